//! The device targets' world: one node (node 1) with two secure-channel partitions (1 and 2,
//! devices 0 and 1) in front of one CMM (`Router::unlinked()`), and a virtio-rng (device 2),
//! each behind its own `MmioTransport` over its own guest RAM, as the VMM wires them:
//! control and transmit notifications are served inline through the transport
//! (`ChannelNode::serve_inline`), everything else through the queue eventfds and a real
//! `EventManager` running the node as the device thread would.
//!
//! [`World::run`] reads operations from the fuzzer's bytes. The structured ones play a
//! driver that sets the queues up and writes descriptor chains, control requests, transmit
//! headers and receive buffers into guest memory; the raw ones write registers and guest
//! memory anywhere, so the fuzzer can also break every rule a driver should keep.
//!
//! The [`Driver`], the operations every device target shares ([`Driver::common`]), the node
//! and its device thread ([`DeviceThread`]) and the input builder ([`Ops`]) serve the vsock
//! target too (`crate::vsock`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, SubscriberId, SubscriberOps};
use guest_agent::channel::abi::{self, ControlRequest, ControlResponse, Endpoint, TxHeader};
use keyhold_devices::bus::BusDevice;
use keyhold_devices::cmm::{Cmm, CmmConfig};
use keyhold_devices::idle::Wake;
use keyhold_devices::link::Router;
use keyhold_devices::virtio::mmio::{reg, status, DeviceDescription, MmioTransport};
use keyhold_devices::virtio::rng::{self, Rng};
use keyhold_devices::virtio::secure_channel::{self, ChannelDevice, ChannelNode};
use keyhold_devices::virtio::shared::DeviceShared;
use keyhold_devices::virtio::{F_EVENT_IDX, F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Input, Output};

/// The node's ID.
pub const NODE: u32 = 1;
/// Guest RAM of each device, in bytes.
pub const RAM: u64 = 1 << 20;
/// Where the driver's buffers go (below it: the rings).
pub const DATA: u64 = 0x1_0000;
/// Descriptor flags.
pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A descriptor as a driver writes it: address, length, flags, and `next` (`None`: the
/// following slot).
pub(crate) type Desc = (u64, u32, u16, Option<u16>);

/// The device a partition's ID names (devices 0 and 1 are partitions 1 and 2).
pub fn partition_of(device: usize) -> u32 {
    device as u32 + 1
}

/// Where queue `q`'s rings are: descriptor table, avail ring, used ring (a page each).
pub fn rings(q: usize) -> (u64, u64, u64) {
    let desc = 0x1000 + q as u64 * 0x3000;
    (desc, desc + 0x1000, desc + 0x2000)
}

/// Which operations a target uses (each target's corpus is written for its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Raw register reads and writes, guest memory and notifications on all three devices;
    /// nothing set up in advance.
    Mmio,
    /// virtio-rng set up by the driver, then chains on its request queue.
    Rng,
    /// Both secure-channel partitions set up by the driver, then chains, control requests,
    /// messages and receive buffers.
    Channel,
}

/// Operation codes (low nibble of an operation byte; the high nibble picks the device).
pub mod op {
    /// A descriptor chain of up to 8 descriptors, each with raw flags, address and length.
    pub const CHAIN: u8 = 0;
    /// A control request and its response buffer.
    pub const CONTROL: u8 = 1;
    /// A message: transmit header, payload and status buffer.
    pub const TX: u8 = 2;
    /// Receive buffers.
    pub const RX: u8 = 3;
    /// `QueueNotify` written through the transport (the vCPU's path).
    pub const NOTIFY: u8 = 4;
    /// A queue eventfd, served by the event manager (the device thread's path).
    pub const NOTIFY_THREAD: u8 = 5;
    /// Bytes written anywhere in guest RAM.
    pub const WRITE_MEM: u8 = 6;
    /// A 32-bit register write.
    pub const REG_WRITE: u8 = 7;
    /// A register read of any width.
    pub const REG_READ: u8 = 8;
    /// A register write of any width.
    pub const REG_WRITE_ODD: u8 = 9;
    /// Reset and set the device up again.
    pub const REINIT: u8 = 10;
    /// A raw avail index.
    pub const AVAIL_IDX: u8 = 11;
    /// The partition stops (and may start again): vsock target only.
    pub const STOP: u8 = 12;
    /// The operator resets the partition's vsock transport: vsock target only.
    pub const RESET_VSOCK: u8 = 13;
}

