//! The audit log: every security decision as one JSON line, never with a key in it.
//!
//! Deciding threads hand records to [`Audit::record`], which costs a lock and a queue push:
//! the writer thread ([`writer`]) formats them and appends them to the file, rotating it by
//! size. Records are rate limited per source ([`limiter`]), so that no guest or peer can
//! flood the log or the disk; what was held back is reported as a count. The control API
//! reads the most recent records ([`recent`]), where refusals cannot push out link events.

mod entry;
mod limiter;
mod recent;
mod writer;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_agent::channel::abi::Endpoint;

use entry::Entry;
pub use limiter::RateLimit;
use limiter::{Limiter, Source};
use recent::Recent;
pub use recent::RECENT;
pub use writer::{AuditFile, DEFAULT_KEEP, DEFAULT_MAX_BYTES};
use writer::{Message, Writer};

/// Records waiting for the writer at most; past this they are counted and dropped.
pub const QUEUE: usize = 8192;

/// How the audit log is written and bounded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditConfig {
    /// The file, or `None` for the process log (at info level, target `audit`).
    pub file: Option<AuditFile>,
    /// How many records one source may cause.
    pub limit: RateLimit,
}

/// Where audit records go. Clones share the writer, so the CMM and the host links write one
/// log.
#[derive(Clone)]
pub struct Audit {
    node: u32,
    shared: Arc<Mutex<Shared>>,
    queue: SyncSender<Message>,
}

/// What the deciding threads and the writer share.
#[derive(Debug)]
struct Shared {
    limiter: Limiter,
    recent: Recent,
    /// Records dropped because the writer's queue was full, since the last report.
    dropped: u64,
    /// Totals since the start, for metrics.
    totals: AuditCounts,
    /// Decisions by event and reason since the start, suppressed ones included.
    decisions: BTreeMap<(&'static str, &'static str), u64>,
}

/// How many records the audit log took, held back and lost since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditCounts {
    /// Records admitted (written, or lost to a full queue).
    pub recorded: u64,
    /// Records held back by the per-source rate limits.
    pub suppressed: u64,
    /// Records lost because the writer's queue was full.
    pub dropped: u64,
}

impl Shared {
    /// Records reporting what was suppressed or dropped since the last call (kept in the
    /// recent list too).
    fn take_reports(&mut self, node: u32, now: Instant) -> Vec<Entry> {
        let mut reports: Vec<Entry> =
            self.limiter.take_suppressed(now).iter().map(|s| s.entry(node)).collect();
        if self.dropped > 0 {
            reports.push(Entry::now(&Record {
                count: Some(std::mem::take(&mut self.dropped)),
                ..Record::link("audit_dropped", "queue_full", None)
            }));
        }
        for entry in &reports {
            self.recent.push(*entry);
        }
        reports
    }
}

/// One security decision.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// What was decided, e.g. `"offer_rejected"`.
    pub event: &'static str,
    /// Why, e.g. `"no_listener"`.
    pub reason: &'static str,
    /// Source endpoint, when there is one.
    pub source: Option<&'a Endpoint>,
    /// Destination endpoint, when there is one.
    pub destination: Option<&'a Endpoint>,
    /// The peer node of a host-link decision.
    pub peer: Option<u32>,
    /// The network address of the other end of a host-link decision.
    pub address: Option<SocketAddr>,
    /// A number the record reports (how many entries closed, refusals counted together...).
    pub count: Option<u64>,
    /// The record stands for `count` decisions of its kind taken since the last one (refusals
    /// before authentication are recorded so): metrics count `count`, not one.
    pub batched: bool,
    /// The node decided this on its own (an operator's word, a partition that stopped), not
    /// at a guest's or peer's request: never rate limited.
    pub by_node: bool,
}

impl<'a> Record<'a> {
    /// A decision about a message or offer between two endpoints.
    pub fn endpoints(
        event: &'static str,
        reason: &'static str,
        source: &'a Endpoint,
        destination: &'a Endpoint,
    ) -> Self {
        Self {
            event,
            reason,
            source: Some(source),
            destination: Some(destination),
            peer: None,
            address: None,
            count: None,
            batched: false,
            by_node: false,
        }
    }

    /// A decision about the host link to or from `peer` (when known).
    pub fn link(event: &'static str, reason: &'static str, peer: Option<u32>) -> Self {
        Self {
            event,
            reason,
            source: None,
            destination: None,
            peer,
            address: None,
            count: None,
            batched: false,
            by_node: false,
        }
    }
}

