//! Builds the guest programs of `guest/` as part of the ordinary `cargo build`.
//!
//! The guest workspace needs its own rustflags (`guest/.cargo/config.toml`), which apply only
//! when cargo runs inside it, so this script runs a nested cargo there with a target directory
//! of its own and an environment cleaned of the outer build's flags (docs/GUEST.md, "Building firmware", says
//! why each variable must go). Each program is then copied to `target/fixtures/<name>.elf`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

#[path = "src/guest_build.rs"]
mod guest_build;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("guest");
    let target_dir = target_dir();
    let guest_target_dir = target_dir.join("fixture-build");
    let fixtures_dir = target_dir.join("fixtures");

    build_guests(&guest_dir, &guest_target_dir);
    let names = program_names(&guest_dir.join("src/bin"));
    fs::create_dir_all(&fixtures_dir).expect("create target/fixtures");
    let built = guest_target_dir.join("x86_64-unknown-linux-gnu/release");
    for name in &names {
        install(&built.join(name), &fixtures_dir.join(format!("{name}.elf")));
    }
    write_index(&names, &fixtures_dir);

    for watched in ["guest/src", "guest/Cargo.toml", "guest/build.rs", "guest/link.ld"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    println!("cargo:rerun-if-changed=guest/.cargo/config.toml");
    println!("cargo:rerun-if-changed=../guest-agent/src");
    println!("cargo:rerun-if-changed=../guest-agent/Cargo.toml");
}

/// The outer build's target directory. Found from `OUT_DIR`, which cargo always gives as an
/// absolute `<target dir>[/<triple>]/<profile>/build/<package>-<hash>/out`, not from
/// `CARGO_TARGET_DIR`, which may be relative to the directory cargo was started in, and that
/// directory is not this script's.
fn target_dir() -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let above_profile =
        out.ancestors().nth(4).expect("OUT_DIR is <target>/<profile>/build/<pkg>/out");
    let triple = env::var("TARGET").expect("set by cargo");
    match above_profile.file_name() {
        // A build with --target puts the profiles under <target dir>/<triple>.
        Some(name) if name == triple.as_str() => {
            above_profile.parent().expect("a parent").to_owned()
        }
        _ => above_profile.to_owned(),
    }
}

fn build_guests(guest_dir: &Path, guest_target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = guest_build::release_build(&cargo, guest_dir);
    cmd.arg("--target-dir").arg(guest_target_dir);
    let status = cmd.status().expect("run cargo for the guest programs");
    assert!(status.success(), "building the guest programs in {guest_dir:?} failed");
}

/// The guest programs are the files of `guest/src/bin`, one binary each.
fn program_names(bin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(bin_dir)
        .expect("read guest/src/bin")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    names
}

/// Copies by write-then-rename, so a concurrent debug and release build never see half a file.
/// An image that is already there byte for byte is left alone: debug and release builds
/// share `target/fixtures`, and a fresh modification time would make the other profile
/// rebuild everything that embeds the images.
fn install(from: &Path, to: &Path) {
    let image = fs::read(from).unwrap_or_else(|e| panic!("read {from:?}: {e}"));
    if fs::read(to).is_ok_and(|installed| installed == image) {
        return;
    }
    let tmp = to.with_extension(format!("elf.tmp{}", std::process::id()));
    fs::write(&tmp, &image).unwrap_or_else(|e| panic!("write {tmp:?}: {e}"));
    fs::rename(&tmp, to).unwrap_or_else(|e| panic!("install {to:?}: {e}"));
}

/// Tells the library where the images are and which exist.
fn write_index(names: &[String], fixtures_dir: &Path) {
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("index.rs");
    let dir = fixtures_dir.canonicalize().expect("canonical target/fixtures");
    let arms: String = names
        .iter()
        .map(|name| {
            format!(
                "        {name:?} => Some(include_bytes!({:?})),\n",
                dir.join(format!("{name}.elf"))
            )
        })
        .collect();
    let code = format!(
        "/// Directory holding `<name>.elf` for every fixture.\n\
         pub const DIR: &str = {dir:?};\n\
         /// Names of all fixtures, sorted.\n\
         pub const NAMES: &[&str] = &{names:?};\n\
         /// The image of fixture `name`, built into this crate.\n\
         pub fn image(name: &str) -> Option<&'static [u8]> {{\n    match name {{\n{arms}        _ => None,\n    }}\n}}\n"
    );
    fs::write(out, code).expect("write fixture index");
}
