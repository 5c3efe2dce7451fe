#!/usr/bin/env bash
# cluster-down.sh: stops the nodes cluster-up.sh started and removes their namespaces, keys,
# configs and logs ($KEYHOLD_CLUSTER_DIR, default target/cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${KEYHOLD_CLUSTER_DIR:-target/cluster}
say() { printf '==> %s\n' "$*"; }

if [ -f "$dir/pids" ]; then
    say "stopping the nodes (SIGTERM: partitions stop, links say goodbye)"
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done <"$dir/pids"
    for _ in $(seq 50); do
        alive=0
        while read -r pid; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done <"$dir/pids"
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    while read -r pid; do
        kill -9 "$pid" 2>/dev/null || true
    done <"$dir/pids"
fi
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && ip netns list | grep -qE '^kh(-hub|[0-9]+)( |$)'; then
    say "removing network namespaces kh-hub and kh1..khN"
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^kh([0-9]+|-hub)$' || true); do
        ip netns del "$ns"
    done
fi
say "removing $dir"
rm -rf "$dir"
