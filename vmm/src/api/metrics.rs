//! `GET /metrics`: the node's counters in the Prometheus text exposition format (version
//! 0.0.4), for a scraper or `curl`. Every family is listed in docs/API.md.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_agent::channel::abi::state;
use keyhold_devices::bus::lock;
use keyhold_devices::cmm::query::{Query, Reply};

use super::http::Response;
use super::ApiState;

/// The exposition's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics answer.
pub fn answer(state: &ApiState) -> Response {
    // A scrape without the device thread's counters would look like counters that reset:
    // better none at all.
    let (Some(Reply::Stats(stats)), Some(Reply::Channels(entries))) =
        (state.queries.ask(Query::Stats), state.queries.ask(Query::Channels))
    else {
        return Response::error(503, "the device thread did not answer");
    };
    let mut out = Exposition::default();
    node(&mut out, state);
    partitions(&mut out, state, &stats);
    channels(&mut out, &entries);
    links(&mut out, state);
    membership(&mut out, state);
    audit(&mut out, state);
    Response { code: 200, content_type: CONTENT_TYPE, body: out.text, allow: None }
}

/// The text being written: a `# HELP` and `# TYPE` line per family, then its samples.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let pairs: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = write!(self.text, "{{{}}}", pairs.join(","));
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// A label value as the format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn node(out: &mut Exposition, state: &ApiState) {
    out.family("keyhold_node_info", "gauge", "This node: its ID and the build it runs.");
    out.sample(
        "keyhold_node_info",
        &[("node", &state.node.to_string()), ("version", crate::VERSION)],
        1,
    );
}

/// Only on a node whose members come from etcd.
fn membership(out: &mut Exposition, state: &ApiState) {
    let Some(status) = &state.membership else { return };
    let s = lock(status).clone();
    out.family(
        "keyhold_membership_synced",
        "gauge",
        "1 while the node follows etcd, 0 while etcd cannot be reached or its ID is refused.",
    );
    out.sample("keyhold_membership_synced", &[], u64::from(s.state == "synced"));
    out.family("keyhold_membership_members", "gauge", "Nodes in the directory, this one included.");
    out.sample("keyhold_membership_members", &[], s.members as u64);
    out.family("keyhold_membership_revision", "gauge", "The etcd revision the directory reflects.");
    out.sample("keyhold_membership_revision", &[], u64::try_from(s.revision).unwrap_or(0));
}

fn partitions(
    out: &mut Exposition,
    state: &ApiState,
    stats: &[(u32, guest_agent::channel::abi::Stats)],
) {
    let partitions = lock(&state.partitions).clone();
    out.family("keyhold_partition_running", "gauge", "1 while the partition runs, 0 once stopped.");
    for p in &partitions {
        out.sample("keyhold_partition_running", &[("partition", &p.id.to_string())], {
            u64::from(p.stopped.is_none())
        });
    }
    type DeviceCounter = fn(&keyhold_devices::virtio::shared::DeviceCounters) -> &AtomicU64;
    let device_counters: [(&str, &str, DeviceCounter); 6] = [
        ("spurious_notifications", "Notifications for a queue not in use, ignored.", |c| {
            &c.spurious_notifications
        }),
        ("refused_queue_configs", "Queue configurations refused at DRIVER_OK.", |c| {
            &c.refused_queue_configs
        }),
        ("queue_stops", "Queues stopped by the driver after DRIVER_OK.", |c| &c.queue_stops),
        ("needs_reset", "Times the device asked its driver for a reset.", |c| &c.needs_reset),
        ("throttled", "Requests held back by a rate limit.", |c| &c.throttled),
        ("deferred", "Passes cut short by the per-partition budget.", |c| &c.deferred),
    ];
    for (name, help, counter) in device_counters {
        let family = format!("keyhold_device_{name}_total");
        out.family(&family, "counter", help);
        for p in &partitions {
            for d in &p.devices {
                let value = counter(&d.shared.counters).load(Ordering::Relaxed);
                out.sample(&family, &[("partition", &p.id.to_string()), ("device", d.kind)], value);
            }
        }
    }
    type StatsCounter = fn(&guest_agent::channel::abi::Stats) -> u64;
    let channel_counters: [(&str, &str, StatsCounter); 9] = [
        ("messages_sent", "Messages the partition sent.", |s| s.sent),
        ("messages_received", "Messages delivered to the partition.", |s| s.received),
        ("sent_bytes", "Payload bytes the partition sent.", |s| s.sent_bytes),
        ("received_bytes", "Payload bytes delivered to the partition.", |s| s.received_bytes),
        ("refused", "Requests of the partition refused with a status.", |s| s.refused),
        ("forged", "Messages whose claimed source was not the sender.", |s| s.forged),
        ("rejected", "Messages to the partition that failed verification.", |s| s.rejected),
        ("dropped_no_room", "Messages dropped for want of room.", |s| s.dropped_no_room),
        ("notifications", "Queue notifications from the partition.", |s| s.notifications),
    ];
    for (name, help, counter) in channel_counters {
        let family = format!("keyhold_channel_{name}_total");
        out.family(&family, "counter", help);
        for (partition, s) in stats {
            out.sample(&family, &[("partition", &partition.to_string())], counter(s));
        }
    }
}

