//! The vsock target's world (`vsock_queue`): one node (node 1) whose `ChannelNode` switches
//! the virtio-vsock devices of two partitions (devices 0 and 1: partitions 1 and 2, CIDs 3
//! and 4) under a policy that allows some flows and not others ([`policy`]), each device
//! behind its own `MmioTransport` over its own guest RAM. As in the VMM, receive and transmit
//! notifications are served inline on the notifying thread (`ChannelNode::serve_inline`), the
//! queue eventfds by an event manager playing the device thread (`crate::devices`, whose
//! driver and shared operations this world uses).
//!
//! [`VsockWorld::run`] reads operations from the fuzzer's bytes: transmit packets whose header
//! fields are mostly sane but each one fuzzable ([`Packet`]), receive buffers of any size,
//! notifications on either path, resets (the driver's, and the operator's of the transport),
//! a partition stopped (and started again), and the raw
//! operations every device target has (chains, registers, memory, avail indices).
//!
//! After every operation it checks what the devices wrote, as far as it knows what its
//! driver posted (a raw operation that could change a queue or a posted chain behind the
//! driver's back ends the checks that depend on it, for the rest of the input):
//!
//! - every used entry names a chain the driver posted and the device still held; transmit
//!   chains come back with nothing written, and an event buffer comes back only after the
//!   operator reset the transport, once per reset, holding TRANSPORT_RESET (`le32` 0; 4 bytes
//!   used, or none if the buffer is smaller);
//! - every receive buffer used holds a whole header (`len >= 44`) and no more than the
//!   buffer's size, the header's `len` is exactly the bytes after it, its type is stream, its
//!   operation one of the seven, its `buf_alloc` at most `MAX_CREDIT`, and only RW carries
//!   payload;
//! - a packet other than an RST is addressed to the receiver's CID, comes from a partition's
//!   CID, belongs to a flow the policy allows (a REQUEST: in its own direction), and is one
//!   the sending partition's driver sent, with that operation; an RST carries no credit and
//!   is either the device's answer to one of the receiver's own packets (addresses swapped)
//!   or about a connection one of the two ends asked for;
//! - RW payload arrives in order, never duplicated or altered: each piece is the next part of
//!   what the sender sent on that connection, or the start of a later packet it sent (a
//!   packet refused, or lost with a stopped receiver, is skipped whole);
//! - the device writes guest memory only in the used rings and the receive buffers it holds
//!   (a buffer it returns: only the `len` bytes it says), and a device that needs a reset, or
//!   whose partition stopped, writes nothing at all.

use std::collections::{HashMap, HashSet};

use keyhold_devices::virtio::mmio::{reg, status};
use keyhold_devices::virtio::secure_channel::ChannelNode;
use keyhold_devices::virtio::vsock::packet::{self, Header, HEADER_SIZE, TYPE_STREAM};
use keyhold_devices::virtio::vsock::policy::{Policy, Rule};
use keyhold_devices::virtio::vsock::{self, VsockDevice, MAX_CREDIT, MAX_PAYLOAD};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::{
    cmm, link, op, partition_of, rings, set_up, split, Common, Desc, DeviceThread, Driver, Ops,
    Parts, DATA, F_WRITE, MAX_STEPS, RAM,
};
use crate::Input;

/// The CIDs of devices 0 and 1.
pub const CIDS: [u32; 2] = [3, 4];

/// The ports a port byte names (0xff: a raw port follows).
pub const PORTS: [u32; 8] = [5000, 7, 2000, 1024, 1025, 5001, 0, u32::MAX];

const RX: usize = vsock::RX_QUEUE;
const TX: usize = vsock::TX_QUEUE;
const EVENT: usize = vsock::EVENT_QUEUE;

/// The flows the node allows: CID 4 to port 5000 of CID 3, anyone to port 7 of CID 3 (CID 3
/// itself included), and CID 3 from port 2000 to any port of CID 4. Nothing else.
pub fn policy() -> Policy {
    let rule = |from: &str, to: &str| Rule {
        from: from.parse().expect("a pattern"),
        to: to.parse().expect("a pattern"),
    };
    Policy { rules: vec![rule("4:*", "3:5000"), rule("*", "3:7"), rule("3:2000", "4:*")] }
}

/// A packet's addresses: `(src_cid, src_port, dst_cid, dst_port)`.
type Addr = (u64, u32, u64, u32);

fn mirror((src_cid, src_port, dst_cid, dst_port): Addr) -> Addr {
    (dst_cid, dst_port, src_cid, src_port)
}

/// The device whose CID `cid` is.
fn device_of(cid: u64) -> Option<usize> {
    CIDS.iter().position(|&c| u64::from(c) == cid)
}

