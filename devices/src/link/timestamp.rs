//! Handshake timestamps: TAI64N, as WireGuard's initiation messages carry them, so that a
//! responder can refuse a handshake message it has seen before.
//!
//! 12 bytes, big-endian: seconds as TAI64 (2^62 + 10 + seconds since the Unix epoch), then
//! nanoseconds. Byte order makes a plain byte comparison a time comparison. This node's own
//! timestamps strictly increase even if the clock steps back while it runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::lock;

/// A TAI64N timestamp.
pub type Tai64n = [u8; 12];

const TAI64_BASE: u64 = (1 << 62) + 10;

static LAST: Mutex<Tai64n> = Mutex::new([0; 12]);

/// Encodes a time given as seconds and nanoseconds since the Unix epoch.
pub fn encode(secs: u64, nanos: u32) -> Tai64n {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&TAI64_BASE.saturating_add(secs).to_be_bytes());
    out[8..].copy_from_slice(&nanos.to_be_bytes());
    out
}

/// Now, strictly after every timestamp this process made before.
pub fn now() -> Tai64n {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut stamp = encode(since.as_secs(), since.subsec_nanos());
    let mut last = lock(&LAST);
    if stamp <= *last {
        stamp = successor(&last);
    }
    *last = stamp;
    stamp
}

/// The timestamp one nanosecond after `t`.
fn successor(t: &Tai64n) -> Tai64n {
    let secs = u64::from_be_bytes(t[..8].try_into().unwrap_or([0; 8]));
    let nanos = u32::from_be_bytes(t[8..].try_into().unwrap_or([0; 4]));
    if nanos >= 999_999_999 {
        encode_raw(secs + 1, 0)
    } else {
        encode_raw(secs, nanos + 1)
    }
}

fn encode_raw(tai_secs: u64, nanos: u32) -> Tai64n {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&tai_secs.to_be_bytes());
    out[8..].copy_from_slice(&nanos.to_be_bytes());
    out
}

/// The greatest handshake timestamp accepted from each peer: a handshake message that does not
/// carry a greater one is a replay.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    greatest: Mutex<HashMap<u32, Tai64n>>,
}

impl ReplayGuard {
    /// Accepts `stamp` from `peer` if it is greater than any before (and remembers it).
    pub fn accept(&self, peer: u32, stamp: &Tai64n) -> bool {
        let mut greatest = lock(&self.greatest);
        match greatest.get(&peer) {
            Some(seen) if stamp <= seen => false,
            _ => {
                greatest.insert(peer, *stamp);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_increase_and_replays_are_refused() {
        let a = now();
        let b = now();
        assert!(b > a);
        assert_eq!(encode(0, 0)[..8], TAI64_BASE.to_be_bytes());
        assert_eq!(successor(&encode(5, 999_999_999)), encode(6, 0));
        let guard = ReplayGuard::default();
        assert!(guard.accept(2, &a));
        assert!(!guard.accept(2, &a), "the same one again");
        assert!(guard.accept(3, &a), "another peer's are its own");
        assert!(guard.accept(2, &b));
        assert!(!guard.accept(2, &a), "an older one");
    }
}
