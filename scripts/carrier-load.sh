#!/usr/bin/env bash
# The triple-fault comparison of docs/carrier.md: one guest under a TCP
# client asking its demo service every 10 ms, for SECONDS, under MODE:
#   dvisor       D-Visor with --no-monitor (no pause, no memory access)
#   qemu         QEMU microvm -accel kvm, virtio-net on the same kind of tap
#   mon          D-Visor with its monitor, no requests
#   patch-v2     D-Visor with its monitor, the sample v2 patch applied at 2 s
# Prints one RESULT line. Runs inside the carrier, in a network namespace:
#   dvisor carrier -- unshare -n scripts/carrier-load.sh MODE SECONDS
# Needs python3 (the client) and root (the tap).
set -uo pipefail
MODE=${1:?usage: carrier-load.sh dvisor|qemu|mon|patch-v2 SECONDS}
DUR=${2:-120}
HERE=$(cd "$(dirname "$0")/.." && pwd)
D=${DVISOR:-$HERE/target/debug/dvisor}
[[ -x $D ]] || { echo "carrier-load.sh: no dvisor at $D (cargo build, or set DVISOR)" >&2; exit 2; }
IMG=$($D image path --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dir"])')
LOG=$(mktemp /tmp/carrier-load-console.XXXXXX)
ANS=$(mktemp /tmp/carrier-load-answers.XXXXXX)
ip tuntap add dvt0 mode tap && ip addr add 10.0.2.1/24 dev dvt0 && ip link set dvt0 up && ip link set lo up
CMDL="console=ttyS0 quiet dvisor.ip=10.0.2.15/24"
case $MODE in
qemu)
    sleep 100000 | qemu-system-x86_64 -M microvm -accel kvm -cpu host -nodefaults -no-user-config -nographic \
        -serial stdio -no-reboot -smp 1 -m 256 -kernel "$IMG/bzImage" -initrd "$IMG/initrd.cpio" -append "$CMDL" \
        -netdev tap,id=n0,ifname=dvt0,script=no,downscript=no -device virtio-net-device,netdev=n0 >"$LOG" 2>&1 &
    ;;
dvisor)
    sleep 100000 | $D run --no-monitor --vcpus 1 --name load --net tap=dvt0 --cmdline "$CMDL" >"$LOG" 2>&1 &
    ;;
mon | patch-v2)
    sleep 100000 | $D run --vcpus 1 --name load --net tap=dvt0 --cmdline "$CMDL" >"$LOG" 2>&1 &
    ;;
*) echo "carrier-load.sh: unknown mode $MODE" >&2; exit 2 ;;
esac
for _ in $(seq 180); do grep -q "guest: shell" "$LOG" && break; sleep 1; done
python3 - "$ANS" <<'PY' &
import socket, sys, time
n = 0
out = open(sys.argv[1], "w")
while True:
    try:
        s = socket.create_connection(("10.0.2.15", 8080), timeout=1)
        s.sendall(b"GET\n")
        while s.recv(256):
            pass
        s.close()
        n += 1
        if n % 100 == 0:
            out.write(f"{n}\n"); out.flush()
    except OSError:
        pass
    time.sleep(0.01)
PY
CLIENT=$!
sleep 2
if [[ $MODE == patch-v2 ]]; then
    for _ in $(seq 60); do $D status --vm load >/dev/null 2>&1 && break; sleep 1; done
    $D patch apply --vm load --comm demo-service --object "$IMG/patches/v2.o" --commands "$IMG/patches/v2.cmd" >/dev/null 2>&1 &
fi
T0=$(date +%s)
while (( $(date +%s) - T0 < DUR )); do
    grep -q -E "triple fault|Kernel panic|Oops" "$LOG" && break
    sleep 1
done
crash=$(grep -c -E "triple fault|Kernel panic|Oops" "$LOG")
echo "RESULT $MODE: $(( $(date +%s) - T0 )) s under load, $(tail -1 "$ANS" 2>/dev/null || echo 0) answers, crashes: $crash"
kill $CLIENT 2>/dev/null
kill %1 2>/dev/null
sleep 1
