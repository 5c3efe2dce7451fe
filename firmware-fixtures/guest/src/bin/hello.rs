//! Greets from the partition and reports its RAM size.
#![no_std]
#![no_main]

use guest_agent::{println, BootInfo};

fn main(info: &'static BootInfo) -> u32 {
    println!("hello from partition {}", info.partition_id);
    println!("ram: {} MiB", info.ram_size >> 20);
    0
}

guest_agent::entry!(main);