/// What one of the operations every device target shares ([`Driver::common`]) did, for the
/// target to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Common {
    /// Not one of them: the target's own operation, with its code.
    Other(u8),
    /// A register read: nothing changed.
    Read,
    /// `QueueNotify` written through the transport (served inline, if at all).
    Notified,
    /// Queue `q`'s eventfd is to be written and the device thread run.
    Thread(usize),
    /// A raw chain put on queue `q`.
    Chain(usize),
    /// `len` raw bytes written to guest RAM at `at`.
    Memory(u64, usize),
    /// A raw write of `width` bytes to the register at this offset.
    Register(u64, usize),
    /// The device reset and set up again.
    Reinit,
    /// A raw avail index on queue `q`.
    AvailIdx(usize),
}

#[derive(Debug, Clone, Copy, Default)]
struct Layout {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A control request waiting for its answer.
#[derive(Debug, Clone, Copy)]
struct Asked {
    response: u64,
    process: u32,
    op: u32,
}

/// One device as its driver sees it.
pub struct Driver {
    /// The register file.
    pub transport: MmioTransport,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The queue eventfds (the secure channel's; empty for virtio-rng).
    pub evts: Vec<EventFd>,
    layouts: Vec<Layout>,
    next_buffer: u64,
    asked: HashMap<u16, Asked>,
    /// Channels LISTEN and OPEN answered, with the process they were made for.
    pub channels: Vec<(u32, u32)>,
    /// Guest RAM as the driver wrote it, for targets that check what the device writes
    /// ([`Driver::with_shadow`]).
    pub(crate) shadow: Option<Vec<u8>>,
}

impl Driver {
    fn new(
        transport: MmioTransport,
        mem: GuestMemoryMmap,
        evts: Vec<EventFd>,
        queues: usize,
    ) -> Self {
        Self {
            transport,
            mem,
            evts,
            layouts: vec![Layout::default(); queues],
            next_buffer: DATA,
            asked: HashMap::new(),
            channels: Vec::new(),
            shadow: None,
        }
    }

    /// Keeps a copy of guest RAM as the driver writes it (RAM starts zeroed).
    pub(crate) fn with_shadow(mut self) -> Self {
        self.shadow = Some(vec![0; RAM as usize]);
        self
    }

    /// Writes `bytes` to guest RAM at `at` (what lies within RAM), and to the shadow.
    pub(crate) fn poke(&mut self, at: u64, bytes: &[u8]) {
        let _ = self.mem.write_slice(bytes, GuestAddress(at));
        if let Some(shadow) = &mut self.shadow {
            let start = at.min(RAM) as usize;
            let end = at.saturating_add(bytes.len() as u64).min(RAM) as usize;
            shadow[start..end].copy_from_slice(&bytes[..end - start]);
        }
    }

    /// The size queue `q` was set up with (0 if it does not exist).
    pub(crate) fn queue_size(&self, q: usize) -> u16 {
        self.layouts.get(q).map_or(0, |l| l.size)
    }