impl Audit {
    /// Starts the audit log of `node` as `config` says (its writer thread, and the file);
    /// the writer thread runs `thread_start` first (the VMM contains it there).
    pub fn start(
        node: u32,
        config: AuditConfig,
        thread_start: impl FnOnce() + Send + 'static,
    ) -> io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared {
            limiter: Limiter::new(config.limit, Instant::now()),
            recent: Recent::default(),
            dropped: 0,
            totals: AuditCounts::default(),
            decisions: BTreeMap::new(),
        }));
        let writer = Writer::open(node, config.file, shared.clone())?;
        let (queue, receiver) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new().name("audit".into()).spawn(move || {
            thread_start();
            writer.run(receiver)
        })?;
        Ok(Self { node, shared, queue })
    }

    /// An audit log of `node` into the process log, with the default limits (tests, tools).
    pub fn to_log(node: u32) -> io::Result<Self> {
        Self::start(node, AuditConfig::default(), || {})
    }

    /// Writes one record, unless its source has used up its rate (then it is counted).
    pub fn record(&self, record: Record<'_>) {
        let entry = {
            let mut shared = crate::bus::lock(&self.shared);
            let times = if record.batched { record.count.unwrap_or(1) } else { 1 };
            *shared.decisions.entry((record.event, record.reason)).or_default() += times;
            if let Some(source) = Source::of(self.node, &record) {
                if !shared.limiter.admit(source, Instant::now()) {
                    shared.totals.suppressed += 1;
                    return;
                }
            }
            shared.totals.recorded += 1;
            let entry = Entry::now(&record);
            shared.recent.push(entry);
            entry
        };
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Message::Record(entry)) {
            let mut shared = crate::bus::lock(&self.shared);
            shared.dropped += 1;
            shared.totals.dropped += 1;
        }
    }

    /// Records taken, held back and lost since the log started.
    pub fn counts(&self) -> AuditCounts {
        crate::bus::lock(&self.shared).totals
    }

    /// How many times each decision (event, reason) was taken since the log started, whether
    /// or not its record was held back by a rate limit.
    pub fn decisions(&self) -> Vec<((&'static str, &'static str), u64)> {
        crate::bus::lock(&self.shared).decisions.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Waits (up to `limit`) until every record made so far is written: before the process
    /// exits, so that its last records are not lost.
    pub fn flush(&self, limit: Duration) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(limit);
        }
    }

    /// The most recent records (at most [`RECENT`] link and channel events and as many
    /// refusals), oldest first, each one JSON object.
    pub fn recent(&self) -> Vec<String> {
        let entries = crate::bus::lock(&self.shared).recent.all();
        entries.iter().map(|e| e.line(self.node)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_json_line() {
        let a = Endpoint { node: 3, partition: 1, process: 2 };
        let line = Entry::now(&Record {
            destination: None,
            ..Record::endpoints("offer_rejected", "no_listener", &a, &a)
        })
        .line(3);
        assert!(line.starts_with("{\"time\":"), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let time = value["time"].as_str().unwrap();
        assert!(time.parse::<jiff::Timestamp>().is_ok() && time.ends_with('Z'), "{time}");
        assert_eq!(time.len(), "2026-11-27T09:05:20.123456Z".len(), "{time}");
        assert!(line.ends_with(
            "\"node\":3,\"event\":\"offer_rejected\",\"reason\":\"no_listener\",\"source\":{\"node\":3,\"partition\":1,\"process\":2},\"destination\":null,\"peer\":null}"
        ), "{line}");
        let link = Entry::now(&Record::link("link_rejected", "unknown_key", None)).line(3);
        assert!(link.ends_with("\"source\":null,\"destination\":null,\"peer\":null}"), "{link}");
        let link = Entry::now(&Record::link("link_up", "authenticated", Some(2))).line(3);
        assert!(link.ends_with("\"peer\":2}"), "{link}");
        assert!(!line.contains('\n'));
    }

    fn file_config(dir: &std::path::Path, max_bytes: u64, keep: u32) -> AuditConfig {
        AuditConfig {
            file: Some(AuditFile { path: dir.join("audit.jsonl"), max_bytes, keep }),
            limit: RateLimit { per_second: 1.0, burst: 5.0 },
        }
    }

    #[test]
    fn a_flooding_source_is_cut_to_its_rate_and_the_rest_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::start(1, file_config(dir.path(), 0, 0), || {}).unwrap();
        let guest = Endpoint { node: 1, partition: 4, process: 0 };
        for _ in 0..1000 {
            audit.record(Record {
                source: Some(&guest),
                ..Record::link("request_refused", "no_channel", None)
            });
        }
        audit.record(Record::link("link_down", "keepalive_timeout", Some(2)));
        audit.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(text.matches("request_refused").count(), 5, "{text}");
        assert!(text.contains("\"event\":\"link_down\""), "{text}");
        assert!(
            text.contains("\"event\":\"audit_suppressed\",\"reason\":\"rate_limit\",\"source\":{\"node\":1,\"partition\":4,\"process\":0},\"destination\":null,\"peer\":null,\"count\":995}"),
            "{text}"
        );
        assert!(audit.recent().iter().any(|r| r.contains("link_down")));
        // The totals count what the reports said, and the reports themselves are not counted.
        assert_eq!(audit.counts(), AuditCounts { recorded: 6, suppressed: 995, dropped: 0 });
        // A record with a count is one decision, unless it stands for a batch of them.
        audit.record(Record {
            count: Some(0),
            by_node: true,
            ..Record::link("channels_closed", "partition_stopped", None)
        });
        audit.record(Record {
            count: Some(7),
            batched: true,
            ..Record::link("link_refused", "handshake_timeout", None)
        });
        let decisions = audit.decisions();
        assert!(decisions.contains(&(("request_refused", "no_channel"), 1000)), "{decisions:?}");
        assert!(
            decisions.contains(&(("channels_closed", "partition_stopped"), 1)),
            "{decisions:?}"
        );
        assert!(decisions.contains(&(("link_refused", "handshake_timeout"), 7)), "{decisions:?}");
        assert!(decisions.contains(&(("link_down", "keepalive_timeout"), 1)), "{decisions:?}");
    }

    #[test]
    fn the_file_is_rotated_by_size_and_old_files_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::start(1, file_config(dir.path(), 1000, 2), || {}).unwrap();
        for peer in 0..100 {
            audit.record(Record::link("link_up", "authenticated", Some(peer)));
        }
        audit.flush(Duration::from_secs(5));
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).map(|m| m.len());
        for name in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"] {
            assert!(size(name).is_ok_and(|s| s > 0 && s <= 1000), "{name}: {:?}", size(name));
        }
        assert!(size("audit.jsonl.3").is_err(), "only two old files are kept");
        let newest = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert!(newest.contains("\"peer\":99}"), "{newest}");
    }
}
