//! Overruns a receiver that stops receiving, to show that the device holds a bounded number of
//! messages for it, drops (and counts) the rest, keeps the order of what it delivers, and keeps
//! the channel working afterwards.
//!
//! `role=send peer=N:P:Q count=N`: opens a channel to the sink and sends `count` 8-byte
//! messages numbered 0.. without pause; waits for the sink's "ready", sends message `count`,
//! and waits for the sink's acknowledgement.
//! `role=sink peer=N:P:Q count=N`: listens, takes message 0, then takes nothing until the
//! device has dropped messages for want of room and none has reached it (delivered or dropped)
//! for 100 ms, however slowly the sender goes; then drains, checks the order,
//! prints what it got and what the device dropped, says "ready", and expects message `count`.
//! Both exit 0 if everything held, 1 if not.
#![no_std]
#![no_main]

use guest_agent::channel::abi::Endpoint;
use guest_agent::channel::{ChannelError, SecureChannel};
use guest_agent::time::{nanos, spin_for, ticks};
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

/// How long nothing must arrive before the sink decides the flood is over.
const QUIET_MICROS: u64 = 100_000;
/// The longest the sink stays deaf, or drains, whatever happens.
const DEAF_MICROS_MAX: u64 = 30_000_000;

fn main(info: &'static BootInfo) -> u32 {
    let (Some(peer), Some(count)) = (info.arg_endpoint("peer"), info.arg_u64("count", 1000)) else {
        println!("flood: needs peer=NODE:PARTITION:PROCESS and count=N");
        return 2;
    };
    let Some(mut ch) = open_channel(info, "flood") else { return CANNOT_RUN };
    let outcome = match info.arg("role") {
        Some("send") => send(info, &mut ch, peer, count),
        Some("sink") => sink(info, &mut ch, peer, count),
        _ => {
            println!("flood: needs role=send or role=sink");
            return 2;
        }
    };
    match outcome {
        Ok(()) => 0,
        Err(why) => {
            println!("flood: {why}");
            1
        }
    }
}

fn send(
    info: &BootInfo,
    ch: &mut SecureChannel,
    peer: Endpoint,
    count: u64,
) -> Result<(), &'static str> {
    let channel = ch.connect_patiently(info, 1, peer, None, 500).map_err(|_| "cannot connect")?;
    for i in 0..count {
        ch.send(channel, 1, &i.to_le_bytes()).map_err(|_| "a send was refused")?;
    }
    println!("flood: sent {count} messages");
    let mut buf = [0u8; 8];
    ch.recv_wait(&mut buf).map_err(|_| "no ready from the sink")?;
    ch.send(channel, 1, &count.to_le_bytes()).map_err(|_| "the last send was refused")?;
    ch.recv_wait(&mut buf).map_err(|_| "no acknowledgement from the sink")?;
    println!("flood: the sink got the message sent after the flood");
    Ok(())
}

fn sink(
    info: &BootInfo,
    ch: &mut SecureChannel,
    peer: Endpoint,
    count: u64,
) -> Result<(), &'static str> {
    ch.listen(1, peer).map_err(|_| "cannot listen")?;
    let mut buf = [0u8; 8];
    let first = ch.recv_wait(&mut buf).map_err(|_| "nothing received")?;
    let (channel, process) = (first.header.channel, first.header.process);
    if index(&buf) != 0 {
        return Err("the first message is not message 0");
    }
    stay_deaf(info, ch)?;
    let (received, dropped) = drain(info, ch, count)?;
    println!("flood: received {received} in order, the device dropped {dropped} for want of room");
    ch.send(channel, process, b"ready").map_err(|_| "cannot say ready")?;
    let after = ch.recv_wait(&mut buf).map_err(|_| "nothing after the flood")?;
    if after.copied != 8 || index(&buf) != count {
        return Err("the message after the flood is not the one sent");
    }
    println!("flood: the channel works after the drops");
    ch.send(channel, process, b"got it").map_err(|_| "cannot acknowledge")
}

/// Receives until every one of the `count` messages was either received or dropped by the
/// device (then none went missing uncounted), checking their order; returns both numbers.
fn drain(info: &BootInfo, ch: &mut SecureChannel, count: u64) -> Result<(u64, u64), &'static str> {
    let start = ticks();
    let (mut received, mut last) = (1, 0);
    let mut buf = [0u8; 8];
    loop {
        if let Some(message) = ch.recv(&mut buf).map_err(|_| "receive failed")? {
            if message.copied != 8 || index(&buf) <= last {
                return Err("messages arrived out of order");
            }
            last = index(&buf);
            received += 1;
            continue;
        }
        let dropped = ch.stats().map_err(|_| "no stats")?.dropped_no_room;
        if received + dropped >= count {
            return if received + dropped == count {
                Ok((received, dropped))
            } else {
                Err("too many")
            };
        }
        if micros(info, ticks() - start) > DEAF_MICROS_MAX {
            return Err("messages went missing uncounted");
        }
        spin_for(info, 1000);
    }
}

/// Takes nothing until the device dropped messages for want of room (the sender sends more
/// than the device holds, so it must) and none has reached this partition for
/// [`QUIET_MICROS`]: the flood is over, at whatever speed the sender went.
fn stay_deaf(info: &BootInfo, ch: &mut SecureChannel) -> Result<(), &'static str> {
    let start = ticks();
    let (mut seen, _) = arrived(ch)?;
    let mut quiet_since = ticks();
    while micros(info, ticks() - start) < DEAF_MICROS_MAX {
        spin_for(info, 10_000);
        let (now, dropped) = arrived(ch)?;
        if now != seen {
            seen = now;
            quiet_since = ticks();
        } else if dropped > 0 && micros(info, ticks() - quiet_since) >= QUIET_MICROS {
            return Ok(());
        }
    }
    Err("the device never dropped a message for want of room")
}

/// Messages that reached this partition so far (delivered into buffers or dropped), and of
/// them those dropped.
fn arrived(ch: &mut SecureChannel) -> Result<(u64, u64), &'static str> {
    let stats = ch.stats().map_err(|_: ChannelError| "no stats")?;
    Ok((stats.received + stats.dropped_no_room, stats.dropped_no_room))
}

fn micros(info: &BootInfo, ticks: u64) -> u64 {
    nanos(info, ticks).map_or(ticks / 1000, |n| n / 1000)
}

fn index(buf: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*buf)
}

guest_agent::entry!(main);