    /// Writes register `offset`.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Reads register `offset`.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Resets the device and sets it up as a driver would: features (VERSION_1, and
    /// EVENT_IDX if `event_idx`), every queue of `size` entries (capped at its maximum) at
    /// [`rings`], then DRIVER_OK.
    pub fn init(&mut self, event_idx: bool, size: u16) {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 };
        for sel in 0..2u32 {
            self.write_reg(reg::DRIVER_FEATURES_SEL, sel);
            self.write_reg(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(reg::STATUS, negotiated);
        for q in 0..self.layouts.len() {
            self.write_reg(reg::QUEUE_SEL, q as u32);
            let max = self.read_reg(reg::QUEUE_NUM_MAX) as u16;
            let size = size.min(max).max(1);
            let (desc, avail, used) = rings(q);
            // The rings' indices start at zero, as a driver's would.
            self.poke(avail, &[0; 4]);
            self.poke(used, &[0; 4]);
            self.write_reg(reg::QUEUE_NUM, u32::from(size));
            self.write_reg(reg::QUEUE_DESC_LOW, desc as u32);
            self.write_reg(reg::QUEUE_DESC_HIGH, 0);
            self.write_reg(reg::QUEUE_DRIVER_LOW, avail as u32);
            self.write_reg(reg::QUEUE_DRIVER_HIGH, 0);
            self.write_reg(reg::QUEUE_DEVICE_LOW, used as u32);
            self.write_reg(reg::QUEUE_DEVICE_HIGH, 0);
            self.write_reg(reg::QUEUE_READY, 1);
            self.layouts[q] = Layout { size, ..Layout::default() };
        }
        self.write_reg(reg::STATUS, negotiated | status::DRIVER_OK);
        self.asked.clear();
        self.next_buffer = DATA;
    }

    /// A buffer of `len` bytes in the data area (wrapping round when it is used up).
    pub(crate) fn buffer(&mut self, len: u64) -> u64 {
        let len = len.min(RAM - DATA);
        if self.next_buffer + len > RAM {
            self.next_buffer = DATA;
        }
        let at = self.next_buffer;
        self.next_buffer = (at + len + 15) & !15;
        at
    }

    /// A buffer holding `bytes`.
    pub(crate) fn buffer_with(&mut self, bytes: &[u8]) -> u64 {
        let at = self.buffer(bytes.len() as u64);
        self.poke(at, bytes);
        at
    }

    /// Puts a chain `(addr, len, flags, next)` on queue `q`'s avail ring; `next: None` links
    /// each descriptor to the following slot (with NEXT set on all but the last unless the
    /// flags say otherwise). Returns the head.
    pub(crate) fn push_chain(&mut self, q: usize, descs: &[Desc]) -> Option<u16> {
        let layout = *self.layouts.get(q)?;
        let size = layout.size.max(1);
        let (desc_at, avail_at, _) = rings(q);
        let head = layout.next_desc % size;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (u32::from(head) + i as u32) % u32::from(size);
            let following = ((slot + 1) % u32::from(size)) as u16;
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.unwrap_or(following).to_le_bytes());
            self.poke(desc_at + u64::from(slot) * 16, &raw);
        }
        let layout = &mut self.layouts[q];
        layout.next_desc = ((u32::from(head) + descs.len() as u32) % u32::from(size)) as u16;
        let entry = avail_at + 4 + 2 * u64::from(layout.avail_idx % size);
        layout.avail_idx = layout.avail_idx.wrapping_add(1);
        let avail_idx = layout.avail_idx;
        self.poke(entry, &head.to_le_bytes());
        self.poke(avail_at + 2, &avail_idx.to_le_bytes());
        Some(head)
    }

    /// The slot the next chain put on queue `q` starts at.
    pub(crate) fn next_slot(&self, q: usize) -> u16 {
        self.layouts.get(q).map_or(0, |l| l.next_desc % l.size.max(1))
    }

    /// The used-ring entries `(id, len)` the device added to queue `q` since the last call,
    /// a ring's worth at most (the rest stay for the next call).
    pub(crate) fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let Some(layout) = self.layouts.get(q).copied() else { return Vec::new() };
        let size = layout.size.max(1);
        let (_, _, used_at) = rings(q);
        let Ok(idx) = self.mem.read_obj::<u16>(GuestAddress(used_at + 2)) else {
            return Vec::new();
        };
        let mut seen = layout.used_seen;
        let mut entries = Vec::new();
        while seen != idx && entries.len() < usize::from(size) {
            let entry = used_at + 4 + 8 * u64::from(seen % size);
            let id = self.mem.read_obj::<u32>(GuestAddress(entry)).unwrap_or(u32::MAX);
            let len = self.mem.read_obj::<u32>(GuestAddress(entry + 4)).unwrap_or(0);
            entries.push((id, len));
            seen = seen.wrapping_add(1);
        }
        self.layouts[q].used_seen = seen;
        entries
    }

    /// The used index the device last wrote for queue `q`, and the one the driver has read up
    /// to.
    pub(crate) fn used_indices(&self, q: usize) -> (u16, u16) {
        let idx = self.mem.read_obj::<u16>(GuestAddress(rings(q).2 + 2)).unwrap_or(0);
        (idx, self.layouts.get(q).map_or(0, |l| l.used_seen))
    }

    /// Reads the control queue's new used entries and records the channels LISTEN and OPEN
    /// answered.
    fn collect_answers(&mut self) {
        for (id, _) in self.take_used(0) {
            if let Some(asked) = self.asked.remove(&(id as u16)) {
                let mut head = [0u8; abi::CONTROL_RESPONSE_SIZE];
                if self.mem.read_slice(&mut head, GuestAddress(asked.response)).is_ok() {
                    let answer = ControlResponse::from_bytes(&head);
                    let opens = asked.op == abi::op::LISTEN || asked.op == abi::op::OPEN;
                    if answer.status == abi::status::OK && opens && answer.channel != 0 {
                        self.channels.push((answer.channel, asked.process));
                    }
                }
            }
        }
    }

