#!/usr/bin/env bash
# Installs what dvisor needs on a fresh Debian 12 machine. Idempotent.
#   qemu-system-x86  the carrier VM (hosts without VT-x/AMD-V) and the boot benchmark
#   gcc, libc6-dev   build the demo service (static) into the guest image
#   apt, dpkg        fetch and unpack the Debian kernel and busybox packages
#   iproute2, procps, binutils
#                    the tests: tap devices (ip), kill, and nm for program symbols
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v ip >/dev/null || need+=(iproute2)
command -v kill >/dev/null && [ -x /usr/bin/kill ] || need+=(procps)
command -v nm >/dev/null || need+=(binutils)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The image build resolves packages with apt-cache and downloads them with
# apt-get: stale lists name package versions the archive no longer has.
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }
echo "setup: ok"
