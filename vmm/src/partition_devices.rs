//! Puts virtio devices into a partition: an MMIO window and interrupt line each, an ioeventfd
//! per queue, the transport on the MMIO bus, an entry in the boot info, and a backend for the
//! device thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use guest_agent::boot_info::{BootInfo, DeviceInfo, DeviceKind};
use guest_agent::channel::abi;
use keyhold_devices::bus::{Bus, BusError};
use keyhold_devices::cmm::Limits;
use keyhold_devices::idle::Wake;
use keyhold_devices::virtio::mmio::{reg, DeviceDescription, MmioTransport, WINDOW_SIZE};
use keyhold_devices::virtio::rng::{self, Rng, RngLimit};
use keyhold_devices::virtio::secure_channel::{self, ChannelDevice};
use keyhold_devices::virtio::shared::DeviceShared;
use keyhold_devices::virtio::vsock::{self, VsockDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::device_thread::Backend;
use crate::layout::{MMIO_BASE, MMIO_SIZE};

/// First interrupt line given to devices: IOAPIC pins from 16 up are not shared with the PIC
/// and start masked, so a guest that polls is never interrupted.
pub const FIRST_GSI: u32 = 16;

/// Why a device could not be attached.
#[derive(Debug, Error)]
pub enum AttachError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be made.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The MMIO window is taken.
    #[error("MMIO bus: {0}")]
    Bus(#[from] BusError),
    /// Too many devices for the window or the boot info.
    #[error("no room for another device")]
    Full,
}

/// Devices being added to one partition.
pub struct DeviceSet<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    info: &'a mut BootInfo,
    wake: Arc<Wake>,
    count: u32,
    attached: Vec<DeviceView>,
}

/// A device as the control API shows it: its kind and its shared state.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// `virtio-rng` or `secure-channel`.
    pub kind: &'static str,
    /// Its state and counters.
    pub shared: Arc<DeviceShared>,
}

/// A device just attached: what its backend needs.
pub struct Attached {
    /// State shared with the transport.
    pub shared: Arc<DeviceShared>,
    /// One eventfd per queue, signalled by the guest's notifications.
    pub queue_evts: Vec<EventFd>,
}

impl<'a> DeviceSet<'a> {
    /// Starts adding devices to a partition; they wake its idle vCPU through `wake`.
    pub fn new(
        vm: &'a VmFd,
        mem: &'a GuestMemoryMmap,
        mmio: &'a mut Bus,
        info: &'a mut BootInfo,
        wake: Arc<Wake>,
    ) -> Self {
        Self { vm, mem, mmio, info, wake, count: 0, attached: Vec::new() }
    }

    /// The devices attached so far.
    pub fn views(&self) -> Vec<DeviceView> {
        self.attached.clone()
    }

    /// Attaches a virtio device described by `desc`.
    pub fn attach(
        &mut self,
        kind: DeviceKind,
        desc: DeviceDescription,
    ) -> Result<Attached, AttachError> {
        let base = MMIO_BASE + u64::from(self.count) * WINDOW_SIZE;
        if base + WINDOW_SIZE > MMIO_BASE + MMIO_SIZE {
            return Err(AttachError::Full);
        }
        let gsi = FIRST_GSI + self.count;
        let kvm = |what| move |source| AttachError::Kvm { what, source };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(AttachError::EventFd)?;
        self.vm.register_irqfd(&irq, gsi).map_err(kvm("registering an irqfd"))?;
        let mut queue_evts = Vec::with_capacity(desc.queue_sizes.len());
        for index in 0..desc.queue_sizes.len() as u32 {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(AttachError::EventFd)?;
            // An inline queue's notifications come to the transport, on the vCPU's thread.
            if desc.inline_queues & (1 << index) == 0 {
                let addr = IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY);
                self.vm
                    .register_ioevent(&evt, &addr, index)
                    .map_err(kvm("registering an ioeventfd"))?;
            }
            queue_evts.push(evt);
        }
        let shared = Arc::new(DeviceShared::new(irq, self.wake.clone()));
        let transport = MmioTransport::new(desc, shared.clone(), self.mem.clone());
        self.mmio.insert(base, WINDOW_SIZE, Box::new(transport))?;
        let entry =
            DeviceInfo { kind: kind as u32, irq: gsi, mmio_base: base, mmio_size: WINDOW_SIZE };
        if !self.info.push_device(entry) {
            return Err(AttachError::Full);
        }
        self.count += 1;
        let name = match kind {
            DeviceKind::VirtioRng => "virtio-rng",
            DeviceKind::SecureChannel => "secure-channel",
            DeviceKind::VirtioVsock => "virtio-vsock",
        };
        self.attached.push(DeviceView { kind: name, shared: shared.clone() });
        Ok(Attached { shared, queue_evts })
    }

    /// Attaches the secure-channel device of partition `partition` on node `node`.
    pub fn attach_secure_channel(
        &mut self,
        node: u32,
        partition: u32,
        limits: Limits,
    ) -> Result<ChannelDevice, AttachError> {
        let config = abi::Config {
            node,
            partition,
            max_message: limits.max_message,
            max_channels: limits.max_channels,
            version: abi::INTERFACE_VERSION,
        };
        let attached =
            self.attach(DeviceKind::SecureChannel, secure_channel::description(config))?;
        Ok(ChannelDevice::new(partition, attached.shared, self.mem.clone(), attached.queue_evts))
    }

    /// Attaches the virtio-vsock device of partition `partition`, with CID `cid`.
    pub fn attach_vsock(&mut self, partition: u32, cid: u32) -> Result<VsockDevice, AttachError> {
        let attached = self.attach(DeviceKind::VirtioVsock, vsock::description(cid))?;
        Ok(VsockDevice::new(partition, cid, attached.shared, self.mem.clone(), attached.queue_evts))
    }

    /// Attaches a virtio-rng serving at most `limit`, and returns its backend.
    pub fn attach_rng(&mut self, limit: RngLimit) -> Result<Backend, AttachError> {
        let attached = self.attach(DeviceKind::VirtioRng, rng::description())?;
        let rng = Rng::new(attached.shared, self.mem.clone(), limit);
        let timer = keyhold_devices::timer::nonblocking().map_err(AttachError::EventFd)?;
        Ok(Arc::new(Mutex::new(RngBackend { rng, queue_evts: attached.queue_evts, timer })))
    }
}

/// virtio-rng on the device thread, with the timer that resumes it when its rate allows.
struct RngBackend {
    rng: Rng,
    queue_evts: Vec<EventFd>,
    timer: TimerFd,
}

impl MutEventSubscriber for RngBackend {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("virtio-rng: watching a queue: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("virtio-rng: watching its rate timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        if let Some(evt) = self.queue_evts.iter().find(|e| e.as_raw_fd_eq(events.fd())) {
            let _ = evt.read();
        } else if self.timer.as_raw_fd_eq(events.fd()) {
            let _ = self.timer.wait();
        }
        if let Some(wait) = self.rng.process() {
            // A zero duration would disarm the timer: wait at least a millisecond.
            let wait = wait.max(Duration::from_millis(1));
            if let Err(e) = self.timer.reset(wait, None) {
                log::error!("virtio-rng: arming its rate timer: {e}");
            }
        }
    }
}

/// Matches an eventfd to the fd an event came from.
trait RawFdEq {
    fn as_raw_fd_eq(&self, fd: std::os::fd::RawFd) -> bool;
}

impl<T: std::os::fd::AsRawFd> RawFdEq for T {
    fn as_raw_fd_eq(&self, fd: std::os::fd::RawFd) -> bool {
        self.as_raw_fd() == fd
    }
}
