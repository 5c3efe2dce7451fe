//! The guest-facing devices as a driver sees them, through real guests under real KVM: virtio
//! 1.2 queue semantics (stop, re-program, refuse), the channel life cycle when a partition
//! stops, OPENs nobody answers, the per-partition budget and virtio-rng's rate, with the
//! devices' counters read from the control API.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use keyhold_integration::nodes::{audit, ctl, pair, run_nodes, wait_until};
use keyhold_integration::{finish, fixture, keyhold, require_kvm, spawn_keyhold, Outcome};
use serde_json::Value;

/// A node of one machine (no cluster), with its API, running until stopped.
struct Node {
    dir: tempfile::TempDir,
    child: Child,
}

impl Node {
    /// Starts node 0 with `partitions` (`(firmware, args, extra lines)`, IDs from 1), a
    /// `spin` partition after them that keeps the node up, and `sections`.
    fn start(partitions: &[(&str, &str, &str)], sections: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!("[node]\nid = 0\napi_socket = \"api.sock\"\n{sections}\n");
        let spin = ("spin", "", "");
        for (i, (firmware, args, extra)) in partitions.iter().chain([&spin]).enumerate() {
            text += &format!(
                "[[partition]]\nid = {}\nfirmware = \"{}\"\nargs = \"{args}\"\n{extra}\n",
                i + 1,
                fixture(firmware).display()
            );
        }
        let config = dir.path().join("node.toml");
        std::fs::write(&config, text).unwrap();
        let child = spawn_keyhold(["node", "--config", &config.display().to_string()]);
        Self { dir, child }
    }

    fn partitions(&self) -> Option<Value> {
        let out = ctl(self.dir.path(), "api", &["partitions"]);
        (out.code() == 0).then(|| serde_json::from_str(&out.stdout).ok()).flatten()
    }

    /// Waits until partition `id` has stopped; returns its API entry.
    fn stopped(&self, id: u64) -> Value {
        let mut entry = Value::Null;
        let stopped = wait_until(Duration::from_secs(120), || {
            let found = self.partitions().and_then(|all| {
                all.as_array()?.iter().find(|p| p["id"].as_u64() == Some(id)).cloned()
            });
            entry = found.unwrap_or(Value::Null);
            entry["running"] == false
        });
        assert!(stopped, "partition {id} still running: {entry:#}");
        entry
    }

    /// Stops the node (SIGTERM) and collects it; its directory stays until the caller drops
    /// it.
    fn stop(self) -> (Outcome, tempfile::TempDir) {
        signal(&self.child, libc::SIGTERM);
        let out = finish(self.child, Duration::from_secs(60));
        out.assert_no_panic();
        (out, self.dir)
    }
}

/// The counter `name` of `partition`'s device of `kind`.
fn counter(partition: &Value, kind: &str, name: &str) -> u64 {
    let devices = partition["devices"].as_array().expect("devices");
    let device = devices.iter().find(|d| d["kind"] == kind).expect("device of that kind");
    device[name].as_u64().unwrap_or_else(|| panic!("{name} in {device:#}"))
}

#[test]
fn a_driver_may_stop_and_reprogram_queues_and_bad_configurations_need_reset() {
    require_kvm!();
    let node = Node::start(&[("echo", "peer=0:2:1", ""), ("queues", "peer=0:1:1", "")], "");
    let queues = node.stopped(2);
    let (out, _) = node.stop();
    assert_eq!(out.stdout.matches(": ok\n").count(), 12, "{out:#?}");
    assert!(out.stdout.contains("[p2] queues: 0 cases failed"), "{out:#?}");
    assert_eq!(queues["exit_status"], 0, "{queues:#}");
    // What the driver did, as the devices counted it.
    assert_eq!(counter(&queues, "virtio-rng", "queue_stops"), 2, "{queues:#}");
    assert_eq!(counter(&queues, "virtio-rng", "refused_queue_configs"), 5, "{queues:#}");
    assert_eq!(counter(&queues, "virtio-rng", "needs_reset"), 5, "{queues:#}");
    // (Whether a notify that raced the reset found the device inactive depends on when the
    // device thread got to it; that it was harmless, the fixture checked.)
    assert_eq!(counter(&queues, "secure-channel", "queue_stops"), 2, "{queues:#}");
    assert_eq!(counter(&queues, "secure-channel", "needs_reset"), 0, "{queues:#}");
}

