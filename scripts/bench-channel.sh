#!/usr/bin/env bash
# Secure channels between partitions, on one node and across two nodes linked over loopback,
# next to plain TCP between two processes on loopback, all measured in this run with the same
# message sizes, counts and batches; the ratio is channel throughput over TCP's.
#
# For each size the `ping` fixture sends COUNT messages (batches of BATCH) to `echo` and checks
# every echo; it prints messages/s, MB/s and round-trip percentiles. tcp-pingpong does the same
# over TCP. Beside each path: the system calls and context switches of all its processes per
# round trip (from `perf stat`, when perf is installed), and for the partitions the VM exits
# per round trip as KVM counts them (queue notifications KVM handles itself included), and in
# brackets the same without the page faults of first touching guest memory. Last, channel
# set-ups per second (each a full offer and answer, one after another) on one node and across
# nodes; scripts/bench-cmm.sh measures batched set-ups at scale.
#
#   scripts/bench-channel.sh [COUNT] [BATCH]        (defaults: 5000, 32)
#
# KEYHOLD_BENCH_PREBUILT=1 skips the release build and uses what target/release and
# target/fixtures hold (for a machine with no cargo or no registry, given a copy of them).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
count=${1:-5000}
batch=${2:-32}

if ! command -v perf >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q linux-perf >/dev/null 2>&1 || true
fi
[ "${KEYHOLD_BENCH_PREBUILT:-0}" = 1 ] || cargo build --release --workspace -q
bin=$(realpath target/release/keyhold)
tcp=$(realpath target/release/tcp-pingpong)
fx=$(realpath target/fixtures)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port() { echo $((20000 + RANDOM % 30000)); }

# counted NAME COMMAND...: runs COMMAND, counting its system calls and context switches into
# $work/NAME.perf when perf can.
counted() {
    local name=$1
    shift
    if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
        perf stat -x, -o "$work/$name.perf" -e raw_syscalls:sys_enter,context-switches -- "$@"
    else
        "$@"
    fi
}

