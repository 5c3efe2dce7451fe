#!/usr/bin/env bash
# Coverage-guided fuzzing of keyhold's outside inputs (docs/FUZZING.md).
#
#   scripts/fuzz.sh TARGET|all SECONDS [LIBFUZZER_ARGS...]   fuzz each target for SECONDS
#   scripts/fuzz.sh check                                    every target over its seed corpus
#                                                            and its saved regressions (CI)
#   scripts/fuzz.sh build                                    build the targets only
#   scripts/fuzz.sh list                                     the targets
#   scripts/fuzz.sh corpus                                   regenerate fuzz/corpus/ (seeds)
#
# The fuzzer is libFuzzer, through the `libfuzzer-sys` crate (it builds libFuzzer's C++ sources
# with the system C++ compiler). Coverage instrumentation is LLVM's SanitizerCoverage, enabled
# with stable rustc flags (`-C passes=sancov-module` and `-C llvm-args=...`, exactly those that
# `cargo fuzz --sanitizer none` passes), so the stable toolchain is enough: no nightly, no
# RUSTC_BOOTSTRAP, no cargo-fuzz. Panics abort (the fuzz profile sets panic = "abort"), and
# overflow checks and debug assertions are on.
#
# New inputs the fuzzer finds go to fuzz/target/corpus/TARGET (not in git); crashes to
# fuzz/artifacts/TARGET/. Minimise one with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET -minimize_crash=1 -runs=100000 CRASH
# and save it under fuzz/regressions/TARGET/, which `check` replays.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ=$ROOT/fuzz
TARGETS=(wire abi mmio rng_queue channel_queue vsock_queue link api node_config cluster_config)
TRIPLE=x86_64-unknown-linux-gnu
# The fuzz crate's own target dir, also for the firmware fixtures that keyhold-vmm's build
# script makes, so a fuzz build never touches the main build's target/.
export CARGO_TARGET_DIR=$FUZZ/target
BIN=$CARGO_TARGET_DIR/$TRIPLE/release
# FUZZ_FEATURES="--no-default-features" builds the device and link targets without keyhold-vmm.
read -r -a FUZZ_FEATURES <<<"${FUZZ_FEATURES:-}"

say() { printf '==> %s\n' "$*" >&2; }

install_deps() {
    # libfuzzer-sys compiles libFuzzer (C++) with the cc crate.
    if ! command -v c++ >/dev/null; then
        say "installing a C++ compiler (libFuzzer's runtime is C++)"
        apt-get install -y -q g++ >/dev/null || { apt-get update -q && apt-get install -y -q g++; }
    fi
}

build() {
    install_deps
    say "building the fuzz targets (stable rustc, SanitizerCoverage)"
    # --target keeps these flags off build scripts and proc macros, as cargo fuzz does.
    local flags=(
        -Cpasses=sancov-module
        -Cllvm-args=-sanitizer-coverage-level=4
        -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
        -Cllvm-args=-sanitizer-coverage-pc-table
        -Cllvm-args=-sanitizer-coverage-trace-compares
        --cfg=fuzzing
    )
    # The wrapper leaves third-party cryptography uninstrumented (fuzz/rustc-wrapper.sh).
    (cd "$FUZZ" && RUSTFLAGS="${flags[*]}" RUSTC_WRAPPER="$FUZZ/rustc-wrapper.sh" \
        cargo build --release --target "$TRIPLE" --bins "${FUZZ_FEATURES[@]}")
}

corpus() {
    say "regenerating the seed corpora in fuzz/corpus/"
    # An ordinary (uninstrumented) build of the generator, in a target dir of its own.
    (cd "$FUZZ" && CARGO_TARGET_DIR=$FUZZ/target/plain cargo run --release --no-default-features \
        --example make_corpus -- "$FUZZ/corpus")
}

known() {
    local t
    for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
    return 1
}

# Runs TARGET over its seeds and regressions once each (no fuzzing).
replay() {
    local t=$1
    local inputs=("$FUZZ/corpus/$t")
    [ -d "$FUZZ/regressions/$t" ] && inputs+=("$FUZZ/regressions/$t")
    local log
    log=$(mktemp)
    if "$BIN/$t" -runs=0 -timeout=30 "${inputs[@]}" >"$log" 2>&1; then
        printf '%-15s %s\n' "$t" "$(grep -ao 'INITED.*' "$log" | tail -1 || echo ok)"
        rm -f "$log"
    else
        cat "$log" >&2
        rm -f "$log"
        say "$t failed on its corpus"
        return 1
    fi
}

fuzz() {
    local t=$1 secs=$2
    shift 2
    local work=$CARGO_TARGET_DIR/corpus/$t
    mkdir -p "$work" "$FUZZ/artifacts/$t" "$CARGO_TARGET_DIR/logs"
    local log=$CARGO_TARGET_DIR/logs/$t.log
    say "fuzzing $t for ${secs}s (log: $log)"
    # The first corpus directory gets the new inputs; the seeds in git stay as they are.
    "$BIN/$t" -max_total_time="$secs" -print_final_stats=1 -timeout=20 \
        -artifact_prefix="$FUZZ/artifacts/$t/" "$@" "$work" "$FUZZ/corpus/$t" 2>&1 | tee "$log" |
        grep -aE '^#[0-9]+ +(pulse|REDUCE|NEW|DONE)|^(stat::|==|SUMMARY|INFO: a leak|Done)' | tail -n 3 >&2 || true
    local status=${PIPESTATUS[0]}
    grep -aE '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::average_exec_per_sec)' "$log" >&2 || true
    if [ "$status" -ne 0 ]; then
        say "$t stopped with status $status: see $log and fuzz/artifacts/$t/"
        return "$status"
    fi
}

case "${1:-}" in
    build) build ;;
    list) printf '%s\n' "${TARGETS[@]}" ;;
    corpus) corpus ;;
    check)
        build
        say "replaying every seed corpus and saved regression"
        failed=0
        for t in "${TARGETS[@]}"; do replay "$t" || failed=1; done
        exit $failed
        ;;
    all | *)
        [ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
        target=$1 secs=$2
        shift 2
        if [ "$target" != all ] && ! known "$target"; then
            say "no target $target; targets: ${TARGETS[*]}"
            exit 2
        fi
        build
        failed=0
        if [ "$target" = all ]; then
            for t in "${TARGETS[@]}"; do fuzz "$t" "$secs" "$@" || failed=1; done
        else
            fuzz "$target" "$secs" "$@" || failed=1
        fi
        exit $failed
        ;;
esac