#[test]
fn an_independent_driver_written_from_device_md_alone_talks_to_the_device() {
    require_kvm!();
    // `indie` has its own transport, split queues and request encoding, written from
    // docs/DEVICE.md alone: it checks the document as much as the device.
    let node = Node::start(&[("echo", "peer=0:2:1", ""), ("indie", "peer=0:1:1", "")], "");
    let indie = node.stopped(2);
    let echo = node.stopped(1);
    let (out, _) = node.stop();
    assert_eq!(indie["exit_status"], 0, "{out:#?}");
    assert!(out.stdout.contains("[p2] indie: all checks passed"), "{out:#?}");
    assert!(!out.stdout.contains("indie: FAILED"), "{out:#?}");
    assert_eq!(echo["exit_status"], 0, "the echo heard the goodbye: {out:#?}");
    assert_eq!(counter(&indie, "secure-channel", "needs_reset"), 0, "{indie:#}");
}

#[test]
fn a_partition_that_stops_or_crashes_closes_its_channels_and_its_peer_learns_why() {
    require_kvm!();
    let lifecycle = fixture("lifecycle").display().to_string();
    for (how, status) in [("exit", 0), ("crash", 121)] {
        let out = keyhold([
            "run",
            "--partition",
            &format!("1={lifecycle}"),
            "--partition",
            &format!("2={lifecycle}"),
            "--arg",
            "1=peer=0:2:1 role=watch",
            "--arg",
            &format!("2=peer=0:1:1 role=leave how={how}"),
            "--timeout",
            "60",
        ]);
        out.assert_no_panic();
        assert_eq!(out.code(), status, "{how}: {out:#?}");
        assert!(out.stdout.contains("[p1] lifecycle: closed: partition_stopped"), "{out:#?}");
    }
}

/// Nodes 1 and 2 in `dir`, each running the `lifecycle` fixture with the given arguments.
fn lifecycle_pair(dir: &Path, args1: &str, args2: &str, sections1: &str) -> (PathBuf, PathBuf) {
    let p = pair(dir);
    (
        p.spec(1, "lifecycle", args1, sections1).write(dir),
        p.spec(2, "lifecycle", args2, "").write(dir),
    )
}

#[test]
fn across_nodes_a_stopped_partition_closes_its_channels_with_the_reason() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (n1, n2) =
        lifecycle_pair(d, "peer=2:1:1 role=watch", "peer=1:1:1 role=leave how=crash", "");
    let outs = run_nodes(&[&n1, &n2], "60");
    assert_eq!(outs[0].code(), 0, "{:#?}", outs[0]);
    assert!(outs[0].stdout.contains("lifecycle: closed: partition_stopped"), "{:#?}", outs[0]);
    assert_eq!(outs[1].code(), 121, "{:#?}", outs[1]);
    let a1 = audit(d, "1");
    assert!(
        a1.contains("\"event\":\"channel_closed\",\"reason\":\"peer_partition_stopped\""),
        "{a1}"
    );
}

#[test]
fn an_open_the_other_node_never_answers_times_out_and_the_guest_is_told() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (n1, n2) = lifecycle_pair(
        d,
        "peer=2:1:1 role=open",
        "peer=1:1:1 role=listen count=60",
        "[channels]\nopen_timeout_secs = 1\n",
    );
    let opener = spawn_keyhold(["node", "--config", &n1.display().to_string(), "--timeout", "60"]);
    let silent = spawn_keyhold(["node", "--config", &n2.display().to_string()]);
    // Once node 2 has accepted an offer, it stops answering: SIGSTOP freezes it whole, its
    // socket still open, as a node that hangs.
    let answered =
        wait_until(Duration::from_secs(60), || audit(d, "2").contains("\"offer_accepted\""));
    assert!(answered, "{}", audit(d, "2"));
    signal(&silent, libc::SIGSTOP);
    let opener = finish(opener, Duration::from_secs(60));
    signal(&silent, libc::SIGCONT);
    opener.assert_no_panic();
    assert_eq!(opener.code(), 0, "{opener:#?}");
    assert!(opener.stdout.contains("lifecycle: open: timed_out"), "{opener:#?}");
    let a1 = audit(d, "1");
    assert!(a1.contains("\"event\":\"offer_timed_out\",\"reason\":\"no_answer\""), "{a1}");
    // Woken, node 2 takes the late offer and then the CLOSE that followed it: no channel of
    // its stays open, and no key is left behind.
    let settled = wait_until(Duration::from_secs(60), || {
        let out = ctl(d, "2", &["channels"]);
        out.code() == 0 && !out.stdout.contains("\"open\"") && out.stdout.contains("peer_closed")
    });
    let channels = ctl(d, "2", &["channels"]);
    signal(&silent, libc::SIGTERM);
    let silent = finish(silent, Duration::from_secs(60));
    silent.assert_no_panic();
    assert!(settled, "{channels:#?}\n{silent:#?}");
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
}

