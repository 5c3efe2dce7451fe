//! Host links between real keyhold nodes on loopback: keys, cluster config, the authenticated
//! handshake, and the audit of every refused link.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyhold_integration::nodes::{
    api_node, audit, channel_of, cluster, free_port, keygen, node, node_with, pair, run_nodes,
    wait_until,
};
use keyhold_integration::{finish, keyhold, require_kvm, spawn_keyhold, terminate, Outcome};

#[test]
fn keygen_and_pubkey_make_working_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = keygen(dir.path(), "k");
    assert_eq!(public.len(), 44);
    let bad = keyhold(["pubkey"]);
    bad.assert_bad_input("stdin:");
    // Written into a file others may read, the key comes with a warning; into a private
    // file, without.
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        let path = dir.path().join(format!("key-{mode:o}"));
        let file = std::fs::File::create(&path).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(mode)).unwrap();
        let out = std::process::Command::new(keyhold_integration::keyhold_bin())
            .arg("keygen")
            .stdout(file)
            .output()
            .unwrap();
        assert!(out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.contains("others may read (mode"), warned, "{mode:o}: {stderr}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim().len(), 44);
    }
}

#[test]
fn two_nodes_link_with_their_listed_keys_and_say_goodbye() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ((k1, p1), (k2, p2)) = (keygen(d, "1.key"), keygen(d, "2.key"));
    let c = cluster(d, "real", &[(1, free_port(), &p1), (2, free_port(), &p2)]);
    let outs = run_nodes(&[&node(d, "1", 1, &c, &k1), &node(d, "2", 2, &c, &k2)], "3");
    for out in &outs {
        assert_eq!(out.code(), 124, "spin ran until the timeout: {out:#?}");
        out.assert_no_panic();
    }
    let (a1, a2) = (audit(d, "1"), audit(d, "2"));
    assert!(a1.contains("\"event\":\"link_up\",\"reason\":\"authenticated\",\"source\":null,\"destination\":null,\"peer\":2"), "{a1}");
    assert!(a2.contains("\"event\":\"link_up\",\"reason\":\"authenticated\",\"source\":null,\"destination\":null,\"peer\":1"), "{a2}");
    assert!(
        a1.contains("\"event\":\"link_down\"") && a2.contains("\"event\":\"link_down\""),
        "{a1}\n{a2}"
    );
}

#[test]
fn unknown_keys_and_false_claims_are_refused_and_audited() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ((k1, p1), (k2, p2), (k3, p3)) =
        (keygen(d, "1.key"), keygen(d, "2.key"), keygen(d, "3.key"));
    let (port1, port2) = (free_port(), free_port());
    let real = cluster(d, "real", &[(1, port1, &p1), (2, port2, &p2)]);
    // A stranger: node 0 with a key node 1 has never heard of.
    let stranger = cluster(d, "stranger", &[(0, free_port(), &p3), (1, port1, &p1)]);
    // An impostor: node 2's own key, but claiming to be node 0.
    let impostor = cluster(d, "impostor", &[(0, free_port(), &p2), (1, port1, &p1)]);
    let outs = run_nodes(
        &[
            &node(d, "1", 1, &real, &k1),
            &node(d, "2", 2, &real, &k2),
            &node(d, "stranger", 0, &stranger, &k3),
            &node(d, "impostor", 0, &impostor, &k2),
        ],
        "4",
    );
    for out in &outs {
        out.assert_no_panic();
    }
    let a1 = audit(d, "1");
    assert!(a1.contains("\"event\":\"link_rejected\",\"reason\":\"unknown_key\""), "{a1}");
    assert!(a1.contains("\"event\":\"link_rejected\",\"reason\":\"claims_other_node\""), "{a1}");
    assert!(a1.contains("\"event\":\"link_up\",\"reason\":\"authenticated\",\"source\":null,\"destination\":null,\"peer\":2"), "node 1 kept its real link: {a1}");
    assert!(!audit(d, "stranger").contains("\"link_up\""), "the stranger never got a link");
    assert!(!audit(d, "impostor").contains("\"link_up\""), "the impostor never got a link");
}

