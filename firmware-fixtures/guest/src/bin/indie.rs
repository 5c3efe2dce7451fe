//! An independent driver for the secure-channel device, written from docs/DEVICE.md alone: its
//! own virtio-mmio transport handling, its own split virtqueues (with EVENT_IDX) and its own
//! encoding of every request. It opens a channel to an `echo` partition (`peer=N:P:Q`), sends
//! messages of many sizes (singly and in a batch behind one notification), checks every echo's
//! verified header and payload, provokes documented refusals, reads LIST and STATS, says goodbye
//! and closes. Prints `indie: all checks passed` and exits 0, or `indie: FAILED: <what>` and 1.
//!
//! It shares no code with the guest agent's driver, nor with this crate's `raw_queue` (whose
//! descriptor writes it repeats): two implementations of one document are the check.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use guest_agent::idle::Backoff;
use guest_agent::{mmio, pages, println, time, BootInfo};

// ---- virtio-mmio registers (DEVICE.md, "Transport") ----
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;

const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

const DEVICE_ID_CHANNEL: u32 = 0x4b48;
const VENDOR_ID_KH: u32 = 0x484b;
/// Boot-info device kind of the secure channel (GUEST.md).
const KIND_CHANNEL: u32 = 2;

// ---- split virtqueue ----
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

// ---- the device's ABI (DEVICE.md) ----
const Q_CONTROL: u32 = 0;
const Q_TRANSMIT: u32 = 1;
const Q_RECEIVE: u32 = 2;

const OP_LISTEN: u32 = 1;
const OP_OPEN: u32 = 2;
const OP_CLOSE: u32 = 3;
const OP_LIST: u32 = 4;
const OP_STATS: u32 = 5;

const OK: u32 = 0;
const BAD_REQUEST: u32 = 1;
const UNKNOWN_OP: u32 = 2;
const NO_CHANNEL: u32 = 3;
const FORGED_SOURCE: u32 = 4;
const NO_LISTENER: u32 = 5;
const EXISTS: u32 = 6;
const TOO_BIG: u32 = 8;
const NOT_OPEN: u32 = 9;
const NOT_OWNER: u32 = 10;
const BUFFER_TOO_SMALL: u32 = 11;
const UNREACHABLE: u32 = 12;
const NO_ROOM: u32 = 13;

const STATE_LISTENING: u32 = 1;
const STATE_OPEN: u32 = 2;

const REQUEST_LEN: usize = 64;
const HEAD_LEN: usize = 16;
const LIST_RECORD: usize = 56;
const TX_HEADER: usize = 24;
const RX_HEADER: usize = 32;

/// The process this program speaks for.
const PROCESS: u32 = 1;

// Our own sizes (at most QueueNumMax each).
const CONTROL_SIZE: u16 = 8;
const TX_SIZE: u16 = 32;
const RX_SIZE: u16 = 16;
/// Transmit slots, four descriptors each.
const TX_SLOTS: usize = 8;
/// Bytes per transmit and receive buffer: 17 pages, room for 32 + 65,536 and a status.
const BUF_BYTES: u64 = 17 * 4096;
/// Where a transmit slot's status goes, inside its buffer.
const TX_STATUS_AT: u64 = BUF_BYTES - 8;

type Check<T = ()> = Result<T, ()>;

/// Prints the failure and returns `Err(())`.
macro_rules! fail {
    ($($arg:tt)*) => {{
        println!("indie: FAILED: {}", format_args!($($arg)*));
        return Err(());
    }};
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

/// A little-endian endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Endpoint {
    node: u32,
    partition: u32,
    process: u32,
}

impl Endpoint {
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':').map(|p| p.parse::<u32>().ok());
        let e = Self { node: parts.next()??, partition: parts.next()??, process: parts.next()?? };
        parts.next().is_none().then_some(e)
    }
}

fn rd_u32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses inside buffers this program allocated from free RAM
    // (identity-mapped); unaligned reads are allowed by `read_unaligned`.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn rd_u64(addr: u64) -> u64 {
    // SAFETY: as in `rd_u32`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

fn wr_u32(addr: u64, v: u32) {
    // SAFETY: as in `rd_u32`; the device does not own the buffer while we write it.
    unsafe { core::ptr::write_unaligned(addr as *mut u32, v) }
}

fn bytes_mut(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: `addr..addr + len` lies in a buffer this program allocated and that the device
    // does not own while the slice is used.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// The payload byte `i` of message `k`: varied, so that shifted or mixed-up bytes show.
fn pattern(k: u32, i: usize) -> u8 {
    (k.wrapping_mul(31) as usize ^ i.wrapping_mul(7) ^ (i >> 8) ^ (i >> 16)) as u8
}

/// The virtio-mmio window.
struct Regs {
    base: u64,
}

impl Regs {
    fn read(&self, off: u64) -> u32 {
        // SAFETY: `base` is the secure channel's MMIO window from the boot info, and `off` a
        // 4-byte aligned register or configuration offset inside it.
        unsafe { mmio::read32(self.base + off) }
    }

    fn write(&self, off: u64, v: u32) {
        // SAFETY: as in `read`.
        unsafe { mmio::write32(self.base + off, v) }
    }

    fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }
}

/// One split virtqueue, laid out in three page-aligned allocations.
struct Queue {
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Our avail idx (next free avail slot).
    avail_idx: u16,
    /// The avail idx at our last notification decision.
    kicked_idx: u16,
    /// Used entries we have consumed.
    last_used: u16,
    event_idx: bool,
    notifies: u64,
}

