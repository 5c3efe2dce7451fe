//! A channel's life as its peer sees it end. Arguments: `peer=N:P:Q` and `role=`:
//! - `watch`: listens for the peer, waits until the channel is keyed, then until it is closed,
//!   and prints why (`lifecycle: closed: REASON`); exits 0 if the reason is `expect=REASON`
//!   (a name from the control API's `closed` field, default `partition_stopped`).
//! - `leave`: opens the channel, then stops: `how=exit` (status 0, the default) or `how=crash`
//!   (an access no page table maps: a triple fault).
//! - `listen`: listens for processes 1 to `count=N` (default 60) of the peer's partition,
//!   then idles until the node stops it.
//! - `open`: opens a channel from process 1, 2, 3, ... to the peer's partition (the process of
//!   the same number there), closing each, until an OPEN fails with TIMED_OUT
//!   (`lifecycle: open: timed_out`, exit 0); any other failure exits 1.
#![no_std]
#![no_main]

use guest_agent::channel::abi::{closed, state, status, ChannelInfo, Endpoint};
use guest_agent::channel::driver::ChannelError;
use guest_agent::channel::SecureChannel;
use guest_agent::idle::Backoff;
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

/// 512 GiB: beyond the identity map.
const UNMAPPED: usize = 0x80_0000_0000;

fn main(info: &'static BootInfo) -> u32 {
    let Some(peer) = info.arg_endpoint("peer") else {
        println!("lifecycle: needs peer=NODE:PARTITION:PROCESS");
        return CANNOT_RUN;
    };
    let Some(mut ch) = open_channel(info, "lifecycle") else { return CANNOT_RUN };
    match info.arg("role") {
        Some("watch") => watch(&mut ch, peer, info.arg("expect").unwrap_or("partition_stopped")),
        Some("leave") => leave(&mut ch, info, peer, info.arg("how").unwrap_or("exit")),
        Some("open") => open_until_timeout(&mut ch, info, peer),
        Some("listen") => listen(&mut ch, peer, info.arg_u64("count", 60).unwrap_or(60)),
        _ => {
            println!("lifecycle: needs role=watch|leave|open|listen");
            CANNOT_RUN
        }
    }
}

fn watch(ch: &mut SecureChannel, peer: Endpoint, expect: &str) -> u32 {
    let Ok(channel) = ch.listen(1, peer) else { return CANNOT_RUN };
    println!("lifecycle: listening");
    let mut keyed = false;
    let mut backoff = Backoff::new();
    loop {
        let mut entries = [ChannelInfo::default(); 4];
        let Ok(count) = ch.list(&mut entries) else { return 1 };
        let Some(entry) = entries[..count.min(4)].iter().find(|e| e.channel == channel) else {
            println!("lifecycle: the channel vanished");
            return 1;
        };
        if entry.state == state::OPEN && !keyed {
            keyed = true;
            println!("lifecycle: open");
        }
        if entry.state == state::PEER_CLOSED {
            let reason = closed::name(entry.closed);
            println!("lifecycle: closed: {reason}");
            return u32::from(reason != expect);
        }
        backoff.snooze();
    }
}

fn leave(ch: &mut SecureChannel, info: &BootInfo, peer: Endpoint, how: &str) -> u32 {
    if let Err(e) = ch.connect_patiently(info, 1, peer, None, 1000) {
        println!("lifecycle: open failed: {e:?}");
        return 1;
    }
    println!("lifecycle: open; leaving ({how})");
    if how == "crash" {
        // SAFETY: none; faulting is the point.
        let v = unsafe { (UNMAPPED as *const u64).read_volatile() };
        println!("lifecycle: read {v:#x}: the fault did not happen");
        return 1;
    }
    0
}

fn listen(ch: &mut SecureChannel, peer: Endpoint, count: u64) -> u32 {
    for process in 1..=count as u32 {
        if ch.listen(process, Endpoint { process, ..peer }).is_err() {
            println!("lifecycle: listen {process} failed");
            return 1;
        }
    }
    println!("lifecycle: listening for {count} processes");
    let mut backoff = Backoff::new();
    loop {
        backoff.snooze();
    }
}

fn open_until_timeout(ch: &mut SecureChannel, info: &BootInfo, peer: Endpoint) -> u32 {
    let mut process = 1;
    loop {
        match ch.connect(process, Endpoint { process, ..peer }, None) {
            Ok(channel) => {
                if process == 1 {
                    println!("lifecycle: open answered; waiting for one that is not");
                }
                if ch.close(process, channel).is_err() {
                    return 1;
                }
                process += 1;
            }
            Err(ChannelError::Status(status::TIMED_OUT)) => {
                println!("lifecycle: open: timed_out (after {} answered)", process - 1);
                return 0;
            }
            Err(ChannelError::Status(status::NO_LISTENER | status::UNREACHABLE)) => {}
            Err(e) => {
                println!("lifecycle: open failed: {e:?}");
                return 1;
            }
        }
        guest_agent::time::spin_for(info, 20_000);
    }
}

guest_agent::entry!(main);
