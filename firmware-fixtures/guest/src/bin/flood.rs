//! Floods a receiver that stops receiving, to show that a deaf receiver stalls its own sender:
//! the device holds a bounded number of messages for it, answers the sender NO_ROOM past that,
//! drops nothing, keeps the order, and the channel works on afterwards.
//!
//! `role=send peer=N:P:Q count=N`: opens a channel to the sink and sends `count` 8-byte
//! messages numbered 0.. without pause, each tried until the device takes it, counting the
//! NO_ROOM answers (at the first, a send claiming another process must still be refused as
//! forged); waits for the sink's "ready", sends message `count`, and waits for the
//! sink's acknowledgement.
//! `role=sink peer=N:P:Q count=N`: listens, takes message 0, then takes nothing until none
//! has reached its buffers for 100 ms (they are full, and the sender stalls), however slowly
//! the sender goes; then drains all `count`, checks the order and that the device dropped
//! none, prints what it got, says "ready", and expects message `count`.
//! Both exit 0 if everything held, 1 if not.
#![no_std]
#![no_main]

use guest_agent::channel::abi::{status, Endpoint, TxHeader};
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
    let mut stalls = 0u64;
    for i in 0..count {
        loop {
            match ch.try_send(channel, 1, &i.to_le_bytes()) {
                Ok(()) => break,
                Err(ChannelError::Status(status::NO_ROOM)) => {
                    if stalls == 0 {
                        forge_while_stalled(ch, channel)?;
                    }
                    stalls += 1;
                    spin_for(info, 100);
                }
                Err(_) => return Err("a send was refused"),
            }
        }
    }
    println!("flood: sent {count} messages, stalled {stalls} times by a receiver with no room");
    let mut buf = [0u8; 8];
    ch.recv_wait(&mut buf).map_err(|_| "no ready from the sink")?;
    ch.send(channel, 1, &count.to_le_bytes()).map_err(|_| "the last send was refused")?;
    ch.recv_wait(&mut buf).map_err(|_| "no acknowledgement from the sink")?;
    println!("flood: the sink got the message sent after the flood");
    Ok(())
}

/// While the receiver has no room, a send that claims another process of this partition is
/// still refused as the forgery it is, not told to wait.
fn forge_while_stalled(ch: &mut SecureChannel, channel: u32) -> Result<(), &'static str> {
    let header = TxHeader { channel, source: ch.endpoint(2), len: 6 };
    match ch.send_raw(header.to_bytes(), b"forged").map_err(|_| "the forged send failed")? {
        status::FORGED_SOURCE => {
            println!("flood: a forged send to the full receiver was refused as forged");
            Ok(())
        }
        _ => Err("a forged send to the full receiver was not refused as forged"),
    }
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
    let received = drain(info, ch, count)?;
    let dropped = ch.stats().map_err(|_| "no stats")?.dropped_no_room;
    println!("flood: received {received} in order, the device dropped {dropped} for want of room");
    if dropped != 0 {
        return Err("the device dropped messages");
    }
    ch.send(channel, process, b"ready").map_err(|_| "cannot say ready")?;
    let after = ch.recv_wait(&mut buf).map_err(|_| "nothing after the flood")?;
    if after.copied != 8 || index(&buf) != count {
        return Err("the message after the flood is not the one sent");
    }
    println!("flood: the channel works after the flood");
    ch.send(channel, process, b"got it").map_err(|_| "cannot acknowledge")
}

/// Receives until all `count` messages are in (message 0 was taken already), checking their
/// order; returns how many.
fn drain(info: &BootInfo, ch: &mut SecureChannel, count: u64) -> Result<u64, &'static str> {
    let start = ticks();
    let (mut received, mut last) = (1, 0);
    let mut buf = [0u8; 8];
    while received < count {
        if let Some(message) = ch.recv(&mut buf).map_err(|_| "receive failed")? {
            if message.copied != 8 || index(&buf) != last + 1 {
                return Err("messages arrived out of order or went missing");
            }
            last = index(&buf);
            received += 1;
            continue;
        }
        if micros(info, ticks() - start) > DEAF_MICROS_MAX {
            return Err("messages went missing");
        }
        spin_for(info, 1000);
    }
    Ok(received)
}

/// Takes nothing until none has reached this partition's buffers for [`QUIET_MICROS`]: they
/// are full, the device holds what it may, and the sender is stalled, at whatever speed it
/// went.
fn stay_deaf(info: &BootInfo, ch: &mut SecureChannel) -> Result<(), &'static str> {
    let start = ticks();
    let mut seen = arrived(ch)?;
    let mut quiet_since = ticks();
    while micros(info, ticks() - start) < DEAF_MICROS_MAX {
        spin_for(info, 10_000);
        let now = arrived(ch)?;
        if now != seen {
            seen = now;
            quiet_since = ticks();
        } else if micros(info, ticks() - quiet_since) >= QUIET_MICROS {
            return Ok(());
        }
    }
    Err("messages kept arriving")
}

/// Messages that reached this partition's buffers so far.
fn arrived(ch: &mut SecureChannel) -> Result<u64, &'static str> {
    Ok(ch.stats().map_err(|_: ChannelError| "no stats")?.received)
}

fn micros(info: &BootInfo, ticks: u64) -> u64 {
    nanos(info, ticks).map_or(ticks / 1000, |n| n / 1000)
}

fn index(buf: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*buf)
}

guest_agent::entry!(main);