impl Queue {
    fn new(index: u32, size: u16, event_idx: bool) -> Check<Self> {
        let n = u64::from(size);
        let (Some(desc), Some(avail), Some(used)) =
            (pages::alloc(16 * n), pages::alloc(6 + 2 * n), pages::alloc(6 + 8 * n))
        else {
            fail!("out of RAM for queue {index}");
        };
        Ok(Self {
            index,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx,
            notifies: 0,
        })
    }

    /// Programs the queue into the device and enables it.
    fn setup(&self, regs: &Regs) -> Check {
        regs.write(REG_QUEUE_SEL, self.index);
        let max = regs.read(REG_QUEUE_NUM_MAX);
        ensure!(max >= u32::from(self.size), "queue {} QueueNumMax {max}", self.index);
        ensure!(regs.read(REG_QUEUE_READY) == 0, "queue {} ready before setup", self.index);
        regs.write(REG_QUEUE_NUM, u32::from(self.size));
        for (low, high, addr) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, self.desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, self.avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, self.used),
        ] {
            regs.write(low, addr as u32);
            regs.write(high, (addr >> 32) as u32);
        }
        regs.write(REG_QUEUE_READY, 1);
        ensure!(regs.read(REG_QUEUE_READY) == 1, "queue {} did not become ready", self.index);
        Ok(())
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i);
        // SAFETY: descriptor `i` (< size) of our table, which the device reads only for chains
        // we have made available; this one is not available now.
        unsafe {
            write_volatile(d as *mut u64, addr);
            write_volatile((d + 8) as *mut u32, len);
            write_volatile((d + 12) as *mut u16, flags);
            write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Writes a chain of `(addr, len, writable)` buffers from descriptor `first` on.
    fn chain(&self, first: u16, parts: &[(u64, u32, bool)]) {
        for (k, &(addr, len, writable)) in parts.iter().enumerate() {
            let i = first + k as u16;
            let more = k + 1 < parts.len();
            let flags =
                if more { DESC_F_NEXT } else { 0 } | if writable { DESC_F_WRITE } else { 0 };
            self.set_desc(i, addr, len, flags, if more { i + 1 } else { 0 });
        }
    }

    /// Makes the chain at `head` available (no notification).
    fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        fence(Ordering::SeqCst);
        // SAFETY: the avail ring is ours; slot < size; the idx is written after the entry.
        unsafe {
            write_volatile((self.avail + 4 + 2 * slot) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile((self.avail + 2) as *mut u16, self.avail_idx);
        }
    }

    /// Notifies the device if it asked for it (EVENT_IDX's avail_event, or NO_NOTIFY).
    fn kick(&mut self, regs: &Regs) {
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        self.kicked_idx = new;
        let wanted = if self.event_idx {
            // SAFETY: avail_event is the u16 after the used ring's entries, in our allocation.
            let event =
                unsafe { read_volatile((self.used + 4 + 8 * u64::from(self.size)) as *const u16) };
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: the used ring's flags, in our allocation.
            unsafe { read_volatile(self.used as *const u16) & 1 == 0 }
        };
        if wanted && new != old {
            regs.write(REG_QUEUE_NOTIFY, self.index);
            self.notifies += 1;
        }
    }

    /// The next used entry, if any: `(id, len)`.
    fn pop(&mut self) -> Option<(u32, u32)> {
        // SAFETY: the used ring's idx, in our allocation, written by the device.
        let idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: a used entry the device has published (idx moved past it).
        let (id, len) =
            unsafe { (read_volatile(e as *const u32), read_volatile((e + 4) as *const u32)) };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // SAFETY: used_event is the u16 after the avail ring's entries, in our allocation.
            unsafe {
                write_volatile(
                    (self.avail + 4 + 2 * u64::from(self.size)) as *mut u16,
                    self.last_used,
                )
            };
        }
        Some((id, len))
    }
}

/// How a transmit chain spreads over descriptors ("A request may span descriptors in any way").
#[derive(Clone, Copy)]
enum Layout {
    /// Header and payload in one buffer.
    Whole,
    /// Header, payload.
    Split,
    /// 10 bytes of header, then the rest of the header with the payload.
    Ragged,
    /// Header, an empty buffer, payload.
    WithEmpty,
    /// Header and only half the payload the header claims (a malformed request).
    Truncated,
}

struct Driver {
    info: &'static BootInfo,
    regs: Regs,
    tsc_khz: u32,
    node: u32,
    partition: u32,
    max_message: u32,
    max_channels: u32,
    control: Queue,
    tx: Queue,
    rx: Queue,
    /// Control request at +0, response at +4096 (4096 bytes).
    control_buf: u64,
    tx_bufs: u64,
    rx_bufs: u64,
    tx_busy: [bool; TX_SLOTS],
    /// Split the next control response so (see `control`).
    resp_split: Option<u32>,
}

/// Result of one control request.
struct Answer {
    used_len: u32,
    status: u32,
    channel: u32,
    count: u32,
}

impl Driver {
    fn me(&self, process: u32) -> Endpoint {
        Endpoint { node: self.node, partition: self.partition, process }
    }

    /// True while fewer than `secs` seconds passed since `start`.
    fn within(&self, start: u64, secs: u64) -> bool {
        let limit = u64::from(self.tsc_khz.max(1_000_000)) * 1000 * secs;
        time::ticks().wrapping_sub(start) < limit
    }