/// Byte `offset` of the payload stream of the connection `addr` names (RW payloads are this
/// pattern, so that a piece of one shows where in the stream it lies).
fn pattern(addr: &Addr, offset: u64) -> u8 {
    let seed = addr.0.wrapping_mul(0x1_0000_0001)
        ^ addr.2.rotate_left(17)
        ^ u64::from(addr.1) << 24
        ^ u64::from(addr.3).rotate_left(44);
    (offset.wrapping_add(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// Which CID a packet's `src_cid` or `dst_cid` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cid {
    /// The sending device's own.
    Own,
    /// The other device's (as a source: forged).
    Other,
    /// The host's, 2 (nobody's on this node; as a source: forged).
    Host,
    /// Any value.
    Raw(u64),
}

/// How a packet's `len` relates to the payload that follows its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Len {
    /// The payload's length.
    Actual,
    /// The payload's length plus this.
    Off(i8),
    /// Any value.
    Raw(u32),
    /// The payload's length, but the chain ends after this many bytes (header included).
    Cut(u8),
}

/// A transmit packet, as the TX operation describes it.
#[derive(Debug, Clone, Copy)]
pub struct Packet {
    /// The operation (0 to 8: 0 and 8 are none).
    pub op: u16,
    /// Type 2 (seqpacket) instead of stream.
    pub seqpacket: bool,
    /// `src_cid`.
    pub src: Cid,
    /// `dst_cid`.
    pub dst: Cid,
    /// `src_port`.
    pub src_port: u32,
    /// `dst_port`.
    pub dst_port: u32,
    /// `flags`.
    pub flags: u32,
    /// `buf_alloc`.
    pub buf_alloc: u32,
    /// `fwd_cnt`.
    pub fwd_cnt: u32,
    /// Payload bytes after the header.
    pub payload: u16,
    /// `len`.
    pub len: Len,
    /// Descriptors of the payload (0: header and payload in one buffer; 1 to 3).
    pub pieces: u8,
    /// The header's first buffer ends after this many bytes (1 to 43).
    pub header_cut: Option<u8>,
    /// A device-writable descriptor in the chain: its length in 16-byte units (0 to 63) and
    /// position (0 to 3, at most the number of buffers).
    pub write_only: Option<(u8, u8)>,
}

impl Packet {
    /// A well-formed packet from (`src_port`) to (`dst`, `dst_port`), with credit
    /// (`buf_alloc` 64 KiB, `fwd_cnt` 0) and `payload` bytes in a buffer of their own.
    pub fn new(op: u16, src_port: u32, dst: Cid, dst_port: u32, payload: u16) -> Self {
        Self {
            op,
            seqpacket: false,
            src: Cid::Own,
            dst,
            src_port,
            dst_port,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
            payload,
            len: Len::Actual,
            pieces: 1,
            header_cut: None,
            write_only: None,
        }
    }

    fn port(input: &mut Input<'_>) -> u32 {
        match input.u8() {
            0xff => input.u32(),
            b => PORTS[usize::from(b) % PORTS.len()],
        }
    }

    /// Reads the TX operation's arguments.
    fn read(input: &mut Input<'_>) -> Self {
        let code = input.u8();
        let addr = input.u8();
        let src = match addr & 3 {
            0 | 1 => Cid::Own,
            2 => Cid::Other,
            _ => Cid::Raw(input.u64()),
        };
        let dst = match addr >> 2 & 3 {
            0 => Cid::Own,
            1 => Cid::Other,
            2 => Cid::Host,
            _ => Cid::Raw(input.u64()),
        };
        let src_port = Self::port(input);
        let dst_port = Self::port(input);
        let flags = match input.u8() {
            0xff => input.u32(),
            b => u32::from(b & 3),
        };
        let buf_alloc = input.u32();
        let fwd_cnt = input.u32();
        let payload = input.u16();
        let shape = input.u8();
        let header_cut = (shape & 4 != 0).then(|| 1 + input.u8() % 43);
        let len = match shape >> 3 & 3 {
            0 => Len::Actual,
            1 => Len::Off(input.u8() as i8),
            2 => Len::Raw(input.u32()),
            _ => Len::Cut(input.u8()),
        };
        let write_only = (shape & 0x20 != 0).then(|| {
            let b = input.u8();
            (b & 0x3f, b >> 6)
        });
        Self {
            op: u16::from(code & 0x7f) % 9,
            seqpacket: code & 0x80 != 0,
            src,
            dst,
            src_port,
            dst_port,
            flags,
            buf_alloc,
            fwd_cnt,
            payload,
            len,
            pieces: shape & 3,
            header_cut,
            write_only,
        }
    }

    /// Writes the TX operation's arguments.
    fn write(&self, out: &mut crate::Output) {
        let code = self.op as u8 | if self.seqpacket { 0x80 } else { 0 };
        let cid_code = |cid: Cid| match cid {
            Cid::Own => 0,
            Cid::Other => 1,
            Cid::Host => 2,
            Cid::Raw(_) => 3,
        };
        // A source has no code of its own for the host's CID.
        let src = if self.src == Cid::Host { Cid::Raw(2) } else { self.src };
        let src_code = match src {
            Cid::Other => 2,
            cid => cid_code(cid),
        };
        out.u8(code).u8(src_code | cid_code(self.dst) << 2);
        for cid in [src, self.dst] {
            if let Cid::Raw(raw) = cid {
                out.u64(raw);
            }
        }
        for port in [self.src_port, self.dst_port] {
            match PORTS.iter().position(|&p| p == port) {
                Some(i) => out.u8(i as u8),
                None => out.u8(0xff).u32(port),
            };
        }
        match self.flags {
            0..=3 => out.u8(self.flags as u8),
            raw => out.u8(0xff).u32(raw),
        };
        out.u32(self.buf_alloc).u32(self.fwd_cnt).u16(self.payload);
        let len_code = match self.len {
            Len::Actual => 0,
            Len::Off(_) => 1,
            Len::Raw(_) => 2,
            Len::Cut(_) => 3,
        };
        let shape = self.pieces.min(3)
            | u8::from(self.header_cut.is_some()) << 2
            | len_code << 3
            | u8::from(self.write_only.is_some()) << 5;
        out.u8(shape);
        if let Some(cut) = self.header_cut {
            out.u8(cut.clamp(1, 43) - 1);
        }
        match self.len {
            Len::Off(delta) => {
                out.u8(delta as u8);
            }
            Len::Raw(raw) => {
                out.u32(raw);
            }
            Len::Cut(n) => {
                out.u8(n);
            }
            Len::Actual => {}
        }
        if let Some((units, at)) = self.write_only {
            out.u8(units & 0x3f | at << 6);
        }
    }
}

/// A chain the driver posted and the device has not returned.
#[derive(Debug, Clone, Default)]
struct Posted {
    /// The descriptor slots it takes.
    slots: Vec<u16>,
    /// Its device-writable buffers, in order: `(address, length)`.
    writable: Vec<(u64, u64)>,
    /// Its device-readable buffers.
    readable: Vec<(u64, u64)>,
}

impl Posted {
    fn capacity(&self) -> u64 {
        self.writable.iter().map(|w| w.1).sum()
    }

    /// The first `len` bytes of its writable buffers, as `(address, length)` pieces.
    fn prefix(&self, len: u64) -> Vec<(u64, u64)> {
        let mut left = len;
        let mut out = Vec::new();
        for &(at, n) in &self.writable {
            let n = n.min(left);
            out.push((at, n));
            left -= n;
        }
        out
    }
}

/// What the world knows of one device's queues.
#[derive(Debug, Clone)]
struct Track {
    /// Chains on each queue the device holds, by head.
    held: [HashMap<u16, Posted>; 3],
    /// The queues and the chains on them are as the driver wrote them: no raw operation
    /// since this driver started. Only then is what the device returns checked.
    known: bool,
    /// The device needed a reset at the end of the last operation.
    failed: bool,
    /// The partition is stopped.
    stopped: bool,
    /// Transport resets not yet reported in an event buffer.
    events_due: u32,
}

impl Track {
    fn new() -> Self {
        Self { held: Default::default(), known: true, failed: false, stopped: false, events_due: 0 }
    }

    /// The regions of the chains held on queue `q`, writable ones or readable ones.
    fn regions(&self, q: usize, writable: bool) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.held[q]
            .values()
            .flat_map(move |p| if writable { &p.writable } else { &p.readable })
            .copied()
    }
}

