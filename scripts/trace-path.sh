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
# Needs perf (Debian's linux-perf) and root. Uses target/release/keyhold and target/fixtures
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
bin=$(realpath target/release/keyhold)
fx=$(realpath target/fixtures)
[ -x "$bin" ] && [ -f "$fx/ping.elf" ] || {
    echo "trace-path.sh: build first: cargo build --release --workspace" >&2
    exit 2
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

two_node_cluster "$bin" "$work"
# Enough messages at any size that the run outlasts the recording by far (it is stopped then).
ping_echo_configs "$fx" "$work" "" "count=100000000 size=$size batch=$batch"
"$bin" node --config "$work/node1.toml" --timeout 60 >"$work/node1.out" 2>&1 &
first=$!
"$bin" node --config "$work/node2.toml" --timeout 60 >"$work/node2.out" 2>&1 &
second=$!
sleep 2
events=sched:sched_switch,sched:sched_waking,kvm:kvm_mmio
events+=,syscalls:sys_enter_writev,syscalls:sys_enter_futex
events+=,syscalls:sys_enter_epoll_wait,syscalls:sys_exit_epoll_wait
perf record -q -a -e "$events" -o "$work/trace.data" -- sleep "$secs" 2>/dev/null
kill "$first" "$second" 2>/dev/null || true
wait "$first" "$second" 2>/dev/null || true

# Follows one chain of events at a time: a guest's notification, its vCPU thread's writev, the
# other device thread woken, running, waking its guest (or not), that guest running, its
# notification.
perf script -i "$work/trace.data" -F comm,tid,time,event,trace 2>/dev/null | awk '
    function step(name, t) { d[name, ++n[name]] = t - since; since = t }
    {
        comm = $1; t = $3 * 1e6; ev = $4
        if (comm == "p1-vcpu" && ev == "kvm:kvm_mmio:" && $0 ~ /mmio write/) {
            if (at == "running") step(6, t)
            if (at == "spinning") step(7, t)
            at = "exit"; since = t
        } else if (at == "exit" && comm == "p1-vcpu" && ev == "syscalls:sys_enter_writev:") {
            step(1, t); at = "writev"
        } else if (at == "writev" && ev == "sched:sched_waking:" && $0 ~ /comm=devices/) {
            step(2, t); at = "woken"
        } else if (at == "woken" && comm == "devices" && ev == "syscalls:sys_exit_epoll_wait:") {
            step(3, t); at = "receiving"
        } else if (at == "receiving" && comm == "devices" && ev == "syscalls:sys_enter_futex:") {
            step(4, t); at = "waking"
        } else if (at == "receiving" && comm == "devices" && ev == "syscalls:sys_enter_epoll_wait:") {
            step(4, t); at = "spinning"
        } else if (at == "waking" && ev == "sched:sched_switch:" && $0 ~ /next_comm=p1-vcpu/) {
            step(5, t); at = "running"
        }
    }
    function median(name,   i, j, k, v, m) {
        m = n[name]
        for (i = 1; i <= m; i++) v[i] = d[name, i]
        for (i = 2; i <= m; i++) { k = v[i]; for (j = i - 1; j >= 1 && v[j] > k; j--) v[j + 1] = v[j]; v[j + 1] = k }
        return m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
    }
    END {
        split("exit -> writev (transmit work),writev -> wake-up (loopback TCP),wake-up -> running,receive work (device thread),guest wake -> running,running -> notify (guest),delivered -> notify (spinning guest)", names, ",")
        for (s = 1; s <= 7; s++) {
            if (n[s] == 0) { printf "%-38s not seen\n", names[s]; continue }
            printf "%-38s median %6.1f us  (%d seen)\n", names[s], median(s), n[s]
        }
        total = median(1) + median(2) + median(3) + median(4)
        total += n[6] >= n[7] ? median(5) + median(6) : median(7)
        printf "%-38s %6.1f us (by the path most chains took)\n", "half a round trip", total
    }'
