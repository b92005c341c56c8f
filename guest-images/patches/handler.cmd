# Replace the request handler: replies gain "handler=v2" and report the
# current counter.
J handle_request patched_handle_request
