//! 64 KiB copies by how far the target lies past the source modulo a page: `memcpy` (through
//! `copy_from_slice`) next to `keyhold_devices::memcopy::copy`, in the same run. On hosts whose
//! `rep movsb` is slow when the target lies just past the source (AMD EPYC), `memcpy` falls
//! there and the vector loop does not (docs/PERFORMANCE.md, "Copies").
//!
//! `cargo bench -p keyhold-devices --bench memcopy`

use std::hint::black_box;
use std::time::Instant;

use keyhold_devices::memcopy;

const LEN: usize = 64 * 1024;
const PAGE: usize = 4096;
const ROUNDS: u32 = 4000;

/// GB/s of `copy` moving LEN bytes from `src` into `dst` ROUNDS times.
fn rate(dst: &mut [u8], src: &[u8], copy: impl Fn(&mut [u8], &[u8])) -> f64 {
    let start = Instant::now();
    for _ in 0..ROUNDS {
        copy(black_box(&mut *dst), black_box(src));
    }
    f64::from(ROUNDS) * LEN as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    // One page-aligned buffer: the source is its first LEN bytes, the target starts `shift`
    // bytes into the page after them.
    let mut buffer = memcopy::PageAligned::new(2 * LEN + PAGE);
    let (src, rest) = buffer.split_at_mut(LEN);
    println!("64 KiB copies, GB/s, by how far the target lies past the source modulo 4 KiB");
    println!("{:>6} {:>10} {:>10}", "bytes", "memcpy", "memcopy");
    for shift in [0, 8, 16, 24, 32, 64, 2048, 4064] {
        let target = &mut rest[shift..shift + LEN];
        let libc = rate(target, src, |d, s| d.copy_from_slice(s));
        let ours = rate(target, src, memcopy::copy);
        println!("{shift:>6} {libc:>10.1} {ours:>10.1}");
    }
}
