//! The connection management mechanism: connection table, key table, crypto, audit, and the
//! offer and message paths that tie them together.

pub mod audit;
pub mod connection_table;
pub mod crypto;
pub mod frames;
pub mod key_table;
pub mod manager;
pub mod query;
pub mod secret_memory;

pub use manager::{Closing, Cmm, Delivery, Limits, Opening, Routed};
