//! virtio-vsock (docs/VSOCK.md): partitions whose only driver is the third-party
//! `virtio-drivers` crate's vsock driver and connection manager, unmodified (the `vsock`
//! fixture), connect to each other through keyhold's device. Every connection is a keyed
//! channel of the CMM, opened only where the node's policy allows it; a forged source CID and
//! a forbidden flow are refused with an RST and audited; credit keeps a slow reader's sender
//! waiting, and nothing is lost.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyhold_integration::nodes::{pair, wait_until};
use keyhold_integration::{
    finish, fixture, keyhold, require_kvm, spawn_keyhold, terminate, Outcome,
};

/// A node config in `dir`: an audit log, the policy `allow` (`(from, to)` pairs) and
/// partitions `(id, cid, args)` each running the `vsock` fixture, each with its socket for
/// programs on the node at `DIR/p<ID>.vsock`.
fn config(dir: &Path, allow: &[(&str, &str)], partitions: &[(u32, u32, &str)]) -> PathBuf {
    let mut text = "[node]\nid = 1\naudit_log = \"audit.jsonl\"\n".to_owned();
    for (from, to) in allow {
        text += &format!("\n[[vsock.allow]]\nfrom = \"{from}\"\nto = \"{to}\"\n");
    }
    for (id, cid, args) in partitions {
        text += &format!(
            "\n[[partition]]\nid = {id}\nfirmware = \"{}\"\nmemory_mib = 64\nvsock_cid = {cid}\n\
             vsock_uds = \"p{id}.vsock\"\nargs = \"{args}\"\n",
            fixture("vsock").display()
        );
    }
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the node until its partitions stop (or 120 s pass).
fn run(config: &Path) -> Outcome {
    let out = keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"]);
    out.assert_no_panic();
    out
}

/// The audit records of the node in `dir` with `event` and `reason`.
fn audited(dir: &Path, event: &str, reason: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == event && r["reason"] == reason)
        .collect()
}

#[test]
fn ten_mib_echo_through_an_unmodified_third_party_driver() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[("4:*", "3:5000")],
        &[(1, 3, "role=echo port=5000"), (2, 4, "role=send cid=3 port=5000 bytes=10485760")],
    );
    let out = run(&config);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("vsock: 10485760 bytes echoed and checked"), "{out:#?}");
    assert!(out.stdout.contains("vsock: listening on 3:5000"), "{out:#?}");
    // The connection was a keyed channel the CMM matched to a LISTEN entry.
    assert!(!audited(dir.path(), "offer_accepted", "listener_matched").is_empty());
}

#[test]
fn a_slow_reader_stalls_its_sender_and_loses_nothing() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[("*", "3:7")],
        &[
            (1, 3, "role=echo port=7 slow_ms=1 rx_capacity=4096"),
            (2, 4, "role=send cid=3 port=7 bytes=262144"),
        ],
    );
    let out = run(&config);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("vsock: 262144 bytes echoed and checked"), "{out:#?}");
    assert!(audited(dir.path(), "vsock_refused", "over_credit").is_empty(), "{out:#?}");
}

#[test]
fn a_flow_the_policy_forbids_is_reset_and_audited() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // Only port 5000 is open to CID 4; it asks for 5001. The echo waits for nobody: the
    // node's timeout would stop it, so it is given none to wait for (conns=0 ends at once).
    let config = config(
        dir.path(),
        &[("4:*", "3:5000")],
        &[(1, 3, "role=echo port=5001 conns=0"), (2, 4, "role=send cid=3 port=5001 bytes=64")],
    );
    let out = run(&config);
    assert_eq!(out.code(), 3, "{out:#?}");
    assert!(out.stdout.contains("vsock: connection reset"), "{out:#?}");
    let refused = audited(dir.path(), "vsock_refused", "policy");
    assert_eq!(refused.len(), 1, "{refused:#?}");
}

