//! What an operator drives: `keyhold ctl` (finding the socket, `show`, `--json`, options
//! anywhere), the Prometheus metrics checked with the Prometheus project's own parser, the
//! API's HTTP answers, and a node's claim on its API socket.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keyhold_integration::nodes::{api_node, free_port, pair, wait_until, NodeSpec};
use keyhold_integration::{
    finish, keyhold, keyhold_bin, python_imports, require_kvm, spawn_keyhold, terminate, Outcome,
};

/// One raw HTTP request to the API socket; the whole answer.
fn http(socket: &Path, request: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// `keyhold ctl ARGS` with `KEYHOLD_SOCKET` set to `socket` and no `--socket`.
fn ctl_by_env(socket: &Path, args: &[&str]) -> Outcome {
    let out = Command::new(keyhold_bin())
        .arg("ctl")
        .args(args)
        .env("KEYHOLD_SOCKET", socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Outcome {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The samples of a Prometheus text exposition, as the `prometheus_client` Python package
/// parses them: one line each, `name{labels as JSON} value`. In CI the package must be there
/// (scripts/test.sh installs it); elsewhere the check is skipped without it.
fn parse_metrics(text: &str) -> Option<Vec<String>> {
    const SCRIPT: &str = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        for family in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in family.samples:\n\
        \x20       print(s.name + json.dumps(s.labels, sort_keys=True) + ' ' + repr(s.value))\n";
    if !python_imports("prometheus_client") {
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect())
}

/// The value of the sample `name{labels}` (labels as sorted JSON) among `samples`.
fn value(samples: &[String], name_and_labels: &str) -> Option<f64> {
    samples.iter().find_map(|s| s.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_show_and_the_api_follow_a_running_pair_of_nodes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pair(d);
    let metrics_port = free_port();
    let metrics_listen = format!("metrics_listen = \"127.0.0.1:{metrics_port}\"");
    let one =
        NodeSpec { node_extra: &metrics_listen, ..p.spec(1, "echo", "peer=2:1:1", "") }.write(d);
    let two = p.spec(2, "ping", "peer=1:1:1 count=100000000 batch=1", "").write(d);
    let nodes = [&one, &two]
        .map(|c| spawn_keyhold(["node", "--config", &c.display().to_string(), "--timeout", "120"]));
    let socket = d.join("1.sock");
    let metrics = || keyhold(["ctl", "metrics", "--socket", &socket.display().to_string()]);
    let sent = |text: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix("keyhold_channel_messages_received_total{partition=\"1\"} ")
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(60), || sent(&metrics().stdout) > 0),
        "echo receives messages: {:#?}",
        metrics()
    );

    // The Prometheus project's parser reads it, and the counters move with the traffic.
    let first = metrics();
    assert_eq!(first.code(), 0, "{first:#?}");
    if let Some(samples) = parse_metrics(&first.stdout) {
        assert_eq!(value(&samples, "keyhold_link_up{\"peer\": \"2\"}"), Some(1.0), "{samples:#?}");
        assert_eq!(value(&samples, "keyhold_channels{\"state\": \"open\"}"), Some(1.0));
        assert_eq!(value(&samples, "keyhold_partition_running{\"partition\": \"1\"}"), Some(1.0));
        assert!(samples.iter().any(|s| s.starts_with("keyhold_node_info{")), "{samples:#?}");
        assert!(
            value(&samples, "keyhold_audit_decisions_total{\"event\": \"link_up\", \"reason\": \"authenticated\"}")
                >= Some(1.0),
            "{samples:#?}"
        );
    }
    let before = sent(&first.stdout);
    assert!(
        wait_until(Duration::from_secs(30), || sent(&metrics().stdout) > before),
        "the message counter moves"
    );

    // A scraper reads the same exposition over TCP, and nothing else: no route there acts.
    let scrape = |request: &str| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    let scraped = scrape("GET /metrics HTTP/1.1\r\nHost: k\r\n\r\n");
    assert!(scraped.starts_with("HTTP/1.1 200 OK\r\n"), "{scraped}");
    assert!(sent(scraped.split("\r\n\r\n").nth(1).unwrap_or("")) > before, "{scraped}");
    for request in ["GET /v1/node HTTP/1.1\r\n\r\n", "POST /v1/partitions/1/stop HTTP/1.1\r\n\r\n"]
    {
        let refused = scrape(request);
        assert!(refused.starts_with("HTTP/1.1 404 "), "{request}: {refused}");
    }

    // ctl finds the node through KEYHOLD_SOCKET, takes options after the request, and sums
    // the node up on one screen (or in JSON).
    let show = ctl_by_env(&socket, &["show"]);
    assert_eq!(show.code(), 0, "{show:#?}");
    for part in [
        "node: 1\n",
        "link: node 2\n  state: up",
        "partition: 1\n  state: running",
        "channels: 1 open",
    ] {
        assert!(show.stdout.contains(part), "{part:?} in {show:#?}");
    }
    let json = ctl_by_env(&socket, &["show", "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(summary["channels"]["open"], 1, "{json:#?}");
    assert_eq!(summary["links"][0]["state"], "up", "{json:#?}");
    let node = ctl_by_env(&socket, &["node"]);
    assert!(node.stdout.contains("\"node\": 1") && node.stdout.contains("git"), "{node:#?}");

    // HTTP as a client expects it: a query string is no obstacle, a wrong method is a 405
    // that says which one to use, an unknown path a 404, a broken request a 400.
    let ok = http(&socket, "GET /v1/links?verbose=1 HTTP/1.1\r\nHost: k\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    let wrong = http(&socket, "GET /v1/channels/1/0x1/revoke HTTP/1.1\r\n\r\n");
    assert!(wrong.starts_with("HTTP/1.1 405 ") && wrong.contains("\r\nAllow: POST\r\n"), "{wrong}");
    let wrong = http(&socket, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(wrong.starts_with("HTTP/1.1 405 ") && wrong.contains("\r\nAllow: GET\r\n"), "{wrong}");
    assert!(http(&socket, "GET /v2/x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    let head = http(&socket, "HEAD /v1/node HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");
    assert!(
        !head.contains("Content-Length: 0\r\n"),
        "the length of the body it leaves out: {head}"
    );
    assert!(http(&socket, "GET /v1/node HTTP/9\r\n\r\n").starts_with("HTTP/1.1 400 "));

    // The socket is for the node's user and group only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    // A client that dribbles its request cannot hold the API: the others are answered.
    let slow_socket = socket.clone();
    let slow = std::thread::spawn(move || {
        let mut stream = UnixStream::connect(&slow_socket).unwrap();
        // Longer than ctl would wait (10 s), were the node to wait for all of it.
        let request = format!("GET /v1/node?{} HTTP/1.1\r\n\r\n", "x".repeat(40));
        for byte in request.as_bytes() {
            if stream.write_all(&[*byte]).is_err() {
                return; // the node gave up on it
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let answered = keyhold(["ctl", "node", "--socket", &socket.display().to_string()]);
    assert_eq!(answered.code(), 0, "answered despite the slow client: {answered:#?}");
    slow.join().unwrap();

    for node in &nodes {
        terminate(node);
    }
    for node in nodes {
        let out = finish(node, Duration::from_secs(60));
        assert_eq!(out.code(), 143, "{out:#?}");
        out.assert_no_panic();
    }
    assert!(!socket.exists(), "the node removed its own socket");
}

#[test]
fn a_node_never_takes_or_deletes_a_socket_it_does_not_own() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pair(d);
    let config = p.spec(1, "spin", "", "").write(d);
    let socket = d.join("1.sock");
    let config_arg = config.display().to_string();

    // A socket nobody answers on is what a killed node leaves: it is replaced.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let first = spawn_keyhold(["node", "--config", &config_arg, "--timeout", "120"]);
    let asks = || keyhold(["ctl", "node", "--socket", &socket.display().to_string()]).code() == 0;
    assert!(wait_until(Duration::from_secs(60), asks), "the first node serves its API");

    // A second node naming the same socket is refused, and the first keeps serving.
    let second = keyhold(["node", "--config", &config_arg, "--timeout", "5"]);
    second.assert_bad_input("a running node serves there");
    assert!(asks(), "the first node still answers");
    terminate(&first);
    assert_eq!(finish(first, Duration::from_secs(60)).code(), 143);
    assert!(!socket.exists());

    // A file that is not a socket is left alone.
    std::fs::write(&socket, "operator's notes").unwrap();
    let refused = keyhold(["node", "--config", &config_arg, "--timeout", "5"]);
    refused.assert_bad_input("not a socket");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "operator's notes");
}

#[test]
fn version_names_the_git_revision() {
    let out = keyhold(["--version"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(out.stdout.starts_with("keyhold 0.") && out.stdout.contains("(git "), "{out:#?}");
}

#[test]
fn a_node_tells_systemd_when_it_is_ready() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    manager.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let spin = keyhold_integration::fixture("spin").display().to_string();
    let child = Command::new(keyhold_bin())
        .args(["run", "--firmware", &spin, "--timeout", "120"])
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut message = [0u8; 256];
    let n = manager.recv(&mut message).expect("READY=1 within a minute");
    let text = String::from_utf8_lossy(&message[..n]).into_owned();
    assert!(text.starts_with("READY=1\nSTATUS=node "), "{text:?}");
    assert!(text.contains("1 partitions running"), "{text:?}");
    terminate(&child);
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.code(), 143, "{out:#?}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/keyhold@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("Type=notify") && text.contains("DeviceAllow=/dev/kvm rw"), "{text}");
    let has_systemd = Command::new("systemd-analyze").arg("--version").output().is_ok();
    if !has_systemd {
        eprintln!("skipped the verify: no systemd-analyze here");
        return;
    }
    // The unit as installed, but starting this build's binary.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("keyhold@test.service");
    let bin = keyhold_bin().display().to_string();
    std::fs::write(&copy, text.replace("/usr/local/bin/keyhold", &bin)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn ctl_stop_stops_one_partition_and_its_peer_sees_why() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Partition 3 keeps the node up whatever ping does: a node runs while any partition runs.
    let (config, socket) = api_node(
        d,
        &[
            ("echo", "peer=1:2:1"),
            ("ping", "peer=1:1:1 count=100000000 batch=1 interval_ms=20"),
            ("spin", ""),
        ],
    );
    let node =
        spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"]);
    let ctl = |args: &[&str]| ctl_by_env(&socket, args);
    let both_open = || ctl(&["channels"]).stdout.matches("\"open\"").count() == 2;
    assert!(wait_until(Duration::from_secs(60), both_open), "{:#?}", ctl(&["channels"]));

    let stop = ctl(&["stop", "1"]);
    assert_eq!(stop.code(), 0, "{stop:#?}");
    assert!(stop.stdout.contains("\"stopping\": 1"), "{stop:#?}");
    let stopped = || {
        let listed: serde_json::Value =
            serde_json::from_str(&ctl(&["partitions"]).stdout).unwrap_or_default();
        listed[0]["running"] == false
    };
    assert!(wait_until(Duration::from_secs(60), stopped), "{:#?}", ctl(&["partitions"]));
    let partitions = ctl(&["partitions"]).stdout;
    assert!(partitions.contains("stopped by the operator"), "{partitions}");
    // Ping's end learns why its peer went, unless ping already stopped on the refusal.
    let channels = ctl(&["channels"]).stdout;
    assert!(
        channels.contains("\"partition_stopped\"") || !channels.contains("\"partition\": 2"),
        "{channels}"
    );
    // A stopped partition cannot be stopped again; an unknown one is not found.
    assert_eq!(ctl(&["stop", "1"]).code(), 1);
    assert!(ctl(&["stop", "1"]).stderr.contains("409"), "already stopped");
    assert!(ctl(&["stop", "9"]).stderr.contains("404"), "no such partition");

    // Ping ends when its channel does, or waits for an echo that never comes: stopped either
    // way, both start again, each a fresh VM, under the seccomp filters (the starter's, then
    // each new vCPU thread's own), and find each other.
    let running = |index: usize| {
        let listed: serde_json::Value =
            serde_json::from_str(&ctl(&["partitions"]).stdout).unwrap_or_default();
        listed[index]["running"] == true
    };
    let _ = ctl(&["stop", "2"]);
    assert!(wait_until(Duration::from_secs(60), || !running(1)), "{:#?}", ctl(&["partitions"]));
    for partition in ["1", "2"] {
        let start = ctl(&["start", partition]);
        assert_eq!(start.code(), 0, "{start:#?}");
        assert!(start.stdout.contains("\"started\""), "{start:#?}");
    }
    assert!(ctl(&["start", "1"]).stderr.contains("409"), "already running");
    assert!(ctl(&["start", "9"]).stderr.contains("404"), "no such partition");
    let reopened = || {
        let channels = ctl(&["channels"]).stdout;
        let entries: Vec<serde_json::Value> = serde_json::from_str(&channels).unwrap_or_default();
        entries.iter().filter(|e| e["state"] == "open").count() == 2
    };
    assert!(wait_until(Duration::from_secs(60), reopened), "{:#?}", ctl(&["channels"]));
    assert!(running(0) && running(1), "{:#?}", ctl(&["partitions"]));

    // With every partition stopped (by the operator, or ping on its own once its peer went)
    // the node stays up, waiting for a start.
    for partition in ["1", "2", "3"] {
        let stop = ctl(&["stop", partition]);
        assert!(stop.code() == 0 || stop.stderr.contains("409"), "{stop:#?}");
    }
    let all_stopped = || (0..3).all(|i| !running(i));
    assert!(wait_until(Duration::from_secs(60), all_stopped), "{:#?}", ctl(&["partitions"]));
    assert_eq!(ctl(&["start", "3"]).code(), 0, "the node still serves");
    assert!(running(2), "{:#?}", ctl(&["partitions"]));

    terminate(&node);
    let out = finish(node, Duration::from_secs(60));
    out.assert_no_panic();
    assert!(out.stderr.contains("partition 1 stopped: stopped by the operator"), "{out:#?}");
}
