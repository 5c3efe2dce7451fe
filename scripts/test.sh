#!/usr/bin/env bash
# The test suite, as CI runs it: formatting, lints, a build of everything (the keyhold binary
# and the firmware fixtures), then every unit and end-to-end test, and last each fuzz target
# over its seed corpus.
#
# The end-to-end tests boot real firmware under real KVM: they need read-write /dev/kvm. With
# CI=true a missing /dev/kvm fails them; elsewhere they say "skipped" and pass.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# The cluster tests make network namespaces with ip (iproute2) when run as root.
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null; then
    step "installing iproute2 (for the cluster tests' network namespaces)"
    apt-get install -y -q iproute2 >/dev/null || { apt-get update -q && apt-get install -y -q iproute2; }
fi

# The fleet test runs nodes whose members come from a real etcd (Debian's etcd-server; the
# package's own service is not started: the test runs its own on loopback).
if [ "$(id -u)" = 0 ] && ! command -v etcd >/dev/null; then
    step "installing etcd-server (for the fleet test)"
    apt-get install -y -q etcd-server >/dev/null || { apt-get update -q && apt-get install -y -q etcd-server; }
fi

# The metrics test checks the exposition with the Prometheus project's own Python parser.
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
    step "installing prometheus_client (the metrics test parses with it)"
    python3 -m pip install --quiet --disable-pip-version-check prometheus_client ||
        python3 -m pip install --quiet --disable-pip-version-check --user prometheus_client
fi

# The interop test runs a peer written from docs/PROTOCOL.md alone, in Python, with the
# noiseprotocol package for Noise and cryptography for the rest.
if ! python3 -c 'import noise.connection, cryptography' 2>/dev/null; then
    step "installing noiseprotocol and cryptography (the interop test's peer uses them)"
    python3 -m pip install --quiet --disable-pip-version-check noiseprotocol cryptography ||
        python3 -m pip install --quiet --disable-pip-version-check --user noiseprotocol cryptography
fi

step "cargo fmt --check"
cargo fmt --all -- --check
(cd firmware-fixtures/guest && cargo fmt -- --check)
(cd fuzz && cargo fmt -- --check)
(cd examples/guest-template && cargo fmt -- --check)

step "cargo clippy (host workspace, guest programs, guest template, fuzz targets)"
cargo clippy --workspace --all-targets -- -D warnings
(cd firmware-fixtures/guest && cargo clippy --release -- -D warnings)
(cd examples/guest-template && cargo clippy --release -- -D warnings)
(cd fuzz && cargo clippy --all-targets -- -D warnings)

step "cargo build (keyhold and the fixtures)"
cargo build --workspace

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"

# Each fuzz target once over its seed corpus and saved regressions: the targets still build
# against today's code, and no seed or past finding crashes it (docs/FUZZING.md).
step "fuzz targets over their seed corpora"
bash scripts/fuzz.sh check