#[test]
fn a_forged_source_cid_is_refused_and_audited() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // The driver is told its CID is 9 and stamps it; the device knows the partition's is 4.
    let config = config(
        dir.path(),
        &[("*", "*")],
        &[(1, 3, "role=echo port=5000 conns=0"), (2, 4, "role=send cid=3 port=5000 forge=9")],
    );
    let out = run(&config);
    assert_eq!(out.code(), 3, "{out:#?}");
    assert!(!audited(dir.path(), "vsock_refused", "forged_cid").is_empty(), "{out:#?}");
}

#[test]
fn a_request_to_a_cid_nobody_has_is_reset() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &[("*", "*")], &[(2, 4, "role=send cid=77 port=1")]);
    let out = run(&config);
    assert_eq!(out.code(), 3, "{out:#?}");
    assert!(!audited(dir.path(), "vsock_refused", "no_such_cid").is_empty(), "{out:#?}");
}

#[test]
fn vsock_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad_cid = config(dir.path(), &[], &[(1, 2, "role=echo port=1")]);
    let out = keyhold(["check", "--config", &bad_cid.display().to_string()]);
    out.assert_bad_input("partition[0].vsock_cid");
    let bad_rule = config(dir.path(), &[("3:x", "*")], &[(1, 3, "role=echo port=1")]);
    let out = keyhold(["check", "--config", &bad_rule.display().to_string()]);
    out.assert_bad_input("vsock.allow[0].from");
}

#[test]
fn a_host_program_reaches_a_guest_through_its_socket() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &[("2:*", "3:5000")], &[(1, 3, "role=echo port=5000")]);
    let node =
        spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"]);
    let socket = dir.path().join("p1.vsock");
    let mut stream = None;
    assert!(wait_until(Duration::from_secs(60), || {
        stream = UnixStream::connect(&socket).ok();
        stream.is_some()
    }));
    let mut stream = stream.unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // Firecracker's hybrid vsock handshake: CONNECT PORT, then OK HOSTPORT once it accepts.
    stream.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let writer = {
        let (mut stream, data) = (stream.try_clone().unwrap(), data.clone());
        std::thread::spawn(move || stream.write_all(&data).unwrap())
    };
    let mut echoed = vec![0u8; data.len()];
    reader.read_exact(&mut echoed).unwrap();
    writer.join().unwrap();
    assert!(echoed == data, "the echo differs");
    drop((reader, stream));
    let out = finish(node, Duration::from_secs(60));
    assert_eq!(out.code(), 0, "the echo saw its one connection end: {out:#?}");
    assert!(out.stdout.contains("vsock: closed 2:"), "{out:#?}");
}

#[test]
fn a_guest_reaches_a_host_program_listening_beside_its_socket() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // The program listens at PATH_PORT before the guest asks for (2, PORT).
    let listener = UnixListener::bind(dir.path().join("p1.vsock_6000")).unwrap();
    let program = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 8192];
        let mut total = 0;
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    stream.write_all(&buf[..n]).unwrap();
                    total += n;
                }
            }
        }
    });
    let config = config(
        dir.path(),
        &[("3:*", "2:6000")],
        &[(1, 3, "role=send cid=2 port=6000 bytes=1048576")],
    );
    let out = run(&config);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.contains("vsock: 1048576 bytes echoed and checked"), "{out:#?}");
    assert_eq!(program.join().unwrap(), 1_048_576);
}

