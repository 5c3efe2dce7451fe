#!/usr/bin/env bash
# cluster-up.sh N [--local]: N keyhold nodes on this machine, linked into one cluster.
#
# Each node gets its own network namespace (kh1..khN) with a veth pair onto a bridge that lives
# in a namespace of its own (kh-hub), and an address 10.77.0.I/24: the nodes reach each other and
# nothing else, and no traffic leaves the machine. With --local (for users who are not root) the
# nodes listen on 127.0.0.1:17000+I instead. Keys, configs, logs, audit logs and API sockets go
# to $KEYHOLD_CLUSTER_DIR (default target/cluster). Node I runs an echo partition listening for
# node I-1's ping (wrapping round) and a ping partition talking to node I+1's echo. The script
# waits until every link is up. cluster-down.sh undoes all of it.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-}
mode=${2:-netns}
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 2 ] || [ "$n" -gt 50 ]; then
    echo "usage: $0 N [--local]   (N from 2 to 50)" >&2
    exit 2
fi
case "$mode" in
    netns) [ "$(id -u)" = 0 ] || { echo "cluster-up.sh: network namespaces need root; use --local" >&2; exit 2; } ;;
    --local) mode=local ;;
    *) echo "usage: $0 N [--local]" >&2; exit 2 ;;
esac
dir=${KEYHOLD_CLUSTER_DIR:-target/cluster}
if [ -e "$dir/pids" ] || { [ "$mode" = netns ] && ip netns list | grep -qE '^kh-hub( |$)'; }; then
    echo "cluster-up.sh: a cluster is already up (in $dir, or namespaces kh-hub/kh*); run cluster-down.sh first" >&2
    exit 2
fi
say() { printf '==> %s\n' "$*"; }

if [ -z "${KEYHOLD_BIN:-}" ]; then
    say "building keyhold (release)"
    cargo build --release --workspace -q
    KEYHOLD_BIN=target/release/keyhold
fi
bin=$(realpath "$KEYHOLD_BIN")
fixtures=$(realpath target/fixtures)
mkdir -p "$dir"
chmod 700 "$dir"
dir=$(realpath "$dir")
echo "$mode" >"$dir/mode"

address() { if [ "$mode" = local ]; then echo "127.0.0.1:$((17000 + $1))"; else echo "10.77.0.$1:7000"; fi; }

if [ "$mode" = netns ]; then
    say "network: namespace kh-hub with bridge br0; kh1..kh$n on 10.77.0.0/24"
    ip netns add kh-hub
    ip -n kh-hub link add br0 type bridge
    ip -n kh-hub link set br0 up
    for i in $(seq "$n"); do
        ip netns add "kh$i"
        ip link add "kh${i}h" netns kh-hub type veth peer name eth0 netns "kh$i"
        ip -n kh-hub link set "kh${i}h" master br0 up
        ip -n "kh$i" addr add "10.77.0.$i/24" dev eth0
        ip -n "kh$i" link set eth0 up
        ip -n "kh$i" link set lo up
    done
fi

say "keys and cluster.toml for $n nodes"
: >"$dir/cluster.toml"
for i in $(seq "$n"); do
    (umask 077 && "$bin" keygen >"$dir/node$i.key")
    printf '[[node]]\nid = %s\naddress = "%s"\npublic_key = "%s"\n\n' \
        "$i" "$(address "$i")" "$("$bin" pubkey <"$dir/node$i.key")" >>"$dir/cluster.toml"
done

say "starting the nodes"
: >"$dir/pids"
for i in $(seq "$n"); do
    prev=$(( (i + n - 2) % n + 1 ))
    next=$(( i % n + 1 ))
    cat >"$dir/node$i.toml" <<TOML
[node]
id = $i
cluster = "cluster.toml"
private_key_file = "node$i.key"
audit_log = "audit$i.jsonl"
api_socket = "node$i.sock"

[[partition]]
id = 1
firmware = "$fixtures/echo.elf"
args = "peer=$prev:2:1"

[[partition]]
id = 2
firmware = "$fixtures/ping.elf"
args = "peer=$next:1:1 count=1000000000 batch=1 interval_ms=200"
TOML
    run=()
    [ "$mode" = netns ] && run=(ip netns exec "kh$i")
    setsid "${run[@]}" "$bin" node --config "$dir/node$i.toml" >"$dir/node$i.log" 2>&1 </dev/null &
    echo $! >>"$dir/pids"
    echo "    node $i at $(address "$i"), API $dir/node$i.sock, log $dir/node$i.log"
done

say "waiting for every link to come up"
for _ in $(seq 300); do
    up=0
    for i in $(seq "$n"); do
        links=$("$bin" ctl --socket "$dir/node$i.sock" links 2>/dev/null || true)
        [ "$(grep -c '"up": true' <<<"$links")" = $((n - 1)) ] && up=$((up + 1))
    done
    if [ "$up" = "$n" ]; then
        say "cluster of $n nodes up: every node linked to the $((n - 1)) others"
        exit 0
    fi
    sleep 0.1
done
echo "cluster-up.sh: links did not all come up in 30 s; see $dir/node*.log" >&2
exit 1
