//! Virtio 1.x devices behind the MMIO transport.
//!
//! The transport ([`mmio`]) runs on the vCPU thread: it answers register accesses and, when the
//! driver sets DRIVER_OK, hands the configured queues to the device's [`shared::DeviceShared`]
//! slot. Device backends ([`rng`], and the secure-channel device in `crate::channel`) run on the
//! node's device thread, woken by the queue ioeventfds, and take the queues from that slot.

pub mod mmio;
pub mod queue_config;
pub mod rng;
pub mod secure_channel;
pub mod shared;
pub mod vsock;

// Device IDs and feature bits are defined once, in the guest agent's ABI.
pub use guest_agent::channel::abi::DEVICE_ID as DEVICE_ID_SECURE_CHANNEL;
pub use guest_agent::virtio::rng::DEVICE_ID as DEVICE_ID_RNG;
pub use guest_agent::virtio::{F_EVENT_IDX, F_VERSION_1};