/// Node `id` of a two-node cluster in `dir`, its partition 1 running the `vsock` fixture with
/// `args` under CID `cid`; the other node's partition 1 is CID `peer_cid`; `allow` is its
/// policy.
fn cluster_node(
    dir: &Path,
    p: &keyhold_integration::nodes::Pair,
    (id, cid, args): (u32, u32, &str),
    peer_cid: u32,
    allow: (&str, &str),
) -> PathBuf {
    let other = 3 - id;
    let sections = format!(
        "[[vsock.allow]]\nfrom = \"{}\"\nto = \"{}\"\n\n[[vsock.peer]]\ncid = {peer_cid}\nnode = {other}\npartition = 1\n",
        allow.0, allow.1
    );
    let path = p.spec(id, "vsock", args, &sections).write(dir);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text += &format!("memory_mib = 64\nvsock_cid = {cid}\n");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_connection_across_two_nodes_is_a_channel_their_link_carries() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pair(d);
    let rule = ("4:*", "3:5000");
    let one = cluster_node(d, &p, (1, 3, "role=echo port=5000"), 4, rule);
    let two = cluster_node(d, &p, (2, 4, "role=send cid=3 port=5000 bytes=10485760"), 3, rule);
    let nodes = [&one, &two]
        .map(|c| spawn_keyhold(["node", "--config", &c.display().to_string(), "--timeout", "120"]));
    let [first, second] = nodes;
    let sender = finish(second, Duration::from_secs(150));
    let echo = finish(first, Duration::from_secs(150));
    for out in [&sender, &echo] {
        out.assert_no_panic();
    }
    assert_eq!(sender.code(), 0, "{sender:#?}\n{echo:#?}");
    assert!(sender.stdout.contains("vsock: 10485760 bytes echoed and checked"), "{sender:#?}");
    assert_eq!(echo.code(), 0, "{echo:#?}");
    // Node 1's CMM made the LISTEN entry its policy allowed, for node 2's offer.
    let audit = std::fs::read_to_string(d.join("audit-1.jsonl")).unwrap_or_default();
    assert!(audit.contains("\"offer_accepted\""), "{audit}");
}

#[test]
fn the_receiving_nodes_policy_decides_a_connection_across_nodes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pair(d);
    // Node 2 lets CID 4 ask for 3:5001; node 1 opens only 3:5000.
    let one = cluster_node(d, &p, (1, 3, "role=echo port=5001"), 4, ("4:*", "3:5000"));
    let two = cluster_node(d, &p, (2, 4, "role=send cid=3 port=5001 bytes=64"), 3, ("4:*", "3:*"));
    let first = spawn_keyhold(["node", "--config", &one.display().to_string(), "--timeout", "60"]);
    let sender = keyhold(["node", "--config", &two.display().to_string(), "--timeout", "60"]);
    assert_eq!(sender.code(), 3, "{sender:#?}");
    assert!(sender.stdout.contains("vsock: connection reset"), "{sender:#?}");
    // The echo waits for a connection that never comes.
    terminate(&first);
    let echo = finish(first, Duration::from_secs(90));
    echo.assert_no_panic();
    let audit = std::fs::read_to_string(d.join("audit-1.jsonl")).unwrap_or_default();
    assert!(audit.contains("\"offer_rejected\",\"reason\":\"no_listener\""), "{audit}");
}

/// A program's `CONNECT PORT` through `socket`, a few bytes echoed back.
/// A program's connection through `socket` to the guest's `port` (Firecracker's hybrid
/// handshake done): the stream, and a reader of what comes back.
fn connect(socket: &Path, port: u32) -> (UnixStream, BufReader<UnixStream>) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    (stream, reader)
}

