//! The routes of the control API and the JSON they answer with (docs/API.md).

use std::sync::atomic::Ordering;

use guest_agent::channel::abi::{closed, state, Stats};
use keyhold_devices::bus::lock;
use keyhold_devices::cmm::query::{Query, Reply};
use keyhold_devices::cmm::ChannelView;
use serde_json::{json, Value};

use super::http::{Request, Response};
use super::{metrics, ApiState, Scope};
use crate::partition_devices::DeviceView;
use crate::requests::{self, Refusal};

/// What a path names, and the one method it takes.
enum Route<'a> {
    Node,
    Partitions,
    Channels,
    Stats,
    Links,
    Membership,
    Audit,
    Metrics,
    Revoke { partition: &'a str, channel: &'a str },
    Stop { partition: &'a str },
    Start { partition: &'a str },
    VsockReset { partition: &'a str },
    Reload,
}

impl<'a> Route<'a> {
    fn of(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match segments.as_slice() {
            ["v1", "node"] => Self::Node,
            ["v1", "partitions"] => Self::Partitions,
            ["v1", "channels"] => Self::Channels,
            ["v1", "stats"] => Self::Stats,
            ["v1", "links"] => Self::Links,
            ["v1", "membership"] => Self::Membership,
            ["v1", "audit"] => Self::Audit,
            ["metrics"] | ["v1", "metrics"] => Self::Metrics,
            ["v1", "channels", partition, channel, "revoke"] => Self::Revoke { partition, channel },
            ["v1", "partitions", partition, "stop"] => Self::Stop { partition },
            ["v1", "partitions", partition, "start"] => Self::Start { partition },
            ["v1", "partitions", partition, "vsock", "reset"] => Self::VsockReset { partition },
            ["v1", "reload"] => Self::Reload,
            _ => return None,
        })
    }

    fn method(&self) -> &'static str {
        match self {
            Self::Revoke { .. }
            | Self::Stop { .. }
            | Self::Start { .. }
            | Self::VsockReset { .. }
            | Self::Reload => "POST",
            _ => "GET",
        }
    }
}

/// The answer to `request`, from a client allowed `scope`.
pub fn answer(state: &ApiState, request: &Request, scope: Scope) -> Response {
    let path = request.path.as_str();
    let route = Route::of(path).filter(|r| scope == Scope::Control || matches!(r, Route::Metrics));
    let Some(route) = route else {
        if scope == Scope::MetricsOnly {
            return Response::error(404, format!("no route {path}: this address serves /metrics"));
        }
        return Response::error(404, format!("no route {path} (docs/API.md lists them)"));
    };
    // HEAD is GET without the body (the server leaves it out).
    let method = if request.method == "HEAD" { "GET" } else { request.method.as_str() };
    if method != route.method() {
        return Response::method_not_allowed(&request.method, path, route.method());
    }
    match route {
        Route::Node => {
            Response::json(200, &json!({ "node": state.node, "version": crate::VERSION }))
        }
        Route::Partitions => Response::json(200, &partitions(state)),
        Route::Channels => ask(state, Query::Channels),
        Route::Stats => ask(state, Query::Stats),
        Route::Links => Response::json(200, &links(state)),
        Route::Membership => Response::json(200, &membership(state)),
        Route::Audit => Response::json(200, &audit(state)),
        Route::Metrics => metrics::answer(state),
        Route::Reload => match operator(state, requests::Request::Reload) {
            Ok(summary) => Response::json(200, &json!({ "reloaded": summary })),
            Err(refused) => refused,
        },
        Route::Stop { partition } => match partition.parse() {
            Ok(id) => match operator(state, requests::Request::Stop(id)) {
                Ok(_) => Response::json(202, &json!({ "stopping": id })),
                Err(refused) => refused,
            },
            Err(_) => Response::error(400, "expected /v1/partitions/PARTITION/stop with a number"),
        },
        Route::Start { partition } => match partition.parse() {
            Ok(id) => match operator(state, requests::Request::Start(id)) {
                Ok(_) => Response::json(200, &json!({ "started": id })),
                Err(refused) => refused,
            },
            Err(_) => Response::error(400, "expected /v1/partitions/PARTITION/start with a number"),
        },
        Route::VsockReset { partition } => match partition.parse() {
            Ok(partition) => ask(state, Query::VsockReset { partition }),
            Err(_) => {
                Response::error(400, "expected /v1/partitions/PARTITION/vsock/reset with a number")
            }
        },
        Route::Revoke { partition, channel } => match (partition.parse(), parse_channel(channel)) {
            (Ok(partition), Some(channel)) => ask(state, Query::Revoke { partition, channel }),
            _ => {
                Response::error(400, "expected /v1/channels/PARTITION/CHANNEL/revoke with numbers")
            }
        },
    }
}

/// Has the main thread carry out `what`: its summary, or the answer that refuses it. A stop
/// is under way when it answers (`GET /v1/partitions` shows when it is done); a start and a
/// reload are done.
fn operator(state: &ApiState, what: requests::Request) -> Result<String, Response> {
    let Some(requests) = &state.requests else {
        return Err(Response::error(503, "this node does not take requests"));
    };
    requests.ask(what, std::time::Duration::from_secs(10)).map_err(|refusal| {
        let status = match refusal {
            Refusal::Unknown(_) => 404,
            Refusal::Conflict(_) => 409,
            Refusal::Failed(_) => 500,
        };
        Response::error(status, refusal.to_string())
    })
}

