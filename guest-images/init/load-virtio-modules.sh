#!/bin/sh
# Loads the virtio modules shipped in the initramfs, in dependency order
# (the order is computed at image build time from each module's .modinfo
# `depends=`; see docs/images.md). Already-loaded modules are skipped.
list=/lib/modules/$(uname -r)/dvisor-load-order
[ -r "$list" ] || { echo "load-virtio-modules: $list missing" >&2; exit 1; }
rc=0
while read -r name rel; do
	[ -n "$name" ] || continue
	[ -d "/sys/module/$name" ] && continue
	insmod "/lib/modules/$(uname -r)/$rel" || { echo "load-virtio-modules: insmod $rel failed" >&2; rc=1; }
done < "$list"
exit $rc
