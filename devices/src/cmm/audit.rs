//! The audit log: every security decision as one JSON line, never with a key in it.
//!
//! Lines carry only numbers and fixed strings from this crate, so no escaping is needed and no
//! outsider-controlled text can forge a line.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use guest_agent::channel::abi::Endpoint;

/// Where audit records go. Clones share the file, so the CMM and the host links write one log.
#[derive(Clone)]
pub struct Audit {
    node: u32,
    file: Option<Arc<Mutex<File>>>,
    recent: Arc<Mutex<VecDeque<String>>>,
}

/// Records kept in memory for the control API.
pub const RECENT: usize = 256;

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
    /// How many times this decision was taken, when records of it are counted together.
    pub count: Option<u64>,
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
        }
    }

    /// A decision about the host link to or from `peer` (when known).
    pub fn link(event: &'static str, reason: &'static str, peer: Option<u32>) -> Self {
        Self { event, reason, source: None, destination: None, peer, address: None, count: None }
    }
}

impl Audit {
    /// An audit log for `node`, appended to `file`, or into the process log at warn level.
    pub fn new(node: u32, file: Option<File>) -> Self {
        Self { node, file: file.map(|f| Arc::new(Mutex::new(f))), recent: Arc::default() }
    }

    /// Writes one record.
    pub fn record(&self, record: Record<'_>) {
        let line = self.format(&record);
        {
            let mut recent = crate::bus::lock(&self.recent);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(line.clone());
        }
        match &self.file {
            Some(file) => {
                if let Err(e) = writeln!(crate::bus::lock(file), "{line}") {
                    log::error!("audit log write failed: {e}; record: {line}");
                }
            }
            None => log::info!(target: "audit", "{line}"),
        }
    }

    /// The most recent records (at most [`RECENT`]), oldest first, each one JSON object.
    pub fn recent(&self) -> Vec<String> {
        crate::bus::lock(&self.recent).iter().cloned().collect()
    }

    fn format(&self, r: &Record<'_>) -> String {
        let time =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let endpoint = |e: Option<&Endpoint>| match e {
            Some(e) => format!(
                "{{\"node\":{},\"partition\":{},\"process\":{}}}",
                e.node, e.partition, e.process
            ),
            None => "null".into(),
        };
        let peer = r.peer.map_or_else(|| "null".to_owned(), |p| p.to_string());
        // A socket address prints as digits, dots, colons and brackets: nothing to escape.
        let mut extra = String::new();
        if let Some(address) = r.address {
            extra.push_str(&format!(",\"address\":\"{address}\""));
        }
        if let Some(count) = r.count {
            extra.push_str(&format!(",\"count\":{count}"));
        }
        format!(
            "{{\"time\":{time:.6},\"node\":{},\"event\":\"{}\",\"reason\":\"{}\",\"source\":{},\"destination\":{},\"peer\":{peer}{extra}}}",
            self.node,
            r.event,
            r.reason,
            endpoint(r.source),
            endpoint(r.destination)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_json_line() {
        let audit = Audit::new(3, None);
        let a = Endpoint { node: 3, partition: 1, process: 2 };
        let line = audit.format(&Record {
            destination: None,
            ..Record::endpoints("offer_rejected", "no_listener", &a, &a)
        });
        assert!(line.starts_with("{\"time\":"), "{line}");
        assert!(line.ends_with(
            "\"node\":3,\"event\":\"offer_rejected\",\"reason\":\"no_listener\",\"source\":{\"node\":3,\"partition\":1,\"process\":2},\"destination\":null,\"peer\":null}"
        ), "{line}");
        let link = audit.format(&Record::link("link_rejected", "unknown_key", None));
        assert!(link.ends_with("\"source\":null,\"destination\":null,\"peer\":null}"), "{link}");
        let link = audit.format(&Record::link("link_up", "authenticated", Some(2)));
        assert!(link.ends_with("\"peer\":2}"), "{link}");
        assert!(!line.contains('\n'));
    }
}
