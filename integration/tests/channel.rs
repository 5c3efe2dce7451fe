//! The secure-channel device between partitions of one node, through real guests: echo, ping,
//! forge and snoop run under real KVM in one `keyhold run` process.

use std::path::Path;

use keyhold_integration::{fixture, keyhold, require_kvm, Outcome};

/// Runs `a` as partition 1 and `b` as partition 2, each told the other's endpoint as its
/// peer, with `extra_b` appended to b's arguments.
fn pair(a: &str, b: &str, extra_b: &str, more: &[&str]) -> Outcome {
    let mut args = vec![
        "run".to_string(),
        "--partition".into(),
        format!("1={}", fixture(a).display()),
        "--partition".into(),
        format!("2={}", fixture(b).display()),
        "--arg".into(),
        "1=peer=0:2:1".into(),
        "--arg".into(),
        format!("2=peer=0:1:1 {extra_b}"),
        "--timeout".into(),
        "60".into(),
    ];
    args.extend(more.iter().map(|s| s.to_string()));
    let out = keyhold(&args);
    out.assert_no_panic();
    out
}

#[test]
fn ping_gets_every_message_echoed() {
    require_kvm!();
    for (size, batch) in [("64", "1"), ("4096", "32"), ("65536", "4")] {
        let out = pair("echo", "ping", &format!("count=100 size={size} batch={batch}"), &[]);
        assert_eq!(out.code(), 0, "size {size}: {out:#?}");
        assert!(
            out.stdout.contains(&format!("[p2] ping: 100 messages of {size} bytes")),
            "{out:#?}"
        );
        assert!(out.stdout.contains("[p1] echo: echoed 100 messages; goodbye"), "{out:#?}");
    }
}

#[test]
fn a_deaf_receiver_stalls_its_sender_and_nothing_is_dropped() {
    require_kvm!();
    let flood = fixture("flood").display().to_string();
    let out = keyhold([
        "run",
        "--partition",
        &format!("1={flood}"),
        "--partition",
        &format!("2={flood}"),
        "--arg",
        "1=role=sink peer=0:2:1 count=2000",
        "--arg",
        "2=role=send peer=0:1:1 count=2000",
        "--timeout",
        "60",
    ]);
    out.assert_no_panic();
    assert_eq!(out.code(), 0, "{out:#?}");
    let numbers = |line: &str| -> Vec<u64> {
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
    };
    let line = out.stdout.lines().find(|l| l.contains("flood: received")).expect("sink's count");
    let [_, received, dropped] = numbers(line)[..] else { panic!("{line}") };
    // Every message arrived, in order (the sink checked), none was dropped: past what the
    // device holds for the channel, the sender was told NO_ROOM and waited.
    assert_eq!((received, dropped), (2000, 0), "{line}");
    let line = out.stdout.lines().find(|l| l.contains("flood: sent")).expect("sender's count");
    let [_, sent, stalls] = numbers(line)[..] else { panic!("{line}") };
    assert!(sent == 2000 && stalls > 0, "the deaf sink stalled its sender: {line}");
    assert!(
        out.stdout.contains("[p2] flood: a forged send to the full receiver was refused as forged"),
        "a forgery is refused as one even when the receiver has no room: {out:#?}"
    );
    assert!(out.stdout.contains("[p1] flood: the channel works after the flood"), "{out:#?}");
    assert!(out.stdout.contains("[p2] flood: the sink got the message sent after"), "{out:#?}");
}

#[test]
fn a_guest_supplied_key_works_too() {
    require_kvm!();
    let out = pair("echo", "ping", "count=20 key=guest", &[]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("[p1] echo: echoed 20 messages"), "{out:#?}");
}

