#!/usr/bin/env bash
# fleet.sh N: a fleet of N keyhold nodes whose membership comes from a 3-member etcd cluster,
# measured step by step, then taken down again (docs/OPERATOR.md, "Fleets on etcd").
#
# Everything stays on this machine: a network namespace fl-hub holds a bridge and the three
# etcd members (Debian's etcd-server, installed if missing) at 10.78.0.251-253; node I runs in
# namespace flI at 10.78.0.I:7000 with one partition that waits, parked, for a peer that
# never comes. Every node's registration is signed by an operator key made for the run.
# The script prints a table:
#
#   - the time until every node has a link up with every other (times come from the nodes'
#     audit logs: when the last node wrote the record that shows it);
#   - threads, RSS and CPU of each node at idle (mean and max over the nodes);
#   - the time until every other node has dropped a SIGKILLed node (its lease expiring) and
#     has linked a newly started one;
#   - with one etcd member down (quorum holds): a node started then is still linked by all;
#   - with two down (no quorum): whether the links stay, and what the nodes say; then the
#     members come back and the nodes follow etcd again.
#
#   sudo scripts/fleet.sh N [--ttl SECS]     (N from 3 to 240; default TTL 5 s)
#
# Needs root (namespaces), iproute2 and python3. Work files go to $KEYHOLD_FLEET_DIR (default
# target/fleet), removed at the start of a run; the namespaces and processes are removed at
# the end, whatever happens. keyhold is built (release) when cargo is on the PATH, else
# target/release/keyhold or $KEYHOLD_BIN is used.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }
fail() { echo "$(basename "$0"): $1" >&2; exit "${2:-1}"; }

n=${1:-}
[[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 3 ] && [ "$n" -le 240 ] || fail "usage: $0 N [--ttl SECS]   (N from 3 to 240)" 2
shift
ttl=5
while [ $# -gt 0 ]; do
    case "$1" in
        --ttl) ttl=${2:-}; shift ;;
        *) fail "usage: $0 N [--ttl SECS]" 2 ;;
    esac
    shift
done
[[ "$ttl" =~ ^[0-9]+$ ]] && [ "$ttl" -ge 2 ] && [ "$ttl" -le 60 ] || fail "--ttl: 2 to 60" 2
[ "$(id -u)" = 0 ] || fail "network namespaces need root" 2
for tool in ip python3; do command -v "$tool" >/dev/null || fail "$tool is needed" 2; done
if ! command -v etcd >/dev/null; then
    say "installing etcd-server"
    apt-get install -y -q etcd-server >/dev/null || { apt-get update -q && apt-get install -y -q etcd-server >/dev/null; }
fi
for ns in fl-hub $(seq -f "fl%g" "$((n + 1))"); do
    ip netns list | awk '{print $1}' | grep -qxF "$ns" && fail "network namespace $ns exists already (a fleet left behind? ip netns del $ns)" 2
done

if [ -z "${KEYHOLD_BIN:-}" ]; then
    if command -v cargo >/dev/null; then
        say "building keyhold (release)"
        cargo build --release --workspace -q
    fi
    KEYHOLD_BIN=target/release/keyhold
fi
[ -x "$KEYHOLD_BIN" ] || fail "$KEYHOLD_BIN is not an executable keyhold" 2
bin=$(realpath "$KEYHOLD_BIN")
fixtures=$(realpath -m "$(dirname "$bin")/../fixtures")
[ -f "$fixtures/echo.elf" ] || fixtures=$(realpath target/fixtures)
dir=${KEYHOLD_FLEET_DIR:-target/fleet}
rm -rf "$dir"
mkdir -p "$dir"
chmod 700 "$dir"
dir=$(realpath "$dir")

# The kernel's ARP table is one for every namespace: N nodes that each talk to every other
# need about N squared entries, past its default limit of 1024 (the kernel then drops
# packets: "neighbor table overflow"). Raised for the run, put back at the end.
neigh=net.ipv4.neigh.default
old_thresholds=$(sysctl -n "$neigh.gc_thresh1" "$neigh.gc_thresh2" "$neigh.gc_thresh3" | tr '\n' ' ')
want=$(( (n + 5) * (n + 5) * 2 ))
if [ "$want" -gt "$(sysctl -n "$neigh.gc_thresh3")" ]; then
    sysctl -q -w "$neigh.gc_thresh1=$((want / 4))" "$neigh.gc_thresh2=$((want / 2))" "$neigh.gc_thresh3=$want"
fi

