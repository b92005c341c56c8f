/*
 * vmgenid-watch: reseeds the kernel RNG when the VM generation ID changes,
 * for kernels built without the vmgenid driver (Debian's cloud kernel has
 * CONFIG_VIRT_DRIVERS off, so no drivers/virt/vmgenid.c and no
 * add_vmfork_randomness).
 *
 *   vmgenid-watch            watch (what /init runs, in the background)
 *   vmgenid-watch -p         print the current ID in hex and exit
 *
 * The VMM keeps the 16-byte ID at guest-physical 0xFE000 (a page the e820
 * map reserves) and writes a new one on every snapshot restore or clone.
 * Its ACPI notification needs a kernel driver, so this program polls
 * instead: every POLL_MS it reads the 16 bytes through /dev/mem and, when
 * they differ from the last ones seen, writes the new ID into the input
 * pool (RNDADDENTROPY, crediting nothing) and forces a crng reseed
 * (RNDRESEEDCRNG), which is what add_vmfork_randomness does in the kernel.
 * The first read only records the ID.
 *
 * All messages go to the kernel log (/dev/kmsg), never to the console,
 * which is the serial stream the tests read: a change logs
 * `vmgenid-watch: ID changed, crng reseeded` at KERN_NOTICE. If the kernel
 * has its own driver (/sys/bus/acpi/drivers/vmgenid), or there is no
 * VMGENCTR device, it logs one line and exits 0. Exit 1: /dev/mem,
 * /dev/urandom or an ioctl failed; 2: bad usage.
 *
 * Built by the guest image builder with gcc -static and installed as
 * /usr/bin/vmgenid-watch (see docs/images.md).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* vmm/src/layout.rs VMGENID_ADDR; the DSDT's VGEN.ADDR says the same. */
#define VMGENID_ADDR 0xFE000
#define ID_LEN 16
#define POLL_MS 20

#define DRIVER_DIR "/sys/bus/acpi/drivers/vmgenid"
#define ACPI_DEVICES "/sys/bus/acpi/devices"
#define DEVICE_PREFIX "VMGENCTR:"

/* -1 until opened; log_line() falls back to stderr while it is. */
static int kmsg_fd = -1;

/*
 * One line to the kernel log at `level` (a KERN_* digit). The console is
 * left alone: with the guest's `quiet` command line only levels below 4
 * reach it, and every level used here is 4 or 5. Without /dev/kmsg the
 * line goes to stderr, so a broken setup still says something.
 */
static void log_line(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(int level, const char *fmt, ...)
{
	char line[256];
	int n = snprintf(line, sizeof line, "<%d>vmgenid-watch: ", level);
	if (n < 0 || (size_t)n >= sizeof line)
		return;
	va_list ap;
	va_start(ap, fmt);
	/* Leave room for the newline: a truncated message is still worth logging. */
	int m = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		return;
	/*
	 * The newline ends the record: without it printk keeps the record open
	 * for a continuation, and dmesg shows it only once the next one comes.
	 */
	size_t len = strlen(line);
	line[len++] = '\n';
	line[len] = '\0';
	if (kmsg_fd >= 0) {
		/* One write() is one record in /dev/kmsg; on failure fall back to stderr. */
		if (write(kmsg_fd, line, len) == (ssize_t)len)
			return;
	}
	/* Without the "<N>" prefix; stderr is the last resort, so its errors are dropped. */
	(void)fputs(line + n - strlen("vmgenid-watch: "), stderr);
}

/* Reads the ID; 0 on success, else -1 with errno set (EIO for a short read). */
static int read_id(int mem_fd, unsigned char id[ID_LEN])
{
	for (;;) {
		ssize_t n = pread(mem_fd, id, ID_LEN, VMGENID_ADDR);
		if (n == ID_LEN)
			return 0;
		if (n < 0 && errno == EINTR)
			continue;
		if (n >= 0)
			errno = EIO;
		return -1;
	}
}

/* A VMGENCTR ACPI device is described (sysfs names it VMGENCTR:NN). */
static int have_device(void)
{
	DIR *d = opendir(ACPI_DEVICES);
	if (!d)
		return 0;
	int found = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (strncmp(e->d_name, DEVICE_PREFIX, strlen(DEVICE_PREFIX)) == 0) {
			found = 1;
			break;
		}
	}
	/* Read-only directory stream: nothing to lose if closing fails. */
	(void)closedir(d);
	return found;
}

/*
 * The RNDADDENTROPY argument: struct rand_pool_info ends in a flexible
 * array, so this is the same layout with room for the ID (checked below).
 */
