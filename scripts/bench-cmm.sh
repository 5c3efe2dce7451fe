#!/usr/bin/env bash
# The CMM at scale, without guests: channel set-ups per second on one node and across two nodes
# linked over loopback TCP, and the memory each channel costs at a million channels.
#
#   scripts/bench-cmm.sh [LOCAL_CHANNELS] [REMOTE_CHANNELS]     (defaults: 1000000, 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p keyhold-devices --bench cmm -- "${1:-1000000}" "${2:-100000}"
