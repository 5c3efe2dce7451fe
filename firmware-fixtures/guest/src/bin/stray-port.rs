//! Writes an I/O port no device decodes: the VMM stops the partition and reports the access.
#![no_std]
#![no_main]

use guest_agent::{println, BootInfo};

/// The POST-code port: on a PC it exists, in a keyhold partition it does not.
const STRAY_PORT: u16 = 0x80;

fn main(_info: &'static BootInfo) -> u32 {
    println!("writing port {STRAY_PORT:#x}");
    // SAFETY: `out` touches no memory; with IOPL 3 it exits to the VMM.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") STRAY_PORT, in("al") 0u8, options(nomem, nostack));
    }
    println!("the write was ignored");
    1
}

guest_agent::entry!(main);