struct pool_input {
	int entropy_count;
	int buf_size;
	unsigned char buf[ID_LEN];
};
_Static_assert(offsetof(struct pool_input, entropy_count) == offsetof(struct rand_pool_info, entropy_count), "layout");
_Static_assert(offsetof(struct pool_input, buf_size) == offsetof(struct rand_pool_info, buf_size), "layout");
_Static_assert(offsetof(struct pool_input, buf) == offsetof(struct rand_pool_info, buf), "layout");

/*
 * Mixes `id` into the input pool and reseeds the crng. 0 on success,
 * 1 if the crng is not initialised yet (the ID is still in the pool and
 * goes into its first seed), -1 on error (logged).
 */
static int reseed(int rnd_fd, const unsigned char id[ID_LEN])
{
	struct pool_input in = { .entropy_count = 0, .buf_size = ID_LEN };
	memcpy(in.buf, id, ID_LEN);
	/* Credit 0 bits: the ID is not secret from the host; it only has to differ per copy. */
	if (ioctl(rnd_fd, RNDADDENTROPY, &in) != 0) {
		log_line(4, "RNDADDENTROPY failed: %s", strerror(errno));
		return -1;
	}
	if (ioctl(rnd_fd, RNDRESEEDCRNG) != 0) {
		/* random.c refuses a reseed before crng_ready(). */
		if (errno == ENODATA)
			return 1;
		log_line(4, "RNDRESEEDCRNG failed: %s", strerror(errno));
		return -1;
	}
	return 0;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	/* A signal only shortens one period; the loop reads again either way. */
	(void)clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
}

static int print_id(int mem_fd)
{
	unsigned char id[ID_LEN];
	if (read_id(mem_fd, id) != 0) {
		fprintf(stderr, "vmgenid-watch: reading /dev/mem at 0x%x: %s\n", VMGENID_ADDR, strerror(errno));
		return 1;
	}
	for (int i = 0; i < ID_LEN; i++)
		printf("%02x", id[i]);
	printf("\n");
	return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	int print_only = 0;
	if (argc == 2 && strcmp(argv[1], "-p") == 0) {
		print_only = 1;
	} else if (argc != 1) {
		fprintf(stderr, "usage: vmgenid-watch [-p]\n");
		return 2;
	}

	kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);

	/* O_SYNC is not needed: below 1 MiB /dev/mem reads a cached mapping, coherent with the VMM's writes. */
	int mem_fd = open("/dev/mem", O_RDONLY | O_CLOEXEC);
	if (print_only) {
		if (mem_fd < 0) {
			fprintf(stderr, "vmgenid-watch: /dev/mem: %s\n", strerror(errno));
			return 1;
		}
		return print_id(mem_fd);
	}

	struct stat st;
	if (stat(DRIVER_DIR, &st) == 0) {
		log_line(5, "the kernel's vmgenid driver handles VM generation ID changes; exiting");
		return 0;
	}
	if (!have_device()) {
		log_line(5, "no VMGENCTR device in " ACPI_DEVICES "; nothing to watch, exiting");
		return 0;
	}
	if (mem_fd < 0) {
		log_line(4, "cannot open /dev/mem: %s; not watching", strerror(errno));
		return 1;
	}
	int rnd_fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (rnd_fd < 0) {
		log_line(4, "cannot open /dev/urandom: %s; not watching", strerror(errno));
		return 1;
	}

	unsigned char last[ID_LEN], now[ID_LEN];
	if (read_id(mem_fd, last) != 0) {
		log_line(4, "reading /dev/mem at 0x%x: %s; not watching", VMGENID_ADDR, strerror(errno));
		return 1;
	}
	/*
	 * The VMM never writes an all-zero ID, but /dev/mem shows a low page
	 * as zeros when the kernel counts it as System RAM: then no change
	 * could ever be seen.
	 */
	static const unsigned char zero[ID_LEN];
	if (memcmp(last, zero, ID_LEN) == 0) {
		log_line(4, "the ID at 0x%x reads as zeros (is the page System RAM?); not watching", VMGENID_ADDR);
		return 1;
	}

	for (;;) {
		sleep_ms(POLL_MS);
		if (read_id(mem_fd, now) != 0) {
			log_line(4, "reading /dev/mem at 0x%x: %s; stopped watching", VMGENID_ADDR, strerror(errno));
			return 1;
		}
		if (memcmp(now, last, ID_LEN) == 0)
			continue;
		int r = reseed(rnd_fd, now);
		if (r < 0)
			return 1;
		memcpy(last, now, ID_LEN);
		if (r == 0)
			log_line(5, "ID changed, crng reseeded");
		else
			log_line(5, "ID changed, ID mixed in (crng not initialised yet, no reseed)");
	}
}
