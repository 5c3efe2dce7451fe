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

#[cfg(test)]
pub(crate) mod test_endpoints {
    //! Endpoints for unit tests: two processes of node 1, in different partitions.
    use guest_agent::channel::abi::Endpoint;

    pub(crate) const A: Endpoint = Endpoint { node: 1, partition: 1, process: 7 };
    pub(crate) const B: Endpoint = Endpoint { node: 1, partition: 2, process: 9 };
}
