//! `cluster.toml`, and the link settings of `node.toml` that refer to it.
//!
//! ```toml
//! [[node]]
//! id = 1
//! address = "10.77.0.1:7000"
//! public_key = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
//! ```
//! A node's `[node]` section then names `cluster`, its `private_key_file` (readable by its owner
//! only) and optionally a `listen` address other than the one the cluster lists for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use keyhold_devices::crypto::node_key::NodeKey;
use keyhold_devices::link::{Directory, LinkSettings, Peer};
use serde::Deserialize;

use crate::keys;
use crate::node_config::{self, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    #[serde(default)]
    node: Vec<NodeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    id: u32,
    address: String,
    public_key: String,
}

/// What a node needs to run its host links.
#[derive(Debug)]
pub struct ClusterLinks {
    /// This node's static key (its private half in secret memory; `Debug` shows the public).
    pub key: Arc<NodeKey>,
    /// Every node of the cluster.
    pub directory: Directory,
    /// Where this node listens.
    pub listen: SocketAddr,
    /// Timing and bounds of the links (node.toml `[links]`).
    pub settings: LinkSettings,
    /// Where the directory comes from.
    pub source: DirectorySource,
}

/// Where a node learns the cluster's members.
#[derive(Debug)]
pub enum DirectorySource {
    /// A cluster file, read again on a reload.
    File(PathBuf),
    /// etcd: registrations under a prefix, followed as they change.
    Etcd(Box<crate::membership::EtcdConfig>),
}

pub(crate) fn invalid(
    path: &Path,
    field: impl Into<String>,
    problem: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid { path: path.to_owned(), field: field.into(), problem: problem.into() }
}

/// Reads and checks `cluster.toml`.
pub fn load_cluster(path: &Path) -> Result<Directory, ConfigError> {
    parse_cluster(path, &node_config::read(path)?)
}

/// Checks the text of a cluster config read from `path`.
pub fn parse_cluster(path: &Path, text: &str) -> Result<Directory, ConfigError> {
    let file: ClusterFile = node_config::from_toml(path, text)?;
    if file.node.is_empty() {
        return Err(invalid(path, "node", "a cluster needs at least one [[node]]"));
    }
    let mut ids = BTreeMap::new();
    let mut keys_seen = BTreeMap::new();
    let mut peers = Vec::with_capacity(file.node.len());
    for (i, n) in file.node.into_iter().enumerate() {
        if let Some(first) = ids.insert(n.id, i) {
            return Err(invalid(
                path,
                format!("node[{i}].id"),
                format!("ID {} is also node[{first}]'s", n.id),
            ));
        }
        let address: SocketAddr = n.address.parse().map_err(|_| {
            invalid(path, format!("node[{i}].address"), format!("{:?} is not IP:PORT", n.address))
        })?;
        let public_key = keys::decode(&n.public_key)
            .map_err(|e| invalid(path, format!("node[{i}].public_key"), e.to_string()))?;
        if let Some(other) = keys_seen.insert(public_key, n.id) {
            return Err(invalid(
                path,
                format!("node[{i}].public_key"),
                format!("the same key as node {other}"),
            ));
        }
        peers.push(Peer { id: n.id, address, public_key });
    }
    Ok(Directory::new(peers))
}

/// Reads the private key file (straight into secret memory) and checks it against the
/// cluster's entry for `node`.
pub fn cluster_links(
    node_path: &Path,
    node: u32,
    cluster: &Path,
    private_key_file: &Path,
    listen: Option<&str>,
    settings: LinkSettings,
) -> Result<ClusterLinks, ConfigError> {
    let directory = load_cluster(cluster)?;
    let me = directory
        .by_id(node)
        .ok_or_else(|| {
            invalid(node_path, "node.id", format!("node {node} is not in {}", cluster.display()))
        })?
        .clone();
    let key = node_key(node_path, private_key_file)?;
    if key.public() != &me.public_key {
        return Err(invalid(
            node_path,
            "node.private_key_file",
            format!("its public key is not the one {} lists for node {node}", cluster.display()),
        ));
    }
    let listen = match listen {
        Some(text) => listen_address(node_path, text)?,
        None => me.address,
    };
    Ok(ClusterLinks {
        key: Arc::new(key),
        directory,
        listen,
        settings,
        source: DirectorySource::File(cluster.to_owned()),
    })
}

/// `node.listen`, parsed.
pub fn listen_address(node_path: &Path, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| invalid(node_path, "node.listen", format!("{text:?} is not IP:PORT")))
}

/// The node's key from `node.private_key_file`, which only its owner may read.
pub fn node_key(node_path: &Path, private_key_file: &Path) -> Result<NodeKey, ConfigError> {
    let field = "node.private_key_file";
    let meta = std::fs::metadata(private_key_file).map_err(|e| {
        invalid(node_path, field, format!("cannot read {}: {e}", private_key_file.display()))
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(invalid(
            node_path,
            field,
            format!(
                "{} is readable by everyone (mode {mode:o}); chmod 600 it",
                private_key_file.display()
            ),
        ));
    }
    NodeKey::read_file(private_key_file)
        .map_err(|e| invalid(node_path, field, format!("{}: {e}", private_key_file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn parse(text: &str) -> Result<Directory, String> {
        parse_cluster(Path::new("/etc/keyhold/cluster.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_cluster_lists_every_node() {
        let text = format!(
            "[[node]]\nid = 1\naddress = \"127.0.0.1:7001\"\npublic_key = \"{KEY_A}\"\n\n[[node]]\nid = 2\naddress = \"[::1]:7002\"\npublic_key = \"{KEY_B}\"\n"
        );
        let directory = parse(&text).unwrap();
        assert_eq!(directory.peers().len(), 2);
        assert_eq!(directory.by_id(2).unwrap().address, "[::1]:7002".parse().unwrap());
        assert_eq!(directory.by_key(&keys::decode(KEY_A).unwrap()).unwrap().id, 1);
    }

    #[test]
    fn bad_clusters_name_file_and_field() {
        let node = |id: u32, addr: &str, key: &str| {
            format!("[[node]]\nid = {id}\naddress = \"{addr}\"\npublic_key = \"{key}\"\n")
        };
        let cases = [
            (String::new(), "node: a cluster needs at least one"),
            (
                node(1, "127.0.0.1:1", KEY_A) + &node(1, "127.0.0.1:2", KEY_B),
                "node[1].id: ID 1 is also node[0]'s",
            ),
            (
                node(1, "127.0.0.1:1", KEY_A) + &node(2, "127.0.0.1:2", KEY_A),
                "node[1].public_key: the same key as node 1",
            ),
            (node(1, "localhost", KEY_A), "node[0].address: \"localhost\" is not IP:PORT"),
            (node(1, "127.0.0.1:1", "short"), "node[0].public_key: "),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.starts_with("/etc/keyhold/cluster.toml: "), "{err}");
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
