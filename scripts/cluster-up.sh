#!/usr/bin/env bash
# cluster-up.sh N [--local] [--prefix NAME] [--subnet A.B.C] [--port BASE]:
# N keyhold nodes on this machine, linked into one cluster.
#
# Each node gets its own network namespace (NAME1..NAMEN, default kh1..khN) with a veth pair
# onto a bridge that lives in a namespace of its own (NAME-hub), and the address A.B.C.I/24
# (default 10.77.0.I), port 7000: the nodes reach each other and nothing else, and no traffic
# leaves the machine. That needs root; with --local (for users who are not root) the nodes
# listen on 127.0.0.1, ports BASE+1.. (default 17001..). Keys, configs, logs, audit logs and
# API sockets go to $KEYHOLD_CLUSTER_DIR (default target/cluster). Node I runs an echo
# partition listening for node I-1's ping (wrapping round) and a ping partition talking to
# node I+1's echo. The script waits until every link is up, and fails at once if a node dies.
#
# cluster-restart.sh I restarts node I; cluster-down.sh undoes all of it, removing only the
# namespaces this script made. keyhold is built first when cargo is on the PATH; under sudo
# (whose PATH has no cargo) an existing target/release/keyhold is used, or $KEYHOLD_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-lib.sh

usage() { fail "usage: $0 N [--local] [--prefix NAME] [--subnet A.B.C] [--port BASE]   (N from 2 to 50)" 2; }
n=${1:-}
[[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 2 ] && [ "$n" -le 50 ] || usage
shift
mode=netns prefix=kh subnet=10.77.0 port=17000
while [ $# -gt 0 ]; do
    case "$1" in
        --local) mode=local ;;
        --prefix) prefix=${2:-}; shift ;;
        --subnet) subnet=${2:-}; shift ;;
        --port) port=${2:-}; shift ;;
        *) usage ;;
    esac
    shift
done
# Interface names are at most 15 bytes: NAME, up to two digits and "h".
[[ "$prefix" =~ ^[a-z][a-z0-9]{0,9}$ ]] || fail "--prefix: 1 to 10 lower-case letters and digits, starting with a letter" 2
[[ "$subnet" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || fail "--subnet: three octets, for example 10.77.0" 2
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65000 ] || fail "--port: 1024 to 65000" 2
if [ "$mode" = netns ] && [ "$(id -u)" != 0 ]; then
    fail "network namespaces need root; use --local" 2
fi
dir=${KEYHOLD_CLUSTER_DIR:-target/cluster}
# The directory is this script's alone (cluster-down.sh deletes it): an existing one must be
# empty, or a cluster's (then one is up, or half made).
if [ -e "$dir/.keyhold-cluster" ]; then
    fail "a cluster is already up (or half made) in $dir; run cluster-down.sh first" 2
elif [ -e "$dir" ] && { [ ! -d "$dir" ] || [ -n "$(ls -A "$dir")" ]; }; then
    fail "$dir exists and is not an empty directory; name another with KEYHOLD_CLUSTER_DIR" 2
fi
if [ "$mode" = netns ]; then
    namespaces=$(ip netns list | awk '{print $1}')
    for ns in "$prefix-hub" $(seq -f "$prefix%g" "$n"); do
        grep -qxF "$ns" <<<"$namespaces" && fail "network namespace $ns exists already; pick another --prefix" 2
    done
fi

if [ -z "${KEYHOLD_BIN:-}" ]; then
    if command -v cargo >/dev/null; then
        say "building keyhold (release)"
        cargo build --release --workspace -q
    elif [ -x target/release/keyhold ]; then
        say "cargo is not on the PATH (sudo resets it): using the keyhold already built"
    else
        fail "cargo is not on the PATH (sudo resets it) and keyhold is not built: run 'cargo build --release' as yourself first" 2
    fi
    KEYHOLD_BIN=target/release/keyhold
fi
[ -x "$KEYHOLD_BIN" ] || fail "$KEYHOLD_BIN is not an executable keyhold" 2
bin=$(realpath "$KEYHOLD_BIN")
fixtures=$(realpath -m "$(dirname "$bin")/../fixtures")
[ -f "$fixtures/echo.elf" ] || fixtures=$(realpath target/fixtures)
mkdir -p "$dir"
chmod 700 "$dir"
dir=$(realpath "$dir")
: >"$dir/.keyhold-cluster"
echo "$mode" >"$dir/mode"
echo "$prefix" >"$dir/prefix"
echo "$n" >"$dir/size"
echo "$bin" >"$dir/bin"
: >"$dir/namespaces"

address() { if [ "$mode" = local ]; then echo "127.0.0.1:$((port + $1))"; else echo "$subnet.$1:7000"; fi; }

if [ "$mode" = netns ]; then
    say "network: namespace $prefix-hub with a bridge; $prefix""1..$prefix$n on $subnet.0/24"
    # Each namespace is recorded as soon as it exists, so cluster-down.sh removes exactly these.
    ip netns add "$prefix-hub" || fail "cannot make namespace $prefix-hub; run cluster-down.sh"
    echo "$prefix-hub" >>"$dir/namespaces"
    ip -n "$prefix-hub" link add br0 type bridge
    ip -n "$prefix-hub" link set br0 up
    for i in $(seq "$n"); do
        ip netns add "$prefix$i" || fail "cannot make namespace $prefix$i; run cluster-down.sh"
        echo "$prefix$i" >>"$dir/namespaces"
        ip link add "$prefix${i}h" netns "$prefix-hub" type veth peer name eth0 netns "$prefix$i"
        ip -n "$prefix-hub" link set "$prefix${i}h" master br0 up
        ip -n "$prefix$i" addr add "$subnet.$i/24" dev eth0
        ip -n "$prefix$i" link set eth0 up
        ip -n "$prefix$i" link set lo up
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
    start_node "$i"
    echo "    node $i at $(address "$i"), API $dir/node$i.sock, log $dir/node$i.log"
done

say "waiting for every link to come up"
wait_links $(seq "$n")
say "cluster of $n nodes up: every node linked to the $((n - 1)) others"
