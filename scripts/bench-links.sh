#!/usr/bin/env bash
# bench-links.sh [LINKS] [PEERS] [SECS]: what links on demand cost a node that knows many
# peers and uses some of them. All nodes run on loopback with links on demand
# (docs/OPERATOR.md, "Links on demand") and one cluster file of PEERS nodes (default 1000):
#
#   - node 1, the one measured, runs one `echo` partition that listens for LINKS peers;
#   - nodes 2..LINKS+1 (default 50) each run a `ping` that opens a channel to it and sends one
#     message a second, parked in between, so that every link stays in use;
#   - the other nodes are only listed (their addresses answer nobody): links on demand never
#     dial them.
#
# Once node 1 shows LINKS links up, the script counts its threads, RSS and CPU time over SECS
# seconds (default 10) and prints them with what its link table says.
#
#   scripts/bench-links.sh [LINKS] [PEERS] [SECS]      (defaults: 50, 1000, 10)
#
# KEYHOLD_BENCH_PREBUILT=1 skips the release build and uses target/release and target/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
links=${1:-50}
peers=${2:-1000}
secs=${3:-10}
[[ "$links" =~ ^[0-9]+$ ]] && [ "$links" -ge 1 ] && [ "$links" -le 60 ] || { echo "LINKS: 1 to 60 (each is a node with a partition)" >&2; exit 2; }
[[ "$peers" =~ ^[0-9]+$ ]] && [ "$peers" -gt "$links" ] && [ "$peers" -le 100000 ] || { echo "PEERS: more than LINKS, at most 100000" >&2; exit 2; }
[[ "$secs" =~ ^[0-9]+$ ]] && [ "$secs" -ge 1 ] || { echo "SECS: a whole number of seconds" >&2; exit 2; }
if [ "${KEYHOLD_BENCH_PREBUILT:-}" != 1 ]; then
    cargo build --release --workspace -q
fi
bin=$(realpath target/release/keyhold)
echo_elf=$(realpath target/fixtures/echo.elf)
ping_elf=$(realpath target/fixtures/ping.elf)
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Keys for the nodes that run; the listed-only nodes get public keys of their own too.
echo "==> $peers keys, $((links + 1)) nodes" >&2
python3 - "$bin" "$work" "$links" "$peers" <<'PY'
import os, subprocess, sys
bin, work, links, peers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(f"{work}/cluster.toml", "w") as cluster:
    for node in range(1, peers + 1):
        private = subprocess.run([bin, "keygen"], capture_output=True, text=True, check=True).stdout
        if node <= links + 1:
            path = f"{work}/{node}.key"
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(private)
        public = subprocess.run([bin, "pubkey"], input=private, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Ports 20000 up for running nodes; listed-only nodes at ports nothing listens on.
        port = 20000 + node if node <= links + 1 else 40000 + node % 20000
        cluster.write(f'[[node]]\nid = {node}\naddress = "127.0.0.1:{port}"\n'
                      f'public_key = "{public}"\n\n')
PY
for node in $(seq $((links + 1))); do
    if [ "$node" = 1 ]; then
        listen=$(seq -s, -f '%g:1:1' 2 $((links + 1)))
        firmware=$echo_elf args="peer=$listen"
    else
        firmware=$ping_elf args="peer=1:1:1 process=1 count=1000000 batch=1 interval_ms=1000"
    fi
    cat >"$work/node-$node.toml" <<EOF
[node]
id = $node
cluster = "$work/cluster.toml"
private_key_file = "$work/$node.key"
api_socket = "$work/$node.sock"

[links]
on_demand = true

[[partition]]
id = 1
firmware = "$firmware"
memory_mib = 16
args = "$args"
EOF
    "$bin" node --config "$work/node-$node.toml" >"$work/node-$node.log" 2>&1 &
    pids+=($!)
done
node1=${pids[0]}
up() { "$bin" ctl --socket "$work/1.sock" links 2>/dev/null | grep -o '"state": *"up"' | wc -l; }
for _ in $(seq 1200); do
    [ "$(up)" -ge "$links" ] && break
    kill -0 "$node1" 2>/dev/null || { tail -5 "$work/node-1.log" >&2; exit 1; }
    sleep 0.1
done
[ "$(up)" -ge "$links" ] || { echo "only $(up) of $links links came up" >&2; exit 1; }
sleep 2
read -r share threads rss < <(process_cost "$node1" "$secs")
names=$(ls "/proc/$node1/task" | while read -r t; do cat "/proc/$node1/task/$t/comm"; done | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')
states=$("$bin" ctl --socket "$work/1.sock" links | python3 -c '
import collections, json, sys
print(", ".join(f"{n} {s}" for s, n in sorted(collections.Counter(l["state"] for l in json.load(sys.stdin)).items())))')
echo "node 1: $((peers - 1)) peers in its directory, $links links in use (one message a second each)"
echo "| threads | $threads ($names) |"
echo "| link table | $states |"
awk -v rss="$rss" 'BEGIN { printf "| RSS | %.1f MiB |\n", rss / 1024 }'
echo "| CPU over $secs s | $share % of one core |"
