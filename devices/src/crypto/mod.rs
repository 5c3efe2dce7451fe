//! The node's cryptography, all of it from well-kept libraries (`ring`, RustCrypto's `hkdf` and
//! `sha2`, `x25519-dalek`, `snow`), and all of its key state built in secret memory.
//!
//! - [`channel`]: what protects a channel's messages end to end (claim 10): per-direction
//!   AES-256-GCM keys derived from the channel key, ratcheted forward epoch by epoch.
//! - [`noise`]: the primitives the host links' Noise handshakes and sessions run on.
//! - [`node_key`]: the node's static X25519 key, read from its file into secret memory.

pub mod channel;
pub mod node_key;
pub mod noise;