/// What one partition's driver sent, as far as the device may have read it.
#[derive(Debug, Clone, Default)]
struct Sent {
    /// Every packet the device may have read is recorded here: no raw write since that
    /// could have changed one before the device read it.
    unknown: bool,
    /// The addresses of every packet (with a whole header) it sent.
    addrs: HashSet<Addr>,
    /// And with each one's operation.
    packets: HashSet<(Addr, u16)>,
    /// The RW payload of each connection, as packets the device may forward.
    streams: HashMap<Addr, Stream>,
}

/// One connection's RW payload, as its sender sent it: the packets the device may forward,
/// `(offset, length)`, in order, and the offset after the last.
#[derive(Debug, Clone, Default)]
struct Stream {
    packets: Vec<(u64, u64)>,
    total: u64,
}

/// The node, its two vsock devices, the device thread, and what the checks know.
pub struct VsockWorld {
    drivers: Vec<Driver>,
    tracks: Vec<Track>,
    thread: DeviceThread,
    /// By device (CID 3, 4).
    sent: [Sent; 2],
    /// Where each connection's payload stream may stand at its receiver: the offsets just
    /// past the piece it got last (more than one while pieces could match at several places).
    received: HashMap<Addr, Vec<u64>>,
    /// Connections whose stream position could not be followed.
    lost: HashSet<Addr>,
    policy: Policy,
    event_idx: bool,
    size: u16,
    step: usize,
}

impl Default for VsockWorld {
    fn default() -> Self {
        Self::new()
    }
}