    /// Runs operation `code` if it is one every device target shares: raw chains on any of
    /// the device's `queues`, notifications, raw memory and registers, a reset and set-up
    /// again (`event_idx` flipped by the input, queues of `size`), a raw avail index. Says
    /// what it did, for the target to finish (the device thread, its own checks).
    pub fn common(
        &mut self,
        code: u8,
        input: &mut Input<'_>,
        queues: usize,
        event_idx: bool,
        size: u16,
    ) -> Common {
        match code {
            op::CHAIN => {
                let q = usize::from(input.u8()) % queues;
                let n = input.u8() % 8 + 1;
                let mut descs = Vec::new();
                for i in 0..n {
                    let flags = input.u8();
                    let short = u64::from(input.u16());
                    let len = u32::from(input.u16());
                    let addr = if flags & 0x10 != 0 {
                        u64::from(input.u32()) | if flags & 0x20 != 0 { 1 << 40 } else { 0 }
                    } else {
                        DATA + short * 8
                    };
                    let mut bits = 0;
                    if flags & 1 != 0 {
                        bits |= F_WRITE;
                    }
                    if flags & 2 != 0 {
                        bits |= F_INDIRECT;
                    }
                    if i + 1 < n && flags & 4 == 0 {
                        bits |= F_NEXT;
                    }
                    let next = (flags & 8 != 0).then(|| input.u16());
                    let fill = input.u8();
                    let content = input.bytes(usize::from(fill));
                    self.poke(addr, content);
                    descs.push((addr, len, bits, next));
                }
                self.push_chain(q, &descs);
                Common::Chain(q)
            }
            op::NOTIFY => {
                let q = input.u8();
                let value = if q >= 0xf0 { input.u32() } else { u32::from(q % 4) };
                self.write_reg(reg::QUEUE_NOTIFY, value);
                Common::Notified
            }
            op::NOTIFY_THREAD => Common::Thread(usize::from(input.u8()) % 3),
            op::WRITE_MEM => {
                let at = u64::from(input.u32()) % RAM;
                let n = input.u8();
                let bytes = input.bytes(usize::from(n));
                self.poke(at, bytes);
                Common::Memory(at, bytes.len())
            }
            op::REG_WRITE => {
                let offset = u64::from(input.u16() % 0x200);
                let value = input.u32();
                self.write_reg(offset, value);
                Common::Register(offset, 4)
            }
            op::REG_READ => {
                let offset = u64::from(input.u16() % 0x200);
                let width = usize::from(input.u8() % 8) + 1;
                let mut data = [0u8; 8];
                self.transport.read(offset, &mut data[..width]);
                Common::Read
            }
            op::REG_WRITE_ODD => {
                let offset = u64::from(input.u16() % 0x200);
                let width = usize::from(input.u8() % 8) + 1;
                let bytes = input.array::<8>();
                self.transport.write(offset, &bytes[..width]);
                Common::Register(offset, width)
            }
            op::REINIT => {
                let features = input.u8();
                self.init(event_idx ^ (features & 1 != 0), size);
                Common::Reinit
            }
            op::AVAIL_IDX => {
                let q = usize::from(input.u8()) % queues;
                let idx = input.u16();
                if let Some(layout) = self.layouts.get_mut(q) {
                    layout.avail_idx = idx;
                }
                self.poke(rings(q).1 + 2, &idx.to_le_bytes());
                Common::AvailIdx(q)
            }
            code => Common::Other(code),
        }
    }

    /// A channel the driver learnt (`pick` with its top bit set), or `pick` itself.
    fn channel(&self, pick: u8) -> (u32, Option<u32>) {
        if pick & 0x80 != 0 && !self.channels.is_empty() {
            let (channel, process) = self.channels[usize::from(pick & 0x7f) % self.channels.len()];
            (channel, Some(process))
        } else {
            (u32::from(pick), None)
        }
    }
}

/// Splits `len` bytes at `at` into `parts` descriptors (device-readable, or writable).
pub(crate) fn split(at: u64, len: u64, parts: u8, flags: u16) -> Vec<Desc> {
    let parts = u64::from(parts.clamp(1, 3)).min(len.max(1));
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..parts {
        let end = if i + 1 == parts { len } else { len * (i + 1) / parts };
        out.push((at + start, (end - start) as u32, flags, None));
        start = end;
    }
    out
}

