//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2).
//!
//! It is one [`BusDevice`] per device on the partition's MMIO bus, driven by the vCPU thread.
//! Queue notifications do not come through here: the VMM registers an ioeventfd on
//! `QueueNotify` for each queue, so KVM wakes the device thread without a userspace exit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::shared::{Activation, DeviceShared};
use super::{F_EVENT_IDX, F_VERSION_1};
use crate::bus::{lock, BusDevice, IoAction};
pub use guest_agent::virtio::registers::{reg, status, MAGIC, VERSION};

/// Vendor ID: `"KH"` plus zeros, as keyhold's own.
pub const VENDOR_ID: u32 = 0x0000_484b;
/// Size of one device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;

/// What the transport must know of the device behind it.
#[derive(Debug, Clone)]
pub struct DeviceDescription {
    /// Virtio device ID.
    pub device_id: u32,
    /// Device-specific feature bits (VERSION_1 and EVENT_IDX are added by the transport).
    pub features: u64,
    /// Maximum size of each queue; the number of entries is the number of queues.
    pub queue_sizes: Vec<u16>,
    /// The device configuration space (read-only to the driver).
    pub config: Vec<u8>,
    /// Queues (a bit each) whose notifications reach the transport (no ioeventfd), to be
    /// served on the notifying vCPU's own thread by [`DeviceShared::notify_inline`].
    pub inline_queues: u32,
}

/// One device's virtio-mmio register file.
pub struct MmioTransport {
    desc: DeviceDescription,
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
}

impl MmioTransport {
    /// A transport for the device `desc`, sharing `shared` with its backend.
    pub fn new(desc: DeviceDescription, shared: Arc<DeviceShared>, mem: GuestMemoryMmap) -> Self {
        let queues = desc
            .queue_sizes
            .iter()
            .map(|&max| {
                Queue::new(max)
                    .unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size"))
            })
            .collect();
        Self {
            desc,
            shared,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
        }
    }

    /// Every feature the device offers.
    fn offered_features(&self) -> u64 {
        self.desc.features | F_VERSION_1 | F_EVENT_IDX
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers are writable only while the driver sets the device up.
        let writable =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        let queue = self.queues.get_mut(self.queue_sel as usize)?;
        (writable && !queue.ready()).then_some(queue)
    }

