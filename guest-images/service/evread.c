/*
 * evread: prints the key events of a Linux evdev device, one line each.
 *
 *   evread [-n COUNT] [DEVICE]        DEVICE defaults to /dev/input/event0
 *
 * Waits up to ~10 s for DEVICE to appear (evdev creates the node when the
 * keyboard is probed), prints `evread: ready DEVICE`, then for every EV_KEY
 * event `evread: key CODE NAME press|release|repeat` (NAME from a small table
 * of common keys, else "?"), flushing stdout after each line. With -n COUNT
 * it exits (status 0) after COUNT key events; 0 (the default) reads forever.
 * Exit status 1: the device could not be opened or read; 2: bad usage.
 *
 * Built by the guest image builder with gcc -static and installed as
 * /usr/bin/evread (see docs/images.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_DEVICE "/dev/input/event0"
#define OPEN_WAIT_MS 10000
#define OPEN_STEP_MS 100

static const char *const key_names[] = {
	[KEY_ESC] = "esc",
	[KEY_1] = "1", [KEY_2] = "2", [KEY_3] = "3", [KEY_4] = "4", [KEY_5] = "5",
	[KEY_6] = "6", [KEY_7] = "7", [KEY_8] = "8", [KEY_9] = "9", [KEY_0] = "0",
	[KEY_MINUS] = "minus", [KEY_EQUAL] = "equal", [KEY_BACKSPACE] = "backspace", [KEY_TAB] = "tab",
	[KEY_Q] = "q", [KEY_W] = "w", [KEY_E] = "e", [KEY_R] = "r", [KEY_T] = "t",
	[KEY_Y] = "y", [KEY_U] = "u", [KEY_I] = "i", [KEY_O] = "o", [KEY_P] = "p",
	[KEY_ENTER] = "enter", [KEY_LEFTCTRL] = "leftctrl",
	[KEY_A] = "a", [KEY_S] = "s", [KEY_D] = "d", [KEY_F] = "f", [KEY_G] = "g",
	[KEY_H] = "h", [KEY_J] = "j", [KEY_K] = "k", [KEY_L] = "l",
	[KEY_LEFTSHIFT] = "leftshift",
	[KEY_Z] = "z", [KEY_X] = "x", [KEY_C] = "c", [KEY_V] = "v", [KEY_B] = "b",
	[KEY_N] = "n", [KEY_M] = "m",
	[KEY_COMMA] = "comma", [KEY_DOT] = "dot", [KEY_SLASH] = "slash",
	[KEY_RIGHTSHIFT] = "rightshift", [KEY_LEFTALT] = "leftalt", [KEY_SPACE] = "space",
	[KEY_CAPSLOCK] = "capslock", [KEY_RIGHTCTRL] = "rightctrl", [KEY_RIGHTALT] = "rightalt",
	[KEY_UP] = "up", [KEY_DOWN] = "down", [KEY_LEFT] = "left", [KEY_RIGHT] = "right",
};

static const char *key_name(unsigned code)
{
	if (code < sizeof key_names / sizeof key_names[0] && key_names[code])
		return key_names[code];
	return "?";
}

static const char *key_action(int value)
{
	switch (value) {
	case 0: return "release";
	case 1: return "press";
	case 2: return "repeat";
	default: return "?";
	}
}

static void usage(FILE *to)
{
	fprintf(to, "usage: evread [-n COUNT] [DEVICE]\n"
		    "  prints `evread: key CODE NAME press|release|repeat` per key event of DEVICE\n"
		    "  (default " DEFAULT_DEVICE "); -n COUNT: exit after COUNT key events (0 = never)\n");
}

static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Opens `dev`, waiting up to OPEN_WAIT_MS while it does not exist yet. */
static int open_device(const char *dev)
{
	long waited = 0;
	for (;;) {
		int fd = open(dev, O_RDONLY | O_CLOEXEC);
		if (fd >= 0)
			return fd;
		int err = errno;
		int absent = err == ENOENT || err == ENODEV || err == ENXIO;
		if (!absent || waited >= OPEN_WAIT_MS) {
			fprintf(stderr, "evread: cannot open %s: %s", dev, strerror(err));
			if (absent)
				fprintf(stderr, " (waited %ld s; is the evdev module loaded and a keyboard attached?)",
					waited / 1000);
			fputc('\n', stderr);
			return -1;
		}
		sleep_ms(OPEN_STEP_MS);
		waited += OPEN_STEP_MS;
	}
}

int main(int argc, char **argv)
{
	unsigned long limit = 0;
	int opt;
	while ((opt = getopt(argc, argv, "n:h")) != -1) {
		switch (opt) {
		case 'n': {
			char *end;
			errno = 0;
			limit = strtoul(optarg, &end, 10);
			if (errno || end == optarg || *end || optarg[0] == '-') {
				fprintf(stderr, "evread: -n wants a count (0 = forever), got `%s`\n", optarg);
				return 2;
			}
			break;
		}
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (argc - optind > 1) {
		usage(stderr);
		return 2;
	}
	const char *dev = optind < argc ? argv[optind] : DEFAULT_DEVICE;

	int fd = open_device(dev);
	if (fd < 0)
		return 1;
	printf("evread: ready %s\n", dev);
	fflush(stdout);

	unsigned long seen = 0;
	struct input_event ev[64];
	for (;;) {
		ssize_t n = read(fd, ev, sizeof ev);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "evread: reading %s: %s\n", dev, strerror(errno));
			return 1;
		}
		if (n == 0) {
			fprintf(stderr, "evread: %s: end of file\n", dev);
			return 1;
		}
		if ((size_t)n % sizeof ev[0]) {
			fprintf(stderr, "evread: %s: short read of %zd bytes (not an evdev device?)\n", dev, n);
			return 1;
		}
		for (size_t i = 0; i < (size_t)n / sizeof ev[0]; i++) {
			if (ev[i].type != EV_KEY)
				continue;
			printf("evread: key %u %s %s\n", (unsigned)ev[i].code, key_name(ev[i].code),
			       key_action(ev[i].value));
			fflush(stdout);
			if (limit && ++seen >= limit)
				return 0;
		}
	}
}