/// Sets NEXT on every descriptor but the last.
pub(crate) fn link(mut descs: Vec<Desc>) -> Vec<Desc> {
    let n = descs.len();
    for (i, d) in descs.iter_mut().enumerate() {
        if i + 1 < n {
            d.2 |= F_NEXT;
        }
    }
    descs
}

/// Operations one input runs at most.
pub(crate) const MAX_STEPS: usize = 256;

/// What an input whose devices the driver sets up starts with: EVENT_IDX or not, and the size
/// of every queue (capped at each queue's maximum): `2 << (b % 8)` (2 to 256), or for `b` from
/// 0xf8 up, `b - 0xf7` (1 to 8, sizes that are no power of two among them).
pub(crate) fn set_up(input: &mut Input<'_>) -> (bool, u16) {
    let event_idx = input.u8() & 1 != 0;
    let size = match input.u8() {
        b @ 0xf8.. => u16::from(b - 0xf7),
        b => 2 << (b % 8),
    };
    (event_idx, size)
}

/// The node, its three devices, and the event manager that plays the device thread.
pub struct World {
    /// Devices 0 and 1: the secure channel of partitions 1 and 2; device 2: virtio-rng.
    pub drivers: Vec<Driver>,
    /// The node (CMM and channel devices) and its device thread.
    pub thread: DeviceThread,
    /// virtio-rng's backend.
    pub rng: Rng,
}

/// Guest RAM of [`RAM`] bytes.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("guest memory for a fuzz input")
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("an eventfd")
}

/// What one device of the node is made of.
pub(crate) struct Parts {
    /// Its guest RAM.
    pub mem: GuestMemoryMmap,
    /// What its transport and its backend share.
    pub shared: Arc<DeviceShared>,
    /// The queue eventfds, the driver's end.
    pub evts: Vec<EventFd>,
    /// The same eventfds, the backend's end.
    pub clones: Vec<EventFd>,
}

impl Parts {
    /// Fresh RAM, shared state and three queue eventfds.
    pub fn new() -> Self {
        let shared = Arc::new(DeviceShared::new(eventfd(), Arc::new(Wake::default())));
        let evts: Vec<EventFd> = (0..3).map(|_| eventfd()).collect();
        let clones = evts.iter().map(|e| e.try_clone().expect("an eventfd clone")).collect();
        Self { mem: memory(), shared, evts, clones }
    }

    /// What the backend takes: the shared state, RAM and its ends of the queue eventfds.
    pub fn backend(&mut self) -> (Arc<DeviceShared>, GuestMemoryMmap, Vec<EventFd>) {
        (self.shared.clone(), self.mem.clone(), std::mem::take(&mut self.clones))
    }

    /// The driver of this device behind a transport that `description` describes.
    pub fn driver(self, description: DeviceDescription) -> Driver {
        let transport = MmioTransport::new(description, self.shared, self.mem.clone());
        Driver::new(transport, self.mem, self.evts, 3)
    }
}

/// The node's CMM (node [`NODE`], no links).
pub(crate) fn cmm() -> Cmm {
    let config = CmmConfig { capacity: 256, ..CmmConfig::default() };
    Cmm::new(NODE, config, crate::audit(NODE), Router::unlinked()).expect("a CMM for a fuzz input")
}

/// A node as the VMM runs it: its notifications served inline on the notifying (vCPU)
/// thread (`ChannelNode::serve_inline`), everything else by an event manager playing the
/// device thread.
pub struct DeviceThread {
    /// The node.
    pub node: Arc<Mutex<ChannelNode>>,
    manager: EventManager<Arc<Mutex<ChannelNode>>>,
    id: SubscriberId,
}

impl DeviceThread {
    /// Serves `node`.
    pub(crate) fn new(node: ChannelNode) -> Self {
        let node = Arc::new(Mutex::new(node));
        ChannelNode::serve_inline(&node);
        let mut manager = EventManager::new().expect("an event manager");
        let id = manager.add_subscriber(node.clone());
        Self { node, manager, id }
    }

    /// Runs the device thread's event loop once, without waiting.
    pub(crate) fn run(&mut self) {
        let _ = self.manager.run_with_timeout(0);
    }

