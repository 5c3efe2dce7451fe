//! Clusters of real nodes for the tests: keys, cluster and node configs, audit logs, and
//! waiting for events rather than for fixed times.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{finish, fixture, keyhold, keyhold_bin, spawn_keyhold, Outcome};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Makes a key file `name` in `dir` (mode 600); returns its path and public key.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let out = keyhold(["keygen"]);
    assert_eq!(out.code(), 0, "{out:#?}");
    let path = dir.join(name);
    std::fs::write(&path, &out.stdout).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, public_key(&out.stdout))
}

/// The public key of a private key, by `keyhold pubkey`.
pub fn public_key(private: &str) -> String {
    let mut child = std::process::Command::new(keyhold_bin())
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

/// Writes `node.toml` in `dir` for a node without a cluster (node 1) whose control API listens
/// on `api.sock` there, with partitions 1, 2, ... running `(fixture, args)`; returns the config
/// and the socket.
pub fn api_node(dir: &Path, partitions: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let socket = dir.join("api.sock");
    let mut text = format!("[node]\nid = 1\napi_socket = \"{}\"\n", socket.display());
    for (i, (firmware, args)) in partitions.iter().enumerate() {
        text += &format!(
            "\n[[partition]]\nid = {}\nfirmware = \"{}\"\nargs = \"{args}\"\n",
            i + 1,
            fixture(firmware).display()
        );
    }
    let config = dir.join("node.toml");
    std::fs::write(&config, text).unwrap();
    (config, socket)
}

/// Writes `cluster-<name>.toml` listing `(id, port, public key)` on 127.0.0.1.
pub fn cluster(dir: &Path, name: &str, nodes: &[(u32, u16, &str)]) -> PathBuf {
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

/// A node config: node `id` of `cluster` with `key`, partition 1 running `firmware`.
pub struct NodeSpec<'a> {
    /// Names the config, audit log and API socket files.
    pub name: &'a str,
    /// The node ID.
    pub id: u32,
    /// The cluster file.
    pub cluster: &'a Path,
    /// The private key file.
    pub key: &'a Path,
    /// The fixture partition 1 runs.
    pub firmware: &'a str,
    /// Its arguments.
    pub args: &'a str,
    /// More lines for `[node]`.
    pub node_extra: &'a str,
    /// More sections (`[links]`, `[channels]`).
    pub sections: &'a str,
}

impl NodeSpec<'_> {
    /// Writes `node-<name>.toml` in `dir`, with an audit log and an API socket beside it.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let text = format!(
            "[node]\nid = {}\naudit_log = \"audit-{name}.jsonl\"\napi_socket = \"{name}.sock\"\ncluster = \"{}\"\n\
             private_key_file = \"{}\"\n{}\n{}\n[[partition]]\nid = 1\nfirmware = \"{}\"\nargs = \"{}\"\n",
            self.id,
            self.cluster.display(),
            self.key.display(),
            self.node_extra,
            self.sections,
            fixture(self.firmware).display(),
            self.args,
            name = self.name,
        );
        let path = dir.join(format!("node-{}.toml", self.name));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Writes a node config (see [`NodeSpec`]) with partition 1 running `firmware` with `args`,
/// and `extra` in `[node]`.
#[allow(clippy::too_many_arguments)]
pub fn node_with(
    dir: &Path,
    name: &str,
    id: u32,
    cluster: &Path,
    key: &Path,
    firmware: &str,
    args: &str,
    extra: &str,
) -> PathBuf {
    NodeSpec { name, id, cluster, key, firmware, args, node_extra: extra, sections: "" }.write(dir)
}

/// Writes a node config whose partition spins until the node's timeout.
pub fn node(dir: &Path, name: &str, id: u32, cluster: &Path, key: &Path) -> PathBuf {
    node_with(dir, name, id, cluster, key, "spin", "", "")
}

/// Runs `keyhold node` on each config with `--timeout secs` and waits for all of them.
pub fn run_nodes(configs: &[&Path], secs: &str) -> Vec<Outcome> {
    let children: Vec<_> = configs
        .iter()
        .map(|c| spawn_keyhold(["node", "--config", &c.display().to_string(), "--timeout", secs]))
        .collect();
    children.into_iter().map(|c| finish(c, Duration::from_secs(120))).collect()
}

/// The audit log of node `name` so far.
pub fn audit(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("audit-{name}.jsonl"))).unwrap_or_default()
}

/// `keyhold ctl` against node `name`'s API socket in `dir`.
pub fn ctl(dir: &Path, name: &str, args: &[&str]) -> Outcome {
    let socket = dir.join(format!("{name}.sock")).display().to_string();
    let mut all = vec!["ctl", "--socket", &socket];
    all.extend_from_slice(args);
    keyhold(&all)
}

/// Waits up to `limit` for `what` to hold, checking every 20 ms; whether it did.
pub fn wait_until(limit: Duration, mut what: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if what() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The channel ID of partition `partition`'s entry in `keyhold ctl channels` output.
pub fn channel_of(channels: &str, partition: u64) -> String {
    let entries: serde_json::Value = serde_json::from_str(channels).unwrap();
    let entry = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["partition"].as_u64() == Some(partition))
        .unwrap_or_else(|| panic!("no entry of partition {partition} in {channels}"));
    entry["channel"].as_str().unwrap().to_owned()
}

/// Two nodes of one cluster in a directory: their key files and the cluster file.
pub struct Pair {
    /// Node 1's key file.
    pub k1: PathBuf,
    /// Node 2's key file.
    pub k2: PathBuf,
    /// The cluster file.
    pub cluster: PathBuf,
    /// Node 2's port.
    pub port2: u16,
}

impl Pair {
    /// Node `id`'s (1 or 2) config with partition 1 running `firmware` with `args`, and
    /// `sections`.
    pub fn spec<'a>(
        &'a self,
        id: u32,
        firmware: &'a str,
        args: &'a str,
        sections: &'a str,
    ) -> NodeSpec<'a> {
        let (name, key) = if id == 1 { ("1", &self.k1) } else { ("2", &self.k2) };
        NodeSpec { name, id, cluster: &self.cluster, key, firmware, args, node_extra: "", sections }
    }
}

/// Keys and a cluster file for nodes 1 and 2 on loopback, in `dir`.
pub fn pair(dir: &Path) -> Pair {
    let ((k1, p1), (k2, p2)) = (keygen(dir, "1.key"), keygen(dir, "2.key"));
    let port2 = free_port();
    let cluster = cluster(dir, "real", &[(1, free_port(), &p1), (2, port2, &p2)]);
    Pair { k1, k2, cluster, port2 }
}
