//! Listens for its peers and echoes every message back on the channel it came in on, until each
//! peer has said goodbye with an empty message. Arguments: `peer=N:P:Q[,N:P:Q...]` (required),
//! `process=N` (default 1), `setups=N` to also listen for processes 1000..1000+N of the first
//! peer's partition (the channel set-up benchmark of `ping setups=N`). Each echo is sent from
//! the receive buffer the message arrived in (`recv_reply`: the guest copies nothing). An echo
//! its receiver has no room for yet (NO_ROOM: on this node, or credit from another) is sent
//! again until it goes.
#![no_std]
#![no_main]

use guest_agent::channel::abi::{Endpoint, RxHeader};
use guest_agent::channel::driver::TX_SLOTS;
use guest_agent::channel::Reply;
use guest_agent::idle::Backoff;
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

fn main(info: &'static BootInfo) -> u32 {
    let peers = info.arg("peer").unwrap_or("");
    if peers.is_empty() || peers.split(',').any(|p| Endpoint::parse(p).is_none()) {
        println!("echo: needs peer=NODE:PARTITION:PROCESS[,NODE:PARTITION:PROCESS...]");
        return 2;
    }
    let process = info.arg_u64("process", 1).unwrap_or(1) as u32;
    let Some(mut ch) = open_channel(info, "echo") else { return CANNOT_RUN };
    let mut waiting = 0;
    for peer in peers.split(',').filter_map(Endpoint::parse) {
        if let Err(e) = ch.listen(process, peer) {
            println!("echo: listen failed: {e:?}");
            return 2;
        }
        println!(
            "echo: process {process} listening for {}:{}:{}",
            peer.node, peer.partition, peer.process
        );
        waiting += 1;
    }
    let setups = info.arg_u64("setups", 0).unwrap_or(0) as u32;
    if let Some(first) = peers.split(',').find_map(Endpoint::parse) {
        for process in 1000..1000 + setups {
            if let Err(e) = ch.listen(1, Endpoint { process, ..first }) {
                println!("echo: listen for set-up {process} failed: {e:?}");
                return 2;
            }
        }
    }
    let mut echoed: u64 = 0;
    // Only a message or a send's verdict ends its waits: it parks until one comes.
    let mut backoff = Backoff::patient();
    loop {
        let mut posted = 0;
        let mut bye = false;
        while posted < TX_SLOTS && !bye {
            // The payload goes back out from where it arrived; an empty one is a goodbye.
            let echo = |header: RxHeader, payload: &mut [u8]| {
                bye = payload.is_empty();
                let len = payload.len();
                (!bye).then_some(Reply { channel: header.channel, process: header.process, len })
            };
            match ch.recv_reply(echo) {
                Ok(Some(_)) if bye => {}
                Ok(Some(_)) => {
                    backoff.reset();
                    posted += 1;
                }
                Ok(None) if posted > 0 => break,
                Ok(None) => backoff.snooze(),
                Err(e) => {
                    println!("echo: receive or send failed: {e:?}");
                    return 1;
                }
            }
        }
        ch.flush();
        while posted > 0 {
            match ch.reap_send_retrying() {
                Ok(Some(0)) => {
                    posted -= 1;
                    echoed += 1;
                }
                Ok(Some(status)) => {
                    println!("echo: the device refused an echo with status {status}");
                    return 1;
                }
                Ok(None) => backoff.snooze(),
                Err(e) => {
                    println!("echo: {e:?}");
                    return 1;
                }
            }
        }
        if bye {
            waiting -= 1;
            if waiting == 0 {
                break;
            }
        }
    }
    println!("echo: echoed {echoed} messages; goodbye");
    0
}

guest_agent::entry!(main);