#[test]
fn virtio_rng_serves_each_partition_at_its_configured_rate() {
    require_kvm!();
    let limited = "rng_bytes_per_sec = 65536\nrng_burst_bytes = 16384";
    let node = Node::start(&[("rng", "bytes=262144", limited), ("rng", "bytes=262144", "")], "");
    let slow = node.stopped(1);
    let fast = node.stopped(2);
    let (out, _) = node.stop();
    let took = |p: &str| -> u64 {
        let line = out.stdout.lines().find(|l| l.starts_with(p) && l.contains("bytes in"));
        let line = line.unwrap_or_else(|| panic!("{p} timing in {out:#?}"));
        line.split_whitespace().rev().nth(1).and_then(|n| n.parse().ok()).expect("ms")
    };
    // 256 KiB at 64 KiB/s after a 16 KiB burst: at least 3.75 s by the guest's own clock,
    // however fast the machine.
    assert!(took("[p1]") >= 3700, "{out:#?}");
    assert!(counter(&slow, "virtio-rng", "throttled") > 0, "{slow:#}");
    assert_eq!(counter(&fast, "virtio-rng", "throttled"), 0, "within its burst: {fast:#}");
}

#[test]
fn a_partition_that_floods_the_device_starves_no_one_and_cannot_flood_the_audit() {
    require_kvm!();
    let started = std::time::Instant::now();
    let node = Node::start(
        &[
            ("hog", "rounds=2000", ""),
            ("echo", "peer=0:3:1", ""),
            ("ping", "peer=0:2:1 count=300 batch=1", ""),
        ],
        "audit_log = \"audit.jsonl\"",
    );
    let ping = node.stopped(3);
    let hog = node.stopped(1);
    let secs = started.elapsed().as_secs();
    let (out, dir) = node.stop();
    assert_eq!(ping["exit_status"], 0, "{out:#?}");
    assert!(out.stdout.contains("[p3] ping: 300 messages"), "{out:#?}");
    assert!(out.stdout.contains("[p1] hog: 256000 requests answered, 0 with"), "{out:#?}");
    // The hog's requests went through in passes of a bounded size.
    assert!(counter(&hog, "secure-channel", "deferred") > 0, "{hog:#}");
    // Each refusal was either written or counted: the default limit (a burst of 50, then
    // 10 a second) holds the log to a few hundred lines, and says how many it held back.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let of_hog = |event: &str| {
        let event = format!("\"event\":\"{event}\"");
        audit.lines().filter(move |l| l.contains(&event) && l.contains("\"partition\":1,"))
    };
    let written = of_hog("request_refused").count() as u64;
    let suppressed: u64 = of_hog("audit_suppressed")
        .map(|l| {
            let record: Value = serde_json::from_str(l).unwrap();
            record["count"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(written + suppressed, 256_000, "{audit}");
    assert!(written <= 50 + 10 * (secs + 2), "{written} lines in {secs} s");
}

#[test]
fn the_audit_log_rotates_by_size_and_keeps_what_it_was_told() {
    require_kvm!();
    // No rate limit to speak of: 25,600 refusals, some 6 MB of records, into 1 MiB files.
    let node = Node::start(
        &[("hog", "rounds=200", "")],
        "audit_log = \"audit.jsonl\"\n[audit]\nmax_file_mib = 1\nkeep_files = 2\n\
         records_per_second = 1000000\nburst = 1000000",
    );
    let hog = node.stopped(1);
    let (out, dir) = node.stop();
    assert_eq!(hog["exit_status"], 0, "{out:#?}");
    let size = |name: &str| std::fs::metadata(dir.path().join(name)).map(|m| m.len());
    for name in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"] {
        assert!(size(name).is_ok_and(|s| s > 0 && s <= 1 << 20), "{name}: {:?}", size(name));
    }
    assert!(size("audit.jsonl.3").is_err(), "two old files kept, no more");
    let newest = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(newest.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "whole lines");
}