    fn check_alive(&self, what: &str) -> Check {
        let s = self.regs.status();
        ensure!(s & STATUS_NEEDS_RESET == 0, "device needs reset (status {s:#x}) {what}");
        Ok(())
    }

    fn control_at(&self) -> (u64, u64) {
        (self.control_buf, self.control_buf + 4096)
    }

    /// Sends one control request: `readable` bytes of request split into `pieces` readable
    /// descriptors, and a response buffer of `resp_len` bytes. Waits for its answer.
    fn control(
        &mut self,
        req: &[u8; REQUEST_LEN],
        readable: usize,
        resp_len: u32,
    ) -> Check<Answer> {
        let (rq, rs) = self.control_at();
        bytes_mut(rq, REQUEST_LEN).copy_from_slice(req);
        bytes_mut(rs, 4096).fill(0xee);
        // Request in two descriptors when it is whole (any split is allowed), then response.
        if let Some(n) = self.resp_split.take() {
            // Response in three writable buffers: `n` bytes, an empty one, the rest.
            let rest = resp_len - n;
            self.control.chain(
                0,
                &[
                    (rq, 64, false),
                    (rs, n, true),
                    (rs + u64::from(n), 0, true),
                    (rs + u64::from(n), rest, true),
                ],
            );
        } else if readable == REQUEST_LEN {
            self.control.chain(0, &[(rq, 40, false), (rq + 40, 24, false), (rs, resp_len, true)]);
        } else {
            self.control.chain(0, &[(rq, readable as u32, false), (rs, resp_len, true)]);
        }
        self.control.push(0);
        self.control.kick(&self.regs);
        let (id, used_len) =
            self.next_used(Q_CONTROL, &format_args!("control answer (op {})", req[0]))?;
        ensure!(id == 0, "control answer for head {id}, we offered 0");
        Ok(Answer { used_len, status: rd_u32(rs), channel: rd_u32(rs + 4), count: rd_u32(rs + 8) })
    }

    fn request(op: u32, flags: u32, process: u32, channel: u32, remote: Endpoint) -> [u8; 64] {
        let mut r = [0u8; REQUEST_LEN];
        r[0..4].copy_from_slice(&op.to_le_bytes());
        r[4..8].copy_from_slice(&flags.to_le_bytes());
        r[8..12].copy_from_slice(&process.to_le_bytes());
        r[12..16].copy_from_slice(&channel.to_le_bytes());
        r[16..20].copy_from_slice(&remote.node.to_le_bytes());
        r[20..24].copy_from_slice(&remote.partition.to_le_bytes());
        r[24..28].copy_from_slice(&remote.process.to_le_bytes());
        r
    }

    /// A control request expected to answer `want`; returns the answer.
    fn expect(&mut self, what: &str, req: [u8; 64], want: u32) -> Check<Answer> {
        let a = self.control(&req, REQUEST_LEN, 4096)?;
        ensure!(
            a.status == want,
            "{what}: status {} (want {want}), used length {}",
            a.status,
            a.used_len
        );
        Ok(a)
    }

    fn tx_buf(&self, slot: usize) -> u64 {
        self.tx_bufs + BUF_BYTES * slot as u64
    }

    /// Lays out a message in transmit slot `slot` and makes it available (no notification).
    fn post(&mut self, slot: usize, m: Msg) {
        let Msg { channel, source, len, k, layout, reserved } = m;
        let b = self.tx_buf(slot);
        let h = bytes_mut(b, TX_HEADER);
        h[0..4].copy_from_slice(&channel.to_le_bytes());
        h[4..8].copy_from_slice(&source.node.to_le_bytes());
        h[8..12].copy_from_slice(&source.partition.to_le_bytes());
        h[12..16].copy_from_slice(&source.process.to_le_bytes());
        h[16..20].copy_from_slice(&len.to_le_bytes());
        h[20..24].copy_from_slice(&reserved.to_le_bytes());
        for (i, byte) in bytes_mut(b + TX_HEADER as u64, len as usize).iter_mut().enumerate() {
            *byte = pattern(k, i);
        }
        let st = b + TX_STATUS_AT;
        wr_u32(st, 0xdead_beef);
        let hl = TX_HEADER as u32;
        let p = b + TX_HEADER as u64;
        let first = (slot * 4) as u16;
        match layout {
            Layout::Whole => self.tx.chain(first, &[(b, hl + len, false), (st, 4, true)]),
            Layout::Split if len > 0 => {
                self.tx.chain(first, &[(b, hl, false), (p, len, false), (st, 4, true)])
            }
            Layout::Ragged => self
                .tx
                .chain(first, &[(b, 10, false), (b + 10, hl - 10 + len, false), (st, 4, true)]),
            Layout::Truncated => self.tx.chain(first, &[(b, hl + len / 2, false), (st, 4, true)]),
            Layout::WithEmpty | Layout::Split => self
                .tx
                .chain(first, &[(b, hl, false), (p, 0, false), (p, len, false), (st, 4, true)]),
        }
        self.tx_busy[slot] = true;
        self.tx.push(first);
    }

    /// Waits, 20 s at most, for the next used entry (`(id, used length)`) of queue `q`,
    /// watching for DEVICE_NEEDS_RESET meanwhile.
    fn next_used(&mut self, q: u32, what: &dyn core::fmt::Display) -> Check<(u32, u32)> {
        let start = time::ticks();
        let mut backoff = Backoff::new();
        loop {
            let queue = match q {
                Q_CONTROL => &mut self.control,
                Q_TRANSMIT => &mut self.tx,
                _ => &mut self.rx,
            };
            if let Some(entry) = queue.pop() {
                backoff.reset();
                return Ok(entry);
            }
            self.check_alive("waiting")?;
            ensure!(self.within(start, 20), "no {what} in 20 s");
            backoff.snooze();
        }
    }

