//! Fuzz target `api`: one HTTP request to the control API, served by a real `ApiServer` on a
//! Unix socket (its request parsing and routing are private), with a thread that answers the
//! CMM questions at once as the device thread would.
//!
//! The server takes one connection at a time and sleeps 20 ms when none is waiting, so each
//! input first queues the connection for the next one: the server never finds none waiting.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use guest_agent::channel::abi::{ChannelInfo, Endpoint, Stats};
use keyhold_devices::cmm::audit::{Audit, Record};
use keyhold_devices::cmm::query::{self, Query, Reply};
use keyhold_devices::cmm::ChannelView;
use keyhold_devices::link::{Directory, LinkBook, Peer};
use keyhold_vmm::api::{ApiServer, ApiState, PartitionState};
use keyhold_vmm::claimed_socket::ClaimedSocket;

struct Server {
    _server: ApiServer,
    path: PathBuf,
    next: Mutex<Option<UnixStream>>,
}

fn connect(path: &PathBuf) -> UnixStream {
    let stream = UnixStream::connect(path).expect("a connection to the API");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("a read timeout");
    stream
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE only makes writes to a closed socket fail with EPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let path =
            std::env::temp_dir().join(format!("keyhold-fuzz-api-{}.sock", std::process::id()));
        let (queries, port) = query::channel().expect("a query channel");
        std::thread::spawn(move || {
            let remote = Endpoint { node: 1, partition: 2, process: 9 };
            let info = ChannelInfo {
                channel: 0x10001,
                state: 2,
                process: 7,
                remote,
                ..Default::default()
            };
            while let Ok((query, reply)) = port.receiver.recv() {
                let answer = match query {
                    Query::Channels => Reply::Channels(vec![ChannelView {
                        partition: 1,
                        info,
                        salt: [0xab; 16],
                        tx_epoch: 1,
                        rx_epoch: 2,
                    }]),
                    Query::Stats => {
                        Reply::Stats(vec![(1, Stats { sent: 3, ..Default::default() })])
                    }
                    Query::Revoke { partition, channel } => {
                        Reply::Revoked(if partition == 1 && channel == 0x10001 {
                            Ok(())
                        } else {
                            Err(3)
                        })
                    }
                    // Questions the API never asks.
                    #[allow(unreachable_patterns)]
                    _ => Reply::Revoked(Err(3)),
                };
                let _ = reply.send(answer);
            }
        });
        let peer = |id: u32| Peer {
            id,
            address: format!("127.0.0.1:{}", 7000 + id).parse().expect("an address"),
            public_key: [id as u8; 32],
        };
        let directory = Directory::new(vec![peer(1), peer(2)]);
        let audit = Audit::to_log(1).expect("an audit log");
        audit.record(Record::link("link_up", "authenticated", Some(2)));
        let state = Arc::new(ApiState {
            node: 1,
            partitions: Mutex::new(vec![
                PartitionState {
                    id: 1,
                    firmware: "echo.elf".into(),
                    memory_mib: 32,
                    stopped: None,
                    devices: Vec::new(),
                },
                PartitionState {
                    id: 2,
                    firmware: "ping.elf".into(),
                    memory_mib: 32,
                    stopped: Some((121, "triple fault".into())),
                    devices: Vec::new(),
                },
            ]),
            queries,
            links: Some(Arc::new(LinkBook::new(&directory, 1))),
            membership: Some(Arc::new(Mutex::new(
                keyhold_vmm::membership::MembershipStatus::default(),
            ))),
            audit,
            // No main thread answers the operator's requests here: a stop, a start and a
            // reload are refused at once (503).
            requests: None,
        });
        // No seccomp filter: the fuzzer's own thread would be filtered too.
        let containment = keyhold_vmm::seccomp::Containment::off();
        let socket = ClaimedSocket::claim(&path).expect("the API socket");
        let server = ApiServer::start(Some(socket), None, state, &containment)
            .expect("the API server")
            .expect("a server for the socket");
        let next = Mutex::new(Some(connect(&path)));
        Server { _server: server, path, next }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let server = server();
    let mut next = server.next.lock().unwrap_or_else(|e| e.into_inner());
    let mut stream = next.take().unwrap_or_else(|| connect(&server.path));
    // Queued before this request is answered, so the server finds it at once.
    *next = Some(connect(&server.path));
    // The server may answer (and close) before it has read everything: that is fine.
    let _ = stream.write_all(data);
    let _ = stream.shutdown(Shutdown::Write);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8(response).expect("the response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let code: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    assert!(
        matches!(code, 200 | 202 | 400 | 404 | 405 | 409 | 431 | 503),
        "status {code} for {data:?}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.parse().ok())
        .expect("a Content-Length");
    // A HEAD request (httparse skips empty lines before the request line) is answered with
    // the headers alone.
    let request =
        data.iter().position(|b| !matches!(b, b'\r' | b'\n')).map_or(&[][..], |i| &data[i..]);
    if request.starts_with(b"HEAD ") && code != 400 && code != 431 {
        assert!(body.is_empty(), "no body for HEAD: {body:?}");
        return;
    }
    assert_eq!(length, body.len(), "Content-Length is the body's");
    if head.contains("\r\nContent-Type: text/plain; version=0.0.4") {
        // The metrics: every line a comment or `name[{labels}] value`.
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().expect("a value");
            value.parse::<u64>().expect("a sample's value is a count");
        }
    } else {
        serde_json::from_str::<serde_json::Value>(body).expect("the body is JSON");
    }
});
