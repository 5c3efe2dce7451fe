//! Driver side of the virtio-mmio transport (register layout version 2).

use super::queue::Virtqueue;
use super::{DriverError, F_VERSION_1};
use crate::boot_info::DeviceInfo;
use crate::mmio::{read32, write32};

/// `"virt"`.
pub const MAGIC: u32 = 0x7472_6976;
/// Register offset.
pub const REG_MAGIC: u64 = 0x000;
/// Register offset.
pub const REG_VERSION: u64 = 0x004;
/// Register offset.
pub const REG_DEVICE_ID: u64 = 0x008;
/// Register offset.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// Register offset.
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// Register offset.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// Register offset.
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// Register offset.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// Register offset.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// Register offset.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// Register offset.
pub const REG_QUEUE_READY: u64 = 0x044;
/// Offset of the queue-notify register.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Register offset.
pub const REG_STATUS: u64 = 0x070;
/// Register offset.
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// Register offset.
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// Register offset.
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// Register offset.
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// Register offset.
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// Register offset.
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Register offset.
pub const REG_CONFIG: u64 = 0x100;

/// Status bit: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Status bit: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Status bit: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Status bit: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Status bit: the device needs a reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;

/// One virtio-mmio device.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    base: u64,
}

impl Transport {
    /// Checks that `dev` is a virtio-mmio v2 device with ID `device_id`.
    pub fn probe(dev: &DeviceInfo, device_id: u32) -> Result<Self, DriverError> {
        let transport = Self { base: dev.mmio_base };
        let ok = transport.read(REG_MAGIC) == MAGIC
            && transport.read(REG_VERSION) == 2
            && transport.read(REG_DEVICE_ID) == device_id;
        if ok {
            Ok(transport)
        } else {
            Err(DriverError::WrongDevice)
        }
    }

    /// The base address of the device's window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads a register; each read is a VM exit.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window was listed by the VMM in the boot info and probed.
        unsafe { read32(self.base + offset) }
    }

    /// Writes a register; each write is a VM exit.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write32(self.base + offset, value) }
    }

    /// Resets the device and negotiates `wanted` features (VERSION_1 is required); returns the
    /// features in force.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, DriverError> {
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(REG_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(REG_DEVICE_FEATURES)) << (32 * sel);
        }
        let features = offered & (wanted | F_VERSION_1);
        if features & F_VERSION_1 == 0 {
            return Err(DriverError::FeaturesRefused);
        }
        for sel in 0..2u32 {
            self.write(REG_DRIVER_FEATURES_SEL, sel);
            self.write(REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, status);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused);
        }
        Ok(features)
    }

    /// Sets up queue `index` with `size` entries (at most what the device offers).
    pub fn setup_queue(
        &self,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> Result<Virtqueue, DriverError> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 || u32::from(size) > max || self.read(REG_QUEUE_READY) != 0 {
            return Err(DriverError::QueueUnavailable);
        }
        let queue = Virtqueue::new(index, size, self.base + REG_QUEUE_NOTIFY, event_idx)?;
        let (desc, avail, used) = queue.addresses();
        self.write(REG_QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, used),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        Ok(queue)
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) -> Result<(), DriverError> {
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.write(REG_STATUS, status);
        self.check()
    }

    /// Fails if the device has asked for a reset.
    pub fn check(&self) -> Result<(), DriverError> {
        if self.read(REG_STATUS) & STATUS_NEEDS_RESET != 0 {
            Err(DriverError::NeedsReset)
        } else {
            Ok(())
        }
    }

    /// Reads a 32-bit word of the device configuration space.
    pub fn config32(&self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }
}
