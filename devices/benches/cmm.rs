//! The CMM at scale, without guests: channel set-ups per second on one node and across two
//! nodes linked over loopback TCP (offers batched in records, as a device's control batch sends
//! them), and the memory each channel costs, ordinary and secret, at a million channels.
//!
//! `cargo bench -p keyhold-devices --bench cmm [-- LOCAL_CHANNELS REMOTE_CHANNELS]`
//! (defaults: 1,000,000 and 100,000); `scripts/bench-cmm.sh` runs it.

use std::time::{Duration, Instant};

use guest_agent::channel::abi::Endpoint;
use keyhold_devices::cmm::audit::Audit;
use keyhold_devices::cmm::{Cmm, CmmConfig, Deliver, Delivered, Limits, Opening};
use keyhold_devices::link::loopback::linked;
use keyhold_devices::link::{Router, RouterConfig};

/// Resident memory now: (anonymous, shared) KiB; secret memory counts as shared.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssShmem:") + field("RssFile:"))
}

fn config(capacity: usize) -> CmmConfig {
    CmmConfig {
        capacity,
        limits: Limits { max_message: 64 * 1024, max_channels: u32::MAX },
        ..CmmConfig::default()
    }
}

fn ep(node: u32, partition: u32, process: u32) -> Endpoint {
    Endpoint { node, partition, process }
}

struct Nowhere;

impl Deliver for Nowhere {
    fn deliver(
        &mut self,
        _: u32,
        _: &guest_agent::channel::abi::RxHeader,
        _: &[u8],
        _: bool,
    ) -> Delivered {
        Delivered::Written
    }
}

/// `channels` entries on one node: half listening, half opening to them.
fn one_node(channels: usize) {
    let pairs = channels / 2;
    let (anon, shared) = rss();
    let audit = Audit::to_log(1).expect("audit writer");
    let mut cmm = Cmm::new(1, config(channels), audit, Router::unlinked()).expect("key table");
    let start = Instant::now();
    for i in 0..pairs as u32 {
        cmm.listen(1, i, ep(1, 2, i)).expect("listen");
    }
    let listened = start.elapsed();
    let start = Instant::now();
    for i in 0..pairs as u32 {
        match cmm.open(2, i, ep(1, 1, i), None) {
            Ok(Opening::Done(_)) => {}
            other => panic!("open {i}: {other:?}"),
        }
    }
    let opened = start.elapsed();
    let (anon2, shared2) = rss();
    let per = |kib: u64| kib as f64 * 1024.0 / cmm.channel_count() as f64;
    println!(
        "one node: {} channels ({pairs} LISTEN + {pairs} OPEN): {:.0} set-ups/s (OPEN to open, each verified and keyed), LISTEN {:.0}/s",
        cmm.channel_count(),
        pairs as f64 / opened.as_secs_f64(),
        pairs as f64 / listened.as_secs_f64()
    );
    println!(
        "          memory per channel: {:.0} B ordinary, {:.0} B secret (its key slot)",
        per(anon2.saturating_sub(anon)),
        per(shared2.saturating_sub(shared))
    );
}

/// `channels` set-ups from node 1 to listeners on node 2, over a real link.
fn two_nodes(channels: usize) {
    let (a, b) = linked(RouterConfig::default()).expect("a loopback link");
    let (a_token, b_token) = (a.token, b.token);
    let mut one = Cmm::new(1, config(channels), a.audit, a.router).expect("key table");
    let mut two = Cmm::new(2, config(channels), b.audit, b.router).expect("key table");
    for i in 0..channels as u32 {
        two.listen(1, i, ep(1, 1, i)).expect("listen");
    }
    let (anon, shared) = rss();
    let start = Instant::now();
    let mut answered = 0;
    let batch = 64;
    let mut next = 0u32;
    let deadline = Instant::now() + Duration::from_secs(300);
    while answered < channels && Instant::now() < deadline {
        // A batch of OPENs, as a guest's control queue would bring them.
        while next < channels as u32 && next as usize - answered < 4 * batch {
            for _ in 0..batch.min(channels - next as usize) {
                match one.open(1, next, ep(2, 1, next), None) {
                    Ok(Opening::Pending(_)) => {}
                    other => panic!("open {next}: {other:?}"),
                }
                next += 1;
            }
            one.flush();
        }
        two.link_readable(b_token, &mut Nowhere);
        one.link_readable(a_token, &mut Nowhere);
        for (_, result) in one.take_answers() {
            assert!(result.is_ok(), "an offer was refused: {result:?}");
            answered += 1;
        }
    }
    let took = start.elapsed();
    let (anon2, shared2) = rss();
    let per = |kib: u64| kib as f64 * 1024.0 / (2 * channels) as f64;
    println!(
        "two nodes: {answered} channels across a link: {:.0} set-ups/s (OPEN to the remote CMM's answer; offers batched {batch} to a record)",
        answered as f64 / took.as_secs_f64()
    );
    println!(
        "           memory per channel end: {:.0} B ordinary, {:.0} B secret (both directions' ratchet and AES-GCM state)",
        per(anon2.saturating_sub(anon)),
        per(shared2.saturating_sub(shared))
    );
}

fn main() {
    let args: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let local = args.first().copied().unwrap_or(1_000_000);
    let remote = args.get(1).copied().unwrap_or(100_000);
    one_node(local);
    two_nodes(remote);
}
