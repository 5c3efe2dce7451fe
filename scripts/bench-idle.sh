#!/usr/bin/env bash
# bench-idle.sh [N] [SECS]: what N idle partitions cost their node. One node runs N `echo`
# partitions (16 MiB each) that wait, parked on the idle port, for a peer that never comes;
# once all have booted, the script counts the node's CPU time (all its threads) over SECS
# seconds (default 10) and prints it as a share of one core, with its threads and RSS.
#
#   scripts/bench-idle.sh [N] [SECS]      (defaults: 100, 10)
#
# KEYHOLD_BENCH_PREBUILT=1 skips the release build and uses target/release and target/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
n=${1:-100}
secs=${2:-10}
[[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 500 ] || { echo "N: 1 to 500" >&2; exit 2; }
[[ "$secs" =~ ^[0-9]+$ ]] && [ "$secs" -ge 1 ] || { echo "SECS: a whole number of seconds" >&2; exit 2; }
if [ "${KEYHOLD_BENCH_PREBUILT:-}" != 1 ]; then
    cargo build --release --workspace -q
fi
bin=$(realpath target/release/keyhold)
echo_elf=$(realpath target/fixtures/echo.elf)
work=$(mktemp -d)
node=
cleanup() {
    [ -z "$node" ] || kill "$node" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

{
    printf '[node]\nid = 1\napi_socket = "%s/api.sock"\n' "$work"
    for i in $(seq "$n"); do
        printf '\n[[partition]]\nid = %s\nfirmware = "%s"\nmemory_mib = 16\nargs = "peer=1:%s:9"\n' \
            "$i" "$echo_elf" "$((n + 1))"
    done
} >"$work/node.toml"
"$bin" node --config "$work/node.toml" >"$work/node.log" 2>&1 &
node=$!
# Booted: every partition has said it listens.
for _ in $(seq 600); do
    [ "$(grep -c 'listening for' "$work/node.log" || true)" -ge "$n" ] && break
    kill -0 "$node" 2>/dev/null || { tail -5 "$work/node.log" >&2; exit 1; }
    sleep 0.1
done
sleep 2
read -r share threads rss < <(process_cost "$node" "$secs")
awk -v n="$n" -v secs="$secs" -v share="$share" -v threads="$threads" -v rss="$rss" 'BEGIN {
    printf "%d parked partitions on one node, %d s: %.2f %% of one core in all (%.4f %% each); %d threads, RSS %.0f MiB\n",
        n, secs, share, share / n, threads, rss / 1024 }'
