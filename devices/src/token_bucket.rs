//! A token bucket: what rate limits everything an outsider can make the node do over and
//! over (handshakes, audit records, entropy), with a burst on top of a steady rate.

use std::time::{Duration, Instant};

/// `rate` tokens a second, holding at most `burst`; starts full.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` must be positive; `burst` at least 1.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self { rate: rate.max(f64::MIN_POSITIVE), burst, tokens: burst, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_up_to(1, now) == 1
    }

    /// Takes as many whole tokens as there are, up to `wanted`; returns how many.
    pub fn take_up_to(&mut self, wanted: u64, now: Instant) -> u64 {
        self.refill(now);
        let taken = (self.tokens.floor() as u64).min(wanted);
        self.tokens -= taken as f64;
        taken
    }

    /// Whether the bucket is (or has refilled to) full: a bucket in that state can be
    /// forgotten and made anew without giving anything away.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// How long until `wanted` tokens (at most a burst) are there.
    pub fn time_until(&self, wanted: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let have = (self.tokens + elapsed * self.rate).min(self.burst);
        let missing = (wanted as f64).min(self.burst) - have;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let now = Instant::now();
        let mut b = TokenBucket::new(10.0, 20.0, now);
        assert_eq!((0..100).filter(|_| b.take(now)).count(), 20);
        assert!(!b.take(now));
        assert_eq!(b.time_until(5, now), Duration::from_millis(500));
        let later = now + Duration::from_millis(500);
        assert_eq!(b.take_up_to(100, later), 5);
        assert!(!b.is_full(later));
        assert!(b.is_full(later + Duration::from_secs(2)));
        assert_eq!(b.take_up_to(100, later + Duration::from_secs(60)), 20, "never above the burst");
    }
}
