//! The key the `snoop` fixture opens its channel with, derived from a seed so that the fixture
//! never has to hold the whole key and the host test can search RAM dumps for it. Shared, as
//! source, by the fixture and by the host-side tests (through `firmware_fixtures::snoop_key`).

/// Byte `i` of the key for `seed`: xorshift64* output, recomputed on demand.
pub fn key_byte(seed: u64, i: usize) -> u8 {
    let mut x = seed | 1;
    let mut out = 0u64;
    for _ in 0..=i / 8 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    (out >> (8 * (i % 8))) as u8
}
