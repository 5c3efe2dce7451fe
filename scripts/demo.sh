#!/usr/bin/env bash
# Builds keyhold (and its firmware, which the binary carries) and runs `keyhold demo`: two
# nodes linked over loopback, channels within a node and across nodes, and a hostile partition
# whose forgeries are all refused. Needs read-write /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
exec target/release/keyhold demo
