#!/usr/bin/env bash
# Secure channels between two partitions of one node, next to plain TCP between two processes
# on loopback, measured in the same run with the same message sizes, counts and batches.
#
# For each size: the `ping` fixture sends COUNT messages (batches of BATCH) to `echo` through
# the secure-channel device; it prints messages/s and round-trip percentiles, and keyhold -v
# reports the VM exits each partition took. Then tcp-pingpong does the same over TCP.
#
#   scripts/bench-channel.sh [COUNT] [BATCH]        (defaults: 5000, 32)
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-5000}
batch=${2:-32}
port=$((20000 + RANDOM % 20000))

cargo build --release --workspace -q
bin=target/release/keyhold
fx=target/fixtures

printf '%-7s %-6s %-58s %s\n' size path "result" "VM exits per message (ping, echo)"
for size in 64 4096 65536; do
    n=$count
    [ "$size" -ge 65536 ] && n=$((count / 5))
    log=$("$bin" -v run --partition "1=$fx/echo.elf" --partition "2=$fx/ping.elf" \
        --arg 1="peer=0:2:1" --arg 2="peer=0:1:1 count=$n size=$size batch=$batch" --timeout 300 2>&1)
    result=$(grep -oE 'ping: [0-9]+ messages.*' <<<"$log" || echo "ping failed: $log")
    exits_ping=$(grep -oE 'partition 2: stopped .* after [0-9]+ VM exits' <<<"$log" | grep -oE '[0-9]+ VM' | grep -oE '[0-9]+')
    exits_echo=$(grep -oE 'partition 1: stopped .* after [0-9]+ VM exits' <<<"$log" | grep -oE '[0-9]+ VM' | grep -oE '[0-9]+')
    per=$(awk -v p="$exits_ping" -v e="$exits_echo" -v n="$n" 'BEGIN { printf "%.3f, %.3f", p / n, e / n }')
    printf '%-7s %-6s %-58s %s\n' "$size" channel "${result#ping: }" "$per"

    target/release/tcp-pingpong echo "$port" &
    server=$!
    tcp=$(target/release/tcp-pingpong ping "$port" "$n" "$size" "$batch")
    wait "$server" || true
    printf '%-7s %-6s %s\n' "$size" tcp "${tcp#tcp: }"
    port=$((port + 1))
done
echo
echo "VM exits include device set-up and console output (about 100 per partition)."
