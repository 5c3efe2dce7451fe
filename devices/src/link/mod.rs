//! Host links (docs/PROTOCOL.md): TCP between nodes, mutually authenticated with the static
//! X25519 keys of the cluster config (Noise IK via `snow`, as WireGuard does), confirmed,
//! replay-proof, rekeyed, kept alive and re-established with backoff.
//!
//! - [`setup`]: one thread that accepts and dials, runs every handshake, bounds what an
//!   unauthenticated peer may cost ([`admission`]), and hands confirmed links over;
//! - [`router`]: every established link, on the device thread beside the CMM: records in and
//!   out, keepalives, rekeys ([`session`]);
//! - [`wire`]: records and frames; [`handshake`] and [`timestamp`]: the handshake;
//! - [`status`]: what the operator sees of each link.

pub mod admission;
pub mod directory;
pub mod handshake;
pub mod loopback;
pub mod manager;
pub mod router;
mod session;
pub mod setup;
pub mod status;
pub mod timestamp;
pub mod wire;

pub use directory::{Directory, DirectoryChanges, Peer, SharedDirectory};
pub use manager::{LinkManager, LinkSettings, ReloadError, Reloader};
pub use router::{FdChange, Router, RouterConfig, SendError};
pub use status::{LinkBook, LinkStatus};