impl VsockWorld {
    /// A fresh node; nothing set up.
    pub fn new() -> Self {
        let mut drivers = Vec::new();
        let mut devices = Vec::new();
        for d in 0..2 {
            let (device, driver) = Self::device(d);
            devices.push(device);
            drivers.push(driver);
        }
        let node = ChannelNode::new(cmm(), Vec::new()).expect("a channel node");
        let policy = policy();
        // No programs on the node (CID 2) and no other nodes: the two partitions only.
        let thread = DeviceThread::new(node.with_vsock(devices, policy.clone(), Vec::new(), &[]));
        Self {
            drivers,
            tracks: vec![Track::new(), Track::new()],
            thread,
            sent: Default::default(),
            received: HashMap::new(),
            lost: HashSet::new(),
            policy,
            event_idx: false,
            size: 16,
            step: 0,
        }
    }

    /// A vsock device for device `d`'s partition, and its driver.
    fn device(d: usize) -> (VsockDevice, Driver) {
        let mut parts = Parts::new();
        let (shared, mem, clones) = parts.backend();
        let device = VsockDevice::new(partition_of(d), CIDS[d], shared, mem, clones);
        (device, parts.driver(vsock::description(CIDS[d])).with_shadow())
    }

    /// Runs the operations in `data`.
    pub fn run(&mut self, data: &[u8]) {
        let mut input = Input::new(data);
        (self.event_idx, self.size) = set_up(&mut input);
        for d in 0..2 {
            self.drivers[d].init(self.event_idx, self.size);
        }
        while !input.is_empty() && self.step < MAX_STEPS {
            self.step += 1;
            let code = input.u8();
            let d = usize::from(code >> 4) & 1;
            if self.tracks[d].stopped && code & 0x0f != op::STOP {
                // A stopped partition runs nothing.
                continue;
            }
            let ran = self.op(d, code & 0x0f, &mut input);
            if crate::debugging() {
                eprintln!(
                    "step {}: device {d} op {}{}",
                    self.step,
                    code & 0x0f,
                    ["", " (ran)"][usize::from(ran)]
                );
            }
            for e in 0..2 {
                self.check(e, ran);
            }
        }
        if crate::debugging() {
            for (d, driver) in self.drivers.iter_mut().enumerate() {
                let status = driver.read_reg(reg::STATUS);
                let used: Vec<(u16, u16)> = (0..3).map(|q| driver.used_indices(q)).collect();
                let track = &self.tracks[d];
                eprintln!(
                    "device {d} (CID {}): status {status:#x}, used {used:?}, known {}, \
                     sent known {}, stopped {}",
                    CIDS[d], track.known, !self.sent[d].unknown, track.stopped
                );
            }
            crate::print_audit(crate::devices::NODE);
        }
    }

    /// Runs one operation on device `d`; whether a device may have run.
    fn op(&mut self, d: usize, code: u8, input: &mut Input<'_>) -> bool {
        match self.drivers[d].common(code, input, 3, self.event_idx, self.size) {
            Common::Notified => self.thread.run(),
            Common::Thread(q) => {
                let _ = self.drivers[d].evts[q].write(1);
                self.thread.run();
            }
            Common::Chain(_) | Common::AvailIdx(_) => {
                self.forget(d);
                return false;
            }
            Common::Memory(at, len) => {
                self.written(d, at, len as u64);
                return false;
            }
            Common::Register(offset, width) => {
                let harmless = [
                    reg::QUEUE_NOTIFY,
                    reg::INTERRUPT_ACK,
                    reg::QUEUE_SEL,
                    reg::DEVICE_FEATURES_SEL,
                    reg::DRIVER_FEATURES_SEL,
                    reg::DRIVER_FEATURES,
                ];
                if width == 4 && offset < reg::CONFIG && !harmless.contains(&offset) {
                    self.forget(d);
                }
                // It may have been a notification.
                self.thread.run();
            }
            Common::Reinit => {
                let track = &mut self.tracks[d];
                track.held = Default::default();
                track.failed = false;
            }
            Common::Read => return false,
            Common::Other(op::TX) => {
                let packet = Packet::read(input);
                self.transmit(d, &packet);
                return false;
            }
            Common::Other(op::RX) => {
                self.receive(d, input);
                return false;
            }
            Common::Other(op::STOP) => self.stop(d, input.u8() & 1 != 0),
            Common::Other(op::RESET_VSOCK) => {
                let node = &self.thread.node;
                let mut node = node.lock().unwrap_or_else(|e| e.into_inner());
                let reset = node.reset_vsock(partition_of(d));
                assert!(reset.is_some(), "a running partition's transport can be reset");
                self.tracks[d].events_due += 1;
            }
            Common::Other(_) => return false,
        }
        true
    }

    /// A raw operation: what device `d` does with its queues is no longer known.
    fn forget(&mut self, d: usize) {
        self.tracks[d].known = false;
        self.sent[d].unknown = true;
    }

    /// Raw bytes written at `at`: the rings, or a packet not yet read, may have changed.
    fn written(&mut self, d: usize, at: u64, len: u64) {
        if len == 0 {
            return;
        }
        if at < DATA {
            self.forget(d);
        } else if overlaps((at, len), self.tracks[d].regions(TX, false)) {
            self.sent[d].unknown = true;
        }
    }

