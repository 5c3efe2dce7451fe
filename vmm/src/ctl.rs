//! `keyhold ctl`: finds the node's API socket, asks it, and prints the answer: JSON as the
//! node gives it, the Prometheus text for `metrics`, and for `show` one screen made from
//! several answers.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::api;
use crate::cli::{CtlArgs, CtlRequest};

/// Where the systemd unit (contrib/systemd) puts node sockets: with one node on the host,
/// `ctl` finds it there.
pub const RUN_DIR: &str = "/run/keyhold";
/// The environment variable naming the socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "KEYHOLD_SOCKET";

/// Exit statuses.
const ANSWERED: u8 = 0;
const REFUSED: u8 = 1;
const UNREACHABLE: u8 = 2;

/// Runs one `keyhold ctl` command; its exit status.
pub fn run(args: &CtlArgs) -> u8 {
    let socket = match find_socket(args.socket.as_deref(), Path::new(RUN_DIR)) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("keyhold: {e}");
            return UNREACHABLE;
        }
    };
    let result = match &args.request {
        CtlRequest::Show => show(&socket, args.json),
        request => {
            let (method, path) = request.route();
            ask(&socket, method, &path).map(|body| print_answer(request, &body, args.json))
        }
    };
    match result {
        Ok(()) => ANSWERED,
        Err(Failure::Refused(code, body)) => {
            eprintln!("keyhold: the node answered {code}: {}", body.trim());
            REFUSED
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("keyhold: no node answers on {}: {e}", socket.display());
            UNREACHABLE
        }
    }
}

/// Why a request got no useful answer.
enum Failure {
    /// The node answered with this status and body.
    Refused(u16, String),
    /// Nobody answered.
    Unreachable(std::io::Error),
}

fn ask(socket: &Path, method: &str, path: &str) -> Result<String, Failure> {
    match api::request(socket, method, path) {
        Ok((200 | 202, body)) => Ok(body),
        Ok((code, body)) => Err(Failure::Refused(code, body)),
        Err(e) => Err(Failure::Unreachable(e)),
    }
}

