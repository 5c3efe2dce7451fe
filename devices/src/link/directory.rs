//! The cluster as this node knows it: every node's ID, address and static public key.

use std::net::SocketAddr;

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
