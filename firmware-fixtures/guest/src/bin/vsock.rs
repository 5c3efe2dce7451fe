//! Drives keyhold's virtio-vsock device with an independent driver: the third-party
//! `virtio-drivers` crate (0.13), unmodified, its `VsockConnectionManager` over its
//! `MmioTransport`. Only the platform glue (DMA, heap, waiting) is ours.
//!
//! - `role=echo port=P [conns=N] [slow_ms=M] [rx_capacity=B]`: listens on P and echoes every
//!   byte back on its connection until N connections (1) have ended; `slow_ms` parks M ms
//!   before each read (a slow reader); B (65536) is each connection's receive buffer.
//! - `role=send cid=C port=P [bytes=N] [src_port=S] [forge=F] [rx_capacity=B]`: connects to
//!   C:P from port S (1024), sends N bytes (10 MiB) in packets of 1 to 4000 bytes, checks the
//!   echo of every byte, shuts down and prints the rate. `forge=F` makes the driver believe its
//!   CID is F, so it stamps src_cid F on its packets: the device must refuse them.
//!
//! - `role=ask cid=C port=P count=N expect=E`: asks for N connections at once (ports 2000 up)
//!   and counts those reset, until E are (or nothing happens for 10 s); prints both numbers.
//!
//! Exit status: 0 done, 1 a byte came back wrong, 2 cannot run or driver error, 3 reset.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::mem::ManuallyDrop;
use core::ptr::{null_mut, NonNull};

use guest_agent::boot_info::DeviceKind;
use guest_agent::idle::{idle, Backoff};
use guest_agent::time::{elapsed_nanos, ticks};
use guest_agent::{println, BootInfo};
use virtio_drivers::device::socket::{
    SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent, VsockEventType,
};
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Error, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Dropped only on success: the crate's drop spins until each queue's QueueReady reads back 0,
/// which a device that has given up (NEEDS_RESET) may never do; a failed run must exit, not hang.
type Manager = ManuallyDrop<VsockConnectionManager<GuestHal, CidTransport, RX_BUFFER>>;

/// Each receive buffer the driver posts: a header and up to one whole packet of `send`'s (the
/// crate's default, 512 bytes, would split each into up to nine).
const RX_BUFFER: usize = 44 + MAX_CHUNK;

/// Largest packet `send` sends.
const MAX_CHUNK: usize = 4000;
/// How long `send` waits without progress before it gives up rather than hang.
const PATIENCE_NS: u64 = 10_000_000_000;
const GONE: Error = Error::SocketDeviceError(SocketError::NotConnected);
const NO_CREDIT: Error = Error::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer);

/// An exit status whose reason is already on the console.
struct Exit(u32);

impl From<Error> for Exit {
    fn from(e: Error) -> Self {
        // The manager forgets a connection once its peer reset it (or shut it down and all was
        // read): for `send`, whose peer must never end first, that is a reset.
        match e {
            GONE => reset(),
            e => say(format_args!("error: {e:?}")),
        }
    }
}

fn say(why: core::fmt::Arguments) -> Exit {
    println!("vsock: {why}");
    Exit(2)
}

fn reset() -> Exit {
    println!("vsock: connection reset");
    Exit(3)
}

fn main(info: &'static BootInfo) -> u32 {
    let result = match info.arg("role") {
        Some("echo") => echo(info),
        Some("send") => send(info),
        Some("ask") => ask(info),
        _ => Err(say(format_args!("needs role=echo, role=send or role=ask"))),
    };
    result.err().map_or(0, |Exit(status)| status)
}

fn echo(info: &BootInfo) -> Result<(), Exit> {
    let port = arg(info, "port", None)?;
    let conns: u64 = arg(info, "conns", Some(1))?;
    let slow_ms = arg(info, "slow_ms", Some(0))?;
    let mut mgr = open(info, None)?;
    mgr.listen(port);
    println!("vsock: listening on {}:{port}", mgr.guest_cid());
    let (mut live, mut ended, mut backoff) = (Vec::<Echo>::new(), 0, Backoff::new());
    while ended < conns {
        let mut busy = false;
        // The manager has accepted requests for our port already (and refused all others).
        while let Some(e) = next_event(&mut mgr)? {
            busy = true;
            let (peer, port) = (e.source, e.destination.port);
            let known = live.iter().any(|c| c.peer == peer && c.port == port);
            if e.event_type == VsockEventType::ConnectionRequest && !known {
                println!("vsock: accepted {}:{}", peer.cid, peer.port);
                live.push(Echo { peer, port, buf: alloc::vec![0; 4096], at: 0, end: 0, echoed: 0 });
            }
        }
        for i in (0..live.len()).rev() {
            if let Some(moved) = pump(&mut mgr, &mut live[i], slow_ms)? {
                busy |= moved;
                continue;
            }
            let c = live.swap_remove(i);
            println!("vsock: closed {}:{} after {} bytes", c.peer.cid, c.peer.port, c.echoed);
            ended += 1;
        }
        if busy {
            backoff.reset();
        } else {
            backoff.snooze();
        }
    }
    drop(ManuallyDrop::into_inner(mgr));
    Ok(())
}