    fn needs_reset(&self) -> bool {
        matches!(*lock(&self.shared.activation), Activation::NeedsReset)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let half = |value: u64, sel: u32| match sel {
            0 => value as u32,
            1 => (value >> 32) as u32,
            _ => 0,
        };
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.desc.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => half(self.offered_features(), self.device_features_sel),
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.shared.interrupt_status.load(Ordering::Acquire),
            reg::STATUS if self.needs_reset() => self.status | status::NEEDS_RESET,
            reg::STATUS => self.status,
            // No shared-memory regions: their length reads as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.with_queue(|q| q.set_size(value as u16)),
            reg::QUEUE_READY => self.with_queue(|q| q.set_ready(value == 1)),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::INTERRUPT_ACK => {
                self.shared.interrupt_status.fetch_and(!value, Ordering::AcqRel);
            }
            reg::STATUS => self.write_status(value),
            // Served here for the queues the device takes inline; otherwise a notify the
            // kernel's ioeventfd did not match (a bad queue index) is ignored.
            reg::QUEUE_NOTIFY if !self.shared.notify_inline(value) => {
                log::debug!("queue notify {value} reached the transport")
            }
            // Anything read-only is ignored.
            _ => {}
        }
    }

    /// Runs `f` on the selected queue if the driver may configure it now (queue size and
    /// addresses are set by the `virtio-queue` setters, which refuse invalid values).
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(queue) = self.selected_queue() {
            f(queue);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating =
            self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        if !negotiating {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.2, 3.1.1); anything else is a driver bug.
        if value & self.status != self.status {
            self.shared.fail("driver cleared device status bits without a reset");
            return;
        }
        let new = value & !self.status;
        let mut accepted = value;
        if new & status::FEATURES_OK != 0 && !self.features_acceptable() {
            accepted &= !status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 {
            if accepted & status::FEATURES_OK == 0 {
                self.shared.fail("DRIVER_OK without FEATURES_OK");
                return;
            }
            self.status = accepted;
            self.activate();
            return;
        }
        self.status = accepted;
    }

    /// The driver may accept only what was offered, and must accept VERSION_1.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features() == 0
            && self.driver_features & F_VERSION_1 != 0
    }

    /// Hands the queues to the backend, or marks the device broken if they are unusable.
    fn activate(&mut self) {
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for queue in &mut self.queues {
            if queue.ready() && !queue.is_valid(&self.mem) {
                self.shared.fail("a ready queue has addresses outside guest RAM or a bad size");
                return;
            }
            queue.set_event_idx(event_idx);
            match Queue::try_from(queue.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    self.shared.fail(&format!("queue set-up rejected: {e}"));
                    return;
                }
            }
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        *lock(&self.shared.activation) = Activation::Active { queues };
    }

    fn reset(&mut self) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        *lock(&self.shared.activation) = Activation::Inactive;
        self.shared.interrupt_status.store(0, Ordering::Release);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            let start = (offset - reg::CONFIG) as usize;
            if let Some(src) = self.desc.config.get(start..start.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
            return;
        }
        // Registers are 32 bits wide and read whole (virtio 1.2, 4.2.2.2).
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            if offset < reg::CONFIG {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    const RAM: usize = 1 << 20;

    fn transport() -> (MmioTransport, Arc<DeviceShared>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let shared = Arc::new(DeviceShared::new(EventFd::new(0).unwrap(), Arc::default()));
        let desc = DeviceDescription {
            device_id: 4,
            features: 0,
            queue_sizes: vec![16],
            config: vec![1, 2, 3, 4],
            inline_queues: 0,
        };
        (MmioTransport::new(desc, shared.clone(), mem), shared)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Drives the transport as a driver would, up to FEATURES_OK with `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            write(t, reg::DRIVER_FEATURES_SEL, sel);
            write(t, reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        read(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, desc: u32) {
        write(t, reg::QUEUE_SEL, 0);
        write(t, reg::QUEUE_NUM, 16);
        write(t, reg::QUEUE_DESC_LOW, desc);
        write(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        write(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        write(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identifies_itself_as_virtio_mmio_v2() {
        let (mut t, _) = transport();
        assert_eq!(read(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(read(&mut t, reg::VERSION), 2);
        assert_eq!(read(&mut t, reg::DEVICE_ID), 4);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 16);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        assert_eq!(read(&mut t, reg::CONFIG), u32::from_le_bytes([1, 2, 3, 4]));
        let mut byte = [0u8; 1];
        t.read(reg::CONFIG + 2, &mut byte);
        assert_eq!(byte, [3]);
        assert_eq!(read(&mut t, reg::SHM_LEN_LOW), u32::MAX, "no shared memory regions");
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_legacy_drivers() {
        let (mut t, _) = transport();
        assert_eq!(negotiate(&mut t, F_VERSION_1 | 1 << 5) & status::FEATURES_OK, 0);
        write(&mut t, reg::STATUS, 0);
        assert_eq!(
            negotiate(&mut t, F_EVENT_IDX) & status::FEATURES_OK,
            0,
            "VERSION_1 is required"
        );
        write(&mut t, reg::STATUS, 0);
        assert_ne!(negotiate(&mut t, F_VERSION_1 | F_EVENT_IDX) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_with_valid_queues_activates_and_reset_deactivates() {
        let (mut t, shared) = transport();
        negotiate(&mut t, F_VERSION_1 | F_EVENT_IDX);
        setup_queue(&mut t, 0x1000);
        write(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        match &*lock(&shared.activation) {
            Activation::Active { queues } => {
                assert_eq!(queues.len(), 1);
                assert!(queues[0].ready() && queues[0].event_idx_enabled());
                assert_eq!(queues[0].desc_table(), 0x1000);
            }
            other => panic!("not active: {other:?}"),
        }
        write(&mut t, reg::STATUS, 0);
        assert!(matches!(*lock(&shared.activation), Activation::Inactive));
        assert_eq!(read(&mut t, reg::STATUS), 0);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn queue_outside_ram_needs_reset() {
        let (mut t, shared) = transport();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0xfff_0000);
        write(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(matches!(*lock(&shared.activation), Activation::NeedsReset));
        assert_ne!(read(&mut t, reg::STATUS) & status::NEEDS_RESET, 0);
        assert_ne!(read(&mut t, reg::INTERRUPT_STATUS) & 2, 0, "config-change interrupt");
        write(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
    }

    #[test]
    fn driver_ok_before_features_ok_needs_reset() {
        let (mut t, shared) = transport();
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert!(matches!(*lock(&shared.activation), Activation::NeedsReset));
    }

    #[test]
    fn queue_registers_are_frozen_outside_set_up() {
        let (mut t, _) = transport();
        write(&mut t, reg::QUEUE_NUM, 8);
        write(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0, "before FEATURES_OK");
        write(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 7");
        let mut narrow = [0u8; 2];
        t.read(reg::MAGIC, &mut narrow);
        assert_eq!(narrow, [0, 0], "registers read whole only");
    }
}
