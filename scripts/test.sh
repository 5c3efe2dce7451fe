#!/usr/bin/env bash
# The test suite, as CI runs it: formatting, lints, a build of everything (the keyhold binary
# and the firmware fixtures), then every unit and end-to-end test.
#
# The end-to-end tests boot real firmware under real KVM: they need read-write /dev/kvm. With
# CI=true a missing /dev/kvm fails them; elsewhere they say "skipped" and pass.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
(cd firmware-fixtures/guest && cargo fmt -- --check)

step "cargo clippy (host workspace, then guest programs)"
cargo clippy --workspace --all-targets -- -D warnings
(cd firmware-fixtures/guest && cargo clippy --release -- -D warnings)

step "cargo build (keyhold and the fixtures)"
cargo build --workspace

step "cargo test"
cargo test --workspace
