//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (usable with
//! `curl --unix-socket`), one connection at a time, each request bounded. docs/API.md lists the
//! routes. Nothing it returns ever holds a key.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_agent::channel::abi::{closed, state, Stats};
use keyhold_devices::bus::lock;
use keyhold_devices::cmm::audit::Audit;
use keyhold_devices::cmm::query::{Query, QueryHandle, Reply};
use keyhold_devices::cmm::ChannelView;
use keyhold_devices::link::LinkBook;
use serde_json::{json, Value};

use crate::partition_devices::DeviceView;
use crate::seccomp::{Containment, ThreadKind};

/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// A partition as the API shows it.
#[derive(Debug, Clone)]
pub struct PartitionState {
    /// Its ID.
    pub id: u32,
    /// Its firmware.
    pub firmware: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// `None` while running; the stop report once stopped.
    pub stopped: Option<(u8, String)>,
    /// Its devices.
    pub devices: Vec<DeviceView>,
}

/// What the API reads.
pub struct ApiState {
    /// This node.
    pub node: u32,
    /// The partitions, updated as they stop.
    pub partitions: Mutex<Vec<PartitionState>>,
    /// Questions for the CMM.
    pub queries: QueryHandle,
    /// The host links, if any.
    pub links: Option<Arc<LinkBook>>,
    /// The audit log's recent records.
    pub audit: Audit,
}

/// The running API server; dropping it stops it and removes the socket.
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Serves `state` on a Unix socket at `path` (a stale socket there is replaced); the
    /// thread installs its seccomp filter from `containment` before it accepts anything.
    pub fn start(
        path: &Path,
        state: Arc<ApiState>,
        containment: &Containment,
    ) -> std::io::Result<Self> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let containment = containment.clone();
        let thread = std::thread::Builder::new().name("api".into()).spawn(move || {
            containment.install(ThreadKind::Api);
            while !flag.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => serve(&state, stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => log::warn!("control API: {e}"),
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread), path: path.to_owned() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One request, one response, then the connection closes.
fn serve(state: &ApiState, mut stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let (code, body) = match read_request(&mut stream) {
        Ok((method, path)) => route(state, &method, &path),
        Err(problem) => (400, json!({ "error": problem })),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// Reads the request head (bounded) and returns method and path.
fn read_request(stream: &mut UnixStream) -> Result<(String, String), &'static str> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut byte).map_err(|_| "incomplete request")?;
        if n == 0 {
            return Err("incomplete request");
        }
        head.extend_from_slice(&byte[..n]);
        if head.len() > MAX_REQUEST {
            return Err("request head too long");
        }
    }
    let text = std::str::from_utf8(&head).map_err(|_| "request is not UTF-8")?;
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), Some(version)) if version.starts_with("HTTP/1.") => {
            Ok((method.to_owned(), path.to_owned()))
        }
        _ => Err("not an HTTP/1.x request line"),
    }
}

fn route(state: &ApiState, method: &str, path: &str) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["v1", "node"]) => (200, json!({ "node": state.node })),
        ("GET", ["v1", "partitions"]) => (200, partitions(state)),
        ("GET", ["v1", "channels"]) => ask(state, Query::Channels),
        ("GET", ["v1", "stats"]) => ask(state, Query::Stats),
        ("GET", ["v1", "links"]) => (200, links(state)),
        ("GET", ["v1", "audit"]) => (200, audit(state)),
        ("POST", ["v1", "channels", partition, channel, "revoke"]) => {
            match (partition.parse(), parse_channel(channel)) {
                (Ok(partition), Some(channel)) => ask(state, Query::Revoke { partition, channel }),
                _ => (
                    400,
                    json!({ "error": "expected /v1/channels/PARTITION/CHANNEL/revoke with numbers" }),
                ),
            }
        }
        (_, ["v1", "node" | "partitions" | "channels" | "stats" | "links" | "audit"]) => {
            (405, json!({ "error": format!("{method} is not allowed on {path}") }))
        }
        _ => (404, json!({ "error": format!("no route {method} {path}") })),
    }
}

/// A channel ID in decimal or `0x` hexadecimal (as LIST and the consoles print them).
fn parse_channel(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn ask(state: &ApiState, query: Query) -> (u16, Value) {
    match state.queries.ask(query) {
        Some(Reply::Channels(entries)) => {
            (200, Value::Array(entries.iter().map(channel_json).collect()))
        }
        Some(Reply::Stats(all)) => {
            (200, Value::Array(all.iter().map(|(p, s)| stats_json(*p, s)).collect()))
        }
        Some(Reply::Revoked(Ok(()))) => (200, json!({ "revoked": true })),
        Some(Reply::Revoked(Err(code))) => {
            (404, json!({ "error": "no such channel", "status": code }))
        }
        // No route asks about stopped partitions: that answer never comes here.
        None | Some(Reply::PartitionStopped(_)) => {
            (503, json!({ "error": "the device thread did not answer" }))
        }
    }
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

/// `keyhold ctl`: sends one request to a node's API and returns its status code and body.
pub fn request(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: keyhold\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_owned()))
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