    /// Waits for the next transmit completion; returns `(slot, status)`.
    fn reap(&mut self) -> Check<(usize, u32)> {
        let (id, len) = self.next_used(Q_TRANSMIT, &"transmit status")?;
        let slot = id as usize / 4;
        ensure!(id % 4 == 0 && slot < TX_SLOTS && self.tx_busy[slot], "transmit used id {id}");
        self.tx_busy[slot] = false;
        ensure!(len == 4, "transmit used length {len} (want 4: the status)");
        Ok((slot, rd_u32(self.tx_buf(slot) + TX_STATUS_AT)))
    }

    /// Sends one message and returns its status; NO_ROOM is retried.
    fn send_one(&mut self, m: Msg) -> Check<u32> {
        let k = m.k;
        loop {
            self.post(0, m);
            self.tx.kick(&self.regs);
            let (slot, status) = self.reap()?;
            ensure!(slot == 0, "completion for slot {slot}");
            if status != NO_ROOM {
                return Ok(status);
            }
            println!("indie: NO_ROOM for message {k}, sending it again");
            time::sleep_for(self.info, 10_000);
        }
    }

    fn rx_buf(&self, id: u32) -> u64 {
        self.rx_bufs + BUF_BYTES * u64::from(id)
    }

    fn post_rx(&mut self, id: u16) {
        self.rx.chain(id, &[(self.rx_buf(u32::from(id)), BUF_BYTES as u32, true)]);
        self.rx.push(id);
    }

    /// Waits for the next message; checks its header and payload against message `k`.
    fn receive(&mut self, ch: &mut Echo, k: u32, len: u32) -> Check {
        let (id, used) =
            self.next_used(Q_RECEIVE, &format_args!("echo of message {k} ({len} bytes)"))?;
        ensure!(id < u32::from(RX_SIZE), "receive used id {id}");
        let b = self.rx_buf(id);
        ensure!(used == RX_HEADER as u32 + len, "echo {k}: used length {used}, want 32 + {len}");
        let (channel, got_len) = (rd_u32(b), rd_u32(b + 4));
        let source =
            Endpoint { node: rd_u32(b + 8), partition: rd_u32(b + 12), process: rd_u32(b + 16) };
        let (process, seq) = (rd_u32(b + 20), rd_u64(b + 24));
        ensure!(channel == ch.channel, "echo {k}: channel {channel}, want {}", ch.channel);
        ensure!(got_len == len, "echo {k}: len {got_len}, want {len}");
        ensure!(source == ch.peer, "echo {k}: source {source:?}, want {:?}", ch.peer);
        ensure!(process == PROCESS, "echo {k}: process {process}, want {PROCESS}");
        let want_seq = ch.first_seq.map_or(seq, |f| f + u64::from(k));
        ensure!(seq == want_seq, "echo {k}: seq {seq}, want {want_seq}");
        let payload = bytes_mut(b + RX_HEADER as u64, len as usize);
        if let Some(i) = payload.iter().enumerate().position(|(i, &x)| x != pattern(k, i)) {
            fail!(
                "echo {k} ({len} bytes): byte {i} is {:#x}, want {:#x}",
                payload[i],
                pattern(k, i)
            );
        }
        if ch.first_seq.is_none() {
            println!("indie: first echo has seq {seq}");
            ch.first_seq = Some(seq.wrapping_sub(u64::from(k)));
        }
        self.post_rx(id as u16);
        self.rx.kick(&self.regs);
        Ok(())
    }
}

/// One message to send.
#[derive(Clone, Copy)]
struct Msg {
    channel: u32,
    source: Endpoint,
    len: u32,
    /// Its number: the payload pattern.
    k: u32,
    layout: Layout,
    /// The header's reserved word (0 but to provoke BAD_REQUEST).
    reserved: u32,
}

/// The channel to the echo.
#[derive(Clone, Copy)]
struct Echo {
    channel: u32,
    peer: Endpoint,
    /// The first echo's sequence number, once seen.
    first_seq: Option<u64>,
}

