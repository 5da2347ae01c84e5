#!/usr/bin/env bash
# Fuzzes ferry's parsers and protocol handlers (fuzz/, cargo-fuzz + libFuzzer; README,
# "Fuzzing").
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds every target once, replays every kept regression input (fuzz/regressions/<target>/),
# then runs each target (all of them unless named) for SECONDS (default 600), starting from its
# working corpus fuzz/corpus/<target>/ plus fuzz/regressions/<target>/ and fuzz/seeds/<target>/.
# Prints one JSON line per target (target, seconds, execs, crashes, ...) and a table; exits
# nonzero when a regression input fails or any target crashed. A crashing input is left in
# fuzz/artifacts/<target>/ (reproduce: cargo +nightly fuzz run <target> <file>); once fixed,
# keep it in fuzz/regressions/<target>/.
#
# Environment: FUZZ_TARGET_DIR (build directory, default fuzz/target), FUZZ_JOBS (build jobs,
# default 2), FUZZ_TOOLCHAIN (default nightly).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
shift || true
case $seconds in '' | *[!0-9]*)
    echo "fuzz: SECONDS must be a whole number, got '$seconds'" >&2
    exit 2
    ;;
esac
all_targets=(ring_wire ring_handshake textcls_csv job_spec shard_manifest checkpoint_load coordinator_requests)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

toolchain=${FUZZ_TOOLCHAIN:-nightly}
if ! rustup toolchain list | grep -q "^$toolchain"; then
    echo "fuzz: installing the $toolchain toolchain (libFuzzer's instrumentation needs it)"
    rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# The same flags for building and running, so `cargo fuzz run` finds the build up to date.
build=(--target-dir "${FUZZ_TARGET_DIR:-fuzz/target}" --codegen-units 16)
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-2}
fuzz() { cargo "+$toolchain" fuzz "$@"; }

# Per-target libFuzzer options: inputs that are whole files get room to grow.
options() {
    local max_len=4096
    case $1 in shard_manifest | checkpoint_load | coordinator_requests) max_len=16384 ;; esac
    # -timeout: one input running this long is a hang (the network targets' own deadlines are
    # 4-5 s); -rss_limit_mb: libtorch and the sanitizer need more than the default 2 GiB.
    echo "-max_len=$max_len -timeout=30 -rss_limit_mb=6144"
}

echo "fuzz: building ${targets[*]}" >&2
for t in "${targets[@]}"; do
    fuzz build "${build[@]}" "$t"
done

logs=fuzz/artifacts/logs
mkdir -p "$logs"
failed=0

# Every input that once crashed a target must pass.
for t in "${targets[@]}"; do
    dir=fuzz/regressions/$t
    [ -n "$(ls -A "$dir" 2>/dev/null)" ] || continue
    n=$(find "$dir" -type f | wc -l)
    # shellcheck disable=SC2046
    if fuzz run "${build[@]}" "$t" "$dir" -- -runs=0 $(options "$t") >"$logs/$t.replay.log" 2>&1; then
        echo "fuzz: $t: $n regression inputs pass" >&2
    else
        echo "fuzz: $t: a regression input fails (log: $logs/$t.replay.log)" >&2
        grep -m1 -A12 -E '^(==[0-9]+==ERROR|thread .* panicked)' "$logs/$t.replay.log" >&2 ||
            tail -30 "$logs/$t.replay.log" >&2
        failed=1
    fi
done

rows=()
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    inputs=("$corpus")
    for d in fuzz/regressions/$t fuzz/seeds/$t; do
        [ -d "$d" ] && inputs+=("$d")
    done
    before=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    echo "fuzz: running $t for ${seconds}s" >&2
    start=$(date +%s)
    rc=0
    # shellcheck disable=SC2046
    fuzz run "${build[@]}" "$t" "${inputs[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 \
        $(options "$t") >"$logs/$t.log" 2>&1 || rc=$?
    took=$(($(date +%s) - start))
    after=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    crashes=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1 # died without leaving an input (see the log)
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*$' || true)
    if [ -z "$execs" ]; then
        execs=$(grep -o '^#[0-9]*' "$logs/$t.log" | tail -1 | tr -d '#' || true)
    fi
    execs=${execs:-0}
    corpus_size=$(find "$corpus" -type f | wc -l)
    printf '{"target":"%s","seconds":%d,"execs":%d,"crashes":%d,"exit":%d,"corpus":%d,"log":"%s"}\n' \
        "$t" "$took" "$execs" "$crashes" "$rc" "$corpus_size" "$logs/$t.log"
    rows+=("$(printf '%-22s %8d %12d %8d %8d' "$t" "$took" "$execs" "$crashes" "$corpus_size")")
    if [ "$crashes" -gt 0 ]; then
        failed=1
        echo "fuzz: $t crashed; the input is in $artifacts/, the log in $logs/$t.log" >&2
        grep -m1 -A12 -E '^(==[0-9]+==ERROR|thread .* panicked)' "$logs/$t.log" >&2 || tail -20 "$logs/$t.log" >&2
    fi
done

echo
printf '%-22s %8s %12s %8s %8s\n' target seconds execs crashes corpus
for r in "${rows[@]}"; do echo "$r"; done
exit "$failed"
