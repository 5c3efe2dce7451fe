//! The connection management mechanism: connection table, key table, audit, and the offer
//! and message paths that tie them together and reach other nodes through the router.

pub mod audit;
mod channels;
pub mod connection_table;
pub mod credit;
mod demand;
pub mod frames;
pub mod key_table;
pub mod manager;
mod messages;
pub mod query;

pub use manager::{
    ChannelView, Cmm, CmmConfig, Deliver, Delivered, ImplicitListen, KeyLifetime, KeySource,
    Limits, Opening, Payload, Sent, Status, DEFAULT_OPEN_TIMEOUT,
};

#[cfg(test)]
pub(crate) mod test_endpoints {
    //! Endpoints for unit tests: two processes of node 1, in different partitions.
    use guest_agent::channel::abi::Endpoint;

    pub(crate) const A: Endpoint = Endpoint { node: 1, partition: 1, process: 7 };
    pub(crate) const B: Endpoint = Endpoint { node: 1, partition: 2, process: 9 };
}

#[cfg(test)]
mod tests;
