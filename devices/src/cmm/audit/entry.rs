//! One audit record as it is kept and written: an owned copy of a [`Record`], stamped with
//! the time it was made, and its JSON line.
//!
//! Lines carry only numbers, addresses and fixed strings from this crate, serialised by
//! `serde_json`, so no outsider-controlled text can forge a line.

use std::net::SocketAddr;
use std::time::SystemTime;

use serde::Serialize;

use guest_agent::channel::abi::Endpoint;

use super::Record;

/// A record, owned.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) time: SystemTime,
    pub(super) event: &'static str,
    pub(super) reason: &'static str,
    pub(super) source: Option<Endpoint>,
    pub(super) destination: Option<Endpoint>,
    pub(super) peer: Option<u32>,
    pub(super) address: Option<SocketAddr>,
    pub(super) count: Option<u64>,
}

impl Entry {
    /// `record`, made now.
    pub(super) fn now(record: &Record<'_>) -> Self {
        Self {
            time: SystemTime::now(),
            event: record.event,
            reason: record.reason,
            source: record.source.copied(),
            destination: record.destination.copied(),
            peer: record.peer,
            address: record.address,
            count: record.count,
        }
    }

    /// The JSON line (without its newline) of this record on `node`. Fields keep this order;
    /// `address` and `count` appear only when the record has them.
    pub(super) fn line(&self, node: u32) -> String {
        let line = Line {
            time: rfc3339(self.time),
            node,
            event: self.event,
            reason: self.reason,
            source: self.source.map(EndpointJson::from),
            destination: self.destination.map(EndpointJson::from),
            peer: self.peer,
            address: self.address.map(|a| a.to_string()),
            count: self.count,
        };
        // Serialising numbers, strings and options cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// `time` in UTC, RFC 3339 with microseconds, e.g. `2026-11-27T09:05:20.123456Z`.
fn rfc3339(time: SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(t) => format!("{t:.6}"),
        Err(_) => "1970-01-01T00:00:00.000000Z".into(),
    }
}

/// A record as it is written.
#[derive(Serialize)]
struct Line {
    time: String,
    node: u32,
    event: &'static str,
    reason: &'static str,
    source: Option<EndpointJson>,
    destination: Option<EndpointJson>,
    peer: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
}

#[derive(Serialize)]
struct EndpointJson {
    node: u32,
    partition: u32,
    process: u32,
}

impl From<Endpoint> for EndpointJson {
    fn from(e: Endpoint) -> Self {
        Self { node: e.node, partition: e.partition, process: e.process }
    }
}
