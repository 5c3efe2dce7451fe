//! A page allocator over the partition's free RAM, for virtqueues and DMA buffers.
//!
//! Guest RAM is identity-mapped, so an allocation's address is also what a device is given.
//! Pages are never freed: firmware sets its devices up once.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot_info::BootInfo;

/// Page size.
pub const PAGE: u64 = 4096;

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Hands the free RAM of `info` to the allocator. Called by the runtime before `main`.
pub fn init(info: &BootInfo) {
    NEXT.store(info.free_ram_start.next_multiple_of(PAGE), Ordering::Relaxed);
    END.store(info.ram_size, Ordering::Relaxed);
}

/// Allocates `bytes` (rounded up to whole pages) of zeroed memory; `None` when RAM runs out.
pub fn alloc(bytes: u64) -> Option<u64> {
    let size = bytes.max(1).next_multiple_of(PAGE);
    let start = NEXT.fetch_add(size, Ordering::Relaxed);
    if start.checked_add(size)? > END.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: [start, start + size) is free guest RAM handed out exactly once.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, size as usize) };
    Some(start)
}

/// Allocates memory for a `T`, zeroed, and returns a `'static` reference to it.
///
/// # Safety
/// All-zero bytes must be a valid `T`.
pub unsafe fn alloc_zeroed<T>() -> Option<&'static mut T> {
    let addr = alloc(core::mem::size_of::<T>() as u64)?;
    // SAFETY: the memory is fresh, zeroed, page-aligned (enough for any T here) and never
    // handed out again; zero is a valid T per the caller's contract.
    Some(unsafe { &mut *(addr as *mut T) })
}