    /// Runs `f` on the node as the device thread would, with its event registrations.
    pub(crate) fn on_thread<T>(
        &mut self,
        f: impl FnOnce(&mut ChannelNode, &mut EventOps) -> T,
    ) -> T {
        let mut ops = self.manager.event_ops(self.id).expect("the node's event registrations");
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut node, &mut ops)
    }
}

impl World {
    /// A fresh node; nothing set up.
    pub fn new() -> Self {
        let mut drivers = Vec::new();
        let mut devices = Vec::new();
        for device in 0..2 {
            let partition = partition_of(device);
            let mut parts = Parts::new();
            let (shared, mem, clones) = parts.backend();
            devices.push(ChannelDevice::new(partition, shared, mem, clones));
            let config = abi::Config {
                node: NODE,
                partition,
                max_message: 64 * 1024,
                max_channels: 64,
                version: abi::INTERFACE_VERSION,
            };
            drivers.push(parts.driver(secure_channel::description(config)));
        }
        let thread = DeviceThread::new(ChannelNode::new(cmm(), devices).expect("a channel node"));
        let mem = memory();
        let shared = Arc::new(DeviceShared::new(eventfd(), Arc::new(Wake::default())));
        let rng = Rng::new(shared.clone(), mem.clone(), rng::RngLimit::default());
        drivers.push(Driver::new(
            MmioTransport::new(rng::description(), shared, mem.clone()),
            mem,
            Vec::new(),
            1,
        ));
        Self { drivers, thread, rng }
    }

    /// Runs the device thread's event loop once, without waiting.
    fn run_thread(&mut self) {
        self.thread.run();
    }

    /// Runs the operations in `data` under `profile`.
    pub fn run(&mut self, profile: Profile, data: &[u8]) {
        let mut input = Input::new(data);
        let mut event_idx = false;
        let mut size = 16;
        if profile != Profile::Mmio {
            (event_idx, size) = set_up(&mut input);
            let devices: &[usize] = if profile == Profile::Rng { &[2] } else { &[0, 1] };
            for &d in devices {
                self.drivers[d].init(event_idx, size);
            }
        }
        let mut steps = 0;
        while !input.is_empty() && steps < MAX_STEPS {
            steps += 1;
            let code = input.u8();
            let device = match profile {
                Profile::Mmio => usize::from(code >> 4) % 3,
                Profile::Rng => 2,
                Profile::Channel => usize::from(code >> 4) & 1,
            };
            self.step(device, code & 0x0f, &mut input, event_idx, size);
        }
        if crate::debugging() {
            for (d, driver) in self.drivers.iter_mut().enumerate() {
                let status = driver.read_reg(reg::STATUS);
                let used: Vec<u16> = (0..driver.layouts.len())
                    .map(|q| driver.mem.read_obj::<u16>(GuestAddress(rings(q).2 + 2)).unwrap_or(0))
                    .collect();
                eprintln!(
                    "device {d}: status {status:#x}, used {used:?}, channels {:?}",
                    driver.channels
                );
            }
            crate::print_audit(NODE);
        }
    }

    fn step(&mut self, d: usize, code: u8, input: &mut Input<'_>, event_idx: bool, size: u16) {
        let queues = if d == 2 { 1 } else { 3 };
        match self.drivers[d].common(code, input, queues, event_idx, size) {
            Common::Notified => {
                if d == 2 {
                    let _ = self.rng.process();
                }
                self.after_notify(d);
            }
            Common::Thread(q) => {
                if d == 2 {
                    let _ = self.rng.process();
                } else {
                    let _ = self.drivers[d].evts[q].write(1);
                    self.run_thread();
                }
                self.after_notify(d);
            }
            Common::Other(op::CONTROL) if d < 2 => self.control(d, input),
            Common::Other(op::TX) if d < 2 => self.transmit(d, input),
            Common::Other(op::RX) if d < 2 => {
                let n = input.u8() % 4 + 1;
                for _ in 0..n {
                    let len = u64::from(input.u16()) * 2;
                    let driver = &mut self.drivers[d];
                    let at = driver.buffer(len);
                    driver.push_chain(2, &[(at, len as u32, F_WRITE, None)]);
                }
            }
            _ => {}
        }
    }

    fn after_notify(&mut self, d: usize) {
        // What the device thread would do with its pokes and pending work.
        if d < 2 {
            self.run_thread();
            self.drivers[d].collect_answers();
        }
    }

