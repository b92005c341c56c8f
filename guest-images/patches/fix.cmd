# Fix the off-by-one in reply_counter(): report the current heartbeat number.
J reply_counter fixed_reply_counter
