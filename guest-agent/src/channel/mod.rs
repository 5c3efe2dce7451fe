//! The secure-channel device: its interface ([`abi`]) and the guest driver and API ([`driver`]).

pub mod abi;
pub mod driver;

pub use driver::{ChannelError, Received, Reply, SecureChannel};
