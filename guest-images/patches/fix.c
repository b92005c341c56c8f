/*
 * Live patch for the demo service: fixes the off-by-one in reply_counter()
 * (it returned counter + 1). `counter` is the program's global: the linker
 * resolves it against the demo service's symbol table.
 */
extern volatile unsigned long counter;

unsigned long fixed_reply_counter(void)
{
	return counter;
}
