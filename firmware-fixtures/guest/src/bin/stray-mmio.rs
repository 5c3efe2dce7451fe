//! Reads guest-physical memory that is neither RAM nor a device: the page tables map it, so the
//! access exits to the VMM as MMIO, which stops the partition and reports it.
#![no_std]
#![no_main]

use guest_agent::{println, BootInfo};

/// Well inside the identity map, far above the partition's RAM and below the device window.
const HOLE: usize = 0xc800_0000;

fn main(_info: &'static BootInfo) -> u32 {
    println!("reading {HOLE:#x}");
    // SAFETY: none needed for the guest's own sake: the VMM ends the partition on this read.
    let v = unsafe { (HOLE as *const u32).read_volatile() };
    println!("read {v:#x}: the access was not caught");
    1
}

guest_agent::entry!(main);
