//! Opens a channel to an echo partition, sends `count` messages of `size` bytes in batches of
//! `batch`, checks every echo, and prints message rate and round-trip percentiles.
//! Arguments: `peer=N:P:Q` (required), `process=N` (1), `count=N` (1000), `size=N` (64),
//! `batch=N` (16, at most 32), `interval_ms=N` (0: pause between batches), `key=guest` to
//! supply the channel key itself (claim 2), `setups=N` to time N more channel set-ups from
//! processes 1000.. (the echo must be told the same `setups`).
#![no_std]
#![no_main]

use guest_agent::channel::abi::{status, Endpoint};
use guest_agent::channel::SecureChannel;
use guest_agent::idle::Backoff;
use guest_agent::time::{nanos, sleep_for, ticks};
use guest_agent::virtio::rng::Rng;
use guest_agent::{println, BootInfo};

const MAX: usize = 64 * 1024;
/// Most round-trip samples kept.
const MAX_SAMPLES: u64 = 1 << 16;

/// Message `index` is its index (8 bytes, little-endian) followed by a fixed pattern, so each
/// message differs (a misrouted or stale echo is caught) and checking one is a memcmp.
fn stamp(msg: &mut [u8], index: u64) {
    let n = msg.len().min(8);
    msg[..n].copy_from_slice(&index.to_le_bytes()[..n]);
}

fn main(info: &'static BootInfo) -> u32 {
    match run(info) {
        Ok(()) => 0,
        Err(why) => {
            println!("ping: {why}");
            1
        }
    }
}

fn run(info: &'static BootInfo) -> Result<(), &'static str> {
    let peer = info.arg_endpoint("peer").ok_or("needs peer=NODE:PARTITION:PROCESS")?;
    let process = info.arg_u64("process", 1).ok_or("bad process")? as u32;
    let count = info.arg_u64("count", 1000).ok_or("bad count")?;
    let size = info.arg_u64("size", 64).ok_or("bad size")? as usize;
    let batch = info.arg_u64("batch", 16).ok_or("bad batch")?.clamp(1, 32);
    let interval_ms = info.arg_u64("interval_ms", 0).ok_or("bad interval_ms")?;
    if size == 0 || size > MAX {
        return Err("size must be 1 to 65536");
    }
    let mut ch = SecureChannel::open(info).map_err(|_| "cannot open the secure channel device")?;
    let key = guest_key(info)?;
    let channel =
        ch.connect_patiently(info, process, peer, key.as_ref(), 1000).map_err(|_| "open failed")?;
    println!(
        "ping: channel {channel:#x} to {}:{}:{} open",
        peer.node, peer.partition, peer.process
    );

    let (out, rtts) = buffers(count)?;
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    let start = ticks();
    let mut sent = 0u64;
    while sent < count {
        let n = batch.min(count - sent);
        let t0 = ticks();
        for i in sent..sent + n {
            stamp(&mut out[..size], i);
            ch.post_send(channel, process, &out[..size]).map_err(|_| "send refused")?;
        }
        ch.flush();
        let (mut reaped, mut echoed) = (0, 0);
        let mut backoff = Backoff::new();
        while reaped < n || echoed < n {
            let mut progress = true;
            match ch.reap_send() {
                Ok(Some(status::OK)) => reaped += 1,
                Ok(Some(_)) => return Err("the device refused a message"),
                Ok(None) => progress = false,
                Err(_) => return Err("transmit queue failed"),
            }
            // The echo is checked where it arrived, in the receive buffer.
            stamp(&mut out[..size], sent + echoed);
            let expected = &out[..size];
            let Some(intact) = ch
                .recv_with(|header, payload| header.source == peer && payload == expected)
                .map_err(|_| "receive queue failed")?
            else {
                if !progress {
                    backoff.snooze();
                }
                continue;
            };
            backoff.reset();
            if !intact {
                return Err("an echo did not match what was sent");
            }
            // Round trips are sampled into a bounded table (the first MAX_SAMPLES).
            if let Some(slot) = rtts.get_mut((sent + echoed) as usize) {
                *slot = ticks() - t0;
            }
            echoed += 1;
        }
        sent += n;
        if interval_ms > 0 {
            sleep_for(info, interval_ms * 1000);
        }
    }
    let elapsed = ticks() - start;
    report(info, count, size, batch, elapsed, rtts);
    time_setups(info, &mut ch, peer)?;
    ch.send(channel, process, &[]).map_err(|_| "goodbye refused")?;
    ch.close(process, channel).map_err(|_| "close refused")?;
    Ok(())
}

/// Opens `setups` channels to `peer` from processes 1000.., each a full offer and answer, and
/// reports how many per second; then closes them.
fn time_setups(
    info: &BootInfo,
    ch: &mut SecureChannel,
    peer: Endpoint,
) -> Result<(), &'static str> {
    let setups = info.arg_u64("setups", 0).ok_or("bad setups")?.min(60) as u32;
    if setups == 0 {
        return Ok(());
    }
    let mut channels = [0u32; 60];
    let start = ticks();
    for (i, slot) in channels.iter_mut().enumerate().take(setups as usize) {
        *slot = ch.connect(1000 + i as u32, peer, None).map_err(|_| "a channel set-up failed")?;
    }
    let elapsed = ticks() - start;
    for (i, channel) in channels.iter().enumerate().take(setups as usize) {
        ch.close(1000 + i as u32, *channel).map_err(|_| "close refused")?;
    }
    match nanos(info, elapsed) {
        Some(ns) if ns > 0 => {
            println!(
                "ping: {setups} channel set-ups: {} per second",
                u128::from(setups) * 1_000_000_000 / u128::from(ns)
            )
        }
        _ => println!("ping: {setups} channel set-ups (no TSC rate for timings)"),
    }
    Ok(())
}