/// Resets the device, negotiates, sets up the queues and reads the configuration.
fn bring_up(info: &'static BootInfo) -> Check<Driver> {
    let Some(dev) = info.devices().iter().find(|d| d.kind == KIND_CHANNEL) else {
        fail!("no secure-channel device (kind {KIND_CHANNEL}) in the boot info");
    };
    let regs = Regs { base: dev.mmio_base };
    let magic = regs.read(REG_MAGIC);
    ensure!(magic == 0x7472_6976, "MagicValue {magic:#x}");
    let version = regs.read(REG_VERSION);
    ensure!(version == 2, "Version {version}");
    let (device_id, vendor) = (regs.read(REG_DEVICE_ID), regs.read(REG_VENDOR_ID));
    ensure!(device_id == DEVICE_ID_CHANNEL, "DeviceID {device_id:#x}");
    ensure!(vendor == VENDOR_ID_KH, "VendorID {vendor:#x}");

    let reset = |regs: &Regs| -> Check {
        regs.write(REG_STATUS, 0);
        let s = regs.status();
        ensure!(s == 0, "Status {s:#x} after reset");
        regs.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        regs.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        Ok(())
    };
    let set_features = |regs: &Regs, f: u64| {
        regs.write(REG_DRIVER_FEATURES_SEL, 0);
        regs.write(REG_DRIVER_FEATURES, f as u32);
        regs.write(REG_DRIVER_FEATURES_SEL, 1);
        regs.write(REG_DRIVER_FEATURES, (f >> 32) as u32);
    };
    reset(&regs)?;
    regs.write(REG_DEVICE_FEATURES_SEL, 0);
    let low = regs.read(REG_DEVICE_FEATURES);
    regs.write(REG_DEVICE_FEATURES_SEL, 1);
    let high = regs.read(REG_DEVICE_FEATURES);
    let offered = u64::from(low) | u64::from(high) << 32;
    ensure!(offered == F_VERSION_1 | F_EVENT_IDX, "device offers {offered:#x}");

    // Refusal: a driver that takes a feature it was not offered (bit 0) gets no FEATURES_OK.
    set_features(&regs, F_VERSION_1 | F_EVENT_IDX | 1);
    let fs = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    regs.write(REG_STATUS, fs);
    let s = regs.status();
    ensure!(
        s & STATUS_FEATURES_OK == 0,
        "FEATURES_OK kept with an unoffered feature (Status {s:#x})"
    );
    reset(&regs)?;

    set_features(&regs, F_VERSION_1 | F_EVENT_IDX);
    regs.write(REG_STATUS, fs);
    let s = regs.status();
    ensure!(s == fs, "Status {s:#x} after FEATURES_OK, want {fs:#x}");

    let control = Queue::new(Q_CONTROL, CONTROL_SIZE, true)?;
    let tx = Queue::new(Q_TRANSMIT, TX_SIZE, true)?;
    let rx = Queue::new(Q_RECEIVE, RX_SIZE, true)?;
    for (q, max) in [(&control, 64), (&tx, 256), (&rx, 256)] {
        regs.write(REG_QUEUE_SEL, q.index);
        let got = regs.read(REG_QUEUE_NUM_MAX);
        ensure!(got == max, "queue {} QueueNumMax {got}, DEVICE.md says {max}", q.index);
        q.setup(&regs)?;
    }
    regs.write(REG_QUEUE_SEL, 3);
    let none = regs.read(REG_QUEUE_NUM_MAX);
    ensure!(none == 0, "queue 3 QueueNumMax {none} (no such queue)");

    let generation = regs.read(REG_CONFIG_GENERATION);
    let config: [u32; 5] = core::array::from_fn(|i| regs.read(REG_CONFIG + 4 * i as u64));
    let again = regs.read(REG_CONFIG_GENERATION);
    ensure!(generation == again, "ConfigGeneration moved {generation} -> {again}");
    let [node, partition, max_message, max_channels, iface] = config;
    ensure!(iface == 1, "interface version {iface}");
    ensure!(node == info.node_id, "config node {node}, boot info {}", info.node_id);
    ensure!(
        partition == info.partition_id,
        "config partition {partition}, boot info {}",
        info.partition_id
    );
    ensure!(max_message == 65_536, "max_message {max_message}");
    ensure!(max_channels >= 2, "max_channels {max_channels}");
    // A read past the end of the configuration space reads zeros.
    let past = regs.read(REG_CONFIG + 20);
    ensure!(past == 0, "config read past its end gave {past:#x}");
    println!(
        "indie: node {node} partition {partition} max_message {max_message} max_channels {max_channels}"
    );

    let (Some(control_buf), Some(tx_bufs), Some(rx_bufs)) = (
        pages::alloc(8192),
        pages::alloc(BUF_BYTES * TX_SLOTS as u64),
        pages::alloc(BUF_BYTES * u64::from(RX_SIZE)),
    ) else {
        fail!("out of RAM for buffers");
    };
    let mut d = Driver {
        info,
        regs,
        tsc_khz: info.tsc_khz,
        node,
        partition,
        max_message,
        max_channels,
        control,
        tx,
        rx,
        control_buf,
        tx_bufs,
        rx_bufs,
        tx_busy: [false; TX_SLOTS],
        resp_split: None,
    };
    for id in 0..RX_SIZE {
        d.post_rx(id);
    }
    let ok = fs | STATUS_DRIVER_OK;
    d.regs.write(REG_STATUS, ok);
    let s = d.regs.status();
    ensure!(s == ok, "Status {s:#x} after DRIVER_OK");
    // The receive buffers were made available before DRIVER_OK: tell the device now.
    d.rx.kick(&d.regs);
    Ok(d)
}

/// LIST into a buffer of `resp_len` bytes.
fn list(d: &mut Driver, resp_len: u32) -> Check<Answer> {
    let none = Endpoint { node: 0, partition: 0, process: 0 };
    d.control(&Driver::request(OP_LIST, 0, PROCESS, 0, none), REQUEST_LEN, resp_len)
}

/// A LIST record.
#[derive(Debug)]
struct Record {
    channel: u32,
    state: u32,
    process: u32,
    remote: Endpoint,
    closed: u32,
    sent: u64,
    received: u64,
    dropped: u64,
}

fn record(d: &Driver, i: usize) -> Record {
    let r = d.control_at().1 + (HEAD_LEN + LIST_RECORD * i) as u64;
    Record {
        channel: rd_u32(r),
        state: rd_u32(r + 4),
        process: rd_u32(r + 8),
        remote: Endpoint {
            node: rd_u32(r + 12),
            partition: rd_u32(r + 16),
            process: rd_u32(r + 20),
        },
        closed: rd_u32(r + 24),
        sent: rd_u64(r + 32),
        received: rd_u64(r + 40),
        dropped: rd_u64(r + 48),
    }
}

