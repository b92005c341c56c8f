#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes outside input
# (docs/security.md). Usage:
#   scripts/fuzz.sh [TARGET|all] [SECONDS]     (default: all, 60 s each)
#   scripts/fuzz.sh --list
# CI runs `scripts/fuzz.sh all 15`. Needs cargo-fuzz (installed here when
# missing) and runs on the stable toolchain, so without a sanitizer
# (`-s none`): a crash is a Rust panic, an abort or a timeout. Findings go
# to fuzz/artifacts/TARGET/; the corpus grows in fuzz/corpus/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
TARGETS=(api_request control_request patch_object patch_commands patch_state dscript snapshot_state i8042)
if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${TARGETS[@]}"
    exit 0
fi
what="${1:-all}"
secs="${2:-60}"
if [[ "$what" == all ]]; then
    run=("${TARGETS[@]}")
elif printf '%s\n' "${TARGETS[@]}" | grep -qx "$what"; then
    run=("$what")
else
    echo "fuzz.sh: no target $what; the targets are: ${TARGETS[*]}" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked >&2
fi
# Seeds: real gcc objects for the patch loader, the D-Script tests' sources,
# a few well-formed lines for the two protocols.
mkdir -p corpus/patch_object corpus/dscript corpus/api_request corpus/control_request corpus/patch_commands
for c in ../guest-images/patches/*.c; do
    o="corpus/patch_object/$(basename "$c" .c).o"
    [[ -e "$o" ]] || gcc -c -O2 -fpic -ffunction-sections -fdata-sections "$c" -o "$o"
done
seed() { [[ -e "$2/$(basename "$1")" ]] || cp "$1" "$2/"; }
while IFS= read -r f; do seed "$f" corpus/dscript; done < <(find ../dscript -name '*.ds')
for f in ../guest-images/patches/*.cmd; do seed "$f" corpus/patch_commands; done
echo '{"id":1,"op":"hello","version":1,"client":"fuzz"}' > corpus/api_request/hello
echo '{"id":2,"op":"read_memory","gpa":4096,"len":16}' > corpus/api_request/read
echo '{"id":1,"op":"status"}' > corpus/control_request/status
echo '{"id":2,"op":"mem","pid":1,"addr":4096,"len":8}' > corpus/control_request/mem
cargo fuzz build -s none -O >&2
status=0
printf '%-16s %12s %8s  %s\n' target executions crashes "artifacts"
for t in "${run[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.log"
    if cargo fuzz run -s none -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        crashes=0
    else
        crashes=1
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    printf '%-16s %12s %8s  %s\n' "$t" "${execs:-?}" "$crashes" "$([[ $crashes == 0 ]] && echo - || echo "fuzz/artifacts/$t/ (see last-run.log)")"
done
exit $status
