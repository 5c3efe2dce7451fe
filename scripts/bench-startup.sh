#!/usr/bin/env bash
# Start-up cost of `keyhold run`: the median, over N runs (default 51), of the time from
# keyhold's main() to entering the guest and to the partition's stop, booting `hello`.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-51}

cargo build --release --workspace -q
samples=$(mktemp)
trap 'rm -f "$samples"' EXIT
for _ in $(seq "$runs"); do
    target/release/keyhold -v run --firmware target/fixtures/hello.elf 2>&1 >/dev/null |
        grep -oE '(entering guest|stopped) [0-9.]+ ms' >>"$samples"
done

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
echo "runs: $runs"
echo "main() to entering the guest: median $(grep entering "$samples" | awk '{print $3}' | median) ms"
echo "main() to the partition's stop: median $(grep stopped "$samples" | awk '{print $2}' | median) ms"
