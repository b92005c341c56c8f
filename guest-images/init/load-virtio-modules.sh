#!/bin/sh
# Loads kernel modules shipped in the initramfs, in dependency order (the
# order is computed at image build time from each module's .modinfo
# `depends=`; see docs/images.md). Already-loaded modules are skipped.
# Installed as /sbin/load-modules, with /sbin/load-virtio-modules a symlink:
#   load-modules [LIST]   LIST: a `name path` file under /lib/modules/<release>/,
#                         default dvisor-load-order (the virtio drivers);
#                         dvisor-boot-modules holds what /init always loads (evdev).
dir=/lib/modules/$(uname -r)
list=$dir/${1:-dvisor-load-order}
me=${0##*/}
[ -r "$list" ] || { echo "$me: $list missing" >&2; exit 1; }
rc=0
while read -r name rel; do
	[ -n "$name" ] || continue
	[ -d "/sys/module/$name" ] && continue
	insmod "$dir/$rel" || { echo "$me: insmod $rel failed" >&2; rc=1; }
done < "$list"
exit $rc
