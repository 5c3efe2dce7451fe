//! The cluster as this node knows it: every node's ID, address and static public key.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its ID.
    pub id: u32,
    /// Where it listens.
    pub address: SocketAddr,
    /// Its static X25519 public key.
    pub public_key: [u8; 32],
}

/// Every node of the cluster, this one included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    peers: Vec<Peer>,
}

impl Directory {
    /// A directory of `peers` (IDs and keys are unique: the config checks that).
    pub fn new(peers: Vec<Peer>) -> Self {
        Self { peers }
    }

    /// The node with ID `id`.
    pub fn by_id(&self, id: u32) -> Option<&Peer> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// The node whose static key is `key`: a link authenticated with `key` belongs to it and to
    /// no other.
    pub fn by_key(&self, key: &[u8]) -> Option<&Peer> {
        self.peers.iter().find(|p| p.public_key.as_slice() == key)
    }

    /// Every node.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }
}

/// The cluster as the link threads see it now: read on every handshake, replaced whole when
/// the operator reloads the cluster file.
#[derive(Debug, Default)]
pub struct SharedDirectory(RwLock<Arc<Directory>>);

impl SharedDirectory {
    /// Starts with `directory`.
    pub fn new(directory: Directory) -> Self {
        Self(RwLock::new(Arc::new(directory)))
    }

    /// The directory now.
    pub fn get(&self) -> Arc<Directory> {
        match self.0.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the directory.
    pub fn set(&self, directory: Arc<Directory>) {
        match self.0.write() {
            Ok(mut d) => *d = directory,
            Err(poisoned) => *poisoned.into_inner() = directory,
        }
    }
}

/// How a new cluster file differs from the directory in use, for one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryChanges {
    /// Nodes new to the cluster.
    pub added: Vec<u32>,
    /// Nodes no longer in it.
    pub removed: Vec<u32>,
    /// Nodes with another key: their links must be made again.
    pub rekeyed: Vec<u32>,
    /// Nodes at another address, same key: dialled there from now on.
    pub moved: Vec<u32>,
}

impl DirectoryChanges {
    /// What changes from `old` to `new`, leaving out node `own_id`.
    pub fn between(old: &Directory, new: &Directory, own_id: u32) -> Self {
        let mut changes = Self::default();
        for p in new.peers().iter().filter(|p| p.id != own_id) {
            match old.by_id(p.id) {
                None => changes.added.push(p.id),
                Some(o) if o.public_key != p.public_key => changes.rekeyed.push(p.id),
                Some(o) if o.address != p.address => changes.moved.push(p.id),
                Some(_) => {}
            }
        }
        changes.removed = old
            .peers()
            .iter()
            .filter(|p| p.id != own_id && new.by_id(p.id).is_none())
            .map(|p| p.id)
            .collect();
        changes
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.rekeyed.is_empty()
            && self.moved.is_empty()
    }
}