declare -A pids=()
etcd_pids=()
cleanup() {
    read -r t1 t2 t3 <<<"$old_thresholds"
    sysctl -q -w "$neigh.gc_thresh1=$t1" "$neigh.gc_thresh2=$t2" "$neigh.gc_thresh3=$t3" || true
    for pid in "${pids[@]}" "${etcd_pids[@]}"; do
        [ "$pid" = - ] || kill -9 "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    for ns in $(seq -f "fl%g" "$((n + 1))") fl-hub; do
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT
# A signal (Ctrl-C, timeout) cleans up too.
trap 'exit 130' INT TERM

say "network: fl-hub with a bridge and etcd at 10.78.0.251-253; fl1..fl$((n + 1)) at 10.78.0.I"
ip netns add fl-hub
ip -n fl-hub link add br0 type bridge
ip -n fl-hub link set br0 up
ip -n fl-hub link set lo up
for m in 1 2 3; do ip -n fl-hub addr add "10.78.0.$((250 + m))/24" dev br0; done
# One namespace more than the fleet: the node started later.
for i in $(seq "$((n + 1))"); do
    ip netns add "fl$i"
    ip link add "fl${i}h" netns fl-hub type veth peer name eth0 netns "fl$i"
    ip -n fl-hub link set "fl${i}h" master br0 up
    ip -n "fl$i" addr add "10.78.0.$i/24" dev eth0
    ip -n "fl$i" link set eth0 up
    ip -n "fl$i" link set lo up
done

members="e1=http://10.78.0.251:2380,e2=http://10.78.0.252:2380,e3=http://10.78.0.253:2380"
endpoints='"http://10.78.0.251:2379", "http://10.78.0.252:2379", "http://10.78.0.253:2379"'
start_etcd() {
    local m=$1 ip="10.78.0.$((250 + $1))"
    setsid ip netns exec fl-hub etcd --name "e$m" --data-dir "$dir/etcd$m" \
        --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
        --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
        --initial-cluster "$members" --initial-cluster-state new \
        >>"$dir/etcd$m.log" 2>&1 </dev/null &
    etcd_pids[$m]=$!
    # Killed on purpose later: no job report for it.
    disown "$!"
}
say "etcd: three members"
for m in 1 2 3; do start_etcd "$m"; done
for _ in $(seq 100); do
    ip netns exec fl-hub python3 -c 'import urllib.request; urllib.request.urlopen(urllib.request.Request("http://10.78.0.251:2379/v3/kv/range", b"{\"key\":\"AA==\"}"), timeout=1)' 2>/dev/null && break
    sleep 0.2
done

say "operator key, node keys and signed registrations"
(umask 077 && "$bin" operator-keygen >"$dir/operator.key")
operator=$("$bin" operator-pubkey <"$dir/operator.key")
for i in $(seq "$((n + 1))"); do
    (umask 077 && "$bin" keygen >"$dir/node$i.key")
    signature=$("$bin" sign-node --operator-key "$dir/operator.key" --id "$i" \
        --address "10.78.0.$i:7000" --public-key "$("$bin" pubkey <"$dir/node$i.key")")
    cat >"$dir/node$i.toml" <<TOML
[node]
id = $i
private_key_file = "node$i.key"
listen = "10.78.0.$i:7000"
audit_log = "audit$i.jsonl"
api_socket = "node$i.sock"

[audit]
records_per_second = 1000
burst = 10000

[etcd]
endpoints = [$endpoints]
lease_ttl_secs = $ttl
operator_public_key = "$operator"
registration_signature = "$signature"

[[partition]]
id = 1
firmware = "$fixtures/echo.elf"
memory_mib = 16
args = "peer=999:1:1"
TOML
done

start_node() {
    setsid ip netns exec "fl$1" "$bin" node --config "$dir/node$1.toml" \
        >>"$dir/node$1.log" 2>&1 </dev/null &
    pids[$1]=$!
    disown "$!"
}
now() { date +%s.%N; }
# after SINCE EVENT [PEER]: seconds from SINCE (epoch seconds) to the last audit record
# EVENT (about node PEER, if given) any node wrote since then: when the last node saw it.
after() { python3 - "$dir" "$@" <<'PY'
import datetime, glob, json, sys
folder, since, event = sys.argv[1], float(sys.argv[2]), sys.argv[3]
peer = int(sys.argv[4]) if len(sys.argv) > 4 else None
last = None
for path in glob.glob(f"{folder}/audit*.jsonl"):
    for line in open(path):
        record = json.loads(line)
        if record.get("event") != event or (peer is not None and record.get("peer") != peer):
            continue
        t = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
        if t >= since and (last is None or t > last):
            last = t
print("?" if last is None else f"{last - since:.2f}")
PY
}
# links_up I J...: whether node I has a link up with each J.
links_up() { "$bin" ctl links --socket "$dir/node$1.sock" 2>/dev/null | python3 -c '
import json, sys
wanted = set(int(p) for p in sys.argv[1:])
up = {l["peer"] for l in json.load(sys.stdin) if l["state"] == "up"}
sys.exit(0 if wanted <= up else 1)' "${@:2}"; }
peer_listed() { "$bin" ctl links --socket "$dir/node$1.sock" 2>/dev/null | grep -q "\"peer\": $2,"; }
# wait_all DESCRIPTION TEST ARGS...: waits (up to 120 s) until TEST ARGS... holds.
wait_all() {
    local what=$1; shift
    for _ in $(seq 1200); do
        "$@" && return 0
        sleep 0.1
    done
    fail "$what did not happen within 120 s (logs in $dir)"
}
every_node_linked() { local i; for i in "${live[@]}"; do links_up "$i" $(printf '%s\n' "${live[@]}" | grep -vx "$i") || return 1; done; }
nobody_lists() { local i; for i in "${live[@]}"; do ! peer_listed "$i" "$1" || return 1; done; }
state_of() { "$bin" ctl membership --socket "$dir/node$1.sock" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("state", "?"))' 2>/dev/null || echo "?"; }
all_in_state() { local i; for i in "${live[@]}"; do [ "$(state_of "$i")" = "$1" ] || return 1; done; }

say "starting $n nodes"
t0=$(now)
live=()
for i in $(seq "$n"); do start_node "$i"; live+=("$i"); done
wait_all "every node linking every other" every_node_linked
converged=$(after "$t0" link_up)
say "every node linked to the $((n - 1)) others after $converged s; idling 10 s"

sleep 5
declare -A ticks0=()
for i in "${live[@]}"; do ticks0[$i]=$(awk '{print $14 + $15}' "/proc/${pids[$i]}/stat"); done
sleep 10
stats=$(for i in "${live[@]}"; do
    pid=${pids[$i]}
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    threads=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    echo "$threads $rss $((ticks - ticks0[$i]))"
done | python3 -c '
import sys, os
hz = os.sysconf("SC_CLK_TCK")
rows = [list(map(int, l.split())) for l in sys.stdin if l.strip()]
threads = [r[0] for r in rows]; rss = [r[1] / 1024 for r in rows]; cpu = [100 * r[2] / hz / 10 for r in rows]
print(f"{sum(threads)/len(rows):.1f} / {max(threads)}|{sum(rss)/len(rows):.1f} / {max(rss):.1f}|{sum(cpu)/len(rows):.2f} / {max(cpu):.2f}|{sum(cpu):.1f}")')
IFS='|' read -r threads rss cpu cpu_total <<<"$stats"

say "SIGKILL node $n: waiting for the others to drop it (lease $ttl s)"
t0=$(now)
kill -9 "${pids[$n]}"
pids[$n]=-
unset "live[$((n - 1))]"
live=("${live[@]}")
wait_all "every node dropping node $n" nobody_lists "$n"
dropped=$(after "$t0" member_removed "$n")

say "starting node $((n + 1)): waiting for every node to link it"
t0=$(now)
start_node "$((n + 1))"
live+=("$((n + 1))")
wait_all "every node linking node $((n + 1))" every_node_linked
joined=$(after "$t0" link_up "$((n + 1))")

say "one etcd member down: quorum holds; node $n starts again and is linked"
kill -9 "${etcd_pids[3]}"
etcd_pids[3]=-
t0=$(now)
start_node "$n"
live+=("$n")
wait_all "every node linking node $n with one etcd member down" every_node_linked
one_down="node $n started again, linked by all in $(after "$t0" link_up "$n") s"

say "two etcd members down: no quorum; the links must stay"
kill -9 "${etcd_pids[2]}"
etcd_pids[2]=-
sleep "$((ttl * 3))"
no_quorum_links=yes
every_node_linked || no_quorum_links=no
states=$(for i in "${live[@]}"; do state_of "$i"; done | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}')
two_down="links all up: $no_quorum_links after $((ttl * 3)) s; nodes say: $states"

say "etcd members back: the nodes follow etcd again"
start_etcd 2
start_etcd 3
t0=$(now)
wait_all "every node synced with etcd again" all_in_state synced
restored=$(after "$t0" membership_restored)

cat <<TABLE

fleet of $n nodes on etcd (3 members), lease $ttl s, one parked partition per node
| step | result |
| --- | --- |
| every node linked to every other | $converged s after the nodes started (the last node's last link) |
| threads per node at idle (mean / max) | $threads |
| RSS per node at idle, MiB (mean / max) | $rss |
| CPU per node at idle, % of one core (mean / max; all nodes) | $cpu ($cpu_total in all) |
| SIGKILLed node dropped by every other | $dropped s after the kill (the last node's member_removed) |
| new node linked by every node | $joined s after its start (the last node's link_up) |
| one etcd member down (quorum holds) | $one_down |
| two etcd members down (no quorum) | $two_down |
| both members back: every node synced again | $restored s |
TABLE
