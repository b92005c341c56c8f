# Make the TCP reply say message=v2-ptr.
P message_ptr patched_message
