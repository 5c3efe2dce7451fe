//! Never exits: only the VMM's `--timeout` ends it.
#![no_std]
#![no_main]

use guest_agent::{println, BootInfo};

fn main(info: &'static BootInfo) -> u32 {
    println!("partition {} spinning", info.partition_id);
    let mut n: u64 = 0;
    loop {
        // Keep the loop observable so the compiler cannot remove it.
        n = core::hint::black_box(n.wrapping_add(1));
    }
}

guest_agent::entry!(main);
