#!/bin/sh
# /init of the dvisor default guest: PID 1, busybox sh.
# Mounts the kernel filesystems, reports what it sees on the console, starts
# the demo service, then keeps an interactive shell on the console.
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

# virtio drivers are shipped but loaded only when the VMM describes a
# virtio-mmio device (ACPI id LNRO0005); see /sbin/load-virtio-modules.
if ls /sys/bus/platform/devices/ /sys/bus/acpi/devices/ 2>/dev/null | grep -q -e LNRO0005 -e virtio; then
	/sbin/load-virtio-modules
fi

/usr/bin/demo-service &
echo "dvisor-guest: service started pid=$!"

# Interactive shell on the console (cttyhack makes the console its
# controlling tty so Ctrl-C and job control work); restart it if it exits.
while true; do
	echo "dvisor-guest: shell"
	setsid cttyhack sh
	echo "dvisor-guest: shell exited, restarting"
	sleep 1
done
