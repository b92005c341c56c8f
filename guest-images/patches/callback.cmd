# get_message() returns "even" or "odd", computed with the program's own
# reply_counter() and counter.
J get_message callback_get_message
