/*
 * spin-demo: a position-independent (static-pie) program whose one thread
 * sits inside functions on demand, for the live patcher's safety checks
 * and its PIE load-base resolution.
 *
 *   1. prints "spin-demo pid=<pid> spinning", then busy-loops *inside*
 *      spin_here() (its RIP is in the function) until SIGUSR1;
 *   2. prints "spin-demo left spin_here", then sleeps in a loop inside
 *      wait_here() (RIP in the C library, a return address into wait_here()
 *      on its stack) until SIGUSR2;
 *   3. prints "spin-demo says <spin_here()>" every 200 ms, forever.
 *
 * spin_here() returns "spin v1"; a live patch makes it say something else.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static volatile sig_atomic_t hold_spin = 1;
static volatile sig_atomic_t hold_wait = 1;

static void release(int sig)
{
	if (sig == SIGUSR1)
		hold_spin = 0;
	else
		hold_wait = 0;
}

__attribute__((noinline)) const char *spin_here(void)
{
	/* The `pause` matters in the carrier: a bare `while (hold_spin);`
	 * loop triple-faulted the nested guest within seconds in 2 of 3
	 * boots, with nothing else going on (docs/carrier.md). */
	while (hold_spin)
		__asm__ volatile("pause");
	return "spin v1";
}

__attribute__((noinline)) void wait_here(void)
{
	while (hold_wait)
		usleep(20000);
	/* Keeps this a real call frame, not a tail call into usleep. */
	__asm__ volatile("" ::: "memory");
}

int main(void)
{
	signal(SIGUSR1, release);
	signal(SIGUSR2, release);
	printf("spin-demo pid=%d spinning\n", getpid());
	fflush(stdout);
	spin_here();
	printf("spin-demo left spin_here\n");
	fflush(stdout);
	wait_here();
	for (;;) {
		printf("spin-demo says %s\n", spin_here());
		fflush(stdout);
		usleep(200000);
	}
}