/// One echoed connection: `buf[at..end]` was received and is not yet sent back.
struct Echo {
    peer: VsockAddr,
    port: u32,
    buf: Vec<u8>,
    at: usize,
    end: usize,
    echoed: u64,
}

/// Sends back what is pending, as far as credit allows; once all is sent, reads more. Returns
/// whether anything moved, or `None` once the manager has forgotten the connection (the peer
/// shut it down or reset it). No explicit credit updates are needed: every echo carries our
/// `fwd_cnt`, and nothing more is read until the last read has been echoed.
fn pump(mgr: &mut Manager, c: &mut Echo, slow_ms: u64) -> Result<Option<bool>, Error> {
    if c.at < c.end {
        let n = match send_some(mgr, c.peer, c.port, &c.buf[c.at..c.end]) {
            Err(GONE) => return Ok(None),
            n => n?,
        };
        (c.at, c.echoed) = (c.at + n, c.echoed + n as u64);
        if c.at < c.end {
            return Ok(Some(n > 0));
        }
    }
    match mgr.recv_buffer_available_bytes(c.peer, c.port) {
        Err(GONE) => return Ok(None),
        Ok(0) => return Ok(Some(false)),
        other => other?,
    };
    nap(slow_ms);
    (c.at, c.end) = (0, mgr.recv(c.peer, c.port, &mut c.buf)?);
    Ok(Some(true))
}

/// Asks for `count` connections at once (from ports 2000 up) and counts those reset, until
/// `expect` are or nothing happens for a while; prints both numbers.
fn ask(info: &BootInfo) -> Result<(), Exit> {
    let peer = VsockAddr { cid: arg(info, "cid", None)?, port: arg(info, "port", None)? };
    let (count, expect): (u32, u32) = (arg(info, "count", None)?, arg(info, "expect", None)?);
    let mut mgr = open(info, None)?;
    for port in 2000..2000 + count {
        mgr.connect(peer, port)?;
    }
    let (mut reset, mut progress, mut backoff) = (0u32, ticks(), Backoff::new());
    while reset < expect && !past(progress) {
        match next_event(&mut mgr)? {
            Some(e) if matches!(e.event_type, VsockEventType::Disconnected { .. }) => {
                (reset, progress) = (reset + 1, ticks());
            }
            Some(_) => backoff.reset(),
            None => backoff.snooze(),
        }
    }
    println!("vsock: asked for {count} connections, {reset} reset");
    Ok(())
}