#[test]
fn bad_link_settings_are_one_line_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ((k1, p1), (_, p2)) = (keygen(d, "1.key"), keygen(d, "2.key"));
    let c = cluster(d, "real", &[(1, free_port(), &p1), (2, free_port(), &p2)]);
    let run = |config: &Path| keyhold(["node", "--config", &config.display().to_string()]);

    std::fs::set_permissions(&k1, std::fs::Permissions::from_mode(0o644)).unwrap();
    run(&node(d, "open", 1, &c, &k1)).assert_bad_input("node.private_key_file: ");
    assert!(run(&node(d, "open", 1, &c, &k1)).stderr.contains("is readable by everyone"));
    std::fs::set_permissions(&k1, std::fs::Permissions::from_mode(0o600)).unwrap();

    let wrong = run(&node(d, "wrong", 2, &c, &k1));
    wrong.assert_bad_input("node.private_key_file: its public key is not the one");
    run(&node(d, "absent", 7, &c, &k1)).assert_bad_input("node.id: node 7 is not in");
    run(&node(d, "nokey", 1, &c, &d.join("missing.key"))).assert_bad_input("cannot read");
    let dup = cluster(d, "dup", &[(1, free_port(), &p1), (1, free_port(), &p2)]);
    run(&node(d, "dup", 1, &dup, &k1)).assert_bad_input("node[1].id: ID 1 is also node[0]'s");
}

#[test]
fn echo_and_ping_on_different_nodes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let n1 = node_with(d, "1", 1, &p.cluster, &p.k1, "echo", "peer=2:1:1", "");
    let n2 = node_with(
        d,
        "2",
        2,
        &p.cluster,
        &p.k2,
        "ping",
        "peer=1:1:1 count=100 size=2000 batch=8",
        "",
    );
    let outs = run_nodes(&[&n1, &n2], "60");
    assert_eq!(outs[1].code(), 0, "{:#?}", outs[1]);
    assert!(outs[1].stdout.contains("ping: 100 messages of 2000 bytes"), "{:#?}", outs[1]);
    assert_eq!(outs[0].code(), 0, "{:#?}", outs[0]);
    assert!(outs[0].stdout.contains("echo: echoed 100 messages"), "{:#?}", outs[0]);
    let a1 = audit(d, "1");
    assert!(
        a1.contains(
            "\"event\":\"offer_accepted\",\"reason\":\"listener_matched\",\"source\":{\"node\":2,"
        ),
        "{a1}"
    );
}

#[test]
fn a_deaf_receiver_on_another_node_stalls_its_sender_and_nothing_is_dropped() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let n1 =
        node_with(d, "1", 1, &p.cluster, &p.k1, "flood", "role=sink peer=2:1:1 count=2000", "");
    let n2 =
        node_with(d, "2", 2, &p.cluster, &p.k2, "flood", "role=send peer=1:1:1 count=2000", "");
    let outs = run_nodes(&[&n1, &n2], "90");
    for out in &outs {
        out.assert_no_panic();
        assert_eq!(out.code(), 0, "{out:#?}");
    }
    let numbers = |line: &str| -> Vec<u64> {
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
    };
    let find = |out: &Outcome, what: &str| {
        out.stdout.lines().find(|l| l.contains(what)).map(str::to_owned).expect(what)
    };
    // Every message arrived in order (the sink checked) and none was dropped: node 1 granted
    // node 2 credit for a window of messages at a time, and the sender waited for more.
    let line = find(&outs[0], "flood: received");
    let [.., received, dropped] = numbers(&line)[..] else { panic!("{line}") };
    assert_eq!((received, dropped), (2000, 0), "{line}");
    let line = find(&outs[1], "flood: sent");
    let [.., sent, stalls] = numbers(&line)[..] else { panic!("{line}") };
    assert!(sent == 2000 && stalls > 0, "the deaf sink stalled its sender: {line}");
    assert!(outs[0].stdout.contains("flood: the channel works after the flood"), "{outs:#?}");
}

