//! A split virtqueue, driver side (virtio 1.2, section 2.7).
//!
//! The rings live in pages from [`crate::pages`]. Everything the device also touches is read
//! and written volatile, with fences where the specification orders accesses.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use super::DriverError;
use crate::mmio::write32;
use crate::pages;

/// Largest queue this driver sets up.
pub const MAX_SIZE: usize = 256;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The avail ring; `used_event` follows the first `size` entries of `ring`.
#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; MAX_SIZE + 1],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

/// The used ring; `avail_event` follows the first `size` entries of `ring`.
#[repr(C)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; MAX_SIZE + 1],
}

/// One buffer of a request: where, how long, and whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    /// Guest-physical (= virtual) address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (rather than reads it).
    pub writable: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub fn readable(data: &[u8]) -> Self {
        Self { addr: data.as_ptr() as u64, len: data.len() as u32, writable: false }
    }

    /// A buffer the device writes.
    pub fn writable(data: &mut [u8]) -> Self {
        Self { addr: data.as_mut_ptr() as u64, len: data.len() as u32, writable: true }
    }
}

/// A split virtqueue of `size` entries. The rings are allocated for [`MAX_SIZE`] entries; the
/// device is told `size`, so the event fields it uses sit right after entry `size - 1`.
pub struct Virtqueue {
    index: u16,
    size: u16,
    desc: *mut Desc,
    avail: *mut Avail,
    used: *mut Used,
    notify: u64,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_kick: u16,
    last_used: u16,
    in_flight: [bool; MAX_SIZE],
}

impl Virtqueue {
    pub(super) fn new(
        index: u16,
        size: u16,
        notify: u64,
        event_idx: bool,
    ) -> Result<Self, DriverError> {
        if size == 0 || usize::from(size) > MAX_SIZE || !size.is_power_of_two() {
            return Err(DriverError::QueueUnavailable);
        }
        let desc = pages::alloc(16 * MAX_SIZE as u64).ok_or(DriverError::OutOfMemory)? as *mut Desc;
        let avail = pages::alloc(core::mem::size_of::<Avail>() as u64)
            .ok_or(DriverError::OutOfMemory)? as *mut Avail;
        let used = pages::alloc(core::mem::size_of::<Used>() as u64)
            .ok_or(DriverError::OutOfMemory)? as *mut Used;
        let mut queue = Self {
            index,
            size,
            desc,
            avail,
            used,
            notify,
            event_idx,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_kick: 0,
            last_used: 0,
            in_flight: [false; MAX_SIZE],
        };
        for i in 0..size {
            queue.write_desc(i, Desc { addr: 0, len: 0, flags: 0, next: (i + 1) % size });
        }
        Ok(queue)
    }

    /// Addresses of the descriptor table, avail ring and used ring.
    pub(super) fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Descriptors not in use.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Whether the queue uses the event index (VIRTIO_F_EVENT_IDX was negotiated).
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn write_desc(&mut self, i: u16, d: Desc) {
        // SAFETY: `i < size <= MAX_SIZE` and the table holds MAX_SIZE descriptors.
        unsafe { write_volatile(self.desc.add(usize::from(i)), d) }
    }

    fn read_desc(&self, i: u16) -> Desc {
        // SAFETY: as for `write_desc`.
        unsafe { read_volatile(self.desc.add(usize::from(i))) }
    }

    /// Offers one request made of `bufs` (readable ones first) to the device; returns its head
    /// descriptor. The device sees it at once but is not notified: see [`Self::kick`].
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, DriverError> {
        let count = u16::try_from(bufs.len()).map_err(|_| DriverError::QueueUnavailable)?;
        if count == 0 || count > self.num_free {
            return Err(DriverError::QueueUnavailable);
        }
        let head = self.free_head;
        let mut cur = head;
        for (n, buf) in bufs.iter().enumerate() {
            let next = self.read_desc(cur).next;
            let mut flags = if buf.writable { DESC_F_WRITE } else { 0 };
            if n + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(cur, Desc { addr: buf.addr, len: buf.len, flags, next });
            if n + 1 < bufs.len() {
                cur = next;
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= count;
        self.in_flight[usize::from(head)] = true;
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: `slot < size <= MAX_SIZE`; the avail ring is ours to write.
        unsafe { write_volatile(addr_of_mut!((*self.avail).ring[slot]), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { write_volatile(addr_of_mut!((*self.avail).idx), self.avail_idx) };
        Ok(head)
    }

    /// Notifies the device of new requests, unless it said (EVENT_IDX) it does not need it.
    /// Returns whether it notified (each notification is a VM exit).
    pub fn kick(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let old = self.last_kick;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        self.last_kick = new;
        let needed = if self.event_idx {
            let event = self.avail_event();
            // vring_need_event: the device asked to hear once the index passes `event`.
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: the used ring is the device's to write and ours to read.
            let flags = unsafe { read_volatile(addr_of!((*self.used).flags)) };
            flags & 1 == 0
        };
        if needed {
            // SAFETY: `notify` is the device's queue-notify register.
            unsafe { write32(self.notify, u32::from(self.index)) };
        }
        needed
    }

    /// `avail_event`: placed right after the `size` used-ring entries.
    fn avail_event(&self) -> u16 {
        // SAFETY: the used ring is allocated for MAX_SIZE entries, so the slot after `size`
        // entries is inside it; the device writes it, we read.
        unsafe {
            let ring = addr_of!((*self.used).ring) as *const UsedElem;
            read_volatile(ring.add(usize::from(self.size)) as *const u16)
        }
    }

    /// Tells the device (EVENT_IDX) after how many more used entries it should interrupt;
    /// firmware polls, so the driver pushes this as far out as the ring allows.
    pub fn suppress_interrupts(&mut self) {
        // SAFETY: `used_event` sits after `size` avail-ring entries, inside the allocation.
        unsafe {
            let ring = addr_of_mut!((*self.avail).ring) as *mut u16;
            write_volatile(ring.add(usize::from(self.size)), self.last_used.wrapping_sub(1));
            write_volatile(addr_of_mut!((*self.avail).flags), 1);
        }
    }

    /// Takes the next request the device has finished: its head and the bytes it wrote.
    pub fn poll(&mut self) -> Result<Option<(u16, u32)>, DriverError> {
        // SAFETY: the used ring is the device's to write and ours to read.
        let used_idx = unsafe { read_volatile(addr_of!((*self.used).idx)) };
        if used_idx == self.last_used {
            return Ok(None);
        }
        // Read the entry only after seeing the index that publishes it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: `slot < size <= MAX_SIZE`.
        let elem = unsafe { read_volatile(addr_of!((*self.used).ring[slot])) };
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(elem.id).map_err(|_| DriverError::BadUsedEntry)?;
        if head >= self.size || !self.in_flight[usize::from(head)] {
            return Err(DriverError::BadUsedEntry);
        }
        self.recycle(head);
        Ok(Some((head, elem.len)))
    }

    /// Returns the descriptors of the chain at `head` to the free list.
    fn recycle(&mut self, head: u16) {
        self.in_flight[usize::from(head)] = false;
        let mut cur = head;
        let mut count = 1;
        loop {
            let d = self.read_desc(cur);
            if d.flags & DESC_F_NEXT == 0 || count >= self.size {
                self.write_desc(cur, Desc { next: self.free_head, ..d });
                break;
            }
            cur = d.next;
            count += 1;
        }
        self.free_head = head;
        self.num_free += count;
    }
}
