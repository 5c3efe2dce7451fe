//! Membership from etcd (docs/OPERATOR.md, "Fleets on etcd"): real nodes register in a real
//! etcd with signed registrations and follow each other there. Every step is asserted: they
//! find each other; a SIGKILLed node is dropped when its lease expires and one that stops
//! cleanly at once; a new node is linked; a registration the operator did not sign, and a
//! second node claiming a live node's ID with another key, are refused and audited; with etcd
//! gone the links stay and the node says so, and once it is back a node that registered
//! meanwhile is found (no change missed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use keyhold_integration::etcd::{etcd_available, Etcd, Tls};
use keyhold_integration::nodes::{ctl, free_port, keygen, public_key, wait_until};
use keyhold_integration::{
    finish, fixture, keyhold, keyhold_bin, require_kvm, spawn_keyhold, terminate,
};
use serde_json::Value;

/// Lease time to live: how long peers keep a node that crashed.
const TTL: u64 = 3;

/// The operator's key, made as an operator would.
struct Operator {
    key: PathBuf,
    public: String,
}

impl Operator {
    fn new(dir: &Path) -> Self {
        let out = keyhold(["operator-keygen"]);
        assert_eq!(out.code(), 0, "{out:#?}");
        let key = dir.join("operator.key");
        std::fs::write(&key, &out.stdout).unwrap();
        let mut child = std::process::Command::new(keyhold_bin())
            .arg("operator-pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(out.stdout.as_bytes()).unwrap();
        let public = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        Self { key, public: public.trim().to_owned() }
    }

    /// The signature of node `id` at `port` with `public_key`.
    fn sign(&self, id: u32, port: u16, public_key: &str) -> String {
        let key = self.key.display().to_string();
        let (id, address) = (id.to_string(), format!("127.0.0.1:{port}"));
        let out = keyhold([
            "sign-node",
            "--operator-key",
            &key,
            "--id",
            &id,
            "--address",
            &address,
            "--public-key",
            public_key,
        ]);
        assert_eq!(out.code(), 0, "{out:#?}");
        out.stdout.trim().to_owned()
    }
}

/// A registration of node `id` with `public_key`, signed by `operator`, at an address where
/// nothing listens.
fn registration(operator: &Operator, id: u32, public_key: &str) -> String {
    let port = free_port();
    let signature = operator.sign(id, port, public_key);
    format!(
        r#"{{"id":{id},"address":"127.0.0.1:{port}","public_key":"{public_key}","signature":"{signature}"}}"#
    )
}

/// Writes node `name`'s config: node `id` on `port`, members from `etcd`, one partition
/// that waits (parked) for a peer that never comes, its API at `<name>.sock`.
fn node_config(dir: &Path, name: &str, id: u32, etcd: &Etcd, operator: &Operator) -> PathBuf {
    node_config_with(dir, name, id, etcd, operator, "")
}

/// As [`node_config`], with `extra` lines in `[etcd]`.
fn node_config_with(
    dir: &Path,
    name: &str,
    id: u32,
    etcd: &Etcd,
    operator: &Operator,
    extra: &str,
) -> PathBuf {
    let (key, public) = keygen(dir, &format!("{name}.key"));
    let port = free_port();
    let text = format!(
        "[node]\nid = {id}\nprivate_key_file = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n\
         api_socket = \"{name}.sock\"\naudit_log = \"{name}.audit\"\n\n\
         [etcd]\nendpoints = [\"{}\"]\nlease_ttl_secs = {TTL}\noperator_public_key = \"{}\"\n\
         registration_signature = \"{}\"\n{extra}\n\
         [[partition]]\nid = 1\nfirmware = \"{}\"\nargs = \"peer=99:1:1\"\n",
        key.display(),
        etcd.url(),
        operator.public,
        operator.sign(id, port, &public),
        fixture("echo").display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The nodes a test started; whatever still runs when it ends (a failed assertion too) is
/// killed.
struct Nodes(Vec<Option<Child>>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().filter_map(Option::as_mut) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(config: &Path) -> Child {
    spawn_keyhold(["node", "--config", &config.display().to_string(), "--timeout", "120"])
}

fn api(dir: &Path, name: &str, what: &str) -> Value {
    let out = ctl(dir, name, &[what]);
    serde_json::from_str(&out.stdout).unwrap_or(Value::Null)
}

/// The peers node `name` has a link up with.
fn linked(dir: &Path, name: &str) -> Vec<u64> {
    peers(dir, name, true)
}

/// The peers in node `name`'s directory (`up`: only those with a link up).
fn peers(dir: &Path, name: &str, up: bool) -> Vec<u64> {
    let links = api(dir, name, "links");
    let listed = links.as_array().into_iter().flatten().filter(|l| !up || l["state"] == "up");
    let mut peers: Vec<u64> = listed.filter_map(|l| l["peer"].as_u64()).collect();
    peers.sort_unstable();
    peers
}

fn audited(dir: &Path, name: &str, event: &str, reason: &str) -> bool {
    let text = std::fs::read_to_string(dir.join(format!("{name}.audit"))).unwrap_or_default();
    text.contains(&format!("\"event\":\"{event}\",\"reason\":\"{reason}\""))
}

/// Waits until every node in `names` is linked with exactly `peers` (its own ID left out).
fn wait_linked(dir: &Path, names: &[(&str, u64)], peers: &[u64], limit: Duration) -> bool {
    wait_until(limit, || {
        names.iter().all(|(name, id)| {
            let want: Vec<u64> = peers.iter().copied().filter(|p| p != id).collect();
            linked(dir, name) == want
        })
    })
}

#[test]
fn nodes_find_each_other_in_etcd_and_follow_it_through_crashes_forgeries_and_outages() {
    require_kvm!();
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut etcd = Etcd::start(d);
    let operator = Operator::new(d);
    let configs: Vec<PathBuf> =
        (1..=3).map(|id| node_config(d, &format!("n{id}"), id, &etcd, &operator)).collect();
    let check = keyhold(["check", "--config", &configs[0].display().to_string()]);
    assert!(check.stdout.contains("members from etcd at"), "{check:#?}");
    let mut nodes = Nodes(configs.iter().map(|c| Some(start(c))).collect());

    // 1. Every node sees every other.
    let all = [("n1", 1), ("n2", 2), ("n3", 3)];
    assert!(wait_linked(d, &all, &[1, 2, 3], Duration::from_secs(30)), "{:?}", linked(d, "n1"));
    let membership = api(d, "n1", "membership");
    assert_eq!(
        (membership["source"].as_str(), membership["state"].as_str()),
        (Some("etcd"), Some("synced")),
        "{membership}"
    );
    assert_eq!(membership["members"], 3);

    // 2. A registration the operator did not sign is refused and audited; nobody dials it.
    etcd.put(
        "/keyhold/nodes/9",
        &format!(
            r#"{{"id":9,"address":"127.0.0.1:{}","public_key":"{}","signature":"{}"}}"#,
            free_port(),
            keygen(d, "forger.key").1,
            "A".repeat(86) + "=="
        ),
    );
    assert!(wait_until(Duration::from_secs(10), || audited(
        d,
        "n1",
        "registration_rejected",
        "bad_signature"
    )));
    assert_eq!(api(d, "n1", "membership")["members"], 3, "the forged node is not a member");

    // 3. A second node 2, signed but with another key, cannot take the live node 2's place.
    let impostor = node_config(d, "impostor", 2, &etcd, &operator);
    let impostor = Nodes(vec![Some(start(&impostor))]);
    assert!(wait_until(Duration::from_secs(20), || audited(
        d,
        "impostor",
        "registration_refused",
        "held_by_another_key"
    )));
    assert_eq!(api(d, "impostor", "membership")["state"], "refused");
    assert_eq!(linked(d, "n1"), [2, 3], "node 1 still has the real node 2");
    drop(impostor);

    // 3b. A live node whose registration is deleted registers again; its peers keep it.
    etcd.delete("/keyhold/nodes/1");
    assert!(wait_until(Duration::from_secs(20), || etcd.has("/keyhold/nodes/1")));
    assert!(wait_until(Duration::from_secs(20), || linked(d, "n2").contains(&1)));

    // 4. A SIGKILLed node is dropped from the others' directories once its lease expires
    // (its links end at once: its sockets close with it).
    let killed = Instant::now();
    let mut three = nodes.0[2].take().unwrap();
    let _ = three.kill();
    let _ = three.wait();
    let pair = [("n1", 1), ("n2", 2)];
    assert!(wait_until(Duration::from_secs(30), || pair
        .iter()
        .all(|(name, _)| !peers(d, name, false).contains(&3))));
    let dropped = killed.elapsed();
    assert!(
        dropped >= Duration::from_secs(TTL - 1),
        "dropped after {dropped:?}: before the lease could expire"
    );
    assert!(audited(d, "n1", "member_removed", "deregistered"));

    // 5. A new node is linked.
    let four = node_config(d, "n4", 4, &etcd, &operator);
    nodes.0.push(Some(start(&four)));
    let with_four = [("n1", 1), ("n2", 2), ("n4", 4)];
    assert!(wait_linked(d, &with_four, &[1, 2, 4], Duration::from_secs(30)));

    // 5b. More registrations than one read takes at once: signed nodes that are not running
    // (under no lease, as an operator may list them ahead). And one claiming node 2's key,
    // registered after node 2 under an etcd key that sorts first: the first registered keeps
    // the key, the later one is refused.
    for id in 100..140 {
        let (_, public) = keygen(d, &format!("listed-{id}.key"));
        etcd.put(&format!("/keyhold/nodes/{id}"), &registration(&operator, id, &public));
    }
    let two_key = public_key(&std::fs::read_to_string(d.join("n2.key")).unwrap());
    etcd.put("/keyhold/nodes/10", &registration(&operator, 10, &two_key));
    assert!(wait_until(Duration::from_secs(20), || audited(
        d,
        "n1",
        "registration_rejected",
        "duplicate_key"
    )));
    assert!(wait_until(Duration::from_secs(20), || api(d, "n1", "membership")["members"] == 43));
    assert!(linked(d, "n1").contains(&2), "node 2 kept its place");

    // 6. etcd gone: the links stay, and the nodes say so.
    etcd.kill();
    assert!(wait_until(Duration::from_secs(30), || api(d, "n1", "membership")["state"]
        == "unavailable"));
    let metrics = ctl(d, "n1", &["metrics"]).stdout;
    assert!(metrics.contains("keyhold_membership_synced 0"), "{metrics}");
    assert!(audited(d, "n1", "membership_unavailable", "etcd_unreachable"));
    std::thread::sleep(Duration::from_secs(TTL + 1));
    assert_eq!(linked(d, "n1"), [2, 4], "links stay while etcd is away");

    // 7. Back: a node that stopped cleanly meanwhile is gone, one started meanwhile is found.
    let mut four = nodes.0[3].take().unwrap();
    terminate(&four);
    let _ = four.wait();
    etcd.resume();
    let five = node_config(d, "n5", 5, &etcd, &operator);
    nodes.0.push(Some(start(&five)));
    let after = [("n1", 1), ("n2", 2), ("n5", 5)];
    assert!(wait_linked(d, &after, &[1, 2, 5], Duration::from_secs(40)), "{:?}", linked(d, "n1"));
    assert_eq!(api(d, "n1", "membership")["state"], "synced");
    assert!(audited(d, "n1", "membership_restored", "etcd_reachable"));
    // The fresh read, a page at a time, found all the listed nodes (node 4's lease, which it
    // could not revoke while etcd was away, expires meanwhile).
    let members = || api(d, "n1", "membership")["members"].clone();
    assert!(wait_until(Duration::from_secs(20), || members() == 43), "{}", members());
    assert!(!peers(d, "n1", false).contains(&10), "the duplicate key stays refused");

    // 8. A node that stops cleanly deregisters: its peers drop it at once, not after the TTL.
    let mut five = nodes.0[4].take().unwrap();
    let stopped = Instant::now();
    terminate(&five);
    let _ = five.wait();
    assert!(wait_until(Duration::from_secs(30), || pair
        .iter()
        .all(|(name, _)| !peers(d, name, false).contains(&5))));
    assert!(stopped.elapsed() < Duration::from_secs(TTL), "dropped after {:?}", stopped.elapsed());

    for node in nodes.0.iter_mut().filter_map(Option::take) {
        terminate(&node);
        let out = finish(node, Duration::from_secs(30));
        out.assert_no_panic();
        assert!(!out.stderr.contains("seccomp"), "{out:#?}");
    }
}

#[test]
fn nodes_reach_an_etcd_that_wants_tls_and_their_client_certificate() {
    require_kvm!();
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls = Tls::make(d);
    let etcd = Etcd::start_with(d, Some(tls.clone()));
    let operator = Operator::new(d);
    let ca = format!("ca_file = \"{}\"\n", tls.ca.display());
    let cert = format!(
        "{ca}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        tls.client.0.display(),
        tls.client.1.display()
    );
    let configs = [
        node_config_with(d, "n1", 1, &etcd, &operator, &cert),
        node_config_with(d, "n2", 2, &etcd, &operator, &cert),
        // The CA, but no client certificate: etcd refuses it.
        node_config_with(d, "n3", 3, &etcd, &operator, &ca),
    ];
    let _nodes = Nodes(configs.iter().map(|c| Some(start(c))).collect());
    let pair = [("n1", 1), ("n2", 2)];
    assert!(wait_linked(d, &pair, &[1, 2], Duration::from_secs(30)), "{:?}", linked(d, "n1"));
    assert_eq!(api(d, "n1", "membership")["state"], "synced");
    let refused = || {
        let membership = api(d, "n3", "membership");
        membership["state"] == "unavailable" && membership["last_error"].is_string()
    };
    assert!(wait_until(Duration::from_secs(30), refused), "{}", api(d, "n3", "membership"));
    assert!(!peers(d, "n1", false).contains(&3), "node 3 never registered");
}