/// A key from virtio-rng when asked for `key=guest`, so the channel uses a guest-made key.
fn guest_key(info: &BootInfo) -> Result<Option<[u8; 32]>, &'static str> {
    if info.arg("key") != Some("guest") {
        return Ok(None);
    }
    let mut key = [0u8; 32];
    Rng::open(info).and_then(|mut rng| rng.fill(&mut key)).map_err(|_| "virtio-rng failed")?;
    Ok(Some(key))
}

type Buffers = (&'static mut [u8], &'static mut [u64]);

fn buffers(count: u64) -> Result<Buffers, &'static str> {
    let alloc = |bytes: u64| guest_agent::pages::alloc(bytes).ok_or("out of memory");
    let samples = count.min(MAX_SAMPLES);
    let (out, rtts) = (alloc(MAX as u64)?, alloc(samples * 8)?);
    // SAFETY: two fresh, disjoint page ranges of the sizes given, used only here.
    unsafe {
        Ok((
            core::slice::from_raw_parts_mut(out as *mut u8, MAX),
            core::slice::from_raw_parts_mut(rtts as *mut u64, samples as usize),
        ))
    }
}

fn report(info: &BootInfo, count: u64, size: usize, batch: u64, elapsed: u64, rtts: &mut [u64]) {
    rtts.sort_unstable();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    match (nanos(info, elapsed), nanos(info, pct(50)), nanos(info, pct(99))) {
        (Some(total), Some(p50), Some(p99)) if total > 0 => {
            let rate = u128::from(count) * 1_000_000_000 / u128::from(total);
            let mbps = rate * size as u128 / 1_000_000;
            println!(
                "ping: {count} messages of {size} bytes, batch {batch}: {rate} msg/s, {mbps} MB/s, round trip p50 {} us, p99 {} us",
                p50 / 1000,
                p99 / 1000
            );
        }
        _ => println!("ping: {count} messages of {size} bytes, batch {batch}: all echoed (no TSC rate for timings)"),
    }
}

guest_agent::entry!(main);
