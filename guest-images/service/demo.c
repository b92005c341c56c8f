/*
 * dvisor demo service: the long-running program inside the default guest
 * that later issues watch and live-patch from outside the VM.
 *
 *  - every config_interval_ms (1000 ms, or `--beat-ms N`, which /init passes
 *    from the kernel command line's `dvisor.beat=N`) prints
 *    "heartbeat <counter> <message>" to stdout (the guest console), where
 *    <message> is get_message(); once a second keeps the console readable
 *    for a person typing at the shell, tests and benchmarks beat faster;
 *  - listens on TCP 0.0.0.0:8080 and answers every connection with one line
 *    "counter=<n> message=<msg>\n" (msg is *message_ptr), then closes it;
 *    with no network it keeps beating.
 *
 * Built with `gcc -static -O2 -g -fno-pie -no-pie`: non-PIE, so every
 * function and global has a fixed address the patcher can find in the ELF's
 * symbol table. The functions are noinline so each has its own body to patch.
 * Patch targets, on purpose kept as plain globals and small functions:
 *   get_message()       returns "v1"; a patch makes it return "v2".
 *   message_ptr         pointer the request handler reports (data patch).
 *   config_interval_ms  heartbeat period (data patch).
 *   counter             the heartbeat counter, lives in memory (VMI reads it).
 *   reply_counter()     contains the deliberate bug below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long counter;
const char *message_ptr = "v1";
volatile int config_interval_ms = 1000;
volatile unsigned long requests_served;

__attribute__((noinline)) const char *get_message(void)
{
	return "v1";
}

/*
 * DELIBERATE BUG (fixed by a live patch in a later issue): an off-by-one,
 * the reply reports the *next* heartbeat number (counter + 1) instead of the
 * current one. The fix is `return counter;`.
 */
__attribute__((noinline)) unsigned long reply_counter(void)
{
	return counter + 1;
}

__attribute__((noinline)) void heartbeat(void)
{
	counter++;
	printf("heartbeat %lu %s\n", counter, get_message());
	fflush(stdout);
}

/* Answers one connection: read whatever request came (briefly), reply, close. */
__attribute__((noinline)) void handle_request(int fd)
{
	char req[512];
	char reply[128];
	struct pollfd p = { .fd = fd, .events = POLLIN };

	if (poll(&p, 1, 50) > 0)
		(void)read(fd, req, sizeof req);
	int len = snprintf(reply, sizeof reply, "counter=%lu message=%s\n", reply_counter(), message_ptr);
	if (len > 0 && (size_t)len < sizeof reply)
		(void)write(fd, reply, (size_t)len);
	requests_served++;
	close(fd);
}

static int listen_tcp(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY) };
	if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 16) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* `--beat-ms N`: the heartbeat period, 10 to 60000 ms. */
static void parse_args(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--beat-ms") == 0 && i + 1 < argc) {
			char *end;
			long ms = strtol(argv[++i], &end, 10);
			if (*end == '\0' && ms >= 10 && ms <= 60000)
				config_interval_ms = (int)ms;
			else
				fprintf(stderr, "demo-service: --beat-ms %s: want 10 to 60000; beating every %d ms\n",
					argv[i], config_interval_ms);
		} else {
			fprintf(stderr, "demo-service: unknown argument %s (usage: demo-service [--beat-ms N])\n", argv[i]);
		}
	}
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	int lfd = listen_tcp(8080);
	if (lfd < 0)
		fprintf(stderr, "demo-service: no TCP listener on :8080 (%s); heartbeats only\n", strerror(errno));
	long long next = now_ms() + config_interval_ms;
	for (;;) {
		long long wait = next - now_ms();
		if (wait <= 0) {
			heartbeat();
			next += config_interval_ms > 0 ? config_interval_ms : 1000;
			/* After a long stall (VM paused), do not burst to catch up. */
			if (next < now_ms())
				next = now_ms() + config_interval_ms;
			continue;
		}
		if (lfd < 0) {
			usleep((useconds_t)wait * 1000);
			continue;
		}
		struct pollfd p = { .fd = lfd, .events = POLLIN };
		if (poll(&p, 1, (int)wait) > 0) {
			int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
			if (c >= 0)
				handle_request(c);
		}
	}
}
