/*
 * Live patch for the demo service that calls back into the program:
 * get_message() now asks the program's own reply_counter() and reads its
 * global `counter`, and returns "even" or "odd" by the heartbeat number.
 * Both symbols resolve against the demo service's symbol table; parity()
 * is the patch's own function, called like any other.
 */
extern volatile unsigned long counter;
extern unsigned long reply_counter(void);

static const char *const names[2] = { "even", "odd" };

__attribute__((noinline)) static unsigned long parity(unsigned long n)
{
	return n & 1;
}

const char *callback_get_message(void)
{
	unsigned long n = reply_counter();	/* the program's function */

	if (n == 0)
		n = counter;			/* the program's variable */
	return names[parity(n)];		/* the patch's own function */
}