    /// A control request: `op flags process channel node partition process key resp shape`.
    fn control(&mut self, d: usize, input: &mut Input<'_>) {
        let op = u32::from(input.u8());
        let flags = input.u8();
        let process = u32::from(input.u8());
        let pick = input.u8();
        let remote = Endpoint {
            node: u32::from(input.u8()),
            partition: u32::from(input.u8()),
            process: u32::from(input.u8()),
        };
        let key = input.u8();
        let response_len = u64::from(input.u16() % 2048);
        let shape = input.u8();
        let driver = &mut self.drivers[d];
        let (channel, _) = driver.channel(pick);
        let request = ControlRequest {
            op,
            flags: u32::from(flags & 0x7f),
            process,
            channel,
            remote,
            key: [key; 32],
        };
        let mut bytes = request.to_bytes();
        if flags & 0x80 != 0 {
            bytes[28] = 1;
        }
        let len = if shape & 4 != 0 { 32 + usize::from(shape >> 3) } else { bytes.len() };
        let at = driver.buffer_with(&bytes[..len.min(bytes.len())]);
        let mut descs = split(at, len.min(bytes.len()) as u64, shape & 3, 0);
        let response = driver.buffer(response_len);
        if shape & 0x80 == 0 {
            descs.push((response, response_len as u32, F_WRITE, None));
        }
        if let Some(head) = driver.push_chain(0, &link(descs)) {
            driver.asked.insert(head, Asked { response, process, op });
        }
    }

