//! Host links between real keyhold nodes on loopback: keys, cluster config, the authenticated
//! handshake, and the audit of every refused link.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyhold_integration::{finish, fixture, keyhold, require_kvm, spawn_keyhold, Outcome};

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let out = keyhold(["keygen"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    let path = dir.join(name);
    std::fs::write(&path, &out.stdout).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, public_key(&out.stdout))
}

fn public_key(private: &str) -> String {
    let mut child = std::process::Command::new(keyhold_integration::keyhold_bin())
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(private.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Writes `cluster-<name>.toml` listing `(id, port, public key)`.
fn cluster(dir: &Path, name: &str, nodes: &[(u32, u16, &str)]) -> PathBuf {
    let text: String = nodes
        .iter()
        .map(|(id, port, key)| {
            format!(
                "[[node]]\nid = {id}\naddress = \"127.0.0.1:{port}\"\npublic_key = \"{key}\"\n\n"
            )
        })
        .collect();
    let path = dir.join(format!("cluster-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes `node-<name>.toml`: node `id` of `cluster` with `key`, one `spin` partition.
fn node(dir: &Path, name: &str, id: u32, cluster: &Path, key: &Path) -> PathBuf {
    let text = format!(
        "[node]\nid = {id}\naudit_log = \"audit-{name}.jsonl\"\ncluster = \"{}\"\nprivate_key_file = \"{}\"\n\n\
         [[partition]]\nid = 1\nfirmware = \"{}\"\n",
        cluster.display(),
        key.display(),
        fixture("spin").display()
    );
    let path = dir.join(format!("node-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn run_nodes(configs: &[&Path], secs: &str) -> Vec<Outcome> {
    let children: Vec<_> = configs
        .iter()
        .map(|c| spawn_keyhold(["node", "--config", &c.display().to_string(), "--timeout", secs]))
        .collect();
    children.into_iter().map(|c| finish(c, Duration::from_secs(60))).collect()
}

fn audit(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("audit-{name}.jsonl"))).unwrap_or_default()
}

#[test]
fn keygen_and_pubkey_make_working_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = keygen(dir.path(), "k");
    assert_eq!(public.len(), 44);
    let bad = keyhold(["pubkey"]);
    bad.assert_bad_input("stdin:");
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