/// STATS: the nine counters.
fn stats(d: &mut Driver) -> Check<[u64; 9]> {
    let none = Endpoint { node: 0, partition: 0, process: 0 };
    let a = d.control(&Driver::request(OP_STATS, 0, PROCESS, 0, none), REQUEST_LEN, 4096)?;
    ensure!(a.status == OK, "STATS status {}", a.status);
    ensure!(a.used_len == (HEAD_LEN + 72) as u32, "STATS used length {}", a.used_len);
    let base = d.control_at().1 + HEAD_LEN as u64;
    Ok(core::array::from_fn(|i| rd_u64(base + 8 * i as u64)))
}

const SIZES: [u32; 44] = [
    1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 23, 24, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256,
    257, 511, 512, 1000, 1024, 1500, 2048, 4000, 4095, 4096, 4097, 8192, 9000, 16384, 20000, 32768,
    40000, 65535, 0, 777,
];
const BATCHES: [[u32; TX_SLOTS]; 2] =
    [[1, 300, 0, 5000, 17, 65000, 4096, 2], [0, 12345, 64, 1, 60000, 4097, 333, 0]];
const LAYOUTS: [Layout; 4] = [Layout::Whole, Layout::Split, Layout::Ragged, Layout::WithEmpty];

/// What the script provoked and sent, to hold the device's counters to.
#[derive(Default)]
struct Tally {
    /// Requests refused with a status other than OK, NO_LISTENER retries apart.
    refused: u64,
    /// OPEN's NO_LISTENER answers while the echo was not listening yet.
    no_listener: u64,
    forged: u64,
    messages: u32,
    bytes: u64,
}

fn run(info: &'static BootInfo) -> Check {
    let Some(peer) = info.arg("peer").and_then(Endpoint::parse) else {
        fail!("no peer=NODE:PARTITION:PROCESS argument");
    };
    let mut d = bring_up(info)?;
    let s0 = stats(&mut d)?;
    ensure!(s0 == [0; 9] || s0[8] > 0 && s0[..8] == [0; 8], "fresh STATS {s0:?}");
    let mut tally = Tally::default();
    let channel = open_patiently(&mut d, info, peer, &mut tally)?;
    let mut echo = Echo { channel, peer, first_seq: None };
    let listener = control_refusals(&mut d, channel, peer, &mut tally)?;
    list_cases(&mut d, channel, listener, peer, &mut tally)?;
    transmit_refusals(&mut d, channel, listener, &mut tally)?;
    exchange(&mut d, &mut echo, &mut tally)?;
    counters_after(&mut d, channel, &tally)?;
    goodbye(&mut d, channel, listener, tally.messages)
}

/// OPEN, retried every 10 ms while the echo does not listen yet (NO_LISTENER) or its node is
/// not linked yet (UNREACHABLE): partitions and nodes start together.
fn open_patiently(d: &mut Driver, info: &BootInfo, peer: Endpoint, t: &mut Tally) -> Check<u32> {
    let start = time::ticks();
    let mut tries = 0u32;
    let channel = loop {
        let a = d.control(&Driver::request(OP_OPEN, 0, PROCESS, 0, peer), REQUEST_LEN, 4096)?;
        tries += 1;
        match a.status {
            OK => {
                ensure!(a.used_len == HEAD_LEN as u32, "OPEN used length {}", a.used_len);
                break a.channel;
            }
            NO_LISTENER | UNREACHABLE if d.within(start, 10) => time::sleep_for(info, 10_000),
            s => fail!("OPEN to {peer:?}: status {s} after {tries} tries"),
        }
    };
    t.no_listener = u64::from(tries - 1);
    println!(
        "indie: channel {channel} open to {}:{}:{} after {tries} tries",
        peer.node, peer.partition, peer.process
    );
    Ok(channel)
}

/// Control requests the device must refuse, each with its documented status; returns the
/// channel of a listener it opens on the way (process 7).
fn control_refusals(d: &mut Driver, channel: u32, peer: Endpoint, t: &mut Tally) -> Check<u32> {
    let none = Endpoint { node: 0, partition: 0, process: 0 };
    let other = Endpoint { process: 7, ..peer };
    d.expect(
        "second OPEN to the same peer",
        Driver::request(OP_OPEN, 0, PROCESS, 0, peer),
        EXISTS,
    )?;
    let l = d.expect("LISTEN", Driver::request(OP_LISTEN, 0, 7, 0, other), OK)?;
    ensure!(l.used_len == HEAD_LEN as u32, "LISTEN used length {}", l.used_len);
    ensure!(l.channel != channel, "LISTEN answered the open channel's ID {channel}");
    d.expect("LISTEN again", Driver::request(OP_LISTEN, 0, 7, 0, other), EXISTS)?;
    d.expect("LISTEN with flags 1", Driver::request(OP_LISTEN, 1, 8, 0, other), BAD_REQUEST)?;
    let mut req = Driver::request(OP_LISTEN, 0, 8, 0, other);
    req[28] = 5;
    d.expect("LISTEN with the reserved word set", req, BAD_REQUEST)?;
    d.expect("op 9", Driver::request(9, 0, PROCESS, 0, none), UNKNOWN_OP)?;
    let close = Driver::request(OP_CLOSE, 0, PROCESS, 0xffff, none);
    d.expect("CLOSE of channel 0xffff", close, NO_CHANNEL)?;
    d.expect("CLOSE by process 2", Driver::request(OP_CLOSE, 0, 2, channel, none), NOT_OWNER)?;
    let short = d.control(&Driver::request(OP_LISTEN, 0, 9, 0, other), 32, 4096)?;
    ensure!(short.status == BAD_REQUEST, "32-byte LISTEN request: status {}", short.status);
    t.refused += 8;
    Ok(l.channel)
}

