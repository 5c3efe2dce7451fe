#!/usr/bin/env bash
# cluster-down.sh: stops the nodes cluster-up.sh started and removes the network namespaces it
# made (those it recorded, no others) and its directory ($KEYHOLD_CLUSTER_DIR, default
# target/cluster) with the keys, configs and logs in it. A directory cluster-up.sh did not
# make is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-lib.sh
dir=${KEYHOLD_CLUSTER_DIR:-target/cluster}
[ -e "$dir" ] || { say "nothing to do: $dir does not exist"; exit 0; }
[ -e "$dir/.keyhold-cluster" ] || fail "$dir was not made by cluster-up.sh; leaving it alone" 2
dir=$(realpath "$dir")

if [ -f "$dir/pids" ] && [ -f "$dir/bin" ]; then
    say "stopping the nodes (SIGTERM: partitions stop, links say goodbye)"
    while read -r pid; do stop_node "$pid" & done <"$dir/pids"
    wait
fi
if [ -s "$dir/namespaces" ]; then
    say "removing network namespaces $(tr '\n' ' ' <"$dir/namespaces")"
    while read -r ns; do
        ip netns del "$ns" 2>/dev/null || true
    done <"$dir/namespaces"
fi
say "removing $dir"
rm -rf "$dir"