/// Runs node 1 with an echo for partition 1 of node 2, and node 2 with `firmware` talking to
/// it (`peer=1:1:1`), in `dir`; returns both outcomes.
fn against_an_echo_on_node_1(dir: &Path, firmware: &str) -> Vec<Outcome> {
    let p = pair(dir);
    let n1 = node_with(dir, "1", 1, &p.cluster, &p.k1, "echo", "peer=2:1:1", "");
    let n2 = node_with(dir, "2", 2, &p.cluster, &p.k2, firmware, "peer=1:1:1", "");
    run_nodes(&[&n1, &n2], "60")
}

#[test]
fn forgeries_across_nodes_are_refused_too() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let outs = against_an_echo_on_node_1(d, "forge");
    assert_eq!(outs[1].code(), 0, "{:#?}", outs[1]);
    assert_eq!(outs[1].stdout.matches("refused as expected").count(), 11, "{:#?}", outs[1]);
    assert!(outs[1].stdout.contains("forge: genuine message echoed: true"), "{:#?}", outs[1]);
    // The offer to a process that never listened was refused by node 1's CMM.
    let a1 = audit(d, "1");
    assert!(a1.contains("\"event\":\"offer_rejected\",\"reason\":\"no_listener\""), "{a1}");
}

#[test]
fn the_independent_driver_works_across_nodes_too() {
    require_kvm!();
    // `indie` (tests/device.rs) against an echo on another node: OPEN answered by the other
    // node's CMM (into the first non-empty buffer, after the round trip), refusals from there,
    // every message sealed, sent, opened and checked.
    let dir = tempfile::tempdir().unwrap();
    let outs = against_an_echo_on_node_1(dir.path(), "indie");
    assert_eq!(outs[1].code(), 0, "{:#?}", outs[1]);
    assert!(outs[1].stdout.contains("indie: all checks passed"), "{:#?}", outs[1]);
    assert_eq!(outs[0].code(), 0, "the echo heard the goodbye: {:#?}", outs[0]);
}

#[test]
fn garbage_from_a_raw_client_is_refused_and_the_node_serves_on() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let n1 = node(d, "1", 1, &p.cluster, &p.k1);
    let n2 = node(d, "2", 2, &p.cluster, &p.k2);
    let children: Vec<_> = [&n1, &n2]
        .iter()
        .map(|c| spawn_keyhold(["node", "--config", &c.display().to_string(), "--timeout", "60"]))
        .collect();
    let linked = wait_until(Duration::from_secs(30), || audit(d, "2").contains("\"link_up\""));
    assert!(linked, "{}", audit(d, "2"));
    use std::io::Write;
    for junk in [&b"\x00\x05hello"[..], &b"\xff\xff\x01"[..], &b"\x00\x00"[..]] {
        if let Ok(mut raw) = std::net::TcpStream::connect(("127.0.0.1", p.port2)) {
            let _ = raw.write_all(junk);
        }
    }
    // The hello that does not decrypt is refused at once; the malformed ones are counted and
    // written together when the node stops (if not before).
    let refused = wait_until(Duration::from_secs(30), || {
        audit(d, "2").contains("\"event\":\"link_rejected\",\"reason\":\"handshake_failed\"")
    });
    assert!(refused, "{}", audit(d, "2"));
    for child in &children {
        terminate(child);
    }
    let outs: Vec<_> = children.into_iter().map(|c| finish(c, Duration::from_secs(60))).collect();
    for out in &outs {
        out.assert_no_panic();
        assert_eq!(out.code(), 143, "{out:#?}");
    }
    let a2 = audit(d, "2");
    // A hello that does not decrypt is audited on its own; malformed messages are counted
    // together (so that a flood of them is one record per few seconds, not one each).
    assert!(a2.contains("\"event\":\"link_rejected\",\"reason\":\"handshake_failed\""), "{a2}");
    // However the records fell (one with both, or one each), they count both.
    let malformed: u64 = a2
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "link_refused" && r["reason"] == "bad_handshake_message")
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(malformed, 2, "{a2}");
    assert!(a2.contains("\"event\":\"link_up\""), "{a2}");
    assert!(
        !a2.contains("\"event\":\"link_down\",\"reason\":\"keepalive_timeout\""),
        "the real link stayed up: {a2}"
    );
}

