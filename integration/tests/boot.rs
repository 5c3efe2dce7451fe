//! Booting fixtures with the real `keyhold run` under real KVM.

use std::time::Duration;

use keyhold_integration::{fixture, keyhold, require_kvm};

fn arg(path: std::path::PathBuf) -> String {
    path.display().to_string()
}

#[test]
fn hello_greets_with_its_partition_id_and_ram_size() {
    require_kvm!();
    let out = keyhold([
        "run",
        "--firmware",
        &arg(fixture("hello")),
        "--partition-id",
        "42",
        "--memory",
        "64",
    ]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(out.stdout, "hello from partition 42\nram: 64 MiB\n");
    assert_eq!(out.stderr, "");
}

#[test]
fn panic_prints_its_message_and_exits_101() {
    require_kvm!();
    let out = keyhold(["run", "--firmware", &arg(fixture("panic"))]);
    assert_eq!(out.code(), 101, "{out:#?}");
    assert!(out.stdout.contains("panic: panicked at"), "{out:#?}");
    assert!(out.stdout.contains("fixture panic in partition 1"), "{out:#?}");
    assert_eq!(out.stderr.trim(), "keyhold: partition 1 stopped: exited with status 101");
}

#[test]
fn several_partitions_boot_concurrently_with_prefixed_consoles() {
    require_kvm!();
    let hello = arg(fixture("hello"));
    let out = keyhold([
        "run",
        "--firmware",
        &hello,
        "--firmware",
        &hello,
        "--partition",
        &format!("9={hello}"),
        "--partition",
        &format!("5={}", arg(fixture("panic"))),
    ]);
    assert_eq!(out.code(), 101, "the only non-zero status: {out:#?}");
    for id in [1, 2, 9] {
        assert!(out.stdout.contains(&format!("[p{id}] hello from partition {id}\n")), "{out:#?}");
        assert!(out.stdout.contains(&format!("[p{id}] ram: 32 MiB\n")), "{out:#?}");
    }
    assert!(out.stdout.contains("[p5] fixture panic in partition 5\n"), "{out:#?}");
    // Every line belongs to one partition: none is torn by another partition's output.
    assert!(out.stdout.lines().all(|l| l.starts_with("[p")), "{out:#?}");
}

#[test]
fn a_crashing_partition_does_not_stop_the_others() {
    require_kvm!();
    let out = keyhold([
        "run",
        "--partition",
        &format!("1={}", arg(fixture("fault"))),
        "--partition",
        &format!("2={}", arg(fixture("spin"))),
        "--partition",
        &format!("3={}", arg(fixture("hello"))),
        "--timeout",
        "1",
    ]);
    // The fault stops first, so its status is the process's.
    assert_eq!(out.code(), 121, "{out:#?}");
    assert!(out.stdout.contains("[p3] hello from partition 3"), "{out:#?}");
    assert!(out.stderr.contains("partition 1 stopped: triple fault"), "{out:#?}");
    assert!(
        out.stderr.contains("partition 2 stopped: still running at the --timeout limit"),
        "{out:#?}"
    );
    assert!(!out.stderr.contains("partition 3"), "hello exits cleanly: {out:#?}");
}

#[test]
fn console_goes_to_a_file_when_asked() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let out = keyhold([
        "run",
        "--firmware",
        &arg(fixture("hello")),
        "--console",
        &console.display().to_string(),
    ]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(out.stdout, "");
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "hello from partition 1\nram: 32 MiB\n");
}

#[test]
fn verbose_run_logs_start_up_times() {
    require_kvm!();
    let out = keyhold(["-v", "run", "--firmware", &arg(fixture("hello"))]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stderr.contains("partition 1: entering guest"), "{out:#?}");
    assert!(out.stderr.contains("ms after process start"), "{out:#?}");
    assert!(out.stderr.contains("partition 1: stopped"), "{out:#?}");
}

#[test]
fn verbose_run_counts_exits_as_kvm_does() {
    require_kvm!();
    let out = keyhold(["-v", "run", "--firmware", &arg(fixture("hello"))]);
    assert_eq!(out.code(), 0, "{out:#?}");
    // "after A VM exits (B handled by the VMM, C page faults resolved by KVM)"
    let line = out.stderr.lines().find(|l| l.contains("partition 1: stopped")).expect("stop line");
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .rev()
        .take(3)
        .collect();
    let [faults, handled, all] = numbers[..] else { panic!("{line}") };
    assert!(line.ends_with("page faults resolved by KVM)"), "{line}");
    // hello writes two console lines, a byte per exit, all handled by the VMM.
    assert!(handled >= 30, "{line}");
    assert!(all >= handled + faults, "{line}");
}