    /// Puts `chain` (with its regions) on queue `q` of device `d`, keeping track of it while
    /// that is possible.
    fn post(&mut self, d: usize, q: usize, chain: &[Desc]) {
        let driver = &mut self.drivers[d];
        let size = driver.queue_size(q).max(1);
        let first = driver.next_slot(q);
        let slots: Vec<u16> = (0..chain.len())
            .map(|i| ((usize::from(first) + i) % usize::from(size)) as u16)
            .collect();
        let Some(head) = driver.push_chain(q, chain) else { return };
        let track = &mut self.tracks[d];
        if !track.known {
            return;
        }
        // A slot still held (or taken twice by a chain longer than the ring) is overwritten:
        // the device may see a chain the driver no longer knows.
        let mut taken: HashSet<u16> =
            track.held[q].values().flat_map(|p| p.slots.clone()).collect();
        if !slots.iter().all(|s| taken.insert(*s)) {
            self.forget(d);
            return;
        }
        let region = |&(at, len, _, _): &Desc| (at, u64::from(len));
        let posted = Posted {
            slots,
            writable: chain.iter().filter(|c| c.2 & F_WRITE != 0).map(region).collect(),
            readable: chain.iter().filter(|c| c.2 & F_WRITE == 0).map(region).collect(),
        };
        track.held[q].insert(head, posted);
    }

    /// The TX operation: `packet` from device `d`.
    fn transmit(&mut self, d: usize, packet: &Packet) {
        let own = u64::from(CIDS[d]);
        let cid = |c: Cid, own: u64, other: u64| match c {
            Cid::Own => own,
            Cid::Other => other,
            Cid::Host => 2,
            Cid::Raw(raw) => raw,
        };
        let other = u64::from(CIDS[1 - d]);
        let (src_cid, dst_cid) = (cid(packet.src, own, other), cid(packet.dst, own, other));
        let addr: Addr = (src_cid, packet.src_port, dst_cid, packet.dst_port);
        let actual = u64::from(packet.payload);
        let len = match packet.len {
            Len::Actual | Len::Cut(_) => actual as u32,
            Len::Off(delta) => (actual as u32).wrapping_add_signed(i32::from(delta)),
            Len::Raw(raw) => raw,
        };
        let kind = if packet.seqpacket { 2 } else { TYPE_STREAM };
        let header = Header {
            src_cid,
            dst_cid,
            src_port: packet.src_port,
            dst_port: packet.dst_port,
            len,
            kind,
            op: packet.op,
            flags: packet.flags,
            buf_alloc: packet.buf_alloc,
            fwd_cnt: packet.fwd_cnt,
        };
        let sent = &mut self.sent[d];
        let start = sent.streams.get(&addr).map_or(0, |s| s.total);
        let mut message = header.to_bytes().to_vec();
        message.extend((0..actual).map(|i| pattern(&addr, start + i)));
        if let Len::Cut(n) = packet.len {
            message.truncate(usize::from(n));
        }
        let total = message.len() as u64;
        // What the device reads is exactly `message`: record it.
        if total >= HEADER_SIZE as u64 {
            sent.addrs.insert(addr);
            sent.packets.insert((addr, packet.op));
            let forwarded = src_cid == own
                && kind == TYPE_STREAM
                && len <= MAX_PAYLOAD
                && u64::from(len) <= total - HEADER_SIZE as u64
                && device_of(dst_cid).is_some();
            if packet.op == packet::op::RW && forwarded {
                let stream = sent.streams.entry(addr).or_default();
                stream.packets.push((start, u64::from(len)));
                stream.total += u64::from(len);
            }
        }
        // Laid out in guest memory: header (maybe cut in two), payload in pieces.
        let driver = &mut self.drivers[d];
        let at = driver.buffer(total);
        let track = &self.tracks[d];
        if overlaps((at, total), track.regions(TX, false).chain(track.regions(RX, true))) {
            self.sent[d].unknown = true;
        }
        driver.poke(at, &message);
        let head = if packet.pieces == 0 { total } else { total.min(HEADER_SIZE as u64) };
        let mut chain = Vec::new();
        match packet.header_cut.map(u64::from) {
            Some(cut) if cut < head => {
                chain.push((at, cut as u32, 0, None));
                chain.push((at + cut, (head - cut) as u32, 0, None));
            }
            _ => chain.push((at, head as u32, 0, None)),
        }
        if packet.pieces > 0 {
            chain.extend(split(at + head, total - head, packet.pieces, 0));
        }
        if let Some((units, position)) = packet.write_only {
            let len = u64::from(units) * 16;
            let buffer = driver.buffer(len);
            let position = usize::from(position).min(chain.len());
            chain.insert(position, (buffer, len as u32, F_WRITE, None));
        }
        self.post(d, TX, &link(chain));
    }

