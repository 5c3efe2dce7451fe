//! Rate limits on audit records, per source: a guest that retries a refused request in a
//! loop, or a peer that sends refused offers by the hundred thousand, gets its first records
//! written and the rest counted, then one `audit_suppressed` record with the count.
//!
//! A record's source is what caused it: the connecting address for anything before a link is
//! authenticated (the only thing known of the other end then), else the peer node, else the
//! partition of this node that asked. Records the node makes on its own (an operator's
//! revocation) are not limited. Memory is bounded: past [`MAX_SOURCES`] sources, new ones
//! share one bucket, and records with an address also share one bucket for all addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use guest_agent::channel::abi::Endpoint;

use super::entry::Entry;
use super::Record;
use crate::token_bucket::TokenBucket;

/// Sources tracked at most.
pub(super) const MAX_SOURCES: usize = 1024;

/// What caused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    /// A partition of this node.
    Partition(u32),
    /// An authenticated peer node.
    Peer(u32),
    /// An address that has not authenticated.
    Address(IpAddr),
    /// Every source past [`MAX_SOURCES`].
    Others,
}

impl Source {
    /// The source of `record` made on `node`; `None` for the node's own records.
    pub(super) fn of(node: u32, record: &Record<'_>) -> Option<Self> {
        if record.by_node {
            return None;
        }
        if let Some(address) = record.address {
            return Some(Self::Address(address.ip()));
        }
        if let Some(peer) = record.peer {
            return Some(Self::Peer(peer));
        }
        match record.source {
            Some(source) if source.node == node => Some(Self::Partition(source.partition)),
            _ => None,
        }
    }
}

/// How many records a source may cause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Records a second, steadily.
    pub per_second: f64,
    /// Records at once after a quiet spell.
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self { per_second: 10.0, burst: 50.0 }
    }
}

#[derive(Debug)]
struct Budget {
    bucket: TokenBucket,
    suppressed: u64,
}

/// The buckets.
#[derive(Debug)]
pub(super) struct Limiter {
    limit: RateLimit,
    sources: HashMap<Source, Budget>,
    /// Shared by every record that carries an address (before authentication anyone can use
    /// many addresses).
    addresses: TokenBucket,
}

/// Records suppressed from one source since the last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Suppressed {
    pub(super) source: Source,
    pub(super) count: u64,
}

impl Limiter {
    pub(super) fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            sources: HashMap::new(),
            addresses: TokenBucket::new(limit.per_second, limit.burst, now),
        }
    }

    /// Whether a record from `source` may be written now (if not, it is counted).
    pub(super) fn admit(&mut self, source: Source, now: Instant) -> bool {
        let key = if self.sources.len() < MAX_SOURCES || self.sources.contains_key(&source) {
            source
        } else {
            Source::Others
        };
        let limit = self.limit;
        let budget = self.sources.entry(key).or_insert_with(|| Budget {
            bucket: TokenBucket::new(limit.per_second, limit.burst, now),
            suppressed: 0,
        });
        let shared_ok = !matches!(source, Source::Address(_)) || self.addresses.take(now);
        if shared_ok && budget.bucket.take(now) {
            return true;
        }
        budget.suppressed += 1;
        false
    }

    /// The counts of suppressed records since the last call; sources that have been quiet
    /// long enough to have a full bucket again are forgotten.
    pub(super) fn take_suppressed(&mut self, now: Instant) -> Vec<Suppressed> {
        let mut report = Vec::new();
        self.sources.retain(|&source, budget| {
            if budget.suppressed > 0 {
                report.push(Suppressed { source, count: budget.suppressed });
                budget.suppressed = 0;
                return true;
            }
            !budget.bucket.is_full(now)
        });
        report
    }
}

impl Suppressed {
    /// The record that reports it, on node `node`.
    pub(super) fn entry(&self, node: u32) -> Entry {
        let mut entry = Entry::now(&Record {
            count: Some(self.count),
            ..Record::link("audit_suppressed", "rate_limit", None)
        });
        match self.source {
            Source::Partition(partition) => {
                entry.source = Some(Endpoint { node, partition, process: 0 })
            }
            Source::Peer(peer) => entry.peer = Some(peer),
            Source::Address(ip) => entry.address = Some(std::net::SocketAddr::new(ip, 0)),
            Source::Others => {}
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_source_has_its_own_budget_and_suppressions_are_counted() {
        let now = Instant::now();
        let mut l = Limiter::new(RateLimit { per_second: 1.0, burst: 3.0 }, now);
        let admitted = (0..10).filter(|_| l.admit(Source::Partition(1), now)).count();
        assert_eq!(admitted, 3);
        assert!(l.admit(Source::Peer(2), now), "another source is not held back");
        let report = l.take_suppressed(now);
        assert_eq!(report, [Suppressed { source: Source::Partition(1), count: 7 }]);
        assert!(l.take_suppressed(now).is_empty(), "reported once");
        assert!(l.admit(Source::Partition(1), now + Duration::from_secs(1)), "refilled");
    }

    #[test]
    fn many_addresses_share_one_budget_and_sources_stay_bounded() {
        let now = Instant::now();
        let mut l = Limiter::new(RateLimit { per_second: 1.0, burst: 5.0 }, now);
        let admitted = (0..2000u32)
            .filter(|i| l.admit(Source::Address(IpAddr::from(i.to_be_bytes())), now))
            .count();
        assert_eq!(admitted, 5);
        assert!(l.sources.len() <= MAX_SOURCES + 1);
        let suppressed: u64 = l.take_suppressed(now).iter().map(|s| s.count).sum();
        assert_eq!(suppressed, 1995);
    }
}
