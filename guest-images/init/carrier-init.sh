#!/bin/sh
# /init of the dvisor carrier VM (busybox sh, PID 1).
# Loads KVM (AMD SVM, emulated by QEMU TCG) and virtio-9p, mounts the host's
# root read-write over 9p, chroots into it and runs the host-written command
# script named by `dvisor.cmd=` with stdin/stdout on ttyS1 and stderr on
# ttyS2. With `dvisor.net=ADDR/LEN` (the host forwards ports in; QEMU then
# adds a virtio-net NIC on its user-mode network) it loads virtio_net and
# gives eth0 that address; without, no NIC module is loaded. The exit status goes back to the host as `<rundir>/status` (through
# 9p); then the VM powers off. Everything said here lands in the console log
# (ttyS0) that the host shows when no status comes back.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /host

say() { echo "dvisor-carrier: [$(cut -d" " -f1 /proc/uptime)] $*"; }
die() { say "error: $*"; sync; poweroff -f; }

cmd=; cache=mmap; net=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	dvisor.cmd=*) cmd=${arg#dvisor.cmd=} ;;
	dvisor.9pcache=*) cache=${arg#dvisor.9pcache=} ;;
	dvisor.net=*) net=${arg#dvisor.net=} ;;
	esac
done

while read -r name rel; do
	[ -n "$name" ] || continue
	case "$name" in
	virtio_net | net_failover | failover) [ -n "$net" ] || continue ;;
	esac
	insmod "/lib/modules/$rel" || say "insmod $name failed"
done < /etc/dvisor-modules
say "modules loaded"
[ -c /dev/kvm ] || die "/dev/kvm missing: kvm_amd did not load (QEMU must run with -cpu max so the carrier sees AMD SVM)"

# The NIC of forwarded ports (QEMU user-mode network): static address, no
# default route (the network reaches nothing but QEMU's forwards).
if [ -n "$net" ]; then
	if [ -e /sys/class/net/eth0 ]; then
		if ip link set eth0 up && ip addr add "$net" dev eth0; then
			say "eth0 up as $net"
		else
			say "configuring eth0 as $net failed: forwarded ports will not answer"
		fi
	else
		say "dvisor.net=$net given but there is no eth0: forwarded ports will not answer"
	fi
fi

[ -n "$cmd" ] || die "no dvisor.cmd= on the kernel command line"
run=${cmd%/*}

mount -t 9p -o "trans=virtio,version=9p2000.L,msize=524288,cache=$cache" hostroot /host \
	|| die "mounting the host root (9p tag hostroot) failed"
mount -o bind /proc /host/proc || die "bind /proc failed"
mount -o bind /sys /host/sys || die "bind /sys failed"
mount -o bind /dev /host/dev || die "bind /dev failed"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o ptmxmode=0666,mode=0620 devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
# DVISOR_RUNTIME_DIR of every command (set in cmd.sh): UNIX sockets cannot
# live on the 9p root, so they go to this carrier-local tmpfs.
mkdir -p -m 0700 /host/dev/shm/dvisor
[ -r "/host$cmd" ] || die "command script /host$cmd not visible through 9p"

# ttyS1: stdin+stdout, ttyS2: stderr. Output is raw (bytes pass untouched).
# stdin is canonical with echo off and every editing key disabled except
# VEOF (^D) and VLNEXT (^V): the host quotes ^D, ^V and newline in the data
# with ^V, ends each chunk with ^D (the reader gets it in one read) and sends
# ^D on an empty buffer for end of input, which is how EOF crosses a serial
# line (see StdinEncoder in carrier/run.rs). fds 3/4 keep both ports open
# for the whole run, so settings and received bytes persist and the final
# close drains output before poweroff.
exec 3<>/dev/ttyS1 4<>/dev/ttyS2
stty -F /dev/ttyS1 115200 raw -echo
stty -F /dev/ttyS2 115200 raw -echo
stty -F /dev/ttyS1 icanon iexten eof '^D' lnext '^V' eol undef eol2 undef erase undef kill undef werase undef rprnt undef clocal \
	|| die "stty on ttyS1 failed"

# Pipes, not the ttys themselves, become the command's stdio: programs see
# a non-interactive stdin/stdout/stderr like under a pipe on the host.
mkfifo /run/in /run/err
# dd, not cat: busybox cat copies with sendfile(), which kept a chunk read
# from the tty until the next one arrived (typed lines showed up late).
dd if=/dev/ttyS1 bs=65536 2>/dev/null > /run/in &
inpid=$!
cat /run/err > /dev/ttyS2 &
errpid=$!
: > "/host$run/ready"
say "starting the command"
{
	chroot /host /usr/bin/env -i /bin/sh "$cmd" < /run/in 2> /run/err
	echo $? > /run/rc
} | cat > /dev/ttyS1

# Let stderr drain (bounded: a leftover daemon may hold it open).
i=0
while kill -0 "$errpid" 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
kill "$inpid" "$errpid" 2>/dev/null
rc=$(cat /run/rc 2>/dev/null)
say "command exited with status ${rc:-unknown}"
echo "${rc:-255}" > "/host$run/status.tmp" && mv "/host$run/status.tmp" "/host$run/status"
sync
exec 3>&- 4>&-
poweroff -f
