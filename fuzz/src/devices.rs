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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use guest_agent::channel::abi::{self, ControlRequest, ControlResponse, Endpoint, TxHeader};
use keyhold_devices::bus::BusDevice;
use keyhold_devices::cmm::{Cmm, CmmConfig};
use keyhold_devices::idle::Wake;
use keyhold_devices::link::Router;
use keyhold_devices::virtio::mmio::{reg, status, MmioTransport};
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
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

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
        }
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
            let _ = self.mem.write_obj(0u32, GuestAddress(avail));
            let _ = self.mem.write_obj(0u32, GuestAddress(used));
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
    fn buffer(&mut self, len: u64) -> u64 {
        let len = len.min(RAM - DATA);
        if self.next_buffer + len > RAM {
            self.next_buffer = DATA;
        }
        let at = self.next_buffer;
        self.next_buffer = (at + len + 15) & !15;
        at
    }

    /// A buffer holding `bytes`.
    fn buffer_with(&mut self, bytes: &[u8]) -> u64 {
        let at = self.buffer(bytes.len() as u64);
        let _ = self.mem.write_slice(bytes, GuestAddress(at));
        at
    }

    /// Puts a chain `(addr, len, flags, next)` on queue `q`'s avail ring; `next: None` links
    /// each descriptor to the following slot (with NEXT set on all but the last unless the
    /// flags say otherwise). Returns the head.
    fn push_chain(&mut self, q: usize, descs: &[(u64, u32, u16, Option<u16>)]) -> Option<u16> {
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
            let _ = self.mem.write_obj(raw, GuestAddress(desc_at + u64::from(slot) * 16));
        }
        let layout = &mut self.layouts[q];
        layout.next_desc = ((u32::from(head) + descs.len() as u32) % u32::from(size)) as u16;
        let entry = avail_at + 4 + 2 * u64::from(layout.avail_idx % size);
        let _ = self.mem.write_obj(head, GuestAddress(entry));
        layout.avail_idx = layout.avail_idx.wrapping_add(1);
        let _ = self.mem.write_obj(layout.avail_idx, GuestAddress(avail_at + 2));
        Some(head)
    }

    /// Reads the control queue's new used entries and records the channels LISTEN and OPEN
    /// answered.
    fn collect_answers(&mut self) {
        let Some(layout) = self.layouts.first().copied() else { return };
        let size = layout.size.max(1);
        let (_, _, used_at) = rings(0);
        let Ok(idx) = self.mem.read_obj::<u16>(GuestAddress(used_at + 2)) else { return };
        let mut seen = layout.used_seen;
        let mut steps = 0;
        while seen != idx && steps < size {
            let entry = used_at + 4 + 8 * u64::from(seen % size);
            if let Ok(id) = self.mem.read_obj::<u32>(GuestAddress(entry)) {
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
            seen = seen.wrapping_add(1);
            steps += 1;
        }
        self.layouts[0].used_seen = seen;
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
fn split(at: u64, len: u64, parts: u8, flags: u16) -> Vec<(u64, u32, u16, Option<u16>)> {
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
fn link(mut descs: Vec<(u64, u32, u16, Option<u16>)>) -> Vec<(u64, u32, u16, Option<u16>)> {
    let n = descs.len();
    for (i, d) in descs.iter_mut().enumerate() {
        if i + 1 < n {
            d.2 |= F_NEXT;
        }
    }
    descs
}

/// The node, its three devices, and the event manager that plays the device thread.
pub struct World {
    /// Devices 0 and 1: the secure channel of partitions 1 and 2; device 2: virtio-rng.
    pub drivers: Vec<Driver>,
    /// The node (CMM and channel devices).
    pub node: Arc<Mutex<ChannelNode>>,
    /// virtio-rng's backend.
    pub rng: Rng,
    manager: EventManager<Arc<Mutex<ChannelNode>>>,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("guest memory for a fuzz input")
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("an eventfd")
}

impl World {
    /// A fresh node; nothing set up.
    pub fn new() -> Self {
        let mut drivers = Vec::new();
        let mut devices = Vec::new();
        for device in 0..2 {
            let partition = partition_of(device);
            let mem = memory();
            let shared = Arc::new(DeviceShared::new(eventfd(), Arc::new(Wake::default())));
            let evts: Vec<EventFd> = (0..3).map(|_| eventfd()).collect();
            let clones = evts.iter().map(|e| e.try_clone().expect("an eventfd clone")).collect();
            devices.push(ChannelDevice::new(partition, shared.clone(), mem.clone(), clones));
            let config = abi::Config {
                node: NODE,
                partition,
                max_message: 64 * 1024,
                max_channels: 64,
                version: abi::INTERFACE_VERSION,
            };
            let transport =
                MmioTransport::new(secure_channel::description(config), shared, mem.clone());
            drivers.push(Driver::new(transport, mem, evts, 3));
        }
        let config = CmmConfig { capacity: 256, ..CmmConfig::default() };
        let cmm = Cmm::new(NODE, config, crate::audit(NODE), Router::unlinked())
            .expect("a CMM for a fuzz input");
        let node = Arc::new(Mutex::new(ChannelNode::new(cmm, devices).expect("a channel node")));
        ChannelNode::serve_inline(&node);
        let mut manager = EventManager::new().expect("an event manager");
        manager.add_subscriber(node.clone());
        let mem = memory();
        let shared = Arc::new(DeviceShared::new(eventfd(), Arc::new(Wake::default())));
        let rng = Rng::new(shared.clone(), mem.clone(), rng::RngLimit::default());
        drivers.push(Driver::new(
            MmioTransport::new(rng::description(), shared, mem.clone()),
            mem,
            Vec::new(),
            1,
        ));
        Self { drivers, node, rng, manager }
    }

    /// Runs the device thread's event loop once, without waiting.
    fn run_thread(&mut self) {
        let _ = self.manager.run_with_timeout(0);
    }

    /// Runs the operations in `data` under `profile`.
    pub fn run(&mut self, profile: Profile, data: &[u8]) {
        let mut input = Input::new(data);
        let mut event_idx = false;
        let mut size = 16;
        if profile != Profile::Mmio {
            let features = input.u8();
            event_idx = features & 1 != 0;
            size = 1u16 << (1 + input.u8() % 8);
            let devices: &[usize] = if profile == Profile::Rng { &[2] } else { &[0, 1] };
            for &d in devices {
                self.drivers[d].init(event_idx, size);
            }
        }
        let mut steps = 0;
        while !input.is_empty() && steps < 256 {
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
                    let _ = self.drivers[d].mem.write_slice(content, GuestAddress(addr));
                    descs.push((addr, len, bits, next));
                }
                self.drivers[d].push_chain(q, &descs);
            }
            op::CONTROL if d < 2 => self.control(d, input),
            op::TX if d < 2 => self.transmit(d, input),
            op::RX if d < 2 => {
                let n = input.u8() % 4 + 1;
                for _ in 0..n {
                    let len = u64::from(input.u16()) * 2;
                    let driver = &mut self.drivers[d];
                    let at = driver.buffer(len);
                    driver.push_chain(2, &[(at, len as u32, F_WRITE, None)]);
                }
            }
            op::NOTIFY => {
                let q = input.u8();
                let value = if q >= 0xf0 { input.u32() } else { u32::from(q % 4) };
                self.drivers[d].write_reg(reg::QUEUE_NOTIFY, value);
                if d == 2 {
                    let _ = self.rng.process();
                }
                self.after_notify(d);
            }
            op::NOTIFY_THREAD => {
                let q = usize::from(input.u8()) % 3;
                if d == 2 {
                    let _ = self.rng.process();
                } else {
                    let _ = self.drivers[d].evts[q].write(1);
                    self.run_thread();
                }
                self.after_notify(d);
            }
            op::WRITE_MEM => {
                let at = u64::from(input.u32()) % RAM;
                let n = input.u8();
                let bytes = input.bytes(usize::from(n));
                let _ = self.drivers[d].mem.write_slice(bytes, GuestAddress(at));
            }
            op::REG_WRITE => {
                let offset = u64::from(input.u16() % 0x200);
                let value = input.u32();
                self.drivers[d].write_reg(offset, value);
            }
            op::REG_READ => {
                let offset = u64::from(input.u16() % 0x200);
                let width = usize::from(input.u8() % 8) + 1;
                let mut data = [0u8; 8];
                self.drivers[d].transport.read(offset, &mut data[..width]);
            }
            op::REG_WRITE_ODD => {
                let offset = u64::from(input.u16() % 0x200);
                let width = usize::from(input.u8() % 8) + 1;
                let bytes = input.array::<8>();
                self.drivers[d].transport.write(offset, &bytes[..width]);
            }
            op::REINIT => {
                let features = input.u8();
                let event_idx = event_idx ^ (features & 1 != 0);
                self.drivers[d].init(event_idx, size);
            }
            op::AVAIL_IDX => {
                let q = usize::from(input.u8()) % queues;
                let idx = input.u16();
                let driver = &mut self.drivers[d];
                if let Some(layout) = driver.layouts.get_mut(q) {
                    layout.avail_idx = idx;
                }
                let _ = driver.mem.write_obj(idx, GuestAddress(rings(q).1 + 2));
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
        let mut out = Output::default();
        if profile != Profile::Mmio {
            out.u8(u8::from(event_idx)).u8(size_log);
        }
        Self { out }
    }

    /// The bytes.
    pub fn finish(self) -> Vec<u8> {
        self.out.bytes
    }

    fn code(&mut self, device: usize, code: u8) -> &mut Output {
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