#[test]
fn a_killed_node_is_reported_down_and_links_again_when_restarted() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let n1 = node(d, "1", 1, &p.cluster, &p.k1);
    let n2 = node(d, "2", 2, &p.cluster, &p.k2);
    let first = spawn_keyhold(["node", "--config", &n1.display().to_string(), "--timeout", "60"]);
    let mut victim =
        spawn_keyhold(["node", "--config", &n2.display().to_string(), "--timeout", "60"]);
    let ups = || audit(d, "1").matches("\"event\":\"link_up\"").count();
    assert!(wait_until(Duration::from_secs(30), || ups() == 1), "{}", audit(d, "1"));
    victim.kill().unwrap(); // SIGKILL
    let _ = victim.wait();
    let down = wait_until(Duration::from_secs(30), || audit(d, "1").contains("\"link_down\""));
    assert!(down, "{}", audit(d, "1"));
    let again = spawn_keyhold(["node", "--config", &n2.display().to_string(), "--timeout", "60"]);
    assert!(wait_until(Duration::from_secs(30), || ups() == 2), "{}", audit(d, "1"));
    terminate(&again);
    let again = finish(again, Duration::from_secs(60));
    let goodbye = wait_until(Duration::from_secs(30), || {
        audit(d, "1").matches("\"event\":\"link_down\"").count() == 2
    });
    assert!(goodbye, "{}", audit(d, "1"));
    terminate(&first);
    let first = finish(first, Duration::from_secs(60));
    first.assert_no_panic();
    again.assert_no_panic();
    assert_eq!(first.code(), 143, "node 1 ran on until stopped: {first:#?}");
    let a1 = audit(d, "1");
    assert_eq!(a1.matches("\"event\":\"link_up\"").count(), 2, "{a1}");
    let downs: Vec<&str> = a1.lines().filter(|l| l.contains("\"event\":\"link_down\"")).collect();
    assert!(
        downs[0].contains("\"reason\":\"keepalive_timeout\"")
            || downs[0].contains("\"reason\":\"connection_lost\""),
        "{a1}"
    );
    // The new link carried node 2's keepalives, then its goodbye: node 1 read it (a link that
    // came up but was never read would end in keepalive_timeout instead).
    assert!(downs.get(1).is_some_and(|l| l.contains("\"reason\":\"goodbye\"")), "{a1}");
}

