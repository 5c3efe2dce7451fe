//! Bad operator input: each case gets one line naming the problem and exit status 2, never a
//! panic or a backtrace, and no partition is booted.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyhold_integration::{fixture, is_root, keyhold, keyhold_bin, run_with_deadline, Outcome};

fn run_firmware(path: &Path) -> Outcome {
    keyhold(["run", "--firmware", &path.display().to_string()])
}

/// `hello.elf` with `patch` applied, written to a file in `dir`.
fn patched_hello(dir: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut image = std::fs::read(fixture("hello")).unwrap();
    patch(&mut image);
    let path = dir.join(name);
    std::fs::write(&path, image).unwrap();
    path
}

/// Byte offset of program header `i` in an ELF64 image.
fn phdr(image: &[u8], i: usize) -> usize {
    u64::from_le_bytes(image[32..40].try_into().unwrap()) as usize + i * 56
}

#[test]
fn missing_firmware() {
    run_firmware(Path::new("/nonexistent/hello.elf"))
        .assert_bad_input("firmware /nonexistent/hello.elf: cannot read it");
}

#[test]
fn firmware_that_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    run_firmware(dir.path()).assert_bad_input("it is not a regular file");
}

#[test]
fn unreadable_firmware() {
    if !is_root() {
        eprintln!("skipped: needs root to run keyhold as another user");
        return;
    }
    let dir = world_readable_dir();
    let path = patched_hello(dir.path(), "secret.elf", |_| {});
    std::fs::set_permissions(&path, PermissionsExt::from_mode(0o000)).unwrap();
    let out = as_nobody(&dir, &["run", "--firmware", &path.display().to_string()]);
    out.assert_bad_input("cannot read it: Permission denied");
}

#[test]
fn firmware_that_is_not_elf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("script.sh");
    std::fs::write(&path, "#!/bin/sh\necho hello\n").unwrap();
    run_firmware(&path).assert_bad_input("it is not an ELF file");
}

#[test]
fn thirty_two_bit_firmware() {
    let dir = tempfile::tempdir().unwrap();
    let path = patched_hello(dir.path(), "elf32.elf", |image| image[4] = 1);
    run_firmware(&path).assert_bad_input("32-bit ELF");
}

#[test]
fn dynamically_linked_firmware() {
    run_firmware(Path::new("/bin/true"))
        .assert_bad_input("it is dynamically linked (it has a PT_INTERP segment)");
}

#[test]
fn oversized_firmware() {
    let dir = tempfile::tempdir().unwrap();
    let path = patched_hello(dir.path(), "huge.elf", |_| {});
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(65 << 20).unwrap();
    run_firmware(&path).assert_bad_input("over the 67108864-byte limit");
}

#[test]
fn segment_outside_guest_ram() {
    let dir = tempfile::tempdir().unwrap();
    let path = patched_hello(dir.path(), "high.elf", |image| {
        let at = phdr(image, 0);
        for field in [at + 16, at + 24] {
            image[field..field + 8].copy_from_slice(&0x4000_0000u64.to_le_bytes());
        }
    });
    run_firmware(&path).assert_bad_input("segment 0 (0x40000000..");
}

#[test]
fn memory_size_zero_or_beyond_the_host() {
    let hello = fixture("hello").display().to_string();
    keyhold(["run", "--firmware", &hello, "--memory", "0"])
        .assert_bad_input("memory size 0 MiB is out of range");
    keyhold(["run", "--firmware", &hello, "--memory", "1"]).assert_bad_input("it must be 2 to");
    keyhold(["run", "--firmware", &hello, "--memory", "4096"])
        .assert_bad_input("memory size 4096 MiB");
    keyhold(["run", "--firmware", &hello, "--memory", "18446744073709551615"])
        .assert_bad_input("out of range");
}

#[test]
fn duplicate_partition_id() {
    let hello = fixture("hello").display().to_string();
    keyhold(["run", "--firmware", &hello, "--partition", &format!("1={hello}")])
        .assert_bad_input("partition ID 1 is used more than once");
}

#[test]
fn no_partition_at_all() {
    keyhold(["run"]).assert_bad_input("no partition to run");
}

#[test]
fn malformed_arguments() {
    let hello = fixture("hello").display().to_string();
    for args in [
        vec!["run", "--firmware", &hello, "--timeout", "0"],
        vec!["run", "--firmware", &hello, "--memory", "lots"],
        vec!["run", "--partition", "x=y"],
        vec!["run", "--bogus"],
    ] {
        let out = keyhold(&args);
        assert_eq!(out.code(), 2, "{args:?}: {out:#?}");
        assert!(out.stderr.starts_with("error: "), "{args:?}: {out:#?}");
        out.assert_no_panic();
    }
}

#[test]
fn missing_dev_kvm() {
    if !is_root() {
        eprintln!("skipped: needs root to hide /dev/kvm in a mount namespace");
        return;
    }
    // A private mount namespace whose /dev is an empty tmpfs: the host's /dev is untouched.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --firmware {}",
        keyhold_bin().display(),
        fixture("hello").display()
    );
    let out = run_with_deadline(
        "unshare".as_ref(),
        ["--mount", "sh", "-c", &script],
        Duration::from_secs(30),
    );
    out.assert_bad_input("/dev/kvm does not exist");
}

#[test]
fn dev_kvm_without_permission() {
    if !is_root() {
        eprintln!("skipped: needs root to run keyhold as another user");
        return;
    }
    let dir = world_readable_dir();
    let hello = patched_hello(dir.path(), "hello.elf", |_| {});
    let out = as_nobody(&dir, &["run", "--firmware", &hello.display().to_string()]);
    out.assert_bad_input("permission denied opening /dev/kvm");
    // The demo checks first, and says so the same way, before it starts anything.
    let demo = as_nobody(&dir, &["demo"]);
    demo.assert_bad_input("permission denied opening /dev/kvm");
}

/// A scratch directory any user may read, for files that `nobody` must reach (the checkout
/// itself may sit under a directory only root can enter).
fn world_readable_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    dir
}

/// Runs a copy of keyhold, placed in `dir`, as user `nobody`, who may neither read root's
/// 0600 files nor open /dev/kvm.
fn as_nobody(dir: &tempfile::TempDir, args: &[&str]) -> Outcome {
    let bin = dir.path().join("keyhold");
    std::fs::copy(keyhold_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, PermissionsExt::from_mode(0o755)).unwrap();
    let bin = bin.display().to_string();
    let mut full = vec!["--reuid=65534", "--regid=65534", "--clear-groups", bin.as_str()];
    full.extend_from_slice(args);
    run_with_deadline("setpriv".as_ref(), full, Duration::from_secs(30))
}
