//! Opens channels keyed with keys it supplies itself, derived from `seed=N` so that the host test
//! (integration/tests/memory.rs) knows them and can search every keyhold process for them, then
//! goes through the phases of that test on its signals.
//!
//! Arguments: `seed=N` (required), `local=NODE:PARTITION:PROCESS` and
//! `remote=NODE:PARTITION:PROCESS` (required: an echo on this node and one on another node,
//! each listening for processes 11, 12, 13 and 21, 22, 23, 24 of this partition respectively),
//! `count=N` (messages echoed on each channel, 300).
//!
//! Channel `i` of [`PLAN`] is keyed with `key_byte(seed ^ ((i + 1) << 32), 0..32)` (the shared
//! `snoop_key` generator). The phases:
//! 1. open every channel, exchange `count` messages on each (every echo checked), then make a
//!    LISTEN entry nobody will open (the signal) and print `keys: live signal=0x...`;
//! 2. when the test has revoked that entry (`keyhold ctl revoke`), close the channels of
//!    [`Fate::Close`] and print `keys: closed signal=0x...` with a new signal entry;
//! 3. the test revokes the [`Fate::Revoke`] channels and kills the other node
//!    ([`Fate::LinkDown`]) meanwhile; when it revokes the second signal, one more message goes
//!    round the channel that must have survived all that, the remaining entries are listed,
//!    and the program prints `keys: done` and exits 0.
//!
//! Exit statuses: 0 done, 1 a channel failed, 2 bad arguments or no device (both after a
//! `keys: FAILED: why` line).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut};

use guest_agent::channel::abi::{status, ChannelInfo, Endpoint};
use guest_agent::channel::SecureChannel;
use guest_agent::idle::{idle, Backoff};
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::snoop_key::key_byte;
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

/// What the test does to a channel after the live phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// This program closes it (phase 2).
    Close,
    /// The operator revokes it, on this node or the other (phase 3).
    Revoke,
    /// Nothing: it must still work at the end.
    Keep,
    /// It dies with its link when the test kills the other node.
    LinkDown,
}

/// One channel: the local process that owns it, whether its peer is the echo on the other
/// node, and its fate.
struct Plan {
    process: u32,
    remote: bool,
    fate: Fate,
}

/// The channels, in the order the test numbers them (it keeps the same table).
const PLAN: [Plan; 7] = [
    Plan { process: 11, remote: false, fate: Fate::Close },
    Plan { process: 12, remote: false, fate: Fate::Revoke },
    Plan { process: 13, remote: false, fate: Fate::Keep },
    Plan { process: 21, remote: true, fate: Fate::Close },
    Plan { process: 22, remote: true, fate: Fate::Revoke },
    Plan { process: 23, remote: true, fate: Fate::Revoke },
    Plan { process: 24, remote: true, fate: Fate::LinkDown },
];
const CHANNELS: usize = PLAN.len();

/// Signal entries listen for this endpoint, which nobody will ever open (no partition 0x5151).
const NOBODY: Endpoint = Endpoint { node: 0x5151, partition: 0x5151, process: 0x5151 };
/// The processes of the two signal entries.
const SIGNAL_PROCESSES: [u32; 2] = [901, 902];

/// Bytes of each message.
const SIZE: usize = 64;
/// Messages in flight at once.
const BATCH: u64 = 10;

/// This partition's own copies of the channel keys, kept for the whole run on purpose: the
/// test's control case must find every key here, in this partition's RAM, to prove that its
/// scanner reads guest RAM at all. A static stays put at one address in the image; a copy on
/// the stack could be overwritten by any later call and make the control flaky.
static mut KEYS: [[u8; 32]; CHANNELS] = [[0; 32]; CHANNELS];

fn main(info: &'static BootInfo) -> u32 {
    match run(info) {
        Ok(()) => {
            println!("keys: done");
            0
        }
        Err(Failure::Args(why)) => {
            println!("keys: FAILED: {why}");
            CANNOT_RUN
        }
        Err(Failure::Channel(why)) => {
            println!("keys: FAILED: {why}");
            1
        }
    }
}

