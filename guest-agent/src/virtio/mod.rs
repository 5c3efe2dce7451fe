//! Virtio drivers: the MMIO transport ([`transport`]), split virtqueues ([`queue`]) and the
//! devices keyhold gives a partition.

pub mod queue;
pub mod registers;
pub mod rng;
pub mod transport;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Why a device could not be brought up or used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverError {
    /// The boot info lists no such device.
    NoDevice,
    /// The MMIO window does not hold a virtio-mmio v2 device of the expected type.
    WrongDevice,
    /// The device refused the features the driver needs.
    FeaturesRefused,
    /// The device has fewer queues, or smaller ones, than the driver needs.
    QueueUnavailable,
    /// Guest RAM ran out for queues or buffers.
    OutOfMemory,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// The device used a descriptor the driver did not post.
    BadUsedEntry,
}
