//! Host links under attack, between real nodes over real TCP: replayed handshakes and records,
//! a flood of hostile connections, a peer of the previous protocol version; and links and
//! channels that rekey under traffic without losing a message.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyhold_integration::nodes::{
    audit, cluster, ctl, free_port, keygen, pair, wait_until, NodeSpec,
};
use keyhold_integration::{finish, require_kvm, spawn_keyhold};
use serde_json::Value;

/// Spawns `keyhold node` on `config` with a timeout.
fn start(config: &Path, secs: &str) -> std::process::Child {
    spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", secs])
}

/// `ctl <what>` of node `name` as JSON (null if the node does not answer).
fn api(dir: &Path, name: &str, what: &str) -> Value {
    let out = ctl(dir, name, &[what]);
    if out.code() != 0 {
        return Value::Null;
    }
    serde_json::from_str(&out.stdout).unwrap_or(Value::Null)
}

/// Node `name`'s link to `peer`, as `ctl links` shows it.
fn link(dir: &Path, name: &str, peer: u64) -> Value {
    let links = api(dir, name, "links");
    links
        .as_array()
        .and_then(|l| l.iter().find(|l| l["peer"] == peer).cloned())
        .unwrap_or(Value::Null)
}

fn open_channels(dir: &Path, name: &str) -> usize {
    api(dir, name, "channels")
        .as_array()
        .map_or(0, |c| c.iter().filter(|c| c["state"] == "open").count())
}

/// Node `name`'s counters for partition 1.
fn stats(dir: &Path, name: &str) -> Value {
    api(dir, name, "stats").as_array().and_then(|s| s.first().cloned()).unwrap_or(Value::Null)
}

/// Forwards every connection from `listen` to `upstream`. For each, `tap` sees the first
/// `messages` length-prefixed messages the client sends (a handshake message, then records
/// with no payloads), and returns what to write upstream for each; then bytes flow as they
/// are.
fn proxy(
    listen: u16,
    upstream: u16,
    messages: usize,
    tap: impl Fn(usize, &[u8]) -> Vec<u8> + Send + Sync + 'static,
) {
    let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    let tap = Arc::new(tap);
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
            let tap = tap.clone();
            std::thread::spawn(move || forward(client, server, messages, &*tap));
        }
    });
}

fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    messages: usize,
    tap: &dyn Fn(usize, &[u8]) -> Vec<u8>,
) {
    let (mut client_back, mut server_back) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_back, &mut client_back);
    });
    for n in 1..=messages {
        let mut len = [0u8; 2];
        if client.read_exact(&mut len).is_err() {
            return;
        }
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if client.read_exact(&mut body).is_err() {
            return;
        }
        let message = [&len[..], &body[..]].concat();
        if server.write_all(&tap(n, &message)).is_err() {
            return;
        }
    }
    let _ = std::io::copy(&mut client, &mut server);
}

/// Nodes 1 (echo) and 2 (ping, unbatched, many messages), node 1 dialing node 2 through a
/// proxy at the address the cluster lists for node 2. Returns the configs, the proxy's port
/// and node 2's own.
fn proxied_pair(d: &Path, sections: &str) -> (std::path::PathBuf, std::path::PathBuf, u16, u16) {
    let ((k1, p1), (k2, p2)) = (keygen(d, "1.key"), keygen(d, "2.key"));
    let (proxy_port, real_port) = (free_port(), free_port());
    let c = cluster(d, "real", &[(1, free_port(), &p1), (2, proxy_port, &p2)]);
    let n1 = NodeSpec {
        name: "1",
        id: 1,
        cluster: &c,
        key: &k1,
        firmware: "echo",
        args: "peer=2:1:1",
        node_extra: "",
        sections,
    }
    .write(d);
    let listen = format!("listen = \"127.0.0.1:{real_port}\"");
    let n2 = NodeSpec {
        name: "2",
        id: 2,
        cluster: &c,
        key: &k2,
        firmware: "ping",
        args: "peer=1:1:1 count=100000000 batch=1",
        node_extra: &listen,
        sections,
    }
    .write(d);
    (n1, n2, proxy_port, real_port)
}