fn send(info: &BootInfo) -> Result<(), Exit> {
    let peer = VsockAddr { cid: arg(info, "cid", None)?, port: arg(info, "port", None)? };
    let total = arg(info, "bytes", Some(10 << 20))?;
    let src_port = arg(info, "src_port", Some(1024))?;
    let forge = info.arg("forge").map(|_| arg(info, "forge", None)).transpose()?;
    let capacity: u64 = arg(info, "rx_capacity", Some(64 << 10))?;
    let mut mgr = open(info, forge)?;
    let ours = |e: &VsockEvent| e.source == peer && e.destination.port == src_port;
    let closed =
        |e: &VsockEvent| ours(e) && matches!(e.event_type, VsockEventType::Disconnected { .. });
    mgr.connect(peer, src_port)?;
    let (mut progress, mut backoff) = (ticks(), Backoff::new());
    loop {
        match next_event(&mut mgr)? {
            Some(e) if ours(&e) && e.event_type == VsockEventType::Connected => break,
            Some(e) if closed(&e) => return Err(reset()),
            Some(_) => backoff.reset(),
            None if past(progress) => {
                return Err(say(format_args!("error: no answer to the request")))
            }
            None => backoff.snooze(),
        }
    }
    println!("vsock: connected to {}:{} from {}:{src_port}", peer.cid, peer.port, mgr.guest_cid());

    let start = ticks();
    let (mut sent, mut checked, mut unadvertised) = (0u64, 0u64, 0u64);
    let (mut tx, mut rx) = ([0u8; MAX_CHUNK], [0u8; 4096]);
    // tx[at..end] is the stream from offset `sent` on, drawn but not yet sent.
    let (mut at, mut end, mut sizes) = (0, 0, 0x9e37_79b9_7f4a_7c15u64);
    while checked < total {
        let mut busy = false;
        if at == end && sent < total {
            (at, end) = (0, (next_size(&mut sizes) as u64).min(total - sent) as usize);
            tx[..end].iter_mut().zip(sent..).for_each(|(b, k)| *b = pattern(k));
        }
        let n = send_some(&mut mgr, peer, src_port, &tx[at..end])?;
        if n > 0 {
            (at, sent, unadvertised, busy) = (at + n, sent + n as u64, 0, true);
        }
        while let Some(e) = next_event(&mut mgr)? {
            busy = true;
            if closed(&e) {
                return Err(reset());
            }
        }
        loop {
            let n = mgr.recv(peer, src_port, &mut rx)?;
            if n == 0 {
                break;
            }
            // A byte that differs, or that was never sent.
            let bad = (0..n)
                .map(|i| checked + i as u64)
                .find(|&k| k >= sent || rx[(k - checked) as usize] != pattern(k));
            if let Some(k) = bad {
                println!("vsock: mismatch at offset {k}");
                return Err(Exit(1));
            }
            (checked, unadvertised, busy) = (checked + n as u64, unadvertised + n as u64, true);
            // Each packet we send carries our fwd_cnt; when sending stalls (or is over), tell
            // the peer on its own, well before it runs out of the credit it has for us.
            if unadvertised >= capacity / 2 {
                mgr.update_credit(peer, src_port)?;
                unadvertised = 0;
            }
        }
        if busy {
            progress = ticks();
            backoff.reset();
        } else if past(progress) {
            return Err(say(format_args!("error: stalled: {sent} bytes sent, {checked} back")));
        } else {
            backoff.snooze();
        }
    }
    let ns = elapsed_nanos(ticks() - start).unwrap_or(0);
    mgr.shutdown(peer, src_port)?;
    drop(ManuallyDrop::into_inner(mgr));
    let tenths = (total * 10_000).checked_div(ns).unwrap_or(0); // bytes per us = MB/s
    let (us, whole, tenth) = (ns / 1000, tenths / 10, tenths % 10);
    println!("vsock: {total} bytes echoed and checked in {us} us ({whole}.{tenth} MB/s)");
    Ok(())
}

/// The byte at stream offset `k`.
fn pattern(k: u64) -> u8 {
    k.wrapping_mul(131).wrapping_add(k / 7) as u8
}

/// The next packet size, 1 to [`MAX_CHUNK`], from a fixed xorshift sequence.
fn next_size(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    1 + (*state % MAX_CHUNK as u64) as usize
}

/// Sends as much of `data` in one packet as the peer has credit for; 0 bytes if none. The
/// driver only says whether a whole packet fits (asking the peer for credit when not), so
/// halve until one does: a peer whose buffer is smaller than a packet still gets the stream.
fn send_some(mgr: &mut Manager, peer: VsockAddr, port: u32, data: &[u8]) -> Result<usize, Error> {
    let mut len = data.len();
    while len > 0 {
        match mgr.send(peer, port, &data[..len]) {
            Err(NO_CREDIT) => len /= 2,
            sent => return sent.map(|()| len),
        }
    }
    Ok(0)
}

/// The next event. `poll` also answers `None` after a packet it handled itself (a credit
/// request, a refused connection request, a packet for no connection), so one `None` does not
/// mean the rx queue is empty; two in a row almost surely do. Parking with packets queued would
/// wait for the device's next used buffer, or 10 ms.
fn next_event(mgr: &mut Manager) -> Result<Option<VsockEvent>, Error> {
    match mgr.poll()? {
        None => mgr.poll(),
        event => Ok(event),
    }
}

/// Whether [`PATIENCE_NS`] have passed since TSC `since` (never, if the TSC rate is unknown).
fn past(since: u64) -> bool {
    elapsed_nanos(ticks() - since).is_some_and(|ns| ns > PATIENCE_NS)
}

/// Parks for about `ms` milliseconds (a park ends early when a device uses a buffer: loop).
fn nap(ms: u64) {
    let start = ticks();
    while let Some(ns) = elapsed_nanos(ticks() - start).filter(|&ns| ns < ms * 1_000_000) {
        idle((ms * 1000 - ns / 1000).min(10_000) as u32);
    }
}

/// `key=value`, or `default` when absent (required when `default` is `None`).
fn arg<T: core::str::FromStr>(info: &BootInfo, key: &str, default: Option<T>) -> Result<T, Exit> {
    match (info.arg(key), default) {
        (None, Some(value)) => Ok(value),
        (None, None) => Err(say(format_args!("needs {key}=N"))),
        (Some(v), _) => v.parse().map_err(|_| say(format_args!("bad {key}={v}"))),
    }
}

