#!/usr/bin/env bash
# The test suite, as CI runs it: formatting, lints, a build of everything (the keyhold binary
# and the firmware fixtures), then every unit and end-to-end test.
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

step "cargo fmt --check"
cargo fmt --all -- --check
(cd firmware-fixtures/guest && cargo fmt -- --check)

step "cargo clippy (host workspace, then guest programs)"
cargo clippy --workspace --all-targets -- -D warnings
(cd firmware-fixtures/guest && cargo clippy --release -- -D warnings)

step "cargo build (keyhold and the fixtures)"
cargo build --workspace

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"