#[test]
fn the_demo_runs_from_nothing_and_says_everything_held() {
    require_kvm!();
    let out = keyhold(["demo"]);
    out.assert_no_panic();
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(
        out.stdout.contains("keyhold demo: every message echoed, every forgery refused"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("same node") && out.stdout.contains("across nodes"), "{out:#?}");
    assert!(out.stdout.contains("11 forgeries refused"), "{out:#?}");
}

#[test]
fn the_control_api_lists_without_keys_and_revokes_on_both_sides() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (config, socket) =
        api_node(d, &[("echo", "peer=1:2:1"), ("ping", "peer=1:1:1 count=1000000 batch=1")]);
    let node = spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "8"]);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket"];
        let s = socket.display().to_string();
        all.push(&s);
        all.extend_from_slice(args);
        keyhold(&all)
    };
    // Wait for the channel to open.
    let mut channels = String::new();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let out = ctl(&["channels"]);
        if out.code() == 0 && out.stdout.matches("\"open\"").count() == 2 {
            channels = out.stdout;
            break;
        }
    }
    assert_eq!(channels.matches("\"open\"").count(), 2, "{channels}");
    assert!(!channels.contains("key"), "no key in the API: {channels}");
    let echo_channel = channel_of(&channels, 1);
    let revoked = ctl(&["revoke", "1", &echo_channel]);
    assert_eq!(revoked.code(), 0, "{revoked:#?}");
    let after = ctl(&["channels"]);
    assert!(!after.stdout.contains("\"partition\":1"), "echo's entry is gone: {after:#?}");
    // Ping's side learned of it: its entry shows the revocation, or ping was refused its next
    // message and stopped, which closed its channels too.
    let partitions = ctl(&["partitions"]);
    let listed: serde_json::Value = serde_json::from_str(&partitions.stdout).unwrap();
    let ping_stopped = listed[1]["running"] == false;
    let entries: serde_json::Value = serde_json::from_str(&after.stdout).unwrap();
    let revoked = entries[0]["state"] == "peer_closed" && entries[0]["closed"] == "revoked";
    assert!(
        revoked || (ping_stopped && entries.as_array().is_some_and(|e| e.is_empty())),
        "{after:#?}\n{partitions:#?}"
    );
    assert!(partitions.stdout.contains("\"running\""), "{partitions:#?}");
    assert_eq!(ctl(&["revoke", "1", "0x4242"]).code(), 1);
    let audit = ctl(&["audit"]);
    assert!(audit.stdout.contains("\"channel_revoked\""), "{audit:#?}");
    let out = finish(node, Duration::from_secs(60));
    out.assert_no_panic();
    // Whichever side tried next was refused: the echo (its entry is gone) or the ping (its
    // entry is closed).
    let refused = out.stdout.contains("[p1] echo: the device refused an echo with status 3")
        || out.stdout.contains("[p2] ping: the device refused a message");
    assert!(refused, "delivery stopped: {out:#?}");
    assert_eq!(
        keyhold(["ctl", "--socket", &socket.display().to_string(), "links"]).code(),
        2,
        "the node is gone"
    );
}

