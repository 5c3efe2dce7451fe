# Shared by bench-idle.sh and bench-links.sh (sourced, not run).

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
