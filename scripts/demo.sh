#!/usr/bin/env bash
# Builds keyhold and its firmware fixtures, then boots partitions to show what it does.
# Needs read-write access to /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace
bin=target/release/keyhold
fx=target/fixtures

echo
echo "==> one partition: $bin run --firmware $fx/hello.elf"
"$bin" run --firmware "$fx/hello.elf"

echo
echo "==> four partitions at once; one faults, one spins until --timeout"
set +e
"$bin" run --firmware "$fx/hello.elf" --partition "7=$fx/hello.elf" \
    --partition "8=$fx/fault.elf" --partition "9=$fx/spin.elf" --timeout 0.5
status=$?
set -e
echo "exit status $status: the first non-zero status, here the fault's (121)"