/// Runs `scripts/<script>` with the test build of keyhold and a scratch cluster directory.
fn script(script: &str, args: &[&str], dir: &Path) -> Outcome {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut full = vec![root.join("scripts").join(script).display().to_string()];
    full.extend(args.iter().map(|a| a.to_string()));
    let mut cmd = std::process::Command::new("bash");
    cmd.args(&full)
        .env("KEYHOLD_BIN", keyhold_integration::keyhold_bin())
        .env("KEYHOLD_CLUSTER_DIR", dir)
        .stdin(std::process::Stdio::null());
    let out = cmd.output().unwrap();
    Outcome {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn cluster_scripts_bring_nodes_up_and_take_them_down() {
    require_kvm!();
    // A prefix and subnet of this test's own, so that a cluster an operator has up on this
    // machine is neither in the way nor touched.
    let prefix = format!("kt{}", std::process::id() % 100_000);
    let port = (20_000 + std::process::id() % 20_000).to_string();
    let netns: &[&str] = &["3", "--prefix", &prefix, "--subnet", "10.79.3"];
    let local: &[&str] = &["3", "--local", "--port", &port];
    let modes: &[&[&str]] = if keyhold_integration::is_root() { &[netns, local] } else { &[local] };
    for args in modes {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("cluster");
        let up = script("cluster-up.sh", args, &dir);
        // Whatever happens below, the nodes and namespaces go.
        let _down = ClusterDown(dir.clone());
        let down_after = |up: &Outcome| {
            let down = script("cluster-down.sh", &[], &dir);
            assert_eq!(down.code(), 0, "{down:#?} after {up:#?}");
            assert!(!dir.exists());
        };
        assert_eq!(up.code(), 0, "cluster-up {args:?}: {up:#?}");
        assert!(up.stdout.contains("cluster of 3 nodes up"), "{up:#?}");
        let links =
            keyhold(["ctl", "--socket", &dir.join("node2.sock").display().to_string(), "links"]);
        assert_eq!(links.stdout.matches("\"up\": true").count(), 2, "{links:#?}");
        assert_eq!(links.stdout.matches("\"last_failure\": ").count(), 2, "{links:#?}");
        assert_eq!(links.stdout.matches("\"queued_out\": ").count(), 2, "{links:#?}");
        // The ring's pings reach the next node's echo: node 2's echo channel (from node 1) and
        // ping channel (to node 3) open, and a revocation there closes node 3's end too.
        let socket = |i: u32| dir.join(format!("node{i}.sock")).display().to_string();
        let mut channels = String::new();
        for _ in 0..100 {
            channels = keyhold(["ctl", "--socket", &socket(2), "channels"]).stdout;
            if channels.matches("\"open\"").count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(channels.matches("\"open\"").count(), 2, "{channels}");
        let ping_channel = channel_of(&channels, 2);
        let revoked = keyhold(["ctl", "--socket", &socket(2), "revoke", "2", &ping_channel]);
        assert_eq!(revoked.code(), 0, "{revoked:#?}");
        let mut far_end = String::new();
        for _ in 0..100 {
            far_end = keyhold(["ctl", "--socket", &socket(3), "channels"]).stdout;
            if far_end.contains("\"peer_closed\"") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(far_end.contains("\"peer_closed\""), "the revocation reached node 3: {far_end}");
        // A node restarted as an operator would: it comes back linked to both others.
        let restart = script("cluster-restart.sh", &["2"], &dir);
        assert_eq!(restart.code(), 0, "{restart:#?}");
        assert!(restart.stdout.contains("node 2 is back: linked to the 2 others"), "{restart:#?}");
        down_after(&up);
        if args.contains(&"--prefix") {
            let left = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
            let left = String::from_utf8_lossy(&left.stdout);
            assert!(!left.contains(&prefix), "its namespaces are gone: {left}");
        }
    }
    assert!(
        script("cluster-up.sh", &["1"], Path::new("/nonexistent")).code() == 2,
        "N must be 2 or more"
    );
}

#[test]
fn cluster_up_fails_at_once_when_a_node_dies() {
    require_kvm!();
    // Node 1's port is taken, so node 1 exits at start: the script says so without waiting
    // for links that cannot come up.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = (taken.local_addr().unwrap().port() - 1).to_string();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("cluster");
    let up = script("cluster-up.sh", &["2", "--local", "--port", &base], &dir);
    let _down = ClusterDown(dir.clone());
    assert_eq!(up.code(), 1, "{up:#?}");
    assert!(up.stderr.contains("node 1 exited"), "{up:#?}");
    // The log's end, not the 30-second wait for links ("did not all come up").
    assert!(up.stderr.contains("cannot listen for host links"), "{up:#?}");
    assert!(!up.stderr.contains("did not all come up"), "{up:#?}");
}

#[test]
fn cluster_scripts_leave_directories_they_did_not_make_alone() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("mine");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("precious"), "keep me").unwrap();
    let down = script("cluster-down.sh", &[], &dir);
    assert_eq!(down.code(), 2, "{down:#?}");
    assert!(down.stderr.contains("was not made by cluster-up.sh; leaving it alone"), "{down:#?}");
    let up = script("cluster-up.sh", &["2", "--local"], &dir);
    assert_eq!(up.code(), 2, "{up:#?}");
    assert!(up.stderr.contains("is not an empty directory"), "{up:#?}");
    assert_eq!(std::fs::read_to_string(dir.join("precious")).unwrap(), "keep me");
    let gone = script("cluster-down.sh", &[], &scratch.path().join("never-made"));
    assert_eq!(gone.code(), 0, "{gone:#?}");
}

/// Runs cluster-down.sh for a cluster directory when dropped (also when a test fails).
struct ClusterDown(PathBuf);

impl Drop for ClusterDown {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = script("cluster-down.sh", &[], &self.0);
        }
    }
}