/// LIST into a buffer too small, into one with no room even for the head, whole, and split
/// over writable buffers; then OPEN's head, which must fit its first non-empty buffer.
fn list_cases(d: &mut Driver, channel: u32, listener: u32, peer: Endpoint, t: &mut Tally) -> Check {
    let before = stats(d)?[4];
    let a = list(d, HEAD_LEN as u32)?;
    let moved = stats(d)?[4] - before;
    ensure!(moved == 1, "a LIST answered BUFFER_TOO_SMALL moved refused requests by {moved}");
    ensure!(a.status == BUFFER_TOO_SMALL, "LIST into 16 bytes: status {}", a.status);
    ensure!(a.count == 2, "LIST into 16 bytes: count {}, want 2", a.count);
    ensure!(a.used_len == HEAD_LEN as u32, "LIST into 16 bytes: used length {}", a.used_len);
    let a = list(d, 8)?;
    ensure!(a.used_len == 0, "LIST into 8 bytes: used length {}", a.used_len);
    ensure!(rd_u32(d.control_at().1) == 0xeeee_eeee, "LIST into 8 bytes wrote a status");
    let a = list(d, 4096)?;
    ensure!(a.status == OK && a.count == 2, "LIST: status {} count {}", a.status, a.count);
    ensure!(a.count <= d.max_channels, "LIST count {} above max_channels", a.count);
    ensure!(a.used_len == (HEAD_LEN + 2 * LIST_RECORD) as u32, "LIST used length {}", a.used_len);
    let (r0, r1) = (record(d, 0), record(d, 1));
    let (open, listening) = if r0.channel == channel { (r0, r1) } else { (r1, r0) };
    ensure!(
        open.channel == channel
            && open.state == STATE_OPEN
            && open.process == PROCESS
            && open.remote == peer
            && open.closed == 0,
        "LIST record of the open channel: {open:?}"
    );
    ensure!(
        listening.channel == listener
            && listening.state == STATE_LISTENING
            && listening.process == 7
            && listening.remote == Endpoint { process: 7, ..peer },
        "LIST record of the listener: {listening:?}"
    );

    // The response may span writable buffers as one stream...
    d.resp_split = Some(10);
    let a = list(d, 4096)?;
    ensure!(a.status == OK && a.count == 2, "LIST (split): status {} count {}", a.status, a.count);
    let want = (HEAD_LEN + 2 * LIST_RECORD) as u32;
    ensure!(a.used_len == want, "LIST (split) used length {}", a.used_len);
    let (s0, s1) = (record(d, 0), record(d, 1));
    ensure!(s0.channel + s1.channel == channel + listener, "LIST (split) records {s0:?} {s1:?}");
    // ...except OPEN's head, which must fit its first non-empty writable buffer.
    let nobody = Endpoint { process: 42, ..peer };
    d.resp_split = Some(0);
    let a = d.control(&Driver::request(OP_OPEN, 0, PROCESS, 0, nobody), REQUEST_LEN, 4096)?;
    ensure!(a.status == NO_LISTENER, "OPEN to nobody, empty first buffer: status {}", a.status);
    d.resp_split = Some(10);
    let a = d.control(&Driver::request(OP_OPEN, 0, PROCESS, 0, nobody), REQUEST_LEN, 4096)?;
    ensure!(a.status == BUFFER_TOO_SMALL, "OPEN with a 10-byte first buffer: status {}", a.status);
    // Both LISTs with too little room, and both OPENs.
    t.refused += 4;
    Ok(())
}

/// A message of `len` bytes numbered `k` on `channel` from `source`, laid out whole.
fn msg(channel: u32, len: u32, k: u32, source: Endpoint) -> Msg {
    Msg { channel, source, len, k, layout: Layout::Whole, reserved: 0 }
}

/// Sends the device must refuse: forged sources, a listening or unknown channel, too big, a
/// reserved word set, a length past the chain.
fn transmit_refusals(d: &mut Driver, channel: u32, listener: u32, t: &mut Tally) -> Check {
    let me = d.me(PROCESS);
    for (what, source) in [
        ("process 2", d.me(2)),
        ("another partition", Endpoint { partition: d.partition + 1, ..me }),
        ("another node", Endpoint { node: d.node + 1, ..me }),
    ] {
        let st = d.send_one(msg(channel, 5, 9000, source))?;
        ensure!(st == FORGED_SOURCE, "send from {what}: status {st}");
        t.forged += 1;
    }
    for (what, m, want) in [
        ("on a listening channel", msg(listener, 5, 9000, d.me(7)), NOT_OPEN),
        ("on channel 0xffff", msg(0xffff, 5, 9000, me), NO_CHANNEL),
        ("of max_message + 1 bytes", msg(channel, d.max_message + 1, 9000, me), TOO_BIG),
        (
            "with the reserved word set",
            Msg { reserved: 1, ..msg(channel, 5, 9000, me) },
            BAD_REQUEST,
        ),
        // A header that claims more payload than the chain holds.
        (
            "whose len runs past its chain",
            Msg { layout: Layout::Truncated, ..msg(channel, 100, 9000, me) },
            BAD_REQUEST,
        ),
    ] {
        let st = d.send_one(m)?;
        ensure!(st == want, "send {what}: status {st}, want {want}");
    }
    t.refused += 5;
    println!("indie: transmit refusals as documented");
    Ok(())
}

