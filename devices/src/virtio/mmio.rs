//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2).
//!
//! It is one [`BusDevice`] per device on the partition's MMIO bus, driven by the vCPU thread.
//! Most queue notifications do not come through here: the VMM registers an ioeventfd on
//! `QueueNotify` for each queue not served inline, so KVM wakes the device thread without a
//! userspace exit. docs/DEVICE.md says which writes are ignored and which need a reset.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::queue_config::{Field, Half, QueueConfig};
use super::shared::{Activation, ActiveQueue, DeviceShared};
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
    queues: Vec<QueueConfig>,
}

impl MmioTransport {
    /// A transport for the device `desc`, sharing `shared` with its backend.
    pub fn new(desc: DeviceDescription, shared: Arc<DeviceShared>, mem: GuestMemoryMmap) -> Self {
        let queues = desc.queue_sizes.iter().map(|&max| QueueConfig::new(max)).collect();
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

    fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    /// The selected queue, if the driver may write its registers: from FEATURES_OK on
    /// (virtio 1.2, 3.1.1), and not while the device waits for a reset.
    fn configurable_queue(&self) -> Option<usize> {
        if self.status & status::FEATURES_OK == 0 || self.shared.needs_reset() {
            return None;
        }
        let index = self.queue_sel as usize;
        (index < self.queues.len()).then_some(index)
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
            reg::STATUS if self.shared.needs_reset() => self.status | status::NEEDS_RESET,
            reg::STATUS => self.status,
            // No shared-memory regions: their length reads as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let address = |field, half| (field, half);
        let ring = match offset {
            reg::QUEUE_DESC_LOW => Some(address(Field::Descriptors, Half::Low)),
            reg::QUEUE_DESC_HIGH => Some(address(Field::Descriptors, Half::High)),
            reg::QUEUE_DRIVER_LOW => Some(address(Field::Driver, Half::Low)),
            reg::QUEUE_DRIVER_HIGH => Some(address(Field::Driver, Half::High)),
            reg::QUEUE_DEVICE_LOW => Some(address(Field::Device, Half::Low)),
            reg::QUEUE_DEVICE_HIGH => Some(address(Field::Device, Half::High)),
            _ => None,
        };
        if let Some((field, half)) = ring {
            self.configure_queue(|q| q.set_address(field, half, value));
            return;
        }
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.configure_queue(|q| q.set_size(value)),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::INTERRUPT_ACK => {
                self.shared.interrupt_status.fetch_and(!value, Ordering::AcqRel);
            }
            reg::STATUS => self.write_status(value),
            reg::QUEUE_NOTIFY => self.notify(value),
            // Anything read-only is ignored.
            _ => {}
        }
    }