#[test]
fn a_replayed_handshake_leaves_the_live_link_and_its_channels_alone() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (n1, n2, proxy_port, real_port) = proxied_pair(d, "");
    // The proxy sits between node 1 (the initiator) and node 2; it keeps node 1's first
    // handshake message, as anyone on the path could.
    let captured = Arc::new(Mutex::new(None::<Vec<u8>>));
    let keep = captured.clone();
    proxy(proxy_port, real_port, 1, move |_, msg| {
        keep.lock().unwrap().get_or_insert_with(|| msg.to_vec());
        msg.to_vec()
    });
    let (a, b) = (start(&n1, "30"), start(&n2, "30"));
    assert!(
        wait_until(Duration::from_secs(20), || open_channels(d, "1") == 1),
        "the channel never opened"
    );
    let before = stats(d, "1")["received"].as_u64().unwrap_or(0);
    let replay = captured.lock().unwrap().clone().expect("the proxy saw the handshake");
    // The attacker replays it on a new connection to node 2's real address.
    let mut attacker = TcpStream::connect(("127.0.0.1", real_port)).unwrap();
    attacker.write_all(&replay).unwrap();
    let refused = wait_until(Duration::from_secs(10), || {
        audit(d, "2").contains("\"event\":\"link_rejected\",\"reason\":\"handshake_replayed\"")
    });
    assert!(refused, "{}", audit(d, "2"));
    // The replay got no answer: the connection is closed without a byte.
    attacker.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(attacker.read(&mut buf).unwrap_or(0), 0, "the responder answered a replay");
    // The live link and its channel carry on.
    assert!(wait_until(Duration::from_secs(10), || stats(d, "1")["received"]
        .as_u64()
        .unwrap_or(0)
        > before + 100));
    let link2 = link(d, "2", 1);
    assert_eq!(
        (link2["state"].as_str(), link2["established"].as_u64()),
        (Some("up"), Some(1)),
        "{link2}"
    );
    assert_eq!(open_channels(d, "1"), 1);
    let a2 = audit(d, "2");
    assert!(!a2.contains("\"event\":\"link_down\""), "{a2}");
    assert_eq!(a2.matches("\"event\":\"link_up\"").count(), 1, "{a2}");
    for child in [a, b] {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn a_replayed_record_ends_that_link() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (n1, n2, proxy_port, real_port) = proxied_pair(d, "");
    // The second message is node 1's first record (its key confirmation): sent twice.
    proxy(
        proxy_port,
        real_port,
        2,
        |n, msg| if n == 2 { [msg, msg].concat() } else { msg.to_vec() },
    );
    let (a, b) = (start(&n1, "30"), start(&n2, "30"));
    let rejected = wait_until(Duration::from_secs(20), || {
        audit(d, "2")
            .contains("\"event\":\"frame_rejected\",\"reason\":\"bad_link_authentication\"")
    });
    assert!(rejected, "{}", audit(d, "2"));
    for child in [a, b] {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Threads and resident memory of process `pid`.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

/// The names of process `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A connection to `to` from 127.0.0.`host` (any loopback address is this machine's own).
fn connect_from(host: u8, to: SocketAddr) -> Option<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    socket.bind(&SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)).into()).ok()?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5)).ok()?;
    Some(socket.into())
}

