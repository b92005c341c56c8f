/*
 * Live patch for the demo service: a new request handler. It answers like
 * the old one (with the off-by-one fixed) and says which handler answered,
 * using the program's own poll/read/snprintf/write/close and globals.
 * It has no writable data, and the old handle_request body it leaves
 * behind (164 bytes) becomes room for later code-only patches.
 */
#include <poll.h>
#include <stdio.h>
#include <unistd.h>

extern volatile unsigned long counter;
extern const char *message_ptr;
extern volatile unsigned long requests_served;

void patched_handle_request(int fd)
{
	char req[512];
	char reply[160];
	struct pollfd p = { .fd = fd, .events = POLLIN };

	if (poll(&p, 1, 50) > 0)
		(void)read(fd, req, sizeof req);
	int len = snprintf(reply, sizeof reply, "counter=%lu message=%s handler=v2\n", counter, message_ptr);
	if (len > 0 && (size_t)len < sizeof reply)
		(void)write(fd, reply, (size_t)len);
	requests_served++;
	close(fd);
}