/// The partition's vsock device, set up by the crate's driver, under a connection manager.
fn open(info: &BootInfo, forge: Option<u64>) -> Result<Manager, Exit> {
    let capacity = arg(info, "rx_capacity", Some(64 << 10))?;
    let dev = info.find_device(DeviceKind::VirtioVsock);
    let Some((dev, header)) = dev.and_then(|d| Some((d, NonNull::new(d.mmio_base as *mut _)?)))
    else {
        return Err(say(format_args!("no virtio-vsock device")));
    };
    // SAFETY: the boot info names the device's MMIO window, identity-mapped, `mmio_size` bytes
    // long (header and config space), valid for the whole run, and used by this driver alone.
    let mmio = unsafe { MmioTransport::new(header, dev.mmio_size as usize) }
        .map_err(|e| say(format_args!("not a virtio-mmio device: {e:?}")))?;
    if mmio.device_type() != DeviceType::Socket {
        return Err(say(format_args!("device is {:?}, not a socket", mmio.device_type())));
    }
    let socket = VirtIOSocket::new(CidTransport { mmio, forge })?;
    Ok(ManuallyDrop::new(VsockConnectionManager::new_with_capacity(socket, capacity)))
}

/// The MMIO transport, passed through; with `forge`, the config space's `le64 guest_cid`
/// (offset 0, which the driver reads as `guest_cid_low` and `guest_cid_high`) reads as that.
struct CidTransport {
    mmio: MmioTransport<'static>,
    forge: Option<u64>,
}

/// `Transport` methods that go to the MMIO transport as they are.
macro_rules! forward {
    () => {};
    (fn $name:ident(&self) -> $ret:ty; $($rest:tt)*) => {
        fn $name(&self) -> $ret { self.mmio.$name() }
        forward!($($rest)*);
    };
    (fn $name:ident(&mut self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?; $($rest:tt)*) => {
        fn $name(&mut self $(, $arg: $ty)*) $(-> $ret)? { self.mmio.$name($($arg),*) }
        forward!($($rest)*);
    };
}

impl Transport for CidTransport {
    forward! {
        fn device_type(&self) -> DeviceType;
        fn read_device_features(&mut self) -> u64;
        fn write_driver_features(&mut self, features: u64);
        fn max_queue_size(&mut self, queue: u16) -> u32;
        fn notify(&mut self, queue: u16);
        fn get_status(&self) -> DeviceStatus;
        fn set_status(&mut self, status: DeviceStatus);
        fn set_guest_page_size(&mut self, size: u32);
        fn requires_legacy_layout(&self) -> bool;
        fn queue_set(&mut self, queue: u16, size: u32, desc: PhysAddr, driver: PhysAddr, device: PhysAddr);
        fn queue_unset(&mut self, queue: u16);
        fn queue_used(&mut self, queue: u16) -> bool;
        fn ack_interrupt(&mut self) -> InterruptStatus;
        fn read_config_generation(&self) -> u32;
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let mut value: T = self.mmio.read_config_space(offset)?;
        if let Some(cid) = self.forge.map(u64::to_le_bytes) {
            for (byte, at) in value.as_mut_bytes().iter_mut().zip(offset..) {
                *byte = cid.get(at).copied().unwrap_or(*byte);
            }
        }
        Ok(value)
    }

    fn write_config_space<T>(&mut self, offset: usize, value: T) -> Result<(), Error>
    where
        T: IntoBytes + Immutable,
    {
        self.mmio.write_config_space(offset, value)
    }
}

/// DMA for the crate: guest RAM is identity-mapped, so an address is its own bus address.
struct GuestHal;

// SAFETY: `dma_alloc` gives fresh, zeroed, page-aligned pages that the page allocator never
// gives out again (nothing aliases them; they are never freed, so `dma_dealloc` has nothing
// to do), and the device is given each buffer's own address: guest-physical equals virtual.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let addr = guest_agent::pages::alloc((pages * PAGE_SIZE) as u64);
        match addr.and_then(|a| NonNull::new(a as *mut u8)) {
            Some(ptr) => (ptr.as_ptr() as PhysAddr, ptr),
            None => (0, NonNull::dangling()), // the crate turns address 0 into `DmaError`
        }
    }
    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }
    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }
    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The heap behind the crate's `alloc` use: fresh pages for each allocation, never freed.
/// Allocations are few (at set-up and per connection: the connection list, ring buffers, rx
/// buffers; none per packet, as the only such, an indirect descriptor list, needs a feature the
/// device does not offer), so rounding each up to pages costs little; simpler than any crate.
struct Pages;

#[global_allocator]
static HEAP: Pages = Pages;

// SAFETY: each allocation is fresh pages that nothing else uses, zeroed and page-aligned,
// which is aligned enough for any layout up to a page (larger alignments fail).
unsafe impl GlobalAlloc for Pages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match guest_agent::pages::alloc(layout.size() as u64) {
            Some(addr) if layout.align() <= PAGE_SIZE => addr as *mut u8,
            _ => null_mut(),
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

guest_agent::entry!(main);
