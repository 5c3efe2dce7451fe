//! Reads entropy through virtio-rng and checks it looks random: not constant, and two reads
//! differ. Exits 0 if so, 1 if not, 2 if the device could not be used. With `bytes=N` it then
//! reads N more bytes, 4 KiB at a time, and prints how long that took (by its own clock).
#![no_std]
#![no_main]

use guest_agent::virtio::rng::Rng;
use guest_agent::{println, BootInfo};

fn main(info: &'static BootInfo) -> u32 {
    let mut rng = match Rng::open(info) {
        Ok(rng) => rng,
        Err(e) => {
            println!("rng: cannot open virtio-rng: {e:?}");
            return 2;
        }
    };
    let mut first = [0u8; 64];
    let mut second = [0u8; 64];
    for buf in [&mut first, &mut second] {
        if let Err(e) = rng.fill(buf) {
            println!("rng: read failed: {e:?}");
            return 2;
        }
    }
    let constant = first.iter().all(|&b| b == first[0]);
    let distinct = first.iter().fold(0u64, |seen, &b| seen | 1 << (b & 63)).count_ones();
    println!(
        "rng: 2 x 64 bytes, {distinct} distinct low-6-bit values, first byte {:#04x}",
        first[0]
    );
    if constant || first == second || distinct < 16 {
        println!("rng: entropy looks wrong");
        return 1;
    }
    let more = info.arg_u64("bytes", 0).unwrap_or(0);
    if more > 0 {
        let mut page = [0u8; 4096];
        let start = guest_agent::time::ticks();
        let mut read = 0;
        while read < more {
            let n = page.len().min((more - read) as usize);
            if let Err(e) = rng.fill(&mut page[..n]) {
                println!("rng: read failed: {e:?}");
                return 2;
            }
            read += n as u64;
        }
        let took = guest_agent::time::nanos(info, guest_agent::time::ticks() - start);
        match took {
            Some(ns) => println!("rng: read {read} bytes in {} ms", ns / 1_000_000),
            None => println!("rng: read {read} bytes (no clock)"),
        }
    }
    println!("rng: ok");
    0
}

guest_agent::entry!(main);