    /// The RX operation: `n len shape...`: receive buffers (or, with shape bit 3, event
    /// buffers) of `len` bytes in 1 to 3 descriptors (shape bits 0 and 1), with a
    /// device-readable descriptor in front (bit 2).
    fn receive(&mut self, d: usize, input: &mut Input<'_>) {
        let n = input.u8() % 4 + 1;
        for _ in 0..n {
            let len = u64::from(input.u16());
            let shape = input.u8();
            let q = if shape & 8 != 0 { EVENT } else { RX };
            let driver = &mut self.drivers[d];
            let at = driver.buffer(len);
            let mut chain = split(at, len, shape & 3, F_WRITE);
            if shape & 4 != 0 {
                chain.insert(0, (driver.buffer(16), 16, 0, None));
            }
            if overlaps((at, len), self.tracks[d].regions(RX, true)) {
                // Two buffers held at once in the same place: what one holds when the device
                // returns it may be what it wrote into the other.
                self.forget(d);
            } else if overlaps((at, len), self.tracks[d].regions(TX, false)) {
                // The device may write into a packet before it reads it.
                self.sent[d].unknown = true;
            }
            self.post(d, q, &link(chain));
        }
    }

    /// The STOP operation: device `d`'s partition stops (and, with `again`, or if it was
    /// stopped, starts again with a new device, as the VMM's starter does).
    fn stop(&mut self, d: usize, again: bool) {
        if !self.tracks[d].stopped {
            let node = &self.thread.node;
            node.lock().unwrap_or_else(|e| e.into_inner()).partition_stopped(partition_of(d));
            self.tracks[d].stopped = true;
            if !again {
                return;
            }
        }
        let (device, driver) = Self::device(d);
        let attachment = ChannelNode::attach_vsock(&self.thread.node, device);
        self.thread.on_thread(|node, ops| node.watch(attachment, ops));
        self.drivers[d] = driver;
        self.tracks[d] = Track::new();
        self.drivers[d].init(self.event_idx, self.size);
    }

    /// Checks what device `e` did in the last operation (`ran`: a device may have run).
    fn check(&mut self, e: usize, ran: bool) {
        let failed = self.drivers[e].read_reg(reg::STATUS) & status::NEEDS_RESET != 0;
        if self.tracks[e].known {
            // A device that needs a reset, or whose partition stopped, writes nothing.
            let quiet = self.tracks[e].failed || self.tracks[e].stopped;
            let returned = self.check_used(e, quiet);
            if ran {
                self.check_memory(e, quiet, &returned);
            }
        }
        if crate::debugging() && failed != self.tracks[e].failed {
            eprintln!("  device {e} {}", if failed { "needs a reset" } else { "was reset" });
        }
        self.tracks[e].failed = failed;
    }

    /// Checks the used entries device `e` added; the receive chains it returned, with the
    /// bytes it wrote to each.
    fn check_used(&mut self, e: usize, quiet: bool) -> Vec<(Posted, u32)> {
        let mut returned = Vec::new();
        for q in 0..3 {
            let entries = self.drivers[e].take_used(q);
            let (idx, seen) = self.drivers[e].used_indices(q);
            let step = self.step;
            assert_eq!(
                idx, seen,
                "step {step}: device {e} queue {q}: more used entries than posted"
            );
            assert!(
                !quiet || entries.is_empty(),
                "step {step}: device {e} queue {q}: used entries {entries:?} from a device that \
                 needs a reset or whose partition stopped"
            );
            for (id, len) in entries {
                let posted =
                    u16::try_from(id).ok().and_then(|id| self.tracks[e].held[q].remove(&id));
                let Some(posted) = posted else {
                    panic!("step {step}: device {e} queue {q}: used entry {id} (len {len}) is no chain it holds");
                };
                match q {
                    RX => {
                        self.check_packet(e, &posted, len);
                        returned.push((posted, len));
                    }
                    TX => {
                        assert_eq!(len, 0, "step {step}: device {e}: a transmit chain written to")
                    }
                    _ => {
                        self.check_event(e, &posted, len);
                        returned.push((posted, len));
                    }
                }
            }
        }
        returned
    }

    /// Checks the event device `e` wrote into event buffer `posted`, `len` bytes: only a
    /// transport reset's, once per reset.
    fn check_event(&mut self, e: usize, posted: &Posted, len: u32) {
        let step = self.step;
        let track = &mut self.tracks[e];
        assert!(track.events_due > 0, "step {step}: device {e}: an event with no reset ({len} B)");
        track.events_due -= 1;
        if crate::debugging() {
            eprintln!("  device {e}: an event of {len} bytes");
        }
        let fits = posted.capacity() >= 4;
        assert_eq!(len, if fits { 4 } else { 0 }, "step {step}: device {e}: event length");
        if fits {
            let mut id = [0u8; 4];
            let mut at = 0;
            for &(addr, n) in &posted.writable {
                for i in 0..n.min(4 - at as u64) {
                    let byte = self.drivers[e].mem.read_obj::<u8>(GuestAddress(addr + i));
                    id[at] = byte.expect("event buffer in guest RAM");
                    at += 1;
                }
                if at == 4 {
                    break;
                }
            }
            assert_eq!(u32::from_le_bytes(id), 0, "step {step}: device {e}: not TRANSPORT_RESET");
        }
    }

