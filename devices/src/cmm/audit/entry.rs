//! One audit record as it is kept and written: an owned copy of a [`Record`], stamped with
//! the time it was made, and its JSON line.
//!
//! Lines carry only numbers and fixed strings from this crate, so no escaping is needed and no
//! outsider-controlled text can forge a line.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use guest_agent::channel::abi::Endpoint;

use super::Record;

/// A record, owned.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) time: f64,
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
        let time =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Self {
            time,
            event: record.event,
            reason: record.reason,
            source: record.source.copied(),
            destination: record.destination.copied(),
            peer: record.peer,
            address: record.address,
            count: record.count,
        }
    }

    /// The JSON line (without its newline) of this record on `node`.
    pub(super) fn line(&self, node: u32) -> String {
        let endpoint = |e: Option<Endpoint>| match e {
            Some(e) => format!(
                "{{\"node\":{},\"partition\":{},\"process\":{}}}",
                e.node, e.partition, e.process
            ),
            None => "null".into(),
        };
        let peer = self.peer.map_or_else(|| "null".to_owned(), |p| p.to_string());
        // A socket address prints as digits, dots, colons and brackets: nothing to escape.
        let mut extra = String::new();
        if let Some(address) = self.address {
            extra.push_str(&format!(",\"address\":\"{address}\""));
        }
        if let Some(count) = self.count {
            extra.push_str(&format!(",\"count\":{count}"));
        }
        format!(
            "{{\"time\":{:.6},\"node\":{node},\"event\":\"{}\",\"reason\":\"{}\",\"source\":{},\"destination\":{},\"peer\":{peer}{extra}}}",
            self.time,
            self.event,
            self.reason,
            endpoint(self.source),
            endpoint(self.destination)
        )
    }
}
