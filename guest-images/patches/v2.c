/*
 * Live patch for the demo service: get_message() returns "v2".
 * Apply with v2.cmd. Build: see docs/patching.md.
 */
const char *patched_get_message(void)
{
	return "v2";
}