    /// Checks the packet device `e` wrote into receive chain `posted`, `len` bytes.
    fn check_packet(&mut self, e: usize, posted: &Posted, len: u32) {
        let step = self.step;
        let capacity = posted.capacity();
        assert!(
            len as usize >= HEADER_SIZE && u64::from(len) <= capacity,
            "step {step}: device {e}: a receive buffer of {capacity} bytes used with len {len}"
        );
        let mut bytes = Vec::with_capacity(len as usize);
        for (at, n) in posted.prefix(u64::from(len)) {
            let start = bytes.len();
            bytes.resize(start + n as usize, 0);
            self.drivers[e]
                .mem
                .read_slice(&mut bytes[start..], GuestAddress(at))
                .expect("a posted buffer");
        }
        let header = Header::from_bytes(bytes[..HEADER_SIZE].try_into().expect("a header"));
        let payload = &bytes[HEADER_SIZE..];
        if crate::debugging() {
            eprintln!("  device {e} received {header:?} ({} payload bytes)", payload.len());
        }
        let what = format!("step {step}: device {e} (CID {}) received {header:?}", CIDS[e]);
        assert_eq!(header.len as usize, payload.len(), "{what}: len is not the payload's");
        assert_eq!(header.kind, TYPE_STREAM, "{what}: not a stream packet");
        assert!((1..=7).contains(&header.op), "{what}: no operation");
        assert!(header.buf_alloc <= MAX_CREDIT, "{what}: credit above the cap");
        if header.op != packet::op::RW {
            assert_eq!(header.len, 0, "{what}: payload on a packet other than RW");
        }
        let addr: Addr = (header.src_cid, header.src_port, header.dst_cid, header.dst_port);
        let own = u64::from(CIDS[e]);
        if header.op == packet::op::RST {
            assert_eq!(
                (header.flags, header.buf_alloc, header.fwd_cnt),
                (0, 0, 0),
                "{what}: an RST with flags or credit"
            );
            let peer = device_of(header.src_cid).filter(|_| header.dst_cid == own);
            let known = !self.sent[e].unknown && peer.is_none_or(|p| !self.sent[p].unknown);
            if known {
                let answer = self.sent[e].addrs.contains(&mirror(addr));
                let about = peer.is_some_and(|p| self.sent[p].addrs.contains(&addr));
                assert!(
                    answer || about,
                    "{what}: an RST neither in answer to a packet of this partition nor about \
                     a connection either end asked for"
                );
            }
            return;
        }
        assert_eq!(header.dst_cid, own, "{what}: addressed to another CID");
        let Some(src) = device_of(header.src_cid) else {
            panic!("{what}: from a CID no partition has");
        };
        let from = (header.src_cid as u32, header.src_port);
        let to = (header.dst_cid as u32, header.dst_port);
        if header.op == packet::op::REQUEST {
            assert!(self.policy.allows(from, to), "{what}: a connection the policy forbids");
        } else {
            assert!(
                self.policy.allows(from, to) || self.policy.allows(to, from),
                "{what}: on a connection the policy forbids"
            );
        }
        if self.sent[src].unknown {
            return;
        }
        assert!(
            self.sent[src].packets.contains(&(addr, header.op)),
            "{what}: the partition of CID {} never sent it",
            CIDS[src]
        );
        if header.op == packet::op::RW && !payload.is_empty() {
            let payload = payload.to_vec();
            self.check_stream(src, addr, &payload, &what);
        }
    }

    /// Checks that `piece` of the payload of connection `addr` (sent by device `src`) is the
    /// next part of its stream, or the start of a later packet of it.
    fn check_stream(&mut self, src: usize, addr: Addr, piece: &[u8], what: &str) {
        if self.lost.contains(&addr) {
            return;
        }
        let Some(stream) = self.sent[src].streams.get(&addr) else {
            panic!("{what}: RW payload on a connection that never carried any");
        };
        let ends = self.received.entry(addr).or_insert_with(|| vec![0]);
        let mut starts: Vec<u64> = Vec::new();
        for &end in ends.iter() {
            starts.push(end);
            starts.extend(stream.packets.iter().map(|p| p.0).filter(|&s| s > end));
        }
        starts.sort_unstable();
        starts.dedup();
        let n = piece.len() as u64;
        let fits = |o: u64| {
            o + n <= stream.total
                && piece.iter().enumerate().all(|(i, &b)| b == pattern(&addr, o + i as u64))
        };
        let next: Vec<u64> = starts.into_iter().filter(|&o| fits(o)).map(|o| o + n).collect();
        assert!(
            !next.is_empty(),
            "{what}: {n} payload bytes that are not the next of what was sent ({} bytes in {} \
             packets; the receiver had got up to one of {ends:?})",
            stream.total,
            stream.packets.len()
        );
        if next.len() > 16 {
            self.received.remove(&addr);
            self.lost.insert(addr);
        } else {
            *ends = next;
        }
    }

