//! A keyhold guest program to start from: opens a channel to the endpoint given as
//! `peer=NODE:PARTITION:PROCESS` (the `echo` fixture, for example), sends a greeting, waits
//! for the answer, and says goodbye with an empty message (which is how `echo` learns a peer
//! is done).
//!
//! ```sh
//! keyhold run --partition 1=target/fixtures/echo.elf --arg 1=peer=0:2:1 \
//!     --partition 2=examples/guest-template/target/x86_64-unknown-linux-gnu/release/guest-template \
//!     --arg 2=peer=0:1:1
//! ```
#![no_std]
#![no_main]

use guest_agent::channel::abi::Endpoint;
use guest_agent::channel::SecureChannel;
use guest_agent::{println, BootInfo};

/// This program's process ID on its partition (the channel's local endpoint).
const PROCESS: u32 = 1;
/// How often to try while the peer is not listening yet, 10 ms apart.
const ATTEMPTS: u32 = 500;

fn main(info: &'static BootInfo) -> u32 {
    let Some(peer) = info.arg("peer").and_then(Endpoint::parse) else {
        println!("template: needs peer=NODE:PARTITION:PROCESS");
        return 2;
    };
    let Ok(mut channel) = SecureChannel::open(info) else {
        println!("template: no secure-channel device");
        return 3;
    };
    // Partitions start together: the peer may not be listening yet, so keep trying.
    let id = match channel.connect_patiently(info, PROCESS, peer, None, ATTEMPTS) {
        Ok(id) => id,
        Err(e) => {
            println!(
                "template: no channel to {}:{}:{}: {e:?}",
                peer.node, peer.partition, peer.process
            );
            return 4;
        }
    };
    if let Err(e) = channel.send(id, PROCESS, b"hello from the template") {
        println!("template: send failed: {e:?}");
        return 5;
    }
    let mut buf = [0u8; 256];
    match channel.recv_wait(&mut buf) {
        Ok(message) => {
            // `source` was stamped by the device and checked by the host: it cannot be forged.
            let from = message.header.source;
            let text = core::str::from_utf8(&buf[..message.copied]).unwrap_or("(not UTF-8)");
            println!(
                "template: {from_node}:{}:{} answered {text:?}",
                from.partition,
                from.process,
                from_node = from.node
            );
        }
        Err(e) => {
            println!("template: receive failed: {e:?}");
            return 6;
        }
    }
    // An empty message is echo's goodbye; then close the channel (its keys are erased).
    let _ = channel.send(id, PROCESS, b"");
    let _ = channel.close(PROCESS, id);
    0
}

guest_agent::entry!(main);
