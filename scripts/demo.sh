#!/usr/bin/env bash
# Builds keyhold (and its firmware, which the binary carries) and runs `keyhold demo`: two
# nodes linked over loopback, channels within a node and across nodes, and a hostile partition
# whose forgeries are all refused. Needs read-write /dev/kvm, which it checks before building.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /dev/kvm ]; then
    echo "demo: /dev/kvm does not exist: load the kvm module (or use a host with virtualisation)" >&2
    exit 2
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "demo: this user may not open /dev/kvm: run as root or join the group owning it (usually kvm)" >&2
    exit 2
fi
echo "demo: building keyhold and its guest firmware (release; a few minutes the first time)" >&2
cargo build --release --workspace
exec target/release/keyhold demo
