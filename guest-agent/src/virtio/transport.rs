//! Driver side of the virtio-mmio transport (register layout version 2).

use super::queue::Virtqueue;
use super::{DriverError, F_VERSION_1};
use crate::boot_info::DeviceInfo;
use crate::mmio::{read32, write32};

use super::registers::{reg, status, MAGIC};

/// One virtio-mmio device.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    base: u64,
}

impl Transport {
    /// Checks that `dev` is a virtio-mmio v2 device with ID `device_id`.
    pub fn probe(dev: &DeviceInfo, device_id: u32) -> Result<Self, DriverError> {
        let transport = Self { base: dev.mmio_base };
        let ok = transport.read(reg::MAGIC) == MAGIC
            && transport.read(reg::VERSION) == super::registers::VERSION
            && transport.read(reg::DEVICE_ID) == device_id;
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
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        let features = offered & (wanted | F_VERSION_1);
        if features & F_VERSION_1 == 0 {
            return Err(DriverError::FeaturesRefused);
        }
        for sel in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            self.write(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, status);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
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
        self.write(reg::QUEUE_SEL, u32::from(index));
        let max = self.read(reg::QUEUE_NUM_MAX);
        if max == 0 || u32::from(size) > max || self.read(reg::QUEUE_READY) != 0 {
            return Err(DriverError::QueueUnavailable);
        }
        let queue = Virtqueue::new(index, size, self.base + reg::QUEUE_NOTIFY, event_idx)?;
        let (desc, avail, used) = queue.addresses();
        self.write(reg::QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
        Ok(queue)
    }

    /// Stops queue `index` (virtio 1.2, 4.2.2.2: write 0 to QueueReady and read it back): the
    /// device no longer uses its rings, and [`Self::setup_queue`] may set it up anew, also
    /// after DRIVER_OK. Fails if the device does not let go of the queue.
    pub fn stop_queue(&self, index: u16) -> Result<(), DriverError> {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.write(reg::QUEUE_READY, 0);
        // The device answers as soon as the write exits; a few reads are plenty.
        for _ in 0..16 {
            if self.read(reg::QUEUE_READY) == 0 {
                return Ok(());
            }
        }
        Err(DriverError::QueueUnavailable)
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) -> Result<(), DriverError> {
        let status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(reg::STATUS, status);
        self.check()
    }

    /// Fails if the device has asked for a reset.
    pub fn check(&self) -> Result<(), DriverError> {
        if self.read(reg::STATUS) & status::NEEDS_RESET != 0 {
            Err(DriverError::NeedsReset)
        } else {
            Ok(())
        }
    }

    /// Reads a 32-bit word of the device configuration space.
    pub fn config32(&self, offset: u64) -> u32 {
        self.read(reg::CONFIG + offset)
    }
}