fn channels(out: &mut Exposition, entries: &[keyhold_devices::cmm::ChannelView]) {
    out.family("keyhold_channels", "gauge", "Connection-table entries by state.");
    for (code, name) in [
        (state::LISTENING, "listening"),
        (state::OFFERING, "offering"),
        (state::OPEN, "open"),
        (state::PEER_CLOSED, "peer_closed"),
    ] {
        let count = entries.iter().filter(|e| e.info.state == code).count() as u64;
        out.sample("keyhold_channels", &[("state", name)], count);
    }
}

fn links(out: &mut Exposition, state: &ApiState) {
    let Some(book) = &state.links else { return };
    let links = book.status();
    type LinkValue = fn(&keyhold_devices::link::LinkStatus) -> u64;
    let families: [(&str, &str, &str, LinkValue); 8] = [
        ("keyhold_link_up", "gauge", "1 while the link to the peer is up.", |l| {
            u64::from(l.state == "up")
        }),
        ("keyhold_link_established_total", "counter", "Times the link came up.", |l| l.established),
        ("keyhold_link_rekeys_total", "counter", "Rekeys of the current link session.", |l| {
            l.rekeys
        }),
        ("keyhold_link_bytes_in_total", "counter", "Bytes read from the link.", |l| l.bytes_in),
        ("keyhold_link_bytes_out_total", "counter", "Bytes written to the link.", |l| l.bytes_out),
        ("keyhold_link_frames_in_total", "counter", "Frames received on the link.", |l| {
            l.frames_in
        }),
        ("keyhold_link_frames_out_total", "counter", "Frames sent on the link.", |l| l.frames_out),
        ("keyhold_link_queued_out_bytes", "gauge", "Bytes waiting for the peer to read.", |l| {
            l.queued_out
        }),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for l in &links {
            out.sample(name, &[("peer", &l.peer.to_string())], value(l));
        }
    }
}

fn audit(out: &mut Exposition, state: &ApiState) {
    let counts = state.audit.counts();
    out.family(
        "keyhold_audit_decisions_total",
        "counter",
        "Security decisions by audit event and reason, rate-limited records included.",
    );
    for ((event, reason), count) in state.audit.decisions() {
        out.sample("keyhold_audit_decisions_total", &[("event", event), ("reason", reason)], count);
    }
    for (name, help, value) in [
        ("records", "Audit records written (or lost to a full queue).", counts.recorded),
        ("suppressed", "Audit records held back by per-source rate limits.", counts.suppressed),
        ("dropped", "Audit records lost because the writer fell behind.", counts.dropped),
    ] {
        let family = format!("keyhold_audit_{name}_total");
        out.family(&family, "counter", help);
        out.sample(&family, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_with_escaped_labels() {
        let mut out = Exposition::default();
        out.family("x_total", "counter", "An example.");
        out.sample("x_total", &[("a", "1"), ("b", "q\"\\\n")], 7);
        out.sample("x_total", &[], 0);
        assert_eq!(
            out.text,
            "# HELP x_total An example.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\\\\\\n\"} 7\nx_total 0\n"
        );
    }
}