    /// Checks that device `e` wrote guest memory only where it may: the used rings, and
    /// (unless `quiet`) the receive chains it held, of those it returned only the bytes it
    /// said it wrote. Every page ever touched is compared with the driver's copy; a page
    /// never touched (not resident) cannot have changed.
    fn check_memory(&mut self, e: usize, quiet: bool, returned: &[(Posted, u32)]) {
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        if !quiet {
            for q in 0..3 {
                let used = rings(q).2;
                allowed.push((used, 6 + 8 * u64::from(self.drivers[e].queue_size(q))));
            }
            allowed.extend(self.tracks[e].regions(RX, true));
            for (posted, len) in returned {
                allowed.extend(posted.prefix(u64::from(*len)));
            }
        }
        let driver = &mut self.drivers[e];
        let Some(ram) = guest_ram(&driver.mem) else { return };
        let touched = touched_pages(ram);
        let Some(shadow) = driver.shadow.as_mut() else { return };
        for (p, (page, then)) in ram.chunks(PAGE).zip(shadow.chunks_mut(PAGE)).enumerate() {
            let base = (p * PAGE) as u64;
            if touched.as_ref().is_some_and(|t| t[p] & 1 == 0) || page == then {
                continue;
            }
            let lines = page.chunks(64).zip(then.chunks(64)).enumerate();
            for (l, (now, was)) in lines.filter(|(_, (now, was))| now != was) {
                let differ = now.iter().zip(was).enumerate().filter(|(_, (a, b))| a != b);
                for (i, (now, was)) in differ {
                    let at = base + (l * 64 + i) as u64;
                    assert!(
                        allowed.iter().any(|&(s, n)| at >= s && at < s + n),
                        "step {}: device {e} wrote {was:#04x} -> {now:#04x} at {at:#x}, outside \
                     the buffers it held{}",
                        self.step,
                        if quiet { " (it needed a reset or had stopped)" } else { "" }
                    );
                }
            }
            then.copy_from_slice(page);
        }
    }
}

/// Host page size (guest RAM is compared with the driver's copy a page at a time).
const PAGE: usize = 4096;

/// Guest RAM as bytes, to compare with the driver's copy.
fn guest_ram(mem: &vm_memory::GuestMemoryMmap) -> Option<&[u8]> {
    use vm_memory::GuestMemoryBackend;
    let host = mem.get_host_address(GuestAddress(0)).ok()?;
    // SAFETY: guest RAM is one mapping of RAM bytes starting at `host`, which lives as long as
    // `mem` (borrowed for the slice's lifetime). Nothing writes it while the slice is in use:
    // the device runs only on this thread (the event manager and the inline notifications
    // alike), and the caller does not run it while it compares.
    Some(unsafe { std::slice::from_raw_parts(host, RAM as usize) })
}

/// For each page of `ram`, whether it was ever touched (bit 0: resident); `None` if the kernel
/// cannot say (then every page is compared).
fn touched_pages(ram: &[u8]) -> Option<Vec<u8>> {
    let mut pages = vec![0u8; ram.len() / PAGE];
    // SAFETY: `ram` is a page-aligned mapping (mmap) of `ram.len()` bytes; mincore reads none
    // of it and writes one byte per page into `pages`, which has room for every page.
    let rc =
        unsafe { libc::mincore(ram.as_ptr() as *mut libc::c_void, ram.len(), pages.as_mut_ptr()) };
    (rc == 0).then_some(pages)
}

/// Whether `(at, len)` overlaps any of `regions`.
fn overlaps((at, len): (u64, u64), mut regions: impl Iterator<Item = (u64, u64)>) -> bool {
    regions.any(|(s, n)| len > 0 && n > 0 && at < s + n && s < at + len)
}

/// Builders of vsock-target inputs (for the seed corpus).
impl Ops {
    /// `packet` from `device`.
    pub fn packet(&mut self, device: usize, packet: &Packet) -> &mut Self {
        let out = self.code(device, op::TX);
        packet.write(out);
        self
    }

    /// Receive buffers of `lens` bytes (`shape` as the RX operation has it), up to four.
    pub fn buffers(&mut self, device: usize, lens: &[u16], shape: u8) -> &mut Self {
        let out = self.code(device, op::RX);
        out.u8(lens.len() as u8 - 1);
        for &len in lens {
            out.u16(len).u8(shape);
        }
        self
    }

    /// The operator resets `device`'s transport.
    pub fn reset_vsock(&mut self, device: usize) -> &mut Self {
        self.code(device, op::RESET_VSOCK);
        self
    }

    /// `device`'s partition stops; with `again`, it starts again at once.
    pub fn stop(&mut self, device: usize, again: bool) -> &mut Self {
        self.code(device, op::STOP).u8(u8::from(again));
        self
    }
}