/// Lets this process hold `n` descriptors.
fn allow_descriptors(n: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct given, nothing else.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(n.max(limit.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[test]
fn a_peer_links_within_a_second_while_two_thousand_hostile_connections_are_held() {
    require_kvm!();
    allow_descriptors(8192);
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let n2 = p.spec(2, "echo", "peer=1:1:1", "").write(d);
    let n1 = p.spec(1, "echo", "peer=2:1:1", "").write(d);
    let victim = start(&n2, "60");
    let pid = victim.id();
    assert!(
        wait_until(Duration::from_secs(20), || api(d, "2", "links").is_array()),
        "node 2 never served its API"
    );
    // The API serves before the supervisor starts the vCPU thread: count threads only once
    // that one runs too.
    assert!(
        wait_until(Duration::from_secs(20), || thread_names(pid).iter().any(|n| n == "p1-vcpu")),
        "node 2's vCPU thread never started: {:?}",
        thread_names(pid)
    );
    let (threads_before, rss_before) = threads_and_rss(pid);
    let to = SocketAddr::from(([127, 0, 0, 1], p.port2));
    // 2,000 connections from 250 addresses: a third say nothing, a third dribble a byte every
    // two seconds, a third send a hello-sized message of garbage.
    let mut idle = Vec::new();
    let mut drip = Vec::new();
    for i in 0..2000u32 {
        let Some(mut s) = connect_from(2 + (i % 250) as u8, to) else { continue };
        match i % 3 {
            0 => idle.push(s),
            1 => {
                let _ = s.write_all(&[0]);
                drip.push(s);
            }
            _ => {
                let mut junk = vec![0u8, 113];
                junk.extend((0..113).map(|j| (i * 31 + j) as u8));
                let _ = s.write_all(&junk);
                idle.push(s);
            }
        }
    }
    assert!(idle.len() + drip.len() >= 1900, "the test could not open its connections");
    let dripping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dripper = {
        let (go, mut drip) = (dripping.clone(), drip);
        std::thread::spawn(move || {
            while go.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut drip {
                    let _ = s.write_all(&[0]);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    // The legitimate peer starts now.
    let started = Instant::now();
    let peer = start(&n1, "60");
    assert!(
        wait_until(Duration::from_secs(20), || link(d, "2", 1)["state"] == "up"),
        "never linked"
    );
    let took = started.elapsed();
    let (threads, rss) = threads_and_rss(pid);
    let held = descriptors(pid);
    dripping.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = dripper.join();
    drop(idle);
    for mut child in [peer, victim] {
        let _ = child.kill();
        let _ = finish(child, Duration::from_secs(30));
    }
    eprintln!("linked in {took:?}; threads {threads_before} -> {threads}; RSS {rss_before} -> {rss} KiB; {held} descriptors");
    assert!(took < Duration::from_secs(1), "linking took {took:?} under the flood");
    assert_eq!(threads, threads_before, "a thread per connection?");
    assert!(rss < rss_before + 16 * 1024, "RSS grew from {rss_before} to {rss} KiB");
    assert!(held < 400, "{held} descriptors: the unauthenticated connections are not bounded");
    let a2 = audit(d, "2");
    assert!(a2.contains("\"event\":\"link_refused\""), "{a2}");
}

#[test]
fn a_peer_of_the_previous_protocol_version_is_refused_with_its_reason() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    let n2 = p.spec(2, "echo", "peer=1:1:1", "").write(d);
    let node = start(&n2, "30");
    assert!(wait_until(Duration::from_secs(20), || api(d, "2", "links").is_array()));
    // Node 1 as version 1 spoke: Noise IK whose hello is the node ID alone.
    use keyhold_devices::crypto::node_key::NodeKey;
    use keyhold_devices::crypto::noise;
    let key = NodeKey::read_file(&p.k1).unwrap();
    let responder = NodeKey::read_file(&p.k2).unwrap();
    let mut hs = noise::builder()
        .local_private_key(key.private())
        .unwrap()
        .remote_public_key(responder.public())
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut msg = [0u8; 256];
    let n = hs.write_message(&1u32.to_le_bytes(), &mut msg).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", p.port2)).unwrap();
    s.write_all(&[&(n as u16).to_be_bytes()[..], &msg[..n]].concat()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("an answer naming the version");
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply).unwrap();
    let mut payload = [0u8; 16];
    let m = hs.read_message(&reply, &mut payload).unwrap();
    assert_eq!(&payload[..m], &[3], "the node names the newest version it speaks");
    assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0, "and closes the connection");
    assert!(
        wait_until(Duration::from_secs(10), || {
            audit(d, "2").contains("\"event\":\"link_rejected\",\"reason\":\"unsupported_version\",\"source\":null,\"destination\":null,\"peer\":1")
        }),
        "{}",
        audit(d, "2")
    );
    let mut node = node;
    let _ = node.kill();
    let _ = node.wait();
}

/// Reads one length-prefixed message (handshake or record) from `s`.
fn read_message(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("a message");
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut message).expect("the whole message");
    message
}

#[test]
fn a_node_of_the_previous_version_is_linked_in_that_version() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    // The test is node 2 as version 2 spoke; node 1 dials it.
    let listener = TcpListener::bind(("127.0.0.1", p.port2)).unwrap();
    let n1 = p.spec(1, "echo", "peer=2:1:1", "").write(d);
    let node = start(&n1, "30");
    use keyhold_devices::crypto::node_key::NodeKey;
    use keyhold_devices::crypto::noise;
    let key = NodeKey::read_file(&p.k2).unwrap();
    let answer = |s: &mut TcpStream| {
        let mut hs =
            noise::builder().local_private_key(key.private()).unwrap().build_responder().unwrap();
        let mut hello = [0u8; 64];
        let n = hs.read_message(&read_message(s), &mut hello).expect("a valid message 1");
        assert_eq!(n, 17);
        let mut msg2 = [0u8; 64];
        let m = hs.write_message(&[2], &mut msg2).unwrap();
        s.write_all(&[&(m as u16).to_be_bytes()[..], &msg2[..m]].concat()).unwrap();
        (hello[0], hs)
    };
    // First it dials in version 3; a version-2 node refuses, naming version 2, and closes.
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(answer(&mut s).0, 3, "a node dials in the newest version first");
    drop(s);
    // Then again, at once, in version 2, and the link is made.
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (version, hs) = answer(&mut s);
    assert_eq!(version, 2, "it dials again in the version the peer named");
    let mut transport = hs.into_transport_mode().unwrap();
    let mut confirm = [0u8; 16];
    let n = transport.read_message(&read_message(&mut s), &mut confirm).expect("sealed");
    assert_eq!(&confirm[..n], &[3], "CONFIRM");
    assert!(
        wait_until(Duration::from_secs(10), || link(d, "1", 2)["state"] == "up"),
        "{}",
        api(d, "1", "links")
    );
    let mut node = node;
    let _ = node.kill();
    let _ = node.wait();
}

#[test]
fn links_and_channels_rekey_under_traffic_without_losing_a_message() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (d, p) = (dir.path(), pair(dir.path()));
    // Short lifetimes, so that a few seconds of traffic cross many rekeys of both kinds.
    let sections = "[links]\nrekey_after_messages = 40\n\n[channels]\nkey_lifetime_messages = 25\n";
    let n1 = p.spec(1, "echo", "peer=2:1:1", sections).write(d);
    let n2 = p.spec(2, "ping", "peer=1:1:1 count=100000000 batch=4", sections).write(d);
    let (a, b) = (start(&n1, "60"), start(&n2, "60"));
    let epochs =
        |c: &Value| (c["tx_epoch"].as_u64().unwrap_or(0), c["rx_epoch"].as_u64().unwrap_or(0));
    let rekeyed = wait_until(Duration::from_secs(45), || {
        let channels = api(d, "1", "channels");
        let Some(channel) = channels.as_array().and_then(|c| c.first().cloned()) else {
            return false;
        };
        let (tx, rx) = epochs(&channel);
        link(d, "1", 2)["rekeys"].as_u64().unwrap_or(0) >= 50 && tx >= 50 && rx >= 50
    });
    let (l1, l2) = (link(d, "1", 2), link(d, "2", 1));
    let (s1, s2) = (stats(d, "1"), stats(d, "2"));
    let channels = api(d, "1", "channels");
    for mut child in [a, b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(rekeyed, "links {l1} {l2}; channels {channels}");
    // One link all along, both sides rekeyed, the channel still open: nothing was lost,
    // repeated or refused across the switches (the receiver takes only the next sequence
    // number, under the current or next epoch's key).
    for l in [&l1, &l2] {
        assert_eq!((l["state"].as_str(), l["established"].as_u64()), (Some("up"), Some(1)), "{l}");
        assert!(l["rekeys"].as_u64().unwrap_or(0) >= 50, "{l}");
    }
    assert_eq!(channels[0]["state"], "open", "{channels}");
    for s in [&s1, &s2] {
        assert_eq!(
            (s["rejected"].as_u64(), s["dropped_no_room"].as_u64()),
            (Some(0), Some(0)),
            "{s}"
        );
        assert!(s["received"].as_u64().unwrap_or(0) > 1000, "{s}");
    }
    let a1 = audit(d, "1");
    assert!(!a1.contains("\"event\":\"link_down\"") && !a1.contains("message_rejected"), "{a1}");
}