    /// Writes a size or ring address of the selected queue: ignored while the queue is
    /// ready (the driver must stop it first); a refused value is counted and remembered, so
    /// that the queue cannot be enabled with it.
    fn configure_queue(&mut self, write: impl FnOnce(&mut QueueConfig) -> bool) {
        let Some(index) = self.configurable_queue() else { return };
        let queue = &mut self.queues[index];
        if queue.ready() {
            log::debug!("queue {index}: configuration written while ready, ignored");
            return;
        }
        if !write(queue) {
            self.shared.counters.refused_queue_configs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// QueueReady (virtio 1.2, 4.2.2): reads back as written. After DRIVER_OK, writing 0
    /// stops the queue (the device stops using it at once) and writing 1 starts it again from
    /// the rings the driver has configured since.
    fn write_queue_ready(&mut self, value: u32) {
        let driver_ok = self.driver_ok();
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let Some(index) = self.configurable_queue() else { return };
        let queue = &mut self.queues[index];
        let ready = value == 1;
        if queue.ready() == ready {
            return;
        }
        queue.set_ready(ready);
        if !driver_ok {
            return;
        }
        let started = if ready { Some(queue.activate(&self.mem, event_idx)) } else { None };
        let mut activation = lock(&self.shared.activation);
        let Activation::Active { queues } = &mut *activation else { return };
        let Some(active) = queues.get_mut(index) else { return };
        match started {
            None => {
                active.queue.set_ready(false);
                active.epoch = self.shared.new_epoch();
                drop(activation);
                self.shared.counters.queue_stops.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(fresh)) => {
                *active = ActiveQueue { queue: fresh, epoch: self.shared.new_epoch() }
            }
            Some(Err(why)) => {
                drop(activation);
                self.shared.fail(why);
            }
        }
    }

    /// A notification that reached the transport: served here for the queues the device
    /// takes inline; any other (a queue index the kernel's ioeventfds did not match) is
    /// ignored and counted.
    fn notify(&self, queue: u32) {
        if !self.shared.notify_inline(queue) {
            self.shared.spurious_notification();
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
        // DEVICE_NEEDS_RESET is the device's to set: a driver that writes back what it read
        // (Linux's `virtio_add_status` does) echoes it.
        let value = value & !status::NEEDS_RESET;
        // A device that needs a reset takes nothing else (virtio 1.2, 2.1.2): a DRIVER_OK now
        // must not bring it back without one. A driver that gives up says so with FAILED.
        if self.shared.needs_reset() {
            if value & !self.status == status::FAILED {
                self.status = value;
            }
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

    /// Hands the ready queues to the backend, or marks the device broken if any of them
    /// cannot be used (a refused size or address, rings outside RAM).
    fn activate(&mut self) {
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, config) in self.queues.iter_mut().enumerate() {
            let queue = if config.ready() {
                match config.activate(&self.mem, event_idx) {
                    Ok(queue) => queue,
                    Err(why) => {
                        self.shared.fail(&format!("queue {index}: {why}"));
                        return;
                    }
                }
            } else {
                // Not enabled (yet): the backend sees it not ready.
                virtio_queue::Queue::default()
            };
            queues.push(ActiveQueue { queue, epoch: self.shared.new_epoch() });
        }
        *lock(&self.shared.activation) = Activation::Active { queues };
    }

    fn reset(&mut self) {
        let was_set_up = !matches!(
            std::mem::replace(&mut *lock(&self.shared.activation), Activation::Inactive),
            Activation::Inactive
        );
        // A reset before the device was ever set up (every driver starts with one) ends nothing.
        if was_set_up {
            self.shared.driver_reset();
        }
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
    fn a_device_that_needs_a_reset_takes_only_a_reset_or_failed() {
        let (mut t, shared) = transport();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0x1000);
        // Clearing a bit without a reset breaks the device before DRIVER_OK...
        write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert!(shared.needs_reset());
        // ...and a DRIVER_OK on top of the bits it still holds does not bring it back.
        write(&mut t, reg::STATUS, ALL_OK);
        assert!(shared.needs_reset(), "only a reset ends it");
        assert_eq!(read(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
        // As a driver that adds a bit to what it read (NEEDS_RESET included) gives up.
        let held = read(&mut t, reg::STATUS);
        write(&mut t, reg::STATUS, held | status::FAILED);
        assert_ne!(read(&mut t, reg::STATUS) & status::FAILED, 0, "a driver may give up");
        write(&mut t, reg::STATUS, 0);
        assert!(!shared.needs_reset());
        assert_eq!(read(&mut t, reg::STATUS), 0);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn active_desc(shared: &DeviceShared) -> Option<(bool, u64, u64)> {
        match &*lock(&shared.activation) {
            Activation::Active { queues } => {
                Some((queues[0].ready(), queues[0].desc_table(), queues[0].epoch))
            }
            _ => None,
        }
    }

    #[test]
    fn queue_ready_reads_back_and_a_ready_queue_can_be_reprogrammed_after_stopping() {
        let (mut t, _) = transport();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0x1000);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 1);
        write(&mut t, reg::QUEUE_DESC_LOW, 0x4000);
        write(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0, "reads back the last value written");
        write(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        write(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(t.queues[0].desc_table(), 0x5000, "written while ready: ignored; after: taken");
    }

    #[test]
    fn stopping_a_queue_after_driver_ok_takes_it_from_the_backend_and_restarting_gives_it_back() {
        let (mut t, shared) = transport();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0x1000);
        write(&mut t, reg::STATUS, ALL_OK);
        let (ready, _, first_epoch) = active_desc(&shared).unwrap();
        assert!(ready);
        write(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0);
        let (ready, _, stopped_epoch) = active_desc(&shared).unwrap();
        assert!(!ready, "the device stops using the queue at once");
        assert_ne!(stopped_epoch, first_epoch, "work taken from the old rings is abandoned");
        write(&mut t, reg::QUEUE_DESC_LOW, 0x6000);
        write(&mut t, reg::QUEUE_READY, 1);
        let (ready, desc, epoch) = active_desc(&shared).unwrap();
        assert!(ready && desc == 0x6000 && epoch != stopped_epoch, "restarted on the new rings");
        assert_eq!(shared.counters.queue_stops.load(Ordering::Relaxed), 1);
        assert_eq!(read(&mut t, reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn a_refused_queue_configuration_fails_driver_ok() {
        for (register, value) in [
            (reg::QUEUE_NUM, 12),
            (reg::QUEUE_NUM, 0),
            (reg::QUEUE_DESC_LOW, 0x1008),
            (reg::QUEUE_DRIVER_LOW, 0x2001),
            (reg::QUEUE_DEVICE_LOW, 0x3002),
        ] {
            let (mut t, shared) = transport();
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0x1000);
            write(&mut t, reg::QUEUE_READY, 0);
            write(&mut t, register, value);
            write(&mut t, reg::QUEUE_READY, 1);
            write(&mut t, reg::STATUS, ALL_OK);
            assert!(shared.needs_reset(), "register {register:#x} = {value:#x}");
            assert_ne!(read(&mut t, reg::STATUS) & status::NEEDS_RESET, 0);
            assert_eq!(shared.counters.refused_queue_configs.load(Ordering::Relaxed), 1);
            write(&mut t, reg::STATUS, 0);
            assert!(!shared.needs_reset(), "a reset clears it");
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0x1000);
            write(&mut t, reg::STATUS, ALL_OK);
            assert!(active_desc(&shared).is_some(), "and the refused value is forgotten");
        }
    }

    #[test]
    fn restarting_a_stopped_queue_with_a_refused_configuration_needs_reset() {
        let (mut t, shared) = transport();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0x1000);
        write(&mut t, reg::STATUS, ALL_OK);
        write(&mut t, reg::QUEUE_READY, 0);
        write(&mut t, reg::QUEUE_NUM, 3);
        assert!(!shared.needs_reset(), "a stopped queue may hold anything");
        write(&mut t, reg::QUEUE_READY, 1);
        assert!(shared.needs_reset());
    }

    #[test]
    fn a_corrected_value_replaces_a_refused_one() {
        let (mut t, shared) = transport();
        negotiate(&mut t, F_VERSION_1);
        write(&mut t, reg::QUEUE_NUM, 0);
        setup_queue(&mut t, 0x1000);
        write(&mut t, reg::STATUS, ALL_OK);
        assert!(active_desc(&shared).is_some(), "as a driver that unsets a queue, then sets it");
    }

    #[test]
    fn notifications_of_queues_not_in_use_are_ignored_and_counted() {
        let (mut t, shared) = transport();
        write(&mut t, reg::QUEUE_NOTIFY, 0);
        write(&mut t, reg::QUEUE_NOTIFY, 7);
        assert_eq!(shared.counters.spurious_notifications.load(Ordering::Relaxed), 2);
        assert!(!shared.needs_reset());
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