#[test]
fn every_fixture_boots_and_stops_as_designed() {
    require_kvm!();
    // (fixture, expected exit status); `spin` needs the timeout.
    let expected = [
        ("hello", 0),
        ("rng", 0),
        ("panic", 101),
        ("fault", 121),
        ("emulation-failure", 122),
        ("stray-port", 123),
        ("stray-mmio", 123),
        ("spin", 124),
    ];
    // These need a peer and arguments (tests/channel.rs, tests/memory.rs and tests/vsock.rs
    // boot them) or longer than this test gives (memfns, booted below).
    let booted_elsewhere = [
        "memfns",
        "echo",
        "ping",
        "forge",
        "snoop",
        "bad-queue",
        "flood",
        "keys",
        "queues",
        "lifecycle",
        "hog",
        "vsock",
        "indie",
    ];
    let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    for name in firmware_fixtures::NAMES {
        assert!(
            names.contains(name) || booted_elsewhere.contains(name),
            "fixture {name} is not tested"
        );
    }
    for (name, status) in expected {
        let out = keyhold(["run", "--firmware", &arg(fixture(name)), "--timeout", "0.5"]);
        assert_eq!(out.code(), status, "{name}: {out:#?}");
        out.assert_no_panic();
    }
}

#[test]
fn rng_fixture_reads_host_entropy_through_virtio_rng() {
    require_kvm!();
    let out = keyhold(["run", "--firmware", &arg(fixture("rng"))]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("rng: ok"), "{out:#?}");
}

#[test]
fn sigterm_and_sigint_stop_every_partition_in_order_and_sighup_does_not() {
    require_kvm!();
    for (signal, status, name) in [("-TERM", 143, "SIGTERM"), ("-INT", 130, "SIGINT")] {
        let spin = arg(fixture("spin"));
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console");
        let console_arg = console.display().to_string();
        let child = keyhold_integration::spawn_keyhold([
            "run",
            "--firmware",
            &spin,
            "--firmware",
            &spin,
            "--console",
            &console_arg,
        ]);
        // Both partitions run before the signal comes.
        let running = keyhold_integration::nodes::wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.matches("spinning").count() == 2)
        });
        assert!(running, "{:?}", std::fs::read_to_string(&console));
        // SIGHUP first: it asks for a reload (this node has no cluster file) and must not stop
        // the node (it would end with 129). Pending signals
        // are read lowest number first, so it is handled before the stopping one.
        for signal in ["-HUP", signal] {
            let sent = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
        }
        let out = keyhold_integration::finish(child, Duration::from_secs(30));
        out.assert_no_panic();
        assert_eq!(out.code(), status, "{out:#?}");
        assert!(
            out.stderr.contains(
                "SIGHUP: the cluster file was not reloaded: this node has no cluster file"
            ),
            "{out:#?}"
        );
        for id in [1, 2] {
            let line = format!("partition {id} stopped: the node was asked to stop ({name})");
            assert!(out.stderr.contains(&line), "{out:#?}");
        }
    }
}

#[test]
fn log_lines_go_to_a_file_as_json_when_asked() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("keyhold.log");
    let log_arg = log.display().to_string();
    let hello = arg(fixture("hello"));
    let out = keyhold([
        "run",
        "--firmware",
        &hello,
        "-v",
        "--log-format",
        "json",
        "--log-file",
        &log_arg,
    ]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("hello from partition 1"), "the console stays on stdout");
    assert!(out.stderr.is_empty(), "log lines went to the file: {out:#?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty(), "{text}");
    for line in &lines {
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
        assert!(line["level"].is_string() && line["message"].is_string(), "{line}");
    }
    assert!(text.contains("entering guest"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);

    let nowhere = keyhold(["run", "--firmware", &hello, "--log-file", "/nonexistent/dir/k.log"]);
    nowhere.assert_bad_input("--log-file /nonexistent/dir/k.log");
}

/// The runtime's memcpy (eight bytes at a time from 64 bytes), memmove (both directions,
/// overlapping) and memset, checked by the firmware itself against byte-wise loops at every
/// relative offset within a cache line.
#[test]
fn the_runtimes_memory_functions_copy_and_fill_exactly() {
    require_kvm!();
    let out = keyhold(["run", "--firmware", &arg(fixture("memfns")), "--timeout", "120"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(out.stdout, "memfns: ok\n");
}
