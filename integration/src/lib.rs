//! Helpers for the end-to-end tests: find the `keyhold` binary and the fixtures, run the binary
//! with a deadline, and insist on KVM where a test needs it.
//!
//! The tests launch the real binary, so it must be built first; `scripts/test.sh` (the README's
//! test command) does that before `cargo test`.

pub mod etcd;
pub mod nodes;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the `keyhold` binary of this build (`$KEYHOLD_BIN` overrides it).
pub fn keyhold_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYHOLD_BIN") {
        return PathBuf::from(path);
    }
    // Test executables live in target/<profile>/deps; the binary in target/<profile>.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("keyhold");
    assert!(bin.exists(), "{} is missing: build it first (scripts/test.sh does)", bin.display());
    bin
}

/// Path of a firmware fixture image.
pub fn fixture(name: &str) -> PathBuf {
    let path = firmware_fixtures::path(name);
    assert!(path.exists(), "fixture {} is missing", path.display());
    path
}

/// Whether this host can run KVM tests. In CI (`CI=true`) a missing or unusable `/dev/kvm`
/// fails the test instead of skipping it.
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but /dev/kvm is not usable");
        eprintln!("skipped: /dev/kvm is not usable here");
    }
    usable
}

/// Skips the calling test (returning early) when KVM is unavailable outside CI.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            return;
        }
    };
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Outcome {
    /// The exit code; panics if the process was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("killed by a signal: {self:#?}"))
    }

    /// Asserts the one-line operator error of bad input: exit 2, one `keyhold:` line naming
    /// `what`, no panic, no backtrace.
    pub fn assert_bad_input(&self, what: &str) {
        assert_eq!(self.code(), 2, "{self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected: {self:#?}");
        assert!(lines[0].starts_with("keyhold: ") || lines[0].starts_with("error: "), "{self:#?}");
        assert!(lines[0].contains(what), "{what:?} not in {:?}", lines[0]);
        self.assert_no_panic();
    }

    /// Asserts that the VMM did not panic (a host panic reads "thread '…' panicked at";
    /// a guest's panic message on the console is the guest's business).
    pub fn assert_no_panic(&self) {
        for text in [&self.stdout, &self.stderr] {
            assert!(!text.contains("' panicked at"), "{self:#?}");
            assert!(!text.contains("RUST_BACKTRACE"), "{self:#?}");
        }
    }
}

/// Runs `program` with `args`, killing it after `deadline`.
pub fn run_with_deadline<I, S>(program: &OsStr, args: I, deadline: Duration) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {program:?}: {e}"));
    wait(child, deadline)
}

/// Runs `keyhold` with `args` and a 30-second deadline.
pub fn keyhold<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_deadline(keyhold_bin().as_os_str(), args, Duration::from_secs(30))
}

/// Asks a node to stop, as an operator would (SIGTERM).
pub fn terminate(child: &Child) {
    let status = Command::new("kill").arg(child.id().to_string()).status().expect("run kill");
    assert!(status.success(), "kill {}", child.id());
}

/// Starts `keyhold` with `args` in the background; collect it with [`finish`]. It is killed
/// when the calling thread (the test) ends, even by a panic.
pub fn spawn_keyhold<I, S>(args: I) -> Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(keyhold_bin());
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // A test that fails before it stops its node must not leave the node running (its
    // partitions may spin, and would load every later test and benchmark): the node is killed
    // when the thread that started it, the test's own, ends.
    // SAFETY: the closure runs in the forked child before exec and only makes the prctl
    // system call, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command.spawn().expect("spawn keyhold")
}

/// Waits for a spawned process, killing it after `deadline`.
pub fn finish(child: Child, deadline: Duration) -> Outcome {
    wait(child, deadline)
}

fn wait(mut child: Child, deadline: Duration) -> Outcome {
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > deadline {
            let threads = threads_of(child.id());
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            panic!("process ran past its {deadline:?} deadline; its threads:\n{threads}\nstdout:\n{out}\nstderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// What each thread of process `pid` is doing: name, state and kernel wait channel (for a
/// process that hangs).
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return String::new() };
    tasks
        .flatten()
        .map(|task| {
            let read =
                |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            let stat = read("stat");
            let state =
                stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("?");
            format!(
                "  {} {} {} {}",
                read("comm").trim(),
                state,
                read("wchan"),
                read("stack").replace('\n', " | ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether this process runs as root (needed to drop privileges or hide /dev/kvm).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether python3 can run `import {imports}`. In CI (`CI=true`) it must (scripts/test.sh
/// installs what the tests use): a missing package fails the test there; elsewhere the caller
/// skips its check, and this says so on stderr.
pub fn python_imports(imports: &str) -> bool {
    let has = Command::new("python3")
        .args(["-c", &format!("import {imports}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but python3 cannot import {imports} (scripts/test.sh installs it)"
        );
        eprintln!("skipped: python3 cannot import {imports}");
    }
    has
}
