//! Host links: TCP between nodes, mutually authenticated with the static X25519 keys of the
//! cluster config (Noise IK via `snow`, as WireGuard does), kept alive, re-established with
//! backoff. docs/PROTOCOL.md describes the handshake and the frames.

mod connection;
pub mod directory;
pub mod handshake;
pub mod inbox;
pub mod manager;
pub mod wire;

pub use directory::{Directory, Peer};
pub use inbox::{Inbound, Inbox};
pub use manager::{LinkHandle, LinkManager, LinkStatus, SendError};
