# Shared by cluster-up.sh and cluster-restart.sh (sourced, not run): how a node of a cluster
# made by cluster-up.sh is started, and how to wait for its links. Expects $dir (the cluster
# directory, absolute) and reads what cluster-up.sh recorded there.

say() { printf '==> %s\n' "$*"; }
fail() { echo "$(basename "$0"): $1" >&2; exit "${2:-1}"; }

# The setting NAME that cluster-up.sh recorded.
setting() { cat "$dir/$1"; }

# start_node I: starts node I in the background (in its namespace, in netns mode) and
# records its process ID as line I of $dir/pids.
start_node() {
    local i=$1 run=()
    [ "$(setting mode)" = netns ] && run=(ip netns exec "$(setting prefix)$i")
    setsid "${run[@]}" "$(setting bin)" node --config "$dir/node$i.toml" \
        >>"$dir/node$i.log" 2>&1 </dev/null &
    local pid=$!
    local n
    n=$(setting size)
    # Line I of the pids file is node I's (the file has N lines, "-" for none yet).
    [ -f "$dir/pids" ] || for _ in $(seq "$n"); do echo -; done >"$dir/pids"
    sed -i "${i}s/.*/$pid/" "$dir/pids"
}

# pid_of I: node I's process ID.
pid_of() { sed -n "${1}p" "$dir/pids"; }

# wait_links I...: waits until each node I has all its links up; fails at once, with the end
# of its log, if one of them has exited.
wait_links() {
    local n i links pending
    n=$(setting size)
    for _ in $(seq 300); do
        pending=0
        for i in "$@"; do
            if ! kill -0 "$(pid_of "$i")" 2>/dev/null; then
                echo "node $i exited; the end of $dir/node$i.log:" >&2
                tail -n 5 "$dir/node$i.log" >&2
                fail "the other nodes still run: cluster-down.sh stops them and cleans up"
            fi
            links=$("$(setting bin)" ctl links --socket "$dir/node$i.sock" 2>/dev/null || true)
            [ "$(grep -c '"up": true' <<<"$links")" = $((n - 1)) ] || pending=1
        done
        [ "$pending" = 0 ] && return 0
        sleep 0.1
    done
    fail "links did not all come up in 30 s; see $dir/node*.log (cluster-down.sh cleans up)"
}

# ours PID: whether PID is still a node this cluster started (and not a process that has
# reused the number since).
ours() {
    local exe
    [ "$1" != - ] || return 1
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    # A binary rebuilt while the node runs shows as "PATH (deleted)".
    [ "${exe% (deleted)}" = "$(setting bin)" ]
}

# stop_node PID: SIGTERM, up to 10 s for a clean stop, then SIGKILL, and waits for it to go.
stop_node() {
    local pid=$1
    ours "$pid" || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        ours "$pid" || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    while ours "$pid"; do sleep 0.1; done
}
