#!/usr/bin/env bash
# Builds keyhold and its firmware fixtures, then shows what it does on one machine:
# a partition booting, secure channels between partitions of one node, and a hostile
# partition whose every forgery is refused and audited. Needs read-write /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace
bin=target/release/keyhold

echo
echo "==> one partition: $bin run --firmware target/fixtures/hello.elf"
"$bin" run --firmware target/fixtures/hello.elf

echo
echo "==> one node, three partitions: ping <-> echo over a secure channel, rng reading entropy"
echo "    $bin node --config examples/one-node.toml"
rm -f target/one-node-audit.jsonl
"$bin" node --config examples/one-node.toml --timeout 60

echo
echo "==> a hostile partition beside an honest one: $bin node --config examples/hostile.toml"
rm -f target/hostile-audit.jsonl
"$bin" node --config examples/hostile.toml --timeout 60

echo
echo "==> the audit log of that node (target/hostile-audit.jsonl): decisions by event and reason"
grep -oE '"event":"[a-z_]+","reason":"[a-z_]+"' target/hostile-audit.jsonl | sort | uniq -c
