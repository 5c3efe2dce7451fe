//! What a connection may cost before it is authenticated.
//!
//! Anyone who can reach the link port can open connections, so everything before the
//! handshake is bounded (docs/PROTOCOL.md, "Work before authentication"):
//! - connections not yet authenticated: at most [`Limits::pending`] in all (a new one then
//!   evicts the oldest, so a flood of idle connections cannot lock peers out) and at most
//!   [`Limits::pending_per_address`] from one address (more are closed at once);
//! - Diffie-Hellman work (answering a first handshake message): a token bucket per source
//!   address and one for all, checked before any of it is done.
//!
//! A legitimate peer's handshake arrives whole in its first packet and is answered at once,
//! so it gets through while thousands of idle or dribbling connections are held and evicted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::token_bucket::TokenBucket;

/// The bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Unauthenticated connections at once, in all.
    pub pending: usize,
    /// Unauthenticated connections at once from one address.
    pub pending_per_address: usize,
    /// Handshakes answered per second, per source address (with a burst of twice that).
    pub handshakes_per_address: f64,
    /// Handshakes answered per second, in all (with a burst of twice that).
    pub handshakes: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pending: 256,
            pending_per_address: 8,
            handshakes_per_address: 20.0,
            handshakes: 500.0,
        }
    }
}

/// Source addresses tracked at most; past this, new addresses share one bucket.
const MAX_ADDRESSES: usize = 4096;

#[derive(Debug)]
struct Source {
    pending: usize,
    bucket: TokenBucket,
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Keep it.
    Yes,
    /// Keep it, and close the oldest unauthenticated connection to make room.
    EvictOldest,
    /// Close it now: its address has too many unauthenticated connections.
    TooManyFromAddress,
}

/// The counts and buckets.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    sources: HashMap<IpAddr, Source>,
    overflow: TokenBucket,
    global: TokenBucket,
    pending: usize,
}

impl Admission {
    /// Fresh counts under `limits`.
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            sources: HashMap::new(),
            overflow: per_address(limits, now),
            global: TokenBucket::new(limits.handshakes, 2.0 * limits.handshakes, now),
            pending: 0,
        }
    }

    /// A connection from `ip` was accepted; on [`Admit::Yes`] or [`Admit::EvictOldest`] it
    /// counts as pending until [`Admission::done`].
    pub fn connection(&mut self, ip: IpAddr, now: Instant) -> Admit {
        self.forget_idle(now);
        let tracked = self.sources.len() < MAX_ADDRESSES || self.sources.contains_key(&ip);
        if tracked {
            let limits = self.limits;
            let source = self
                .sources
                .entry(ip)
                .or_insert_with(|| Source { pending: 0, bucket: per_address(limits, now) });
            if source.pending >= self.limits.pending_per_address {
                return Admit::TooManyFromAddress;
            }
            source.pending += 1;
        }
        self.pending += 1;
        if self.pending > self.limits.pending {
            Admit::EvictOldest
        } else {
            Admit::Yes
        }
    }

    /// A pending connection from `ip` was authenticated or closed.
    pub fn done(&mut self, ip: IpAddr) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(source) = self.sources.get_mut(&ip) {
            source.pending = source.pending.saturating_sub(1);
        }
    }

    /// Whether a handshake from `ip` may be answered now (takes a token from its bucket and
    /// the global one).
    pub fn handshake(&mut self, ip: IpAddr, now: Instant) -> bool {
        let bucket = match self.sources.get_mut(&ip) {
            Some(source) => &mut source.bucket,
            None => &mut self.overflow,
        };
        bucket.take(now) && self.global.take(now)
    }

    /// Unauthenticated connections held.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Drops the state of addresses with nothing pending and a full bucket: they would start
    /// from the same place if they came back.
    fn forget_idle(&mut self, now: Instant) {
        if self.sources.len() < MAX_ADDRESSES / 2 {
            return;
        }
        self.sources.retain(|_, s| s.pending > 0 || !s.bucket.is_full(now));
    }
}

/// The handshake bucket of one source address: the rate, with a burst of twice that.
fn per_address(limits: Limits, now: Instant) -> TokenBucket {
    TokenBucket::new(limits.handshakes_per_address, 2.0 * limits.handshakes_per_address, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn caps_hold_per_address_and_overall() {
        let now = Instant::now();
        let limits = Limits { pending: 10, pending_per_address: 3, ..Limits::default() };
        let mut a = Admission::new(limits, now);
        for _ in 0..3 {
            assert_eq!(a.connection(ip(2), now), Admit::Yes);
        }
        assert_eq!(a.connection(ip(2), now), Admit::TooManyFromAddress);
        a.done(ip(2));
        assert_eq!(a.connection(ip(2), now), Admit::Yes, "room again after one finished");
        for last in 3..=9 {
            assert_eq!(a.connection(ip(last), now), Admit::Yes);
        }
        assert_eq!(a.pending(), 10);
        assert_eq!(a.connection(ip(10), now), Admit::EvictOldest);
    }

    #[test]
    fn handshakes_are_rate_limited_per_address_and_refill() {
        let now = Instant::now();
        let limits =
            Limits { handshakes_per_address: 5.0, handshakes: 1000.0, ..Limits::default() };
        let mut a = Admission::new(limits, now);
        a.connection(ip(2), now);
        let allowed = (0..100).filter(|_| a.handshake(ip(2), now)).count();
        assert_eq!(allowed, 10, "the burst is twice the rate");
        assert!(a.handshake(ip(3), now), "another address has its own bucket");
        assert!(a.handshake(ip(2), now + Duration::from_secs(1)), "refilled");
    }

    #[test]
    fn the_global_bucket_bounds_many_addresses() {
        let now = Instant::now();
        let limits =
            Limits { handshakes_per_address: 100.0, handshakes: 10.0, ..Limits::default() };
        let mut a = Admission::new(limits, now);
        let allowed = (0..200u8).filter(|&i| a.handshake(ip(i), now)).count();
        assert_eq!(allowed, 20);
    }
}