/// A channel ID in decimal or `0x` hexadecimal (as LIST and the consoles print them).
fn parse_channel(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn ask(state: &ApiState, query: Query) -> Response {
    match state.queries.ask(query) {
        Some(Reply::Channels(entries)) => {
            Response::json(200, &Value::Array(entries.iter().map(channel_json).collect()))
        }
        Some(Reply::Stats(all)) => {
            Response::json(200, &Value::Array(all.iter().map(|(p, s)| stats_json(*p, s)).collect()))
        }
        Some(Reply::Revoked(Ok(()))) => Response::json(200, &json!({ "revoked": true })),
        Some(Reply::Revoked(Err(code))) => {
            Response::json(404, &json!({ "error": "no such channel", "status": code }))
        }
        Some(Reply::VsockReset(Some(connections))) => {
            Response::json(200, &json!({ "reset": true, "connections": connections }))
        }
        Some(Reply::VsockReset(None)) => {
            Response::error(404, "no running partition with a vsock device by that ID")
        }
        // No route asks about stopped partitions: that answer never comes here.
        None | Some(Reply::PartitionStopped(_)) => {
            Response::error(503, "the device thread did not answer")
        }
    }
}

/// Where the members come from, and, from etcd, how that stands.
pub fn membership(state: &ApiState) -> Value {
    let Some(status) = &state.membership else {
        let source = if state.links.is_some() { "cluster_file" } else { "none" };
        return json!({ "source": source });
    };
    let s = lock(status).clone();
    json!({
        "source": "etcd",
        "state": s.state,
        "since": epoch_secs(Some(s.since)),
        "revision": s.revision,
        "members": s.members,
        "endpoint": s.endpoint,
        "last_error": s.last_error,
    })
}

fn partitions(state: &ApiState) -> Value {
    let partitions = lock(&state.partitions);
    Value::Array(
        partitions
            .iter()
            .map(|p| {
                let (running, exit_status, report) = match &p.stopped {
                    None => (true, None, None),
                    Some((status, report)) => (false, Some(*status), Some(report.clone())),
                };
                json!({
                    "id": p.id,
                    "firmware": p.firmware.display().to_string(),
                    "memory_mib": p.memory_mib,
                    "running": running,
                    "exit_status": exit_status,
                    "report": report,
                    "devices": p.devices.iter().map(device_json).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn device_json(device: &DeviceView) -> Value {
    let c = &device.shared.counters;
    let n = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    json!({
        "kind": device.kind,
        "state": device.shared.state_name(),
        "spurious_notifications": n(&c.spurious_notifications),
        "refused_queue_configs": n(&c.refused_queue_configs),
        "queue_stops": n(&c.queue_stops),
        "needs_reset": n(&c.needs_reset),
        "throttled": n(&c.throttled),
        "deferred": n(&c.deferred),
    })
}

fn channel_json(view: &ChannelView) -> Value {
    let (partition, e) = (view.partition, &view.info);
    let state = match e.state {
        state::LISTENING => "listening",
        state::OPEN => "open",
        state::PEER_CLOSED => "peer_closed",
        state::OFFERING => "offering",
        _ => "unknown",
    };
    json!({
        "partition": partition,
        "channel": format!("{:#x}", e.channel),
        "state": state,
        "closed": closed::name(e.closed),
        "process": e.process,
        "remote": { "node": e.remote.node, "partition": e.remote.partition, "process": e.remote.process },
        "sent": e.sent,
        "received": e.received,
        "dropped": e.dropped,
        "salt": view.salt.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "tx_epoch": view.tx_epoch,
        "rx_epoch": view.rx_epoch,
    })
}

fn stats_json(partition: u32, s: &Stats) -> Value {
    json!({
        "partition": partition,
        "sent": s.sent,
        "received": s.received,
        "sent_bytes": s.sent_bytes,
        "received_bytes": s.received_bytes,
        "refused": s.refused,
        "forged": s.forged,
        "rejected": s.rejected,
        "dropped_no_room": s.dropped_no_room,
        "notifications": s.notifications,
    })
}

fn links(state: &ApiState) -> Value {
    let Some(links) = &state.links else { return Value::Array(Vec::new()) };
    Value::Array(links.status().iter().map(link_json).collect())
}

/// Seconds since the Unix epoch, as JSON (null for never).
fn epoch_secs(t: Option<std::time::SystemTime>) -> Value {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(Value::Null, |d| json!((d.as_secs_f64() * 1000.0).round() / 1000.0))
}

fn link_json(l: &keyhold_devices::link::LinkStatus) -> Value {
    let (failure, failed_at) = match &l.last_failure {
        Some((reason, at)) => (json!(reason), epoch_secs(Some(*at))),
        None => (Value::Null, Value::Null),
    };
    json!({
        "peer": l.peer,
        "address": l.address.to_string(),
        "remote": l.remote.map(|r| r.to_string()),
        "protocol": l.protocol,
        "state": l.state,
        "up": l.state == "up",
        "since": epoch_secs(Some(l.since)),
        "last_failure": failure,
        "last_failure_at": failed_at,
        "last_handshake": epoch_secs(l.last_handshake),
        "established": l.established,
        "rekeys": l.rekeys,
        "bytes_in": l.bytes_in,
        "bytes_out": l.bytes_out,
        "frames_in": l.frames_in,
        "frames_out": l.frames_out,
        "queued_out": l.queued_out,
    })
}

fn audit(state: &ApiState) -> Value {
    // Each record is a JSON object made by the audit log itself.
    Value::Array(
        state.audit.recent().iter().filter_map(|line| serde_json::from_str(line).ok()).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_parse_in_both_notations() {
        assert_eq!(parse_channel("0x10001"), Some(0x10001));
        assert_eq!(parse_channel("65537"), Some(65537));
        assert_eq!(parse_channel("0xzz"), None);
        assert_eq!(parse_channel("-1"), None);
    }
}
