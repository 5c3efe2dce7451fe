//! Containment (docs/SECURITY.md): every thread of a node runs under the seccomp filter of its
//! kind, the node's real work passes under them, and a system call a filter does not allow
//! stops the process with one line naming the thread and the call, and status 159.
//!
//! The forbidden call is provoked with the hidden `--seccomp-selftest THREAD`, which makes
//! that thread call `openat` right after its filter went in: no thread of keyhold opens a
//! file once it runs (but the audit writer, and only to append to a fresh log), so the call
//! stands for any a compromised thread might try.

use std::path::Path;
use std::time::Duration;

use keyhold_integration::nodes::{ctl, node, pair, wait_until};
use keyhold_integration::{
    finish, fixture, keyhold, require_kvm, run_with_deadline, spawn_keyhold, Outcome,
};

/// Exit status of a process stopped by its seccomp filter (128 + SIGSYS).
const STATUS_BAD_SYSCALL: i32 = 159;

/// The report of thread `thread` calling `openat`.
fn report(thread: &str) -> String {
    format!(
        "keyhold: thread {thread} made system call openat (257), which its seccomp filter does \
         not allow; stopping"
    )
}

/// Asserts that `out` ended with status 159 and exactly one report, naming `thread`.
fn assert_stopped_by_filter(out: &Outcome, thread: &str) {
    assert_eq!(out.code(), STATUS_BAD_SYSCALL, "{out:#?}");
    let reports: Vec<&str> =
        out.stderr.lines().filter(|l| l.contains("its seccomp filter does not allow")).collect();
    assert_eq!(reports, [report(thread)], "{out:#?}");
    out.assert_no_panic();
}

/// Each `keyhold run` thread kind: the forbidden call stops the process with the report.
#[test]
fn a_forbidden_call_on_any_thread_of_a_run_stops_it_naming_thread_and_call() {
    require_kvm!();
    let hello = fixture("hello").display().to_string();
    let kinds = [("vcpu", "p7-vcpu"), ("devices", "devices"), ("main", "main"), ("audit", "audit")];
    for (kind, thread) in kinds {
        let out = keyhold([
            "run",
            "--partition",
            &format!("7={hello}"),
            "--timeout",
            "20",
            "--seccomp-selftest",
            kind,
        ]);
        assert_stopped_by_filter(&out, thread);
        if kind == "vcpu" {
            // The vCPU thread is contained before its guest runs a single instruction.
            assert!(!out.stdout.contains("hello from partition"), "{out:#?}");
        }
    }
}

/// The threads only a node has: the API, the link set-up thread and the starter (whose
/// filter lets it open a firmware file read-only, but nothing else).
#[test]
fn a_forbidden_call_on_a_nodes_own_threads_stops_it_too() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    // Node 2 never runs: node 1 keeps dialling it, which does not matter here.
    let config = node(d, "1", 1, &p.cluster, &p.k1).display().to_string();
    for kind in ["api", "link-setup", "starter"] {
        let out =
            keyhold(["node", "--config", &config, "--timeout", "20", "--seccomp-selftest", kind]);
        assert_stopped_by_filter(&out, kind);
    }
}

/// `--seccomp off` runs without filters, says so, and the self-test's call then goes through.
#[test]
fn seccomp_off_runs_unfiltered_with_a_warning() {
    require_kvm!();
    let hello = fixture("hello").display().to_string();
    let out =
        keyhold(["run", "--firmware", &hello, "--seccomp", "off", "--seccomp-selftest", "vcpu"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("hello from partition 1"), "{out:#?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(lines[0].starts_with("keyhold: warning: --seccomp off: "), "{out:#?}");
    let bad = keyhold(["run", "--firmware", &hello, "--seccomp", "maybe"]);
    assert_eq!(bad.code(), 2, "{bad:#?}");
}

/// The seccomp mode of each named thread of process `pid` (2: a filter), by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let mode = status.lines().find_map(|l| l.strip_prefix("Seccomp:"))?.trim().to_owned();
            Some((comm.trim().to_owned(), mode))
        })
        .collect()
}

