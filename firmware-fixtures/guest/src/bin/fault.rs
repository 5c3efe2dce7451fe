//! Reads an address no page table maps: the CPU faults, and with no handler the partition
//! shuts down (triple fault), which the VMM reports.
#![no_std]
#![no_main]

use guest_agent::{println, BootInfo};

/// 512 GiB: beyond the identity map, which covers the low 4 GiB only.
const UNMAPPED: usize = 0x80_0000_0000;

fn main(_info: &'static BootInfo) -> u32 {
    println!("about to read {UNMAPPED:#x}");
    // SAFETY: none; faulting is the point of this fixture.
    let v = unsafe { (UNMAPPED as *const u64).read_volatile() };
    println!("read {v:#x}: the fault did not happen");
    1
}

guest_agent::entry!(main);
