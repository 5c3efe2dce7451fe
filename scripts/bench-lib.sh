# Shared by bench-channel.sh, bench-idle.sh, bench-links.sh and trace-path.sh (sourced, not run).

# process_cost PID SECS: what process PID costs over SECS seconds, all its threads together:
# prints "CPU THREADS RSS", CPU as a percentage of one core, RSS in KiB.
process_cost() {
    local pid=$1 secs=$2 before after
    ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
    before=$(ticks)
    sleep "$secs"
    after=$(ticks)
    awk -v b="$before" -v a="$after" -v s="$secs" -v hz="$(getconf CLK_TCK)" \
        '/^Threads:/ { t = $2 } /^VmRSS:/ { r = $2 } END { printf "%.2f %d %d\n", 100 * (a - b) / hz / s, t, r }' \
        "/proc/$pid/status"
}

# two_node_cluster BIN WORK: node keys and a cluster of nodes 1 and 2 on loopback (random
# ports) in WORK: n1.key, n2.key, cluster.toml.
two_node_cluster() {
    local bin=$1 work=$2 i
    for i in 1 2; do
        (umask 077 && "$bin" keygen >"$work/n$i.key")
    done
    printf '[[node]]\nid = 1\naddress = "127.0.0.1:%s"\npublic_key = "%s"\n\n[[node]]\nid = 2\naddress = "127.0.0.1:%s"\npublic_key = "%s"\n' \
        $((20000 + RANDOM % 30000)) "$("$bin" pubkey <"$work/n1.key")" \
        $((20000 + RANDOM % 30000)) "$("$bin" pubkey <"$work/n2.key")" >"$work/cluster.toml"
}

# ping_echo_configs FIXTURES WORK ECHO_ARGS PING_ARGS: node1.toml (the echo fixture, which
# answers node 2) and node2.toml (ping, which sends to node 1) in WORK, for two_node_cluster.
ping_echo_configs() {
    local fx=$1 work=$2 i fw args
    for i in 1 2; do
        if [ "$i" = 1 ]; then fw=echo args="peer=2:1:1 $3"; else fw=ping args="peer=1:1:1 $4"; fi
        printf '[node]\nid = %s\ncluster = "cluster.toml"\nprivate_key_file = "n%s.key"\n\n[[partition]]\nid = 1\nfirmware = "%s/%s.elf"\nargs = "%s"\n' \
            "$i" "$i" "$fx" "$fw" "$args" >"$work/node$i.toml"
    done
}