fn ask_json(socket: &Path, path: &str) -> Result<Value, Failure> {
    let body = ask(socket, "GET", path)?;
    serde_json::from_str(&body)
        .map_err(|e| Failure::Unreachable(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

fn print_answer(request: &CtlRequest, body: &str, json: bool) {
    if matches!(request, CtlRequest::Metrics) && !json {
        print!("{body}");
        return;
    }
    let pretty = serde_json::from_str::<Value>(body)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json!(body).to_string());
    println!("{pretty}");
}

/// The socket to ask: `--socket`, else `$KEYHOLD_SOCKET`, else the only socket in `run_dir`.
pub fn find_socket(given: Option<&Path>, run_dir: &Path) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let sockets = sockets_in(run_dir);
    match sockets.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "which node? no --socket given, {SOCKET_ENV} is not set, and {} holds no node socket",
            run_dir.display()
        )),
        several => Err(format!(
            "which node? {} holds {} node sockets ({}): give --socket",
            run_dir.display(),
            several.len(),
            several.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut sockets: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect();
    sockets.sort();
    sockets
}

/// `ctl show`: the node, links, partitions with their counters, and channels by state.
fn show(socket: &Path, json: bool) -> Result<(), Failure> {
    let summary = json!({
        "node": ask_json(socket, "/v1/node")?,
        "links": ask_json(socket, "/v1/links")?,
        // A node of an older build has no such route: it shows nothing then.
        "membership": ask_json(socket, "/v1/membership").unwrap_or(Value::Null),
        "partitions": ask_json(socket, "/v1/partitions")?,
        "stats": ask_json(socket, "/v1/stats")?,
        "channels": channel_counts(&ask_json(socket, "/v1/channels")?),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else {
        print!("{}", render(&summary, SystemTime::now()));
    }
    Ok(())
}

fn channel_counts(channels: &Value) -> Value {
    let mut counts = serde_json::Map::new();
    for state in ["open", "listening", "offering", "peer_closed"] {
        let n =
            channels.as_array().map_or(0, |all| all.iter().filter(|c| c["state"] == state).count());
        counts.insert(state.into(), json!(n));
    }
    Value::Object(counts)
}

/// The `show` screen, as `wg show` lays one out: a heading, then indented facts.
fn render(s: &Value, now: SystemTime) -> String {
    let mut out = format!(
        "node: {}\n  version: {}\n",
        s["node"]["node"],
        s["node"]["version"].as_str().unwrap_or("?")
    );
    let membership = &s["membership"];
    if membership["source"] == "etcd" {
        out += &format!(
            "  membership: etcd at {}, {} (since {}), {} members, revision {}\n",
            membership["endpoint"].as_str().unwrap_or("?"),
            membership["state"].as_str().unwrap_or("?"),
            ago(&membership["since"], now),
            membership["members"],
            membership["revision"],
        );
        if let Some(error) = membership["last_error"].as_str() {
            out += &format!("  membership's last error: {error}\n");
        }
    }
    let links = s["links"].as_array().map(Vec::as_slice).unwrap_or_default();
    // Links on demand: a fleet lists every peer, most of them idle; those are counted, not
    // shown one by one.
    let idle = links.iter().filter(|l| l["state"] == "idle").count();
    if idle > 0 {
        let up = links.iter().filter(|l| l["state"] == "up").count();
        out += &format!(
            "  links: {up} up, {idle} idle on demand (not shown; `keyhold ctl links` lists all)\n"
        );
    }
    for link in links.iter().filter(|l| l["state"] != "idle") {
        out += &format!(
            "\nlink: node {}\n  state: {} (since {})\n  address: {}\n",
            link["peer"],
            link["state"].as_str().unwrap_or("?"),
            ago(&link["since"], now),
            link["address"].as_str().unwrap_or("?"),
        );
        if link["last_handshake"].is_number() {
            out += &format!("  latest handshake: {}\n", ago(&link["last_handshake"], now));
        }
        if let Some(protocol) = link["protocol"].as_u64() {
            out += &format!("  protocol: version {protocol}\n");
        }
        out += &format!(
            "  transfer: {} received, {} sent; {} rekeys\n",
            bytes(&link["bytes_in"]),
            bytes(&link["bytes_out"]),
            link["rekeys"]
        );
        if let Some(reason) = link["last_failure"].as_str() {
            out += &format!("  last failure: {reason} ({})\n", ago(&link["last_failure_at"], now));
        }
    }
    let stats = s["stats"].as_array().cloned().unwrap_or_default();
    for p in s["partitions"].as_array().into_iter().flatten() {
        let state = match p["exit_status"].as_u64() {
            None => "running".to_owned(),
            Some(code) => format!("stopped with status {code}"),
        };
        out += &format!(
            "\npartition: {}\n  state: {state}\n  firmware: {} ({} MiB)\n",
            p["id"],
            p["firmware"].as_str().unwrap_or("?"),
            p["memory_mib"]
        );
        if let Some(st) = stats.iter().find(|st| st["partition"] == p["id"]) {
            out += &format!(
                "  messages: {} sent ({}), {} received ({})\n  refusals: {} refused, {} forged, {} rejected, {} dropped for want of room\n",
                st["sent"], bytes(&st["sent_bytes"]), st["received"], bytes(&st["received_bytes"]),
                st["refused"], st["forged"], st["rejected"], st["dropped_no_room"]
            );
        }
    }
    let c = &s["channels"];
    out += &format!(
        "\nchannels: {} open, {} listening, {} offering, {} closed by the peer\n",
        c["open"], c["listening"], c["offering"], c["peer_closed"]
    );
    out
}

/// "3 seconds ago" from seconds since the epoch.
fn ago(at: &Value, now: SystemTime) -> String {
    let Some(at) = at.as_f64() else { return "never".into() };
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let secs = Duration::from_secs_f64((now - at).max(0.0)).as_secs();
    match secs {
        0..=119 => format!("{secs} seconds ago"),
        120..=7199 => format!("{} minutes ago", secs / 60),
        _ => format!("{} hours ago", secs / 3600),
    }
}

/// A byte count as people read it.
fn bytes(n: &Value) -> String {
    let n = n.as_u64().unwrap_or(0) as f64;
    match n {
        n if n < 1024.0 => format!("{n} B"),
        n if n < 1024.0 * 1024.0 => format!("{:.2} KiB", n / 1024.0),
        n if n < 1024.0 * 1024.0 * 1024.0 => format!("{:.2} MiB", n / 1024.0 / 1024.0),
        n => format!("{:.2} GiB", n / 1024.0 / 1024.0 / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_socket_in_the_run_directory_is_found_and_several_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let given = Path::new("/x.sock");
        assert_eq!(find_socket(Some(given), dir.path()).unwrap(), given);
        // The environment is the process's: this test sets nothing there, and CI sets no
        // KEYHOLD_SOCKET.
        if std::env::var_os(SOCKET_ENV).is_some() {
            return;
        }
        assert!(find_socket(None, dir.path()).unwrap_err().contains("no node socket"));
        std::fs::write(dir.path().join("notes.txt"), "not a socket").unwrap();
        let one = dir.path().join("node1.sock");
        let _a = std::os::unix::net::UnixListener::bind(&one).unwrap();
        assert_eq!(find_socket(None, dir.path()).unwrap(), one);
        let _b = std::os::unix::net::UnixListener::bind(dir.path().join("node2.sock")).unwrap();
        let several = find_socket(None, dir.path()).unwrap_err();
        assert!(several.contains("2 node sockets") && several.contains("node1.sock"), "{several}");
    }

    #[test]
    fn the_summary_reads_like_wg_show() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = json!({
            "node": { "node": 1, "version": "0.1.0 (git abc)" },
            "links": [{ "peer": 2, "state": "up", "since": 999_990.0, "address": "10.0.0.2:7000",
                        "last_handshake": 999_995.0, "bytes_in": 2048, "bytes_out": 100,
                        "rekeys": 1, "last_failure": "keepalive_timeout",
                        "last_failure_at": 999_000.0 }],
            "partitions": [{ "id": 1, "exit_status": null, "firmware": "echo.elf", "memory_mib": 32 }],
            "stats": [{ "partition": 1, "sent": 5, "sent_bytes": 320, "received": 5,
                        "received_bytes": 320, "refused": 1, "forged": 0, "rejected": 0,
                        "dropped_no_room": 0 }],
            "channels": { "open": 2, "listening": 1, "offering": 0, "peer_closed": 0 },
        });
        let text = render(&s, now);
        assert!(!text.contains("idle on demand"), "no idle links, no count of them");
        let mut on_demand = s.clone();
        on_demand["links"].as_array_mut().unwrap().push(json!({ "peer": 3, "state": "idle" }));
        let quiet = render(&on_demand, now);
        assert!(quiet.contains("  links: 1 up, 1 idle on demand (not shown;"), "{quiet}");
        assert!(!quiet.contains("link: node 3"), "{quiet}");
        for line in [
            "node: 1\n",
            "link: node 2\n  state: up (since 10 seconds ago)\n  address: 10.0.0.2:7000\n",
            "  latest handshake: 5 seconds ago\n",
            "  transfer: 2.00 KiB received, 100 B sent; 1 rekeys\n",
            "  last failure: keepalive_timeout (16 minutes ago)\n",
            "partition: 1\n  state: running\n",
            "  refusals: 1 refused, 0 forged",
            "channels: 2 open, 1 listening, 0 offering",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }
}