/// Messages of every size in `SIZES` one at a time, then the `BATCHES` each behind one
/// notification; every echo is checked.
fn exchange(d: &mut Driver, echo: &mut Echo, t: &mut Tally) -> Check {
    let me = d.me(PROCESS);
    let max = d.max_message;
    let size = |s: u32| if s == 0 { max } else { s.min(max) };
    for (i, &s) in SIZES.iter().enumerate() {
        let (len, k) = (size(s), t.messages);
        let layout = LAYOUTS[i % LAYOUTS.len()];
        let st = d.send_one(Msg { layout, ..msg(echo.channel, len, k, me) })?;
        ensure!(st == OK, "message {k} ({len} bytes): status {st}");
        d.receive(echo, k, len)?;
        t.messages += 1;
        t.bytes += u64::from(len);
    }
    for batch in BATCHES {
        let (before, k) = (d.tx.notifies, t.messages);
        let lens = batch.map(size);
        for (slot, &len) in lens.iter().enumerate() {
            let layout = LAYOUTS[slot % LAYOUTS.len()];
            d.post(slot, Msg { layout, ..msg(echo.channel, len, k + slot as u32, me) });
        }
        d.tx.kick(&d.regs);
        let kicks = d.tx.notifies - before;
        ensure!(kicks <= 1, "a batch took {kicks} notifications");
        for (slot, &len) in lens.iter().enumerate() {
            let (got, st) = d.reap()?;
            ensure!(got == slot, "batch: slot {got} completed where {slot} was next");
            ensure!(st == OK, "batch message {} ({len} bytes): status {st}", k + slot as u32);
        }
        for (slot, &len) in lens.iter().enumerate() {
            d.receive(echo, k + slot as u32, len)?;
            t.bytes += u64::from(len);
        }
        t.messages += TX_SLOTS as u32;
    }
    println!("indie: {} messages echoed and checked ({} bytes)", t.messages, t.bytes);
    Ok(())
}

/// LIST's per-channel counts and STATS against what the script did.
fn counters_after(d: &mut Driver, channel: u32, t: &Tally) -> Check {
    let a = list(d, 4096)?;
    ensure!(a.status == OK && a.count == 2, "LIST: status {} count {}", a.status, a.count);
    let (r0, r1) = (record(d, 0), record(d, 1));
    let open = if r0.channel == channel { r0 } else { r1 };
    let n = u64::from(t.messages);
    ensure!(
        open.state == STATE_OPEN && open.sent == n && open.received == n && open.dropped == 0,
        "LIST record after {n} messages: {open:?}"
    );
    let s = stats(d)?;
    let [sent, received, sent_bytes, received_bytes, refused, forged, rejected, dropped, notes] = s;
    println!("indie: STATS {s:?}");
    ensure!(sent == n && received == n, "STATS sent {sent} received {received}, want {n}");
    ensure!(
        sent_bytes == t.bytes && received_bytes == t.bytes,
        "STATS bytes {sent_bytes}/{received_bytes}, want {}",
        t.bytes
    );
    ensure!(forged == t.forged, "STATS forged sends {forged}, want {}", t.forged);
    ensure!(rejected == 0 && dropped == 0, "STATS rejected {rejected} dropped {dropped}");
    // Forged sends are refusals too.
    let want = t.refused + t.forged + t.no_listener;
    ensure!(refused == want, "STATS refused requests {refused}, want {want}");
    // Notifications of the receive queue reach the device thread through an eventfd, so
    // several that come before it gets to them count once.
    let ours = d.control.notifies + d.tx.notifies + d.rx.notifies;
    ensure!(
        notes <= ours && notes >= d.control.notifies + d.tx.notifies,
        "STATS queue notifications {notes}; QueueNotify was written {ours} times"
    );
    Ok(())
}

/// Closes the listener, says goodbye to the echo, CLOSEs the channel, and checks that it is
/// gone and that the device never needed a reset.
fn goodbye(d: &mut Driver, channel: u32, listener: u32, k: u32) -> Check {
    let none = Endpoint { node: 0, partition: 0, process: 0 };
    let me = d.me(PROCESS);
    d.expect("CLOSE of the listener", Driver::request(OP_CLOSE, 0, 7, listener, none), OK)?;
    let st = d.send_one(msg(channel, 0, k, me))?;
    ensure!(st == OK, "goodbye: status {st}");
    d.expect("CLOSE", Driver::request(OP_CLOSE, 0, PROCESS, channel, none), OK)?;
    let a = list(d, 4096)?;
    ensure!(
        a.status == OK && a.count == 0,
        "LIST after CLOSE: status {} count {}",
        a.status,
        a.count
    );
    let st = d.send_one(msg(channel, 5, k, me))?;
    ensure!(st == NO_CHANNEL, "send on a closed channel: status {st}");
    let isr = d.regs.read(REG_INTERRUPT_STATUS);
    d.regs.write(REG_INTERRUPT_ACK, isr);
    let status = d.regs.status();
    let want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    ensure!(status == want, "final Status {status:#x}");
    d.regs.write(REG_STATUS, 0);
    Ok(())
}

fn main(info: &'static BootInfo) -> u32 {
    match run(info) {
        Ok(()) => {
            println!("indie: all checks passed");
            0
        }
        Err(()) => 1,
    }
}

guest_agent::entry!(main);