/// The threads keyhold contains, all of which a linked node with an API has.
const CONTAINED: [&str; 5] = ["keyhold", "devices", "link-setup", "api", "p1-vcpu"];

fn assert_contained(pid: u32) {
    let modes = seccomp_modes(pid);
    for name in CONTAINED {
        let mode = modes.iter().find(|(n, _)| n == name).map(|(_, m)| m.as_str());
        assert_eq!(mode, Some("2"), "thread {name} of {pid} runs without its filter: {modes:?}");
    }
}

fn link_field(dir: &Path, name: &str, field: &str) -> u64 {
    let out = ctl(dir, name, &["links"]);
    let links: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    links[0][field].as_u64().unwrap_or(0)
}

/// Two linked nodes, every thread under its filter, do their real work: channels across the
/// link served inline by the vCPUs, rekeys every few records, every API request, and a stop by
/// SIGTERM with goodbyes; nothing is refused, and the statuses are the usual ones.
#[test]
fn linked_nodes_under_their_filters_exchange_rekey_answer_and_stop() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let links = "[links]\nrekey_after_messages = 16\n";
    let n1 = p.spec(1, "echo", "peer=2:1:1", links).write(d);
    let ping = "peer=1:1:1 count=100000000 size=1024 batch=8";
    let n2 = p.spec(2, "ping", ping, links).write(d);
    let nodes: Vec<_> = [&n1, &n2]
        .iter()
        .map(|c| spawn_keyhold(["node", "--config", &c.display().to_string(), "--timeout", "90"]))
        .collect();

    let rekeyed = wait_until(Duration::from_secs(30), || link_field(d, "1", "rekeys") >= 10);
    for node in &nodes {
        assert_contained(node.id());
    }
    for request in [&["links"][..], &["channels"], &["stats"], &["partitions"], &["audit"]] {
        for name in ["1", "2"] {
            let out = ctl(d, name, request);
            assert_eq!(out.code(), 0, "ctl {request:?} on node {name}: {out:#?}");
        }
    }
    let sent = ctl(d, "2", &["stats"]);
    for node in &nodes {
        // SAFETY: kill with a process ID and a signal number only.
        assert_eq!(unsafe { libc::kill(node.id() as i32, libc::SIGTERM) }, 0);
    }
    let outs: Vec<Outcome> =
        nodes.into_iter().map(|n| finish(n, Duration::from_secs(30))).collect();
    assert!(rekeyed, "no rekeys within 30 s: {outs:#?}");
    assert!(sent.stdout.contains("\"sent\""), "{sent:#?}");
    for out in &outs {
        assert_eq!(out.code(), 143, "{out:#?}");
        assert!(!out.stderr.contains("seccomp"), "{out:#?}");
        out.assert_no_panic();
    }
    assert!(outs[1].stdout.contains("ping: channel"), "{:#?}", outs[1]);
}

/// `--dump-ram`, for which the vCPU threads' filter lets them create their RAM file as they
/// stop, and `--console` to a file work under the filters.
#[test]
fn dump_ram_and_console_files_are_written_under_the_filters() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.txt");
    let hello = fixture("hello").display().to_string();
    let out = run_with_deadline(
        keyhold_integration::keyhold_bin().as_os_str(),
        [
            "run",
            "--firmware",
            &hello,
            "--firmware",
            &hello,
            "--dump-ram",
            &dir.path().display().to_string(),
            "--console",
            &console.display().to_string(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stderr.is_empty(), "{out:#?}");
    for id in [1, 2] {
        let ram = std::fs::metadata(dir.path().join(format!("partition-{id}.ram"))).unwrap();
        assert_eq!(ram.len(), 32 << 20);
    }
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("[p1] hello from partition 1"), "{text}");
    assert!(text.contains("[p2] hello from partition 2"), "{text}");
}
