#!/usr/bin/env bash
# cluster-restart.sh I: restarts node I of the cluster cluster-up.sh made ($KEYHOLD_CLUSTER_DIR,
# default target/cluster), as an operator restarts a host: SIGTERM (its partitions stop and
# its links say goodbye), then the same node with the same config, key and address; returns
# once its links are all up again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-lib.sh
dir=${KEYHOLD_CLUSTER_DIR:-target/cluster}
[ -f "$dir/pids" ] || fail "no cluster in $dir (cluster-up.sh makes one)" 2
dir=$(realpath "$dir")
i=${1:-}
[[ "$i" =~ ^[0-9]+$ ]] && [ "$i" -ge 1 ] && [ "$i" -le "$(setting size)" ] ||
    fail "usage: $0 I   (a node from 1 to $(setting size))" 2

say "stopping node $i (SIGTERM)"
stop_node "$(pid_of "$i")"
say "starting node $i again"
start_node "$i"
wait_links "$i"
say "node $i is back: linked to the $(( $(setting size) - 1 )) others"
