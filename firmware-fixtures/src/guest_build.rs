//! How a guest workspace is built from inside another cargo build (this crate's build script,
//! and the guest-template test): a nested `cargo build --release` run in the guest workspace,
//! so that its `.cargo/config.toml` applies, with the outer build's flags and target removed
//! (docs/GUEST.md, "Building firmware", says why each must go).

use std::path::Path;
use std::process::Command;

/// Variables of the outer build that would override the guest's own flags or target dir.
pub const OUTER_BUILD_VARS: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "CARGO_BUILD_TARGET",
];

/// `cargo build --release` in `guest_dir` with the outer build's variables removed; `cargo`
/// is the cargo to run.
pub fn release_build(cargo: &std::ffi::OsStr, guest_dir: &Path) -> Command {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest_dir).args(["build", "--release"]);
    for var in OUTER_BUILD_VARS {
        cmd.env_remove(var);
    }
    cmd
}