# per_trip N NAMES...: syscalls and context switches of the processes NAMES, per round trip.
per_trip() {
    local n=$1
    shift
    local files=()
    for name in "$@"; do [ -f "$work/$name.perf" ] && files+=("$work/$name.perf"); done
    [ ${#files[@]} -eq 0 ] && { echo "syscalls -"; return; }
    awk -F, -v n="$n" '$3 ~ /sys_enter/ { s += $1 } $3 ~ /context-switches/ { c += $1 }
        END { printf "%.1f syscalls, %.1f switches", s / n, c / n }' "${files[@]}"
    rm -f "${files[@]}"
}

# Keys and a two-node cluster on loopback, made once.
two_node_cluster "$bin" "$work"

# cross_node ECHO_ARGS PING_ARGS: runs echo on node 1 and ping on node 2; prints ping's output.
cross_node() {
    ping_echo_configs "$fx" "$work" "$1" "$2"
    counted node1 "$bin" node --config "$work/node1.toml" --timeout 300 >"$work/node1.out" 2>&1 &
    local first=$!
    counted node2 "$bin" node --config "$work/node2.toml" --timeout 300 2>&1 || true
    wait "$first" || true
}

figures() { grep -oE '[0-9]+ msg/s, [0-9]+ MB/s, round trip p50 [0-9]+ us, p99 [0-9]+ us' <<<"$1" || echo "failed"; }
rate() { grep -oE '^[0-9]+' <<<"$1" || echo 0; }

printf '%-6s %-10s %-61s %s\n' size path "msg/s, MB/s, round trip" "vs TCP; per round trip: syscalls, context switches; VM exits ping, echo (without page faults)"
for size in 64 4096 65536; do
    n=$count
    [ "$size" -ge 65536 ] && n=$((count / 5))
    ping_args="count=$n size=$size batch=$batch"

    log=$(counted local "$bin" -v run --partition "1=$fx/echo.elf" --partition "2=$fx/ping.elf" \
        --arg 1="peer=0:2:1" --arg 2="peer=0:1:1 $ping_args" --timeout 300 2>&1)
    local_figures=$(figures "$log")
    [ "$local_figures" = failed ] && echo "one-node run failed: $log" >&2
    local_costs=$(per_trip "$n" local)
    # "partition P: stopped ... after A VM exits (B handled by the VMM, C page faults ...)"
    exits() {
        grep -E "partition $1: stopped .* VM exits" <<<"$2" | awk -v n="$n" '{
            for (i = 1; i <= NF; i++) {
                if ($i == "VM" && $(i + 1) == "exits") all = $(i - 1)
                if ($i == "page" && $(i + 1) == "faults") faults = $(i - 1)
            }
            printf "%.3f (%.3f)", all / n, (all - faults) / n
        }'
    }
    local_exits="$(exits 2 "$log"), $(exits 1 "$log")"

    cross_figures=$(figures "$(cross_node "" "$ping_args")")
    cross_costs=$(per_trip "$n" node1 node2)

    tcp_port=$(port)
    counted tcp-echo "$tcp" echo "$tcp_port" &
    server=$!
    tcp_figures=$(figures "$(counted tcp-ping "$tcp" ping "$tcp_port" "$n" "$size" "$batch")")
    wait "$server" || true
    tcp_costs=$(per_trip "$n" tcp-echo tcp-ping)

    tcp_rate=$(rate "$tcp_figures")
    ratio() { awk -v c="$(rate "$1")" -v t="$tcp_rate" 'BEGIN { if (t > 0) printf "%.3f x TCP", c / t; else print "-" }'; }
    printf '%-6s %-10s %-61s %s\n' "$size" "one node" "$local_figures" "$(ratio "$local_figures"); $local_costs; $local_exits"
    printf '%-6s %-10s %-61s %s\n' "$size" "two nodes" "$cross_figures" "$(ratio "$cross_figures"); $cross_costs"
    printf '%-6s %-10s %-61s %s\n' "$size" "tcp" "$tcp_figures" "1.000 x TCP; $tcp_costs"
done

echo
local_setups=$("$bin" run --partition "1=$fx/echo.elf" --partition "2=$fx/ping.elf" \
    --arg 1="peer=0:2:1 setups=60" --arg 2="peer=0:1:1 count=10 setups=60" --timeout 60 2>&1 |
    grep -oE '[0-9]+ per second' || echo failed)
cross_setups=$(cross_node "setups=60" "count=10 setups=60" | grep -oE '[0-9]+ per second' || echo failed)
# virtio-vsock on one node: the third-party virtio-drivers crate's driver (one packet of 1 to 4000
# bytes per transmit, which it waits for; 4 KiB receive buffers) echoes 10 MiB, every byte checked.
printf '[node]\nid = 1\n\n[[vsock.allow]]\nfrom = "4:*"\nto = "3:5000"\n' >"$work/vsock.toml"
for p in "1 3 role=echo port=5000" "2 4 role=send cid=3 port=5000 bytes=10485760"; do
    read -r id cid args <<<"$p"
    printf '\n[[partition]]\nid = %s\nfirmware = "%s/vsock.elf"\nmemory_mib = 64\nvsock_cid = %s\nargs = "%s"\n' \
        "$id" "$fx" "$cid" "$args" >>"$work/vsock.toml"
done
vsock=$("$bin" node --config "$work/vsock.toml" --timeout 300 2>&1 | grep -oE '[0-9]+ bytes echoed .*' || echo failed)
# The same across two nodes: CID 3 on node 1, CID 4 on node 2, over the cluster's link.
for i in 1 2; do
    if [ "$i" = 1 ]; then cid=3 peer=4 args="role=echo port=5000"; else cid=4 peer=3 args="role=send cid=3 port=5000 bytes=10485760"; fi
    printf '[node]\nid = %s\ncluster = "cluster.toml"\nprivate_key_file = "n%s.key"\n\n[[vsock.allow]]\nfrom = "4:*"\nto = "3:5000"\n\n[[vsock.peer]]\ncid = %s\nnode = %s\npartition = 1\n\n[[partition]]\nid = 1\nfirmware = "%s/vsock.elf"\nmemory_mib = 64\nvsock_cid = %s\nargs = "%s"\n' \
        "$i" "$i" "$peer" "$((3 - i))" "$fx" "$cid" "$args" >"$work/vsock$i.toml"
done
"$bin" node --config "$work/vsock1.toml" --timeout 300 >/dev/null 2>&1 &
echo_node=$!
vsock_cross=$("$bin" node --config "$work/vsock2.toml" --timeout 300 2>&1 | grep -oE '[0-9]+ bytes echoed .*' || echo failed)
wait "$echo_node" || true
rm -f "$work"/*.perf
echo "channel set-ups one after another (OPEN to an answer, 60 of them): one node $local_setups; two nodes $cross_setups"
echo "virtio-vsock, virtio-drivers' driver, 10 MiB echoed: one node $vsock; two nodes $vsock_cross"
echo "VM exits include device set-up and console output (about 100 per partition); page faults"
echo "are the one-time cost of first touching each 4 KiB page of guest memory. System calls and"
echo "context switches count every thread of every process on the path (for a node: vCPUs,"
echo "device thread, link set-up), start-up included."
