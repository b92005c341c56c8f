#!/usr/bin/env bash
# Creates (or removes) the host side of a dvisor guest's network: a
# persistent tap device for `dvisor run --net tap=NAME`.
#
#   scripts/tap-up.sh NAME HOST_ADDR/PREFIX   create tap NAME owned by the
#                                            invoking user (root if run as
#                                            root without sudo), give it
#                                            HOST_ADDR/PREFIX, bring it up
#   scripts/tap-up.sh --down NAME             delete it
#
# The guest then takes an address in the same subnet from its kernel command
# line, e.g.
#   scripts/tap-up.sh dvtap0 10.0.2.1/24
#   dvisor run --net tap=dvtap0 \
#       --cmdline "console=ttyS0 reboot=k quiet dvisor.ip=10.0.2.15/24 dvisor.gw=10.0.2.1"
#   curl -s --http0.9 http://10.0.2.15:8080/   # the demo service (one raw line, no HTTP)
# Needs iproute2 and root (uses sudo when not root). On hosts without
# hardware KVM, run it inside the carrier, in the same command as the guest
# (the carrier is a separate VM: a tap made on the host is not visible there):
#   dvisor carrier -- sh -c 'scripts/tap-up.sh dvtap0 10.0.2.1/24 && dvisor run --net tap=dvtap0 ...'
set -euo pipefail

prog=${0##*/}
usage() {
    cat >&2 <<EOF
usage: $prog NAME HOST_ADDR/PREFIX    create tap NAME (owned by you), address it, bring it up
       $prog --down NAME              delete tap NAME
example: $prog dvtap0 10.0.2.1/24     then boot the guest with dvisor.ip=10.0.2.15/24
EOF
    exit 2
}
die() { echo "$prog: $*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "must run as root (sudo not found)"
    SUDO=(sudo)
fi
command -v ip >/dev/null || die "\`ip\` not found: run \`apt-get install iproute2\`"

check_name() {
    [[ $1 =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad interface name \`$1\` (1-15 characters of A-Za-z0-9_.-)"
}

if [ "${1:-}" = "--down" ]; then
    [ $# -eq 2 ] || usage
    check_name "$2"
    ip link show dev "$2" >/dev/null 2>&1 || die "no device $2"
    "${SUDO[@]}" ip tuntap del dev "$2" mode tap
    echo "$prog: removed $2"
    exit 0
fi
case "${1:-}" in -h|--help|"") usage ;; esac
[ $# -eq 2 ] || usage
name=$1 addr=$2
check_name "$name"
[[ $addr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]] || die "bad address \`$addr\`: want HOST_ADDR/PREFIX, e.g. 10.0.2.1/24"

# The owner: the user who ran sudo, else the caller (root when run as root).
owner=${SUDO_USER:-$(id -un)}
if ip link show dev "$name" >/dev/null 2>&1; then
    die "device $name already exists (remove it with \`$prog --down $name\`)"
fi
if [ ! -c /dev/net/tun ]; then
    "${SUDO[@]}" modprobe tun 2>/dev/null || true
    [ -c /dev/net/tun ] || die "/dev/net/tun missing: the tun module is not loaded (modprobe tun)"
fi
"${SUDO[@]}" ip tuntap add dev "$name" mode tap user "$owner"
if ! { "${SUDO[@]}" ip addr add "$addr" dev "$name" && "${SUDO[@]}" ip link set dev "$name" up; }; then
    "${SUDO[@]}" ip tuntap del dev "$name" mode tap || true
    die "configuring $name failed; removed it again"
fi
echo "$prog: $name up, owner $owner, host address $addr"
