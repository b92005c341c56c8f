#!/bin/sh
# /init of the dvisor default guest: PID 1, busybox sh.
# Mounts the kernel filesystems, reports what it sees on the console, loads
# vmgenid-watch, evdev (and the virtio drivers when there is a virtio-mmio device),
# configures eth0 from `dvisor.ip=`, starts a shell reading the keyboard's
# VT (tty1) and the demo service, then keeps an interactive shell on the
# serial console.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
export PS1='guest# '

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run /root
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
hostname dvisor-guest
ip link set lo up 2>/dev/null

echo "dvisor-guest: init"
echo "dvisor-guest: cpus=$(grep -c '^processor' /proc/cpuinfo)"

# The cloud kernel has no vmgenid driver: vmgenid-watch reseeds the RNG when
# the VM generation ID changes (snapshot restore, clone). It logs to dmesg
# only, never to the console, and exits at once where the kernel has the
# driver. Started early so a clone of an early snapshot is covered too.
/usr/bin/vmgenid-watch </dev/null >/dev/null &

# evdev on every boot: the PS/2 keyboard (atkbd, built in) then gets
# /dev/input/event0 (read it with /usr/bin/evread).
/sbin/load-modules dvisor-boot-modules || echo "dvisor-guest: loading boot modules (evdev) failed"

# virtio drivers are shipped but loaded only when the VMM describes a
# virtio-mmio device (ACPI id LNRO0005); see /sbin/load-virtio-modules.
if ls /sys/bus/platform/devices/ /sys/bus/acpi/devices/ 2>/dev/null | grep -q -e LNRO0005 -e virtio; then
	/sbin/load-virtio-modules
fi

# Networking from the kernel command line: dvisor.ip=ADDR/PREFIX [dvisor.gw=GW];
# the demo service's heartbeat period: dvisor.beat=MS (default 1000).
net_ip=; net_gw=; beat=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	dvisor.ip=*) net_ip=${arg#dvisor.ip=} ;;
	dvisor.gw=*) net_gw=${arg#dvisor.gw=} ;;
	dvisor.beat=*) beat=${arg#dvisor.beat=} ;;
	esac
done
if [ -n "$net_ip" ]; then
	# virtio_net creates eth0 while it loads; give a slow probe a moment.
	i=0
	while [ ! -e /sys/class/net/eth0 ] && [ -d /sys/module/virtio_net ] && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	case "$net_ip" in
	*/*) ;;
	*) net_ip= ; echo "dvisor-guest: eth0 not configured: dvisor.ip wants ADDR/PREFIX (e.g. dvisor.ip=10.0.2.15/24)" ;;
	esac
	if [ -z "$net_ip" ]; then
		:
	elif [ ! -e /sys/class/net/eth0 ]; then
		echo "dvisor-guest: eth0 missing (dvisor.ip=$net_ip given but no virtio-net device appeared; start the VMM with --net tap=NAME)"
	elif ip addr add "$net_ip" dev eth0 && ip link set eth0 up; then
		echo "dvisor-guest: eth0 $net_ip"
		if [ -n "$net_gw" ]; then
			if ip route add default via "$net_gw" dev eth0; then
				echo "dvisor-guest: default route via $net_gw"
			else
				echo "dvisor-guest: default route via $net_gw failed"
			fi
		fi
	else
		echo "dvisor-guest: eth0 setup failed (ip addr add $net_ip dev eth0)"
	fi
fi

# A shell for the PS/2 keyboard: its keys go to the foreground virtual
# terminal, tty1, not to the serial console. The shell reads commands from
# tty1 (in a session of its own, so tty1 is its controlling tty and Ctrl-C
# on the keyboard interrupts it; it is then restarted) and writes to the
# serial console: typing `echo hi<Enter>` prints `hi` on ttyS0. It runs
# tty1 as a script file (`sh /dev/tty1`), not as stdin: with a tty on stdin
# and stdout ash would turn interactive and print prompts and line-editing
# escapes onto the serial console.
if [ -c /dev/tty1 ]; then
	echo "dvisor-guest: vt shell on tty1"
	(
		while true; do
			setsid sh -c 'exec sh /dev/tty1 </dev/tty1 >/dev/ttyS0 2>&1'
			sleep 1
		done
	) </dev/null >/dev/null 2>&1 &
else
	echo "dvisor-guest: no /dev/tty1; no vt shell"
fi

/usr/bin/demo-service ${beat:+--beat-ms "$beat"} &
echo "dvisor-guest: service started pid=$!"

# Interactive shell on the console (cttyhack makes the console its
# controlling tty so Ctrl-C and job control work); restart it if it exits.
while true; do
	echo "dvisor-guest: shell"
	setsid cttyhack sh
	echo "dvisor-guest: shell exited, restarting"
	sleep 1
done