/// A node in `dir` with an API socket, partition 1 (CID 3) echoing on port 5000 until `conns`
/// connections end (programs on the node may connect to it), and partition 2 spinning, which
/// keeps the node up whatever becomes of partition 1. Returns once partition 1's socket takes
/// connections: the node, that socket and the API's.
fn operated_echo(dir: &Path, conns: u32) -> (std::process::Child, PathBuf, PathBuf) {
    let args = format!("role=echo port=5000 conns={conns}");
    let config = config(dir, &[("2:*", "3:5000")], &[(1, 3, &args)]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace("[node]\n", "[node]\napi_socket = \"api.sock\"\n");
    text += &format!("\n[[partition]]\nid = 2\nfirmware = \"{}\"\n", fixture("spin").display());
    std::fs::write(&config, text).unwrap();
    let node =
        spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"]);
    let (socket, api) = (dir.join("p1.vsock"), dir.join("api.sock"));
    assert!(wait_until(Duration::from_secs(60), || UnixStream::connect(&socket).is_ok()));
    (node, socket, api)
}

fn echo_through(socket: &Path, port: u32) -> Vec<u8> {
    let (mut stream, mut reader) = connect(socket, port);
    stream.write_all(b"hello").unwrap();
    let mut back = vec![0u8; 5];
    reader.read_exact(&mut back).unwrap();
    back
}

#[test]
fn a_partition_started_again_has_its_vsock_device_and_socket_back() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (node, socket, api) = operated_echo(dir.path(), 100);
    // Twice, so that the first connection's socket has been closed and its number reused.
    for _ in 0..2 {
        assert_eq!(echo_through(&socket, 5000), b"hello");
    }
    let ctl = |what: &str| keyhold(["ctl", "--socket", &api.display().to_string(), what, "1"]);
    assert_eq!(ctl("stop").code(), 0);
    let stopped = || {
        keyhold(["ctl", "--socket", &api.display().to_string(), "partitions"])
            .stdout
            .contains("stopped by the operator")
    };
    assert!(wait_until(Duration::from_secs(60), stopped));
    assert_eq!(ctl("start").code(), 0);
    assert_eq!(echo_through(&socket, 5000), b"hello", "the new guest answers on the same socket");
    terminate(&node);
    let out = finish(node, Duration::from_secs(60));
    out.assert_no_panic();
    assert!(!out.stderr.contains("ERROR"), "{out:#?}");
}

#[test]
fn programs_that_never_greet_cannot_hold_the_socket() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &[("2:*", "3:5000")], &[(1, 3, "role=echo port=5000 conns=1")]);
    let node =
        spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"]);
    let socket = dir.path().join("p1.vsock");
    assert!(wait_until(Duration::from_secs(60), || UnixStream::connect(&socket).is_ok()));
    // 64 connections that say nothing: the partition's whole allowance.
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(UnixStream::connect(&socket).unwrap());
    }
    // The next is closed at once; a silent one is closed within its 5 s to greet.
    let extra = UnixStream::connect(&socket).unwrap();
    // Closed: the read ends (0 bytes, or reset), rather than timing out.
    let closed = |mut s: &UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        match s.read(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => {
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
            }
        }
    };
    assert!(closed(&extra), "the 65th connection is refused");
    assert!(closed(&silent[0]), "a connection that never greets is closed");
    drop(silent);
    // The socket still serves a program that says CONNECT.
    let ok = wait_until(Duration::from_secs(30), || {
        std::panic::catch_unwind(|| echo_through(&socket, 5000)).is_ok_and(|b| b == b"hello")
    });
    assert!(ok, "a greeting program is served after the silent ones");
    let out = finish(node, Duration::from_secs(60));
    out.assert_no_panic();
    assert_eq!(out.code(), 0, "{out:#?}");
}

#[test]
fn a_connection_to_a_node_that_dies_is_reset() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pair(d);
    let rule = ("4:*", "3:5000");
    // A slow echo: the transfer is still going when node 1 is killed.
    let one = cluster_node(d, &p, (1, 3, "role=echo port=5000 slow_ms=20"), 4, rule);
    let two = cluster_node(d, &p, (2, 4, "role=send cid=3 port=5000 bytes=10485760"), 3, rule);
    let mut first =
        spawn_keyhold(["node", "--config", &one.display().to_string(), "--timeout", "120"]);
    let second =
        spawn_keyhold(["node", "--config", &two.display().to_string(), "--timeout", "120"]);
    // Once node 1 took the connection's offer, it dies without a word.
    let accepted = || {
        std::fs::read_to_string(d.join("audit-1.jsonl")).is_ok_and(|a| a.contains("offer_accepted"))
    };
    assert!(wait_until(Duration::from_secs(60), accepted));
    first.kill().unwrap();
    let _ = first.wait();
    let sender = finish(second, Duration::from_secs(90));
    sender.assert_no_panic();
    assert_eq!(sender.code(), 3, "{sender:#?}");
    assert!(sender.stdout.contains("vsock: connection reset"), "{sender:#?}");
}