#[test]
fn a_reloaded_cluster_file_links_new_nodes_and_unlinks_removed_ones() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ((k1, p1), (k2, p2), (k3, p3)) =
        (keygen(d, "1.key"), keygen(d, "2.key"), keygen(d, "3.key"));
    let ports = [free_port(), free_port(), free_port()];
    let all = [(1, ports[0], p1.as_str()), (2, ports[1], p2.as_str()), (3, ports[2], p3.as_str())];
    // Nodes 1 and 2 start with a file that lists only them; node 3's lists all three.
    let shared = cluster(d, "shared", &all[..2]);
    let full = cluster(d, "full", &all);
    let spawn = |name: &str, id: u32, cluster: &Path, key: &Path| {
        let config = node_with(d, name, id, cluster, key, "spin", "", "");
        spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"])
    };
    let links_up = |name: &str| {
        keyhold_integration::nodes::ctl(d, name, &["links"]).stdout.matches("\"up\": true").count()
    };
    let one = spawn("1", 1, &shared, &k1);
    let two = spawn("2", 2, &shared, &k2);
    assert!(wait_until(Duration::from_secs(60), || links_up("1") == 1), "1 and 2 linked");

    // Node 3 joins: the shared file grows, node 1 is told by SIGHUP, node 2 by ctl reload.
    std::fs::copy(&full, &shared).unwrap();
    let three = spawn("3", 3, &full, &k3);
    let hup = std::process::Command::new("kill").args(["-HUP", &one.id().to_string()]).status();
    assert!(hup.unwrap().success());
    let reload = keyhold_integration::nodes::ctl(d, "2", &["reload"]);
    assert_eq!(reload.code(), 0, "{reload:#?}");
    assert!(reload.stdout.contains("added [3]"), "{reload:#?}");
    assert!(wait_until(Duration::from_secs(60), || links_up("3") == 2), "3 linked to 1 and 2");
    let established = |name: &str, peer: u32| {
        let links = keyhold_integration::nodes::ctl(d, name, &["links"]).stdout;
        let links: serde_json::Value = serde_json::from_str(&links).unwrap();
        let link = links.as_array().unwrap().iter().find(|l| l["peer"] == peer).cloned();
        link.map(|l| l["established"].as_u64().unwrap_or(0))
    };
    assert_eq!(established("1", 2), Some(1), "the 1-2 link was not touched");

    // Node 2 leaves node 1's cluster: node 1 ends its link, audited, and forgets the peer;
    // its link to node 3 stays as it was.
    cluster(d, "shared", &[all[0], all[2]]);
    let reload = keyhold_integration::nodes::ctl(d, "1", &["reload"]);
    assert!(reload.stdout.contains("removed [2]"), "{reload:#?}");
    assert_eq!(
        established("1", 2),
        None,
        "{:?}",
        keyhold_integration::nodes::ctl(d, "1", &["links"])
    );
    assert_eq!(established("1", 3), Some(1));
    // The device thread ends the link, and the audit writer writes it down, after the answer.
    let unlinked = "\"event\":\"link_down\",\"reason\":\"removed_from_cluster\"";
    assert!(
        wait_until(Duration::from_secs(30), || audit(d, "1").contains(unlinked)),
        "{}",
        audit(d, "1")
    );
    // A file without this node cannot be applied: the node says so and runs on unchanged.
    cluster(d, "shared", &all[1..]);
    let refused = keyhold_integration::nodes::ctl(d, "1", &["reload"]);
    assert_eq!(refused.code(), 1, "{refused:#?}");
    assert!(refused.stderr.contains("node 1 is not in the cluster file"), "{refused:#?}");
    assert_eq!(links_up("1"), 1);

    for node in [&one, &two, &three] {
        terminate(node);
    }
    for node in [one, two, three] {
        let out = finish(node, Duration::from_secs(60));
        assert_eq!(out.code(), 143, "{out:#?}");
        out.assert_no_panic();
    }
}
