//! The channel cipher at work: AES-256-GCM sealing and opening 64 KiB messages in place, with
//! its key state in secret memory as the key table keeps it. Prints GB/s;
//! `scripts/bench-aead.sh` prints OpenSSL's figure measured in the same run beside it.
//!
//! `cargo bench -p keyhold-devices --bench aead [-- SIZE SECONDS]`

use std::time::{Duration, Instant};

use guest_agent::channel::abi::Endpoint;
use keyhold_devices::crypto::channel::{associated_data, ChannelCiphers};
use keyhold_devices::secret::SecretBox;

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let size: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(65_536);
    let secs: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3.0);
    let (a, b) = (
        Endpoint { node: 1, partition: 1, process: 1 },
        Endpoint { node: 2, partition: 1, process: 1 },
    );
    let sender = SecretBox::new_with(|s| ChannelCiphers::init(s, &[7; 32], &[1; 16], &a, &b))
        .expect("secret memory");
    let receiver = SecretBox::new_with(|s| ChannelCiphers::init(s, &[7; 32], &[1; 16], &b, &a))
        .expect("secret memory");
    let mut buf = vec![0x5au8; size];
    let rate = |bytes: usize, took: Duration| bytes as f64 / took.as_secs_f64() / 1e9;

    let (mut seq, start) = (0u64, Instant::now());
    while start.elapsed().as_secs_f64() < secs {
        let tag = sender.tx.seal(&associated_data(&a, &b, 0, seq), seq, &mut buf);
        std::hint::black_box(tag);
        seq += 1;
    }
    let seal = rate(seq as usize * size, start.elapsed());

    let mut sealed = vec![0x5au8; size];
    let tag = sender.tx.seal(&associated_data(&a, &b, 0, 0), 0, &mut sealed).expect("sealed");
    let (mut n, start) = (0usize, Instant::now());
    while start.elapsed().as_secs_f64() < secs {
        buf.copy_from_slice(&sealed);
        assert!(receiver.rx.open(&associated_data(&a, &b, 0, 0), 0, &mut buf, &tag));
        n += 1;
    }
    let open = rate(n * size, start.elapsed());
    println!("keyhold AES-256-GCM ({size}-byte messages, one core): seal {seal:.2} GB/s, open {open:.2} GB/s (open includes a copy)");
}
