/*
 * Live patch for the demo service: point message_ptr (the string the TCP
 * reply reports) at a string that lives in the patch.
 */
const char patched_message[] = "v2-ptr";