#[test]
fn a_guest_cannot_fill_another_partitions_table_with_unanswered_requests() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // CID 3 has a device but no driver: nothing it is asked is ever answered.
    let config =
        config(dir.path(), &[("*", "*")], &[(2, 4, "role=ask cid=3 port=80 count=20 expect=4")]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace("[node]\n", "[node]\napi_socket = \"api.sock\"\n");
    text += &format!(
        "\n[[partition]]\nid = 1\nfirmware = \"{}\"\nvsock_cid = 3\n",
        fixture("spin").display()
    );
    std::fs::write(&config, text).unwrap();
    let node =
        spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"]);
    // The asker ends once it has seen its resets (or given up); the spinner keeps the node up.
    let api = dir.path().join("api.sock").display().to_string();
    let asker_done = || {
        let listed = keyhold(["ctl", "--socket", &api, "partitions"]).stdout;
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
        listed
            .as_array()
            .is_some_and(|all| all.iter().any(|p| p["id"] == 2 && p["running"] == false))
    };
    assert!(wait_until(Duration::from_secs(60), asker_done));
    terminate(&node);
    let out = finish(node, Duration::from_secs(60));
    out.assert_no_panic();
    // 16 requests wait for an answer; the 4 past them are reset at once, and audited.
    assert!(out.stdout.contains("vsock: asked for 20 connections, 4 reset"), "{out:#?}");
    assert_eq!(audited(dir.path(), "vsock_refused", "too_many_requests").len(), 4);
}

#[test]
fn the_operator_resets_a_partitions_vsock_transport_and_every_end_learns_it() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (node, socket, api) = operated_echo(dir.path(), 2);
    // A program holds a connection to the guest, and it works.
    let (mut stream, mut reader) = connect(&socket, 5000);
    stream.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    reader.read_exact(&mut back).unwrap();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", api.to_str().unwrap()];
        all.extend_from_slice(args);
        keyhold(all)
    };
    // A partition without a vsock device has no transport to reset.
    let none = ctl(&["reset-vsock", "2"]);
    assert_ne!(none.code(), 0, "{none:#?}");
    assert!(none.stderr.contains("404"), "{none:#?}");
    let reset = ctl(&["reset-vsock", "1"]);
    assert_eq!(reset.code(), 0, "{reset:#?}");
    let answer: serde_json::Value = serde_json::from_str(&reset.stdout).unwrap();
    assert_eq!(answer["connections"], 1, "{answer}");
    // The program's end is closed; the guest's driver was told (an RST: this driver posts no
    // event buffers for TRANSPORT_RESET) and counts the connection ended.
    let mut rest = Vec::new();
    assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0, "the program's socket is closed");
    // The transport works on: a new connection echoes, and ends the guest's second.
    assert_eq!(echo_through(&socket, 5000), b"hello");
    let records = audited(dir.path(), "vsock_transport_reset", "operator");
    assert_eq!(records.len(), 1, "audited once");
    assert_eq!(records[0]["count"], 1);
    assert_eq!(records[0]["source"]["partition"], 1);
    let ended = || {
        let partitions: serde_json::Value =
            serde_json::from_str(&ctl(&["partitions"]).stdout).unwrap_or_default();
        partitions.as_array().into_iter().flatten().any(|p| p["id"] == 1 && p["exit_status"] == 0)
    };
    assert!(wait_until(Duration::from_secs(60), ended), "the echo saw both connections end");
    terminate(&node);
    let out = finish(node, Duration::from_secs(60));
    out.assert_no_panic();
    assert!(out.stdout.contains("vsock: closed 2:"), "{out:#?}");
}