    /// A message: `channel mode node partition process len actual fill shape`.
    fn transmit(&mut self, d: usize, input: &mut Input<'_>) {
        let pick = input.u8();
        let mode = input.u8();
        let claimed = Endpoint {
            node: u32::from(input.u8()),
            partition: u32::from(input.u8()),
            process: u32::from(input.u8()),
        };
        let declared = input.u16();
        let actual = usize::from(input.u16());
        let fill = input.u8();
        let shape = input.u8();
        let own = if mode & 4 != 0 { input.bytes(64) } else { &[] };
        let driver = &mut self.drivers[d];
        let (channel, process) = driver.channel(pick);
        let source = if mode & 1 != 0 {
            Endpoint {
                node: NODE,
                partition: partition_of(d),
                process: process.unwrap_or(claimed.process),
            }
        } else {
            claimed
        };
        let len = if mode & 2 != 0 { u32::from(declared) * 2 } else { actual as u32 };
        let mut header = TxHeader { channel, source, len }.to_bytes();
        if mode & 8 != 0 {
            header[20] = 1;
        }
        let mut message = header.to_vec();
        let start = message.len();
        message.resize(start + actual, fill);
        let n = own.len().min(actual);
        message[start..start + n].copy_from_slice(&own[..n]);
        let at = driver.buffer_with(&message);
        let mut descs = split(at, message.len() as u64, (shape >> 3) % 3 + 1, 0);
        let status_len = u64::from(shape & 7);
        if status_len > 0 {
            descs.push((driver.buffer(status_len), status_len as u32, F_WRITE, None));
        }
        driver.push_chain(1, &link(descs));
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds device-target inputs (for the seed corpora).
pub struct Ops {
    out: Output,
}

impl Ops {
    /// A `profile` input; for the set-up profiles, with the features and queue size byte.
    pub fn new(profile: Profile, event_idx: bool, size_log: u8) -> Self {
        match profile {
            Profile::Mmio => Self { out: Output::default() },
            _ => Self::set_up(event_idx, size_log),
        }
    }

    /// An input whose devices the driver sets up first, with EVENT_IDX or not and queues of
    /// `2 << size_log` entries (from 0xf8 up: `size_log - 0xf7`).
    pub fn set_up(event_idx: bool, size_log: u8) -> Self {
        let mut out = Output::default();
        out.u8(u8::from(event_idx)).u8(size_log);
        Self { out }
    }

    /// The bytes.
    pub fn finish(self) -> Vec<u8> {
        self.out.bytes
    }

    /// Starts operation `code` on `device`; its arguments follow.
    pub(crate) fn code(&mut self, device: usize, code: u8) -> &mut Output {
        self.out.u8((device as u8) << 4 | code)
    }

    /// LISTEN (or any `op`, with its flags in bits 8 to 15) from `process` of `device` for
    /// `remote`; `pick` names a channel (top bit: the n-th one learnt).
    pub fn control(
        &mut self,
        device: usize,
        op: u32,
        process: u8,
        pick: u8,
        remote: (u8, u8, u8),
    ) -> &mut Self {
        self.code(device, op::CONTROL)
            .u8(op as u8)
            .u8((op >> 8) as u8)
            .u8(process)
            .u8(pick)
            .u8(remote.0)
            .u8(remote.1)
            .u8(remote.2)
            .u8(0x5a)
            .u16(1024)
            .u8(1);
        self
    }

    /// A message of `len` bytes on the `pick`-th channel learnt, with the right source.
    pub fn send(&mut self, device: usize, pick: u8, len: u16, fill: u8) -> &mut Self {
        self.code(device, op::TX)
            .u8(0x80 | pick)
            .u8(1)
            .u8(0)
            .u8(0)
            .u8(0)
            .u16(0)
            .u16(len)
            .u8(fill)
            .u8(4 | 1 << 3);
        self
    }

    /// `n` receive buffers of `len` bytes (even).
    pub fn receive(&mut self, device: usize, n: u8, len: u32) -> &mut Self {
        self.code(device, op::RX).u8(n - 1);
        for _ in 0..n {
            self.out.u16((len / 2) as u16);
        }
        self
    }

    /// Notifies queue `q` through the transport.
    pub fn notify(&mut self, device: usize, q: u8) -> &mut Self {
        self.code(device, op::NOTIFY).u8(q);
        self
    }

    /// Notifies queue `q` through its eventfd (the device thread).
    pub fn notify_thread(&mut self, device: usize, q: u8) -> &mut Self {
        self.code(device, op::NOTIFY_THREAD).u8(q);
        self
    }

    /// A raw chain of `(flags, short address, len)` descriptors on queue `q`.
    pub fn chain(&mut self, device: usize, q: u8, descs: &[(u8, u16, u16)]) -> &mut Self {
        self.code(device, op::CHAIN).u8(q).u8(descs.len() as u8 - 1);
        for &(flags, addr, len) in descs {
            self.out.u8(flags).u16(addr).u16(len).u8(0);
        }
        self
    }

    /// A 32-bit register write.
    pub fn reg_write(&mut self, device: usize, offset: u16, value: u32) -> &mut Self {
        self.code(device, op::REG_WRITE).u16(offset).u32(value);
        self
    }

    /// A register read.
    pub fn reg_read(&mut self, device: usize, offset: u16, width: u8) -> &mut Self {
        self.code(device, op::REG_READ).u16(offset).u8(width - 1);
        self
    }

    /// Bytes written at `at`.
    pub fn write_mem(&mut self, device: usize, at: u32, bytes: &[u8]) -> &mut Self {
        self.code(device, op::WRITE_MEM).u32(at).u8(bytes.len() as u8).raw(bytes);
        self
    }

    /// Reset and set-up again.
    pub fn reinit(&mut self, device: usize) -> &mut Self {
        self.code(device, op::REINIT).u8(0);
        self
    }

    /// A raw avail index on queue `q`.
    pub fn avail_idx(&mut self, device: usize, q: u8, idx: u16) -> &mut Self {
        self.code(device, op::AVAIL_IDX).u8(q).u16(idx);
        self
    }

    /// Drives `device` to DRIVER_OK through raw register writes, with one queue of 16 at
    /// [`rings`] (for the mmio target's seeds).
    pub fn raw_init(&mut self, device: usize, queues: u8) -> &mut Self {
        self.reg_write(device, reg::STATUS as u16, 1).reg_write(device, reg::STATUS as u16, 3);
        self.reg_write(device, reg::DRIVER_FEATURES_SEL as u16, 1)
            .reg_write(device, reg::DRIVER_FEATURES as u16, 1)
            .reg_write(device, reg::STATUS as u16, 11);
        for q in 0..queues {
            let (desc, avail, used) = rings(usize::from(q));
            self.reg_write(device, reg::QUEUE_SEL as u16, u32::from(q))
                .reg_write(device, reg::QUEUE_NUM as u16, 16)
                .reg_write(device, reg::QUEUE_DESC_LOW as u16, desc as u32)
                .reg_write(device, reg::QUEUE_DRIVER_LOW as u16, avail as u32)
                .reg_write(device, reg::QUEUE_DEVICE_LOW as u16, used as u32)
                .reg_write(device, reg::QUEUE_READY as u16, 1);
        }
        self.reg_write(device, reg::STATUS as u16, 15)
    }
}
