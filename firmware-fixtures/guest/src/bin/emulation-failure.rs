//! Makes KVM's instruction emulator give up: an SSE arithmetic instruction whose memory operand
//! is MMIO has to be emulated, and the emulator does not implement it.
#![no_std]
#![no_main]

use guest_agent::{println, BootInfo};

/// Not RAM, so the access is MMIO (see the `stray-mmio` fixture).
const HOLE: usize = 0xc800_0000;

fn main(_info: &'static BootInfo) -> u32 {
    println!("paddd from MMIO {HOLE:#x}");
    // SAFETY: the instruction only reads `HOLE`, and the VMM ends the partition on it.
    unsafe {
        core::arch::asm!("pxor xmm0, xmm0", "paddd xmm0, [{hole}]", hole = in(reg) HOLE,
            out("xmm0") _, options(nostack, readonly));
    }
    println!("the emulator coped");
    1
}

guest_agent::entry!(main);
