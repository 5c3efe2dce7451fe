//! Opens a channel with a key it made itself (claim 2), wipes its own copy, proves the channel
//! works, then searches all of its RAM and every device register for the key. Exits 0 if the
//! key is nowhere to be found, 1 if it is. Arguments: `peer=N:P:Q` (an echo listening for us),
//! `seed=N` (the key is derived from it, so the test can look for it in RAM dumps too),
//! `process=N` (1), `plant=1` to keep a copy of the key on purpose (the control case: the
//! search must then find it).
#![no_std]
#![no_main]

use guest_agent::channel::abi::{ChannelInfo, Endpoint};
use guest_agent::channel::SecureChannel;
use guest_agent::mmio::read32;
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

use keyhold_fixture_programs::snoop_key::key_byte;

/// A marker the test finds in the RAM dump, proving the dump holds this partition's memory.
static CANARY: &str = "keyhold-snoop-canary-3141592653";

/// Where `plant=1` keeps its deliberate copy of the key.
static mut PLANTED: [u8; 32] = [0; 32];

fn main(info: &'static BootInfo) -> u32 {
    let (Some(peer), Some(seed)) = (info.arg_endpoint("peer"), info.arg_u64("seed", 0)) else {
        println!("snoop: needs peer=NODE:PARTITION:PROCESS and seed=N");
        return 2;
    };
    let process = info.arg_u64("process", 1).unwrap_or(1) as u32;
    let Some(mut ch) = open_channel(info, "snoop") else { return CANNOT_RUN };
    let Some(channel) = connect_with_key(info, &mut ch, process, peer, seed) else {
        println!("snoop: could not open the channel");
        return 2;
    };
    let mut back = [0u8; 8];
    if ch.send(channel, process, b"ping").is_err() || ch.recv_wait(&mut back).is_err() {
        println!("snoop: the keyed channel does not work");
        return 2;
    }
    println!(
        "snoop: channel keyed with my own key works; canary {}",
        core::hint::black_box(CANARY)
    );
    let mut entries = [ChannelInfo::default(); 4];
    if let Ok(n) = ch.list(&mut entries) {
        for e in &entries[..n.min(entries.len())] {
            println!(
                "snoop: LIST channel {:#x} state {} process {} remote {}:{}:{} sent {} received {}",
                e.channel,
                e.state,
                e.process,
                e.remote.node,
                e.remote.partition,
                e.remote.process,
                e.sent,
                e.received
            );
        }
    }
    if info.arg("plant") == Some("1") {
        let planted = core::ptr::addr_of_mut!(PLANTED).cast::<u8>();
        for i in 0..32 {
            // SAFETY: single-threaded firmware; `i < 32` stays inside PLANTED.
            unsafe { planted.add(i).write_volatile(key_byte(seed, i)) };
        }
    }
    let in_ram = search_ram(info, seed);
    let in_registers = search_registers(info, seed);
    println!("snoop: key found in RAM: {in_ram}; in device registers: {in_registers}");
    let _ = ch.send(channel, process, &[]);
    u32::from(in_ram || in_registers)
}

fn connect_with_key(
    info: &BootInfo,
    ch: &mut SecureChannel,
    process: u32,
    peer: Endpoint,
    seed: u64,
) -> Option<u32> {
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = key_byte(seed, i);
    }
    let result = ch.connect_patiently(info, process, peer, Some(&key), 1000);
    for byte in key.iter_mut() {
        // SAFETY: a byte of our own stack buffer; volatile so the wipe is kept.
        unsafe { core::ptr::write_volatile(byte, 0) };
    }
    result.ok()
}

/// Whether the 32 key bytes appear anywhere in `[0, ram_size)`.
fn search_ram(info: &BootInfo, seed: u64) -> bool {
    let first = key_byte(seed, 0);
    (0..info.ram_size.saturating_sub(32)).any(|addr| {
        // SAFETY: all of RAM is identity-mapped and readable (page 0 read-only).
        let at = |i: u64| unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
        at(0) == first && (1..32).all(|i| at(i as u64) == key_byte(seed, i))
    })
}

/// Whether any 8 consecutive key bytes appear in the registers or configuration space of any
/// device (read, never written).
fn search_registers(info: &BootInfo, seed: u64) -> bool {
    let mut dump = [0u8; 0x140];
    info.devices().iter().any(|dev| {
        for (i, word) in dump.chunks_exact_mut(4).enumerate() {
            // SAFETY: reading the device's own window, which the VMM listed.
            let value = unsafe { read32(dev.mmio_base + 4 * i as u64) };
            word.copy_from_slice(&value.to_le_bytes());
        }
        dump.windows(8).any(|w| {
            (0..4).any(|k| w.iter().enumerate().all(|(j, &b)| b == key_byte(seed, 8 * k + j)))
        })
    })
}

guest_agent::entry!(main);
