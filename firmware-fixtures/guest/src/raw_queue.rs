//! A split virtqueue made by hand, for drivers that misbehave on purpose: the fixtures write
//! descriptors and indexes directly, as no well-behaved driver would.

use core::ptr::{read_volatile, write_volatile};

use guest_agent::pages;
use guest_agent::virtio::registers::reg;
use guest_agent::virtio::transport::Transport;

/// Descriptor flag: the chain goes on at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer.
pub const DESC_F_WRITE: u16 = 2;

/// A hand-made split queue: descriptor table, avail ring and used ring, one page each.
pub struct RawQueue {
    /// The descriptor table.
    pub desc: u64,
    /// The avail ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
}

impl RawQueue {
    /// Three fresh pages.
    pub fn new() -> Self {
        let page = || pages::alloc(4096).expect("RAM for a raw queue");
        Self { desc: page(), avail: page(), used: page() }
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(i);
        // SAFETY: our own page; the device reads it only after it is published.
        unsafe {
            write_volatile(at as *mut u64, addr);
            write_volatile((at + 8) as *mut u32, len);
            write_volatile((at + 12) as *mut u16, flags);
            write_volatile((at + 14) as *mut u16, next);
        }
    }

    /// Publishes `head` as avail entry `slot` and sets the avail index to `idx`.
    pub fn publish(&self, slot: u16, head: u16, idx: u16) {
        // SAFETY: our own page.
        unsafe {
            write_volatile((self.avail + 4 + 2 * u64::from(slot)) as *mut u16, head);
            core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
            write_volatile((self.avail + 2) as *mut u16, idx);
        }
    }

    /// Makes this queue (with its descriptor table at `desc`, normally [`Self::desc`]) queue
    /// `index` of `t`, `size` entries, and marks it ready.
    pub fn attach(&self, t: &Transport, index: u32, size: u16, desc: u64) {
        t.write(reg::QUEUE_SEL, index);
        t.write(reg::QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, self.avail),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, self.used),
        ] {
            t.write(low, addr as u32);
            t.write(high, (addr >> 32) as u32);
        }
        t.write(reg::QUEUE_READY, 1);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: our own page, written by the device.
        unsafe { read_volatile((self.used + 2) as *const u16) }
    }

    /// The length the device wrote in used entry `slot`.
    pub fn used_len(&self, slot: u16) -> u32 {
        // SAFETY: as above.
        unsafe { read_volatile((self.used + 8 + 8 * u64::from(slot)) as *const u32) }
    }
}

impl Default for RawQueue {
    fn default() -> Self {
        Self::new()
    }
}
