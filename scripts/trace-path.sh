#!/usr/bin/env bash
# Where a two-node round trip's time goes, step by step (docs/PERFORMANCE.md, "The critical
# path"). Runs `ping` on node 2 against `echo` on node 1 over loopback, records scheduler,
# system-call and KVM tracepoints on both nodes for SECS seconds in the middle of the run, and
# prints the median of each step of a half round trip (one node's message to the other's
# guest):
#
#   exit -> writev        the notification's exit reaching the VMM, the transmit work on the
#                         vCPU thread (CMM checks, sealing, the record), up to the write
#   writev -> wake-up     the kernel's loopback TCP path, up to waking the other device thread
#   wake-up -> running    until that thread runs (an idle core's wake-up on a VM host)
#   receive work          the device thread: read, open, check, deliver into the guest
# then, for a guest that had parked:
#   guest wake -> running the parked vCPU's futex wake-up until its thread runs
#   running -> notify     entering the guest, the guest's own work, its next notification
# or, for a guest still spinning (no wake-up needed):
#   delivered -> notify   the guest's own work until its next notification
#
# The half round trip adds up the steps of the path most chains took.
#
#   scripts/trace-path.sh [SIZE] [BATCH] [SECS]        (defaults: 64, 32, 0.3)
#
# Needs perf (Debian's linux-perf) and root (tracepoints on every CPU). Uses target/release/keyhold and target/fixtures
# as built (cargo build --release --workspace). Tracing costs a few microseconds per event, so
# the steps come out longer than untraced: compare steps, and compare runs of this script.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
size=${1:-64}
batch=${2:-32}
secs=${3:-0.3}

if ! command -v perf >/dev/null; then
    echo "trace-path.sh: needs perf (apt-get install linux-perf)" >&2
    exit 2
fi
if [ ! -x target/release/keyhold ] || [ ! -f target/fixtures/ping.elf ]; then
    echo "trace-path.sh: build first: cargo build --release --workspace" >&2
    exit 2
fi
bin=$(realpath target/release/keyhold)
fx=$(realpath target/fixtures)
work=$(mktemp -d)
first='' second=''
cleanup() {
    kill $first $second 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

two_node_cluster "$bin" "$work"
# Enough messages at any size that the run outlasts the recording (it is stopped then).
ping_echo_configs "$fx" "$work" "" "count=100000000 size=$size batch=$batch"
timeout=$((${secs%.*} + 30))
"$bin" node --config "$work/node1.toml" --timeout "$timeout" >"$work/node1.out" 2>&1 &
first=$!
"$bin" node --config "$work/node2.toml" --timeout "$timeout" >"$work/node2.out" 2>&1 &
second=$!
sleep 2
for pid in $first $second; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "trace-path.sh: a node stopped before the recording:" >&2
        tail -n 5 "$work/node1.out" "$work/node2.out" >&2
        exit 1
    fi
done
events=sched:sched_switch,sched:sched_waking,kvm:kvm_mmio
events+=,syscalls:sys_enter_writev,syscalls:sys_enter_futex
events+=,syscalls:sys_enter_epoll_wait,syscalls:sys_exit_epoll_wait
perf record -q -a -e "$events" -o "$work/trace.data" -- sleep "$secs"

# Follows one chain of events at a time, by thread: a guest's transmit notification (a write
# of queue 1 to the notify register, offset 0x50), its vCPU thread's writev, the other node's
# device thread woken and running, waking that node's guest (FUTEX_WAKE) or not (back to
# epoll_wait), that guest's vCPU thread running, its own transmit notification. Prints each
# step's durations as "STEP MICROSECONDS".
perf script -i "$work/trace.data" -F comm,pid,tid,time,event,trace 2>/dev/null | awk '
    function step(s, t) { print s, t - since; since = t }
    {
        comm = $1; split($2, id, "/"); pid = id[1]; tid = id[2]; t = $3 * 1e6; ev = $4
        process[tid] = pid
        if (comm == "p1-vcpu" && ev == "kvm:kvm_mmio:" && $0 ~ /mmio write len 4 gpa 0x[0-9a-f]*050 val 0x1$/) {
            if (at == "running" && tid == vcpu) step(6, t)
            if (at == "spinning" && pid == receiver) step(7, t)
            at = "exit"; since = t; sender = pid; notifier = tid
        } else if (at == "exit" && tid == notifier && ev == "syscalls:sys_enter_writev:") {
            step(1, t); at = "writev"
        } else if (at == "writev" && ev == "sched:sched_waking:" && $0 ~ /comm=devices /) {
            match($0, /pid=[0-9]+/); woken = substr($0, RSTART + 4, RLENGTH - 4)
            if (process[woken] != sender) { step(2, t); at = "woken" }
        } else if (at == "woken" && tid == woken && ev == "syscalls:sys_exit_epoll_wait:") {
            step(3, t); at = "receiving"; receiver = pid
        } else if (at == "receiving" && tid == woken && ev == "syscalls:sys_enter_futex:" && $0 ~ /op: 0x0*81,/) {
            step(4, t); at = "waking"
        } else if (at == "receiving" && tid == woken && ev == "syscalls:sys_enter_epoll_wait:") {
            step(4, t); at = "spinning"
        } else if (at == "waking" && ev == "sched:sched_switch:" && $0 ~ /next_comm=p1-vcpu /) {
            match($0, /next_pid=[0-9]+/); next_tid = substr($0, RSTART + 9, RLENGTH - 9)
            if (process[next_tid] == receiver) { step(5, t); at = "running"; vcpu = next_tid }
        }
    }' | sort -k1,1n -k2,2n | awk '
    { d[$1, ++n[$1]] = $2 }
    function median(s,   m) { m = n[s]; return m % 2 ? d[s, (m + 1) / 2] : (d[s, m / 2] + d[s, m / 2 + 1]) / 2 }
    END {
        split("exit -> writev (transmit work),writev -> wake-up (loopback TCP),wake-up -> running,receive work (device thread),guest wake -> running,running -> notify (guest),delivered -> notify (spinning guest)", names, ",")
        for (s = 1; s <= 7; s++) {
            if (n[s] == 0) { printf "%-38s not seen\n", names[s]; continue }
            printf "%-38s median %6.1f us  (%d seen)\n", names[s], median(s), n[s]
        }
        parked = n[6] >= n[7]
        if (!n[1] || !n[2] || !n[3] || !n[4] || (parked ? !n[5] || !n[6] : !n[7])) {
            print "no whole half round trip was seen: is the run up, and were the tracepoints recorded?"
            exit 1
        }
        total = median(1) + median(2) + median(3) + median(4)
        total += parked ? median(5) + median(6) : median(7)
        printf "%-38s %6.1f us (by the path most chains took)\n", "half a round trip", total
    }'