#[test]
fn every_forgery_is_refused_with_its_status() {
    require_kvm!();
    let out = pair("echo", "forge", "", &["-v"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(out.stdout.matches("refused as expected").count(), 11, "{out:#?}");
    assert!(out.stdout.contains("forge: genuine message echoed: true"), "{out:#?}");
    assert!(out.stdout.contains("forge: device counted 3 forged sends"), "{out:#?}");
    // Each forgery and the rejected offer is in the audit log.
    assert_eq!(out.stderr.matches("\"reason\":\"forged_source\"").count(), 3, "{out:#?}");
    assert!(
        out.stderr.contains("\"event\":\"offer_rejected\",\"reason\":\"no_listener\""),
        "{out:#?}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn dumps(dir: &Path) -> Vec<Vec<u8>> {
    [1, 2]
        .iter()
        .map(|id| std::fs::read(dir.join(format!("partition-{id}.ram"))).unwrap())
        .collect()
}

#[test]
fn a_guest_key_is_in_no_guest_memory_register_log_or_list() {
    require_kvm!();
    let seed = 0x5eed_1234_u64;
    let key: Vec<u8> = (0..32).map(|i| firmware_fixtures::snoop_key::key_byte(seed, i)).collect();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let dump_dir = dir.path().display().to_string();
    let out = pair("echo", "snoop", &format!("seed={seed}"), &["-v", "--dump-ram", &dump_dir]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(
        out.stdout.contains("snoop: key found in RAM: false; in device registers: false"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("snoop: LIST channel"), "LIST was printed: {out:#?}");
    for (i, ram) in dumps(dir.path()).iter().enumerate() {
        assert!(!contains(ram, &key), "the key is in partition {}'s RAM", i + 1);
    }
    assert!(
        contains(&dumps(dir.path())[1], b"keyhold-snoop-canary-3141592653"),
        "dumps hold guest RAM"
    );
    for text in [&out.stdout, &out.stderr] {
        assert!(
            !contains(text.as_bytes(), &key) && !text.contains(&hex),
            "the key is in the output"
        );
    }

    // Control: a partition that keeps a copy of the key is caught, in its RAM and by itself.
    let planted =
        pair("echo", "snoop", &format!("seed={seed} plant=1"), &["--dump-ram", &dump_dir]);
    assert_eq!(planted.code(), 1, "{planted:#?}");
    assert!(planted.stdout.contains("snoop: key found in RAM: true"), "{planted:#?}");
    assert!(contains(&dumps(dir.path())[1], &key));
}

/// Writes a node config into `dir` whose firmware paths point at the fixtures.
fn node_config(dir: &Path, node: u32, body: &str) -> std::path::PathBuf {
    let fixtures = fixture("hello").parent().unwrap().display().to_string();
    let text = format!(
        "[node]\nid = {node}\naudit_log = \"audit.jsonl\"\n\n{}",
        body.replace("FIXTURES", &fixtures)
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_node_runs_its_config_with_one_cmm_and_an_audit_log() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(
        dir.path(),
        5,
        "[[partition]]\nid = 1\nfirmware = \"FIXTURES/echo.elf\"\nargs = \"peer=5:2:1\"\n\n\
         [[partition]]\nid = 2\nfirmware = \"FIXTURES/ping.elf\"\nargs = \"peer=5:1:1 count=50\"\n\n\
         [[partition]]\nid = 3\nfirmware = \"FIXTURES/rng.elf\"\n",
    );
    let out = keyhold(["node", "--config", &config.display().to_string(), "--timeout", "60"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(
        out.stdout.contains("[p2] ping: channel 0x") && out.stdout.contains(" to 5:1:1 open"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("[p1] echo: echoed 50 messages"), "{out:#?}");
    assert!(out.stdout.contains("[p3] rng: ok"), "{out:#?}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().all(|l| l.starts_with("{\"time\":") && l.contains("\"node\":5")),
        "{audit}"
    );
    assert!(audit.contains("\"event\":\"offer_accepted\""), "{audit}");
    assert!(audit.contains("\"event\":\"channel_closed\""), "{audit}");
}

#[test]
fn a_bad_node_config_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    // TOML syntax and shape: the parser's own rendering, a caret under the fault.
    let config =
        node_config(dir.path(), 1, "[[partition]]\nid = 1\nfirmware = \"x.elf\"\nflavour = 1\n");
    let out = keyhold(["node", "--config", &config.display().to_string()]);
    assert_eq!(out.code(), 2, "{out:#?}");
    out.assert_no_panic();
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("keyhold: ") && first.contains("node.toml: TOML parse error at line")
    );
    assert!(out.stderr.contains("\n  |") && out.stderr.contains('^'), "{out:#?}");
    assert!(out.stderr.contains("unknown field `flavour`"), "{out:#?}");
    let missing = keyhold(["node", "--config", "/nonexistent/node.toml"]);
    missing.assert_bad_input("/nonexistent/node.toml: cannot read it");

    // Values a start would refuse: one line, naming the field.
    for (body, says) in [
        ("[[partition]]\nid = 1\nfirmware = \"missing.elf\"\n", "partition[0].firmware: "),
        (
            "[[partition]]\nid = 1\nfirmware = \"FIXTURES/hello.elf\"\nmemory_mib = 999999\n",
            "partition[0].memory_mib: 999999 MiB is out of range",
        ),
        ("[[partition]]\nid = 1\nfirmware = \"FIXTURES\"\n", "partition[0].firmware: "),
    ] {
        let config = node_config(dir.path(), 1, body);
        let config = config.display().to_string();
        keyhold(["node", "--config", &config]).assert_bad_input(says);
        keyhold(["check", "--config", &config]).assert_bad_input(says);
    }
    // `check` also reads the firmware as a start would.
    let not_elf = dir.path().join("not-elf.bin");
    std::fs::write(&not_elf, b"MZ not an ELF file").unwrap();
    let body = format!("[[partition]]\nid = 1\nfirmware = \"{}\"\n", not_elf.display());
    let config = node_config(dir.path(), 1, &body).display().to_string();
    keyhold(["check", "--config", &config]).assert_bad_input("not-elf.bin");
    let config =
        node_config(dir.path(), 1, "[[partition]]\nid = 1\nfirmware = \"FIXTURES/hello.elf\"\n");
    let text = std::fs::read_to_string(&config).unwrap();
    for (field, line) in [
        ("node.api_socket", "api_socket = \"/nonexistent/dir/api.sock\"\n"),
        ("node.audit_log", "audit_log = \"/nonexistent/dir/audit.jsonl\"\n"),
    ] {
        let text = text.replace("audit_log = \"audit.jsonl\"\n", line);
        std::fs::write(&config, text).unwrap();
        let out = keyhold(["node", "--config", &config.display().to_string()]);
        out.assert_bad_input(&format!("{field}: directory /nonexistent/dir does not exist"));
    }
    if keyhold_integration::kvm_available() {
        std::fs::write(&config, &text).unwrap();
        let ok = keyhold(["check", "--config", &config.display().to_string()]);
        assert_eq!(ok.code(), 0, "{ok:#?}");
        assert!(ok.stdout.ends_with("node 1 with 1 partitions: ok\n"), "{ok:#?}");
    }
}

#[test]
fn a_hostile_driver_gets_errors_or_needs_reset_and_the_others_keep_going() {
    require_kvm!();
    let p = |id: u32, name: &str| format!("{id}={}", fixture(name).display());
    let out = keyhold([
        "run",
        "--partition",
        &p(1, "echo"),
        "--partition",
        &p(2, "ping"),
        "--partition",
        &p(3, "echo"),
        "--partition",
        &p(4, "bad-queue"),
        "--arg",
        "1=peer=0:2:1",
        "--arg",
        "2=peer=0:1:1 count=200",
        "--arg",
        "3=peer=0:4:1",
        "--arg",
        "4=peer=0:3:1",
        "--timeout",
        "60",
    ]);
    out.assert_no_panic();
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(out.stdout.matches(": handled\n").count(), 8, "{out:#?}");
    assert!(out.stdout.contains("[p4] bad-queue: 0 cases not handled"), "{out:#?}");
    assert!(
        out.stdout.contains("[p1] echo: echoed 200 messages"),
        "the other pair kept going: {out:#?}"
    );
    assert!(out.stderr.contains("virtio device needs reset"), "{out:#?}");
}
