# Redirect get_message() to the patch's version, which returns "v2".
J get_message patched_get_message
