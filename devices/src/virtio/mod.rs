//! Virtio 1.x devices behind the MMIO transport.
//!
//! The transport ([`mmio`]) runs on the vCPU thread: it answers register accesses and, when the
//! driver sets DRIVER_OK, hands the configured queues to the device's [`shared::DeviceShared`]
//! slot. Device backends ([`rng`], and the secure-channel device in `crate::channel`) run on the
//! node's device thread, woken by the queue ioeventfds, and take the queues from that slot.

pub mod mmio;
pub mod rng;
pub mod secure_channel;
pub mod shared;

/// Virtio device ID of the entropy device.
pub const DEVICE_ID_RNG: u32 = 4;
/// Virtio device ID of the keyhold secure-channel device (from the range virtio leaves to
/// vendors' experiments; docs/DEVICE.md).
pub const DEVICE_ID_SECURE_CHANNEL: u32 = 0x4b48;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
