#!/usr/bin/env bash
# cluster-down.sh: stops the nodes cluster-up.sh started and removes the network namespaces it
# made (those it recorded, no others), and its keys, configs and logs ($KEYHOLD_CLUSTER_DIR,
# default target/cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${KEYHOLD_CLUSTER_DIR:-target/cluster}
say() { printf '==> %s\n' "$*"; }

if [ -f "$dir/pids" ]; then
    say "stopping the nodes (SIGTERM: partitions stop, links say goodbye)"
    pids=$(grep -E '^[0-9]+$' "$dir/pids" || true)
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        alive=0
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
fi
if [ -s "$dir/namespaces" ]; then
    say "removing network namespaces $(tr '\n' ' ' <"$dir/namespaces")"
    while read -r ns; do
        ip netns del "$ns" 2>/dev/null || true
    done <"$dir/namespaces"
fi
say "removing $dir"
rm -rf "$dir"
