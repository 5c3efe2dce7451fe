//! Panics: the runtime prints the message and exits with a non-zero status.
#![no_std]
#![no_main]

use guest_agent::BootInfo;

fn main(info: &'static BootInfo) -> u32 {
    panic!("fixture panic in partition {}", info.partition_id);
}

guest_agent::entry!(main);