enum Failure {
    Args(&'static str),
    Channel(&'static str),
}

fn run(info: &'static BootInfo) -> Result<(), Failure> {
    let bad = Failure::Args;
    let seed = match info.arg_u64("seed", u64::MAX) {
        Some(u64::MAX) | None => return Err(bad("needs seed=N")),
        Some(seed) => seed,
    };
    let local = info.arg_endpoint("local").ok_or(bad("needs local=NODE:PARTITION:PROCESS"))?;
    let remote = info.arg_endpoint("remote").ok_or(bad("needs remote=NODE:PARTITION:PROCESS"))?;
    let count = info.arg_u64("count", 300).ok_or(bad("bad count"))?;
    let Some(mut ch) = open_channel(info, "keys") else {
        return Err(bad("no secure channel device"));
    };
    let fail = Failure::Channel;

    let mut ids = [0u32; CHANNELS];
    for (i, plan) in PLAN.iter().enumerate() {
        let key = planted_key(seed, i);
        let peer = if plan.remote { remote } else { local };
        ids[i] = ch
            .connect_patiently(info, plan.process, peer, Some(key), 1500)
            .map_err(|_| fail("could not open a channel"))?;
        println!(
            "keys: channel {i} process {} to {}:{}:{} open as {:#x}",
            plan.process, peer.node, peer.partition, peer.process, ids[i]
        );
    }
    for (i, plan) in PLAN.iter().enumerate() {
        exchange(&mut ch, ids[i], plan.process, i as u8, count)?;
    }
    println!("keys: {CHANNELS} channels open, {count} messages echoed on each");

    let signal = ch.listen(SIGNAL_PROCESSES[0], NOBODY).map_err(|_| fail("no signal entry"))?;
    println!("keys: live signal={signal:#x}");
    wait_for_revocation(&mut ch, signal)?;

    for (i, plan) in PLAN.iter().enumerate().filter(|(_, p)| p.fate == Fate::Close) {
        ch.close(plan.process, ids[i]).map_err(|_| fail("close refused"))?;
    }
    let signal = ch.listen(SIGNAL_PROCESSES[1], NOBODY).map_err(|_| fail("no signal entry"))?;
    println!("keys: closed signal={signal:#x}");
    wait_for_revocation(&mut ch, signal)?;

    // Revocations and the lost link took the others; the kept one works as before.
    for (i, plan) in PLAN.iter().enumerate().filter(|(_, p)| p.fate == Fate::Keep) {
        exchange(&mut ch, ids[i], plan.process, i as u8, 1)?;
        println!("keys: channel {i} still works");
    }
    let mut entries = [ChannelInfo::default(); 16];
    let n = ch.list(&mut entries).map_err(|_| fail("LIST refused"))?;
    for e in &entries[..n.min(entries.len())] {
        println!(
            "keys: LIST channel {:#x} process {} state {} remote {}:{}:{}",
            e.channel, e.process, e.state, e.remote.node, e.remote.partition, e.remote.process
        );
    }
    Ok(())
}

/// Derives channel `i`'s key into [`KEYS`] and returns it there.
fn planted_key(seed: u64, i: usize) -> &'static [u8; 32] {
    let channel_seed = seed ^ ((i as u64 + 1) << 32);
    let keys = addr_of_mut!(KEYS).cast::<[u8; 32]>();
    for j in 0..32 {
        // SAFETY: single-threaded firmware; `i < CHANNELS` and `j < 32` stay inside KEYS.
        // Volatile, so the copy the control case looks for is really written.
        unsafe { addr_of_mut!((*keys.add(i))[j]).write_volatile(key_byte(channel_seed, j)) };
    }
    // SAFETY: KEYS lives for the whole program and is written only above, before this shared
    // borrow is made (each key once).
    unsafe { &*addr_of!(KEYS).cast::<[u8; 32]>().add(i) }
}

/// Message `n` of channel `tag`: both stamped in, the rest a pattern.
fn message(tag: u8, n: u64) -> [u8; SIZE] {
    let mut msg = [0u8; SIZE];
    for (j, byte) in msg.iter_mut().enumerate() {
        *byte = (j as u8).wrapping_mul(13).wrapping_add(tag);
    }
    msg[0] = tag;
    msg[1..9].copy_from_slice(&n.to_le_bytes());
    msg
}

/// Sends `count` messages on `channel`, in batches, and checks that each comes back intact,
/// in order, on the same channel.
fn exchange(
    ch: &mut SecureChannel,
    channel: u32,
    process: u32,
    tag: u8,
    count: u64,
) -> Result<(), Failure> {
    let fail = Failure::Channel;
    let mut back = [0u8; SIZE];
    let mut sent = 0u64;
    while sent < count {
        let n = BATCH.min(count - sent);
        for i in sent..sent + n {
            ch.post_send(channel, process, &message(tag, i)).map_err(|_| fail("send refused"))?;
        }
        ch.flush();
        let (mut reaped, mut echoed) = (0, 0);
        let mut backoff = Backoff::new();
        while reaped < n || echoed < n {
            let mut progress = false;
            if reaped < n {
                match ch.reap_send() {
                    Ok(Some(status::OK)) => (reaped, progress) = (reaped + 1, true),
                    Ok(Some(_)) => return Err(fail("the device refused a message")),
                    Ok(None) => {}
                    Err(_) => return Err(fail("transmit queue failed")),
                }
            }
            if let Some(msg) = ch.recv(&mut back).map_err(|_| fail("receive queue failed"))? {
                let intact = msg.copied == SIZE && back == message(tag, sent + echoed);
                if !intact || msg.header.channel != channel {
                    return Err(fail("an echo did not match what was sent"));
                }
                (echoed, progress) = (echoed + 1, true);
            }
            if progress {
                backoff.reset();
            } else {
                backoff.snooze();
            }
        }
        sent += n;
    }
    Ok(())
}

/// Waits until the signal entry `signal` is gone from LIST (the test revoked it), parking the
/// vCPU between looks.
fn wait_for_revocation(ch: &mut SecureChannel, signal: u32) -> Result<(), Failure> {
    let mut entries = [ChannelInfo::default(); 16];
    loop {
        let n = ch.list(&mut entries).map_err(|_| Failure::Channel("LIST refused"))?;
        if !entries[..n.min(entries.len())].iter().any(|e| e.channel == signal) {
            return Ok(());
        }
        // Nothing of ours is in flight, so this parks the whole 10 ms: a hundred looks a
        // second, each one control request.
        idle(10_000);
    }
}

guest_agent::entry!(main);
