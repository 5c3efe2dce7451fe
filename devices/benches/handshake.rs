//! Link handshakes per second on one core: a whole Noise IK handshake as keyhold runs it (both
//! sides, secret-memory state, scrubbed stacks), and the responder's share alone, which is what
//! a flood of first messages can make a node spend before the admission limits refuse more.
//!
//! `cargo bench -p keyhold-devices --bench handshake [-- SECONDS]`

use std::time::Instant;

use keyhold_devices::crypto::node_key::NodeKey;
use keyhold_devices::link::handshake::{initiate, respond};
use keyhold_devices::link::timestamp::ReplayGuard;
use keyhold_devices::link::wire::{MSG1_SIZE, VERSION};
use keyhold_devices::link::{Directory, Peer};

fn main() {
    let secs: f64 = std::env::args().filter_map(|a| a.parse().ok()).next().unwrap_or(2.0);
    let (k1, k2) = (NodeKey::generate().expect("key"), NodeKey::generate().expect("key"));
    let address = "127.0.0.1:1".parse().expect("address");
    let p1 = Peer { id: 1, address, public_key: *k1.public() };
    let p2 = Peer { id: 2, address, public_key: *k2.public() };
    let directory = Directory::new(vec![p1, p2.clone()]);
    let replays = ReplayGuard::default();

    let (mut n, start) = (0u64, Instant::now());
    let mut responder_time = 0.0;
    while start.elapsed().as_secs_f64() < secs {
        let mut msg1 = [0u8; MSG1_SIZE];
        let initiation = initiate(&k1, &p2, 1, VERSION, &mut msg1).expect("initiate");
        let t = Instant::now();
        let response = respond(&k2, &directory, &replays, &msg1, None).expect("respond");
        responder_time += t.elapsed().as_secs_f64();
        initiation.finish(&response.msg2).expect("finish");
        n += 1;
    }
    let whole = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "link handshakes (Noise IK, one core): {whole:.0}/s whole (both sides); the responder's share alone {:.0}/s",
        n as f64 / responder_time
    );
}
