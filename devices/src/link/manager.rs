//! The link manager: accepts links from any listed node, initiates links to the nodes with a
//! higher ID (so each pair has one link), keeps them alive, notices them die, and reconnects
//! with backoff. Every decision about a link is audited.

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snow::TransportState;

use super::directory::{Directory, Peer};
use super::handshake::{self, HandshakeError};
use super::wire::{self, Frame, MAX_MESSAGE};
use crate::bus::lock;
use crate::cmm::audit::{Audit, Record};

/// How often an idle link proves itself alive.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// Silence after which a link is declared dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the node knows about its link to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// The peer node.
    pub peer: u32,
    /// Whether an authenticated link is up.
    pub up: bool,
    /// Frames received on the current or last link.
    pub frames_in: u64,
    /// Frames sent on the current or last link.
    pub frames_out: u64,
    /// Times a link to this peer came up.
    pub established: u64,
}

struct Shared {
    own_id: u32,
    own_key: [u8; 32],
    directory: Directory,
    audit: Audit,
    stop: AtomicBool,
    status: Mutex<BTreeMap<u32, LinkStatus>>,
    next_link: AtomicU64,
    /// The link currently owning each peer's status (a newer link replaces an older one).
    owner: Mutex<BTreeMap<u32, u64>>,
}

/// The running links of a node; dropping it says goodbye on every link.
pub struct LinkManager {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl LinkManager {
    /// Listens on `listen` and starts linking to the other nodes of `directory`.
    pub fn start(
        own_id: u32,
        own_key: [u8; 32],
        directory: Directory,
        listen: SocketAddr,
        audit: Audit,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let status = directory
            .peers()
            .iter()
            .filter(|p| p.id != own_id)
            .map(|p| {
                (
                    p.id,
                    LinkStatus {
                        peer: p.id,
                        up: false,
                        frames_in: 0,
                        frames_out: 0,
                        established: 0,
                    },
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            own_id,
            own_key,
            directory,
            audit,
            stop: AtomicBool::new(false),
            status: Mutex::new(status),
            next_link: AtomicU64::new(1),
            owner: Mutex::new(BTreeMap::new()),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("link-accept".into())
                .spawn(move || accept_loop(&s, &listener))?,
        );
        for peer in shared.directory.peers().iter().filter(|p| p.id > own_id).cloned() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("link-{}", peer.id))
                    .spawn(move || connect_loop(&s, &peer))?,
            );
        }
        Ok(Self { shared, local_addr, threads })
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every peer's link status.
    pub fn status(&self) -> Vec<LinkStatus> {
        lock(&self.shared.status).values().cloned().collect()
    }
}

impl Drop for LinkManager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, from)) => {
                let s = shared.clone();
                let spawned = std::thread::Builder::new().name("link-in".into()).spawn(move || {
                    if let Err(e) = accept_one(&s, stream) {
                        log::warn!("link from {from} refused: {}", e.reason());
                    }
                });
                if let Err(e) = spawned {
                    log::error!("link from {from}: no thread for it: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                log::warn!("accepting a link: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn accept_one(shared: &Arc<Shared>, mut stream: TcpStream) -> Result<(), HandshakeError> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    match handshake::respond(&mut stream, &shared.own_key, &shared.directory) {
        Ok((transport, peer)) => {
            run_link(shared, stream, transport, &peer);
            Ok(())
        }
        Err(e) => {
            let peer = match &e {
                HandshakeError::ClaimsOtherNode { listed, .. } => Some(*listed),
                _ => None,
            };
            shared.audit.record(Record::link("link_rejected", e.reason(), peer));
            Err(e)
        }
    }
}

fn connect_loop(shared: &Arc<Shared>, peer: &Peer) {
    let mut backoff = BACKOFF_MIN;
    while !shared.stop.load(Ordering::Acquire) {
        let started = Instant::now();
        match connect_one(shared, peer) {
            Ok(()) => {}
            Err(e) => log::debug!("link to node {} at {}: {e}", peer.id, peer.address),
        }
        // A link that lived a while earns a quick reconnect; repeated failures back off.
        backoff = if started.elapsed() > BACKOFF_MAX {
            BACKOFF_MIN
        } else {
            (backoff * 2).min(BACKOFF_MAX)
        };
        sleep_unless_stopped(shared, backoff);
    }
}

fn connect_one(shared: &Arc<Shared>, peer: &Peer) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&peer.address, HANDSHAKE_TIMEOUT)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    match handshake::initiate(&mut stream, shared.own_id, &shared.own_key, peer) {
        Ok(transport) => {
            run_link(shared, stream, transport, peer);
            Ok(())
        }
        Err(e) => {
            shared.audit.record(Record::link("link_failed", e.reason(), Some(peer.id)));
            Err(io::Error::other(e.reason()))
        }
    }
}

fn sleep_unless_stopped(shared: &Shared, total: Duration) {
    let until = Instant::now() + total;
    while Instant::now() < until && !shared.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serves an authenticated link until it ends: keepalives out, frames in.
fn run_link(shared: &Arc<Shared>, stream: TcpStream, transport: TransportState, peer: &Peer) {
    let link = shared.next_link.fetch_add(1, Ordering::Relaxed);
    lock(&shared.owner).insert(peer.id, link);
    update(shared, peer.id, link, |s| {
        s.up = true;
        s.frames_in = 0;
        s.frames_out = 0;
        s.established += 1;
    });
    shared.audit.record(Record::link("link_up", "authenticated", Some(peer.id)));
    log::info!("link to node {} up", peer.id);
    let transport = Arc::new(Mutex::new(transport));
    let done = Arc::new(AtomicBool::new(false));
    let writer = stream.try_clone().ok().and_then(|out| {
        let (s, t, d, id) = (shared.clone(), transport.clone(), done.clone(), peer.id);
        std::thread::Builder::new()
            .name(format!("link-{id}-out"))
            .spawn(move || keepalive(&s, out, &t, &d, id, link))
            .ok()
    });
    let reason = read_frames(shared, &stream, &transport, peer.id, link);
    done.store(true, Ordering::Release);
    let _ = stream.shutdown(Shutdown::Both);
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    update(shared, peer.id, link, |s| s.up = false);
    shared.audit.record(Record::link("link_down", reason, Some(peer.id)));
    log::info!("link to node {} down: {reason}", peer.id);
}

/// Reads and checks frames until the link ends; returns why it ended.
fn read_frames(
    shared: &Shared,
    stream: &TcpStream,
    transport: &Mutex<TransportState>,
    peer: u32,
    link: u64,
) -> &'static str {
    if stream.set_read_timeout(Some(DEAD_AFTER)).is_err() {
        return "socket_error";
    }
    let mut reader = stream;
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let mut plain = Box::new([0u8; MAX_MESSAGE]);
    loop {
        let len = match wire::read_message(&mut reader, &mut buf) {
            Ok(len) => len,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return if shared.stop.load(Ordering::Acquire) {
                    "shutdown"
                } else {
                    "keepalive_timeout"
                };
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return "malformed_frame",
            Err(_) => {
                return if shared.stop.load(Ordering::Acquire) {
                    "shutdown"
                } else {
                    "connection_lost"
                }
            }
        };
        let Ok(n) = lock(transport).read_message(&buf[..len], &mut plain[..]) else {
            shared.audit.record(Record::link(
                "frame_rejected",
                "bad_link_authentication",
                Some(peer),
            ));
            return "bad_link_authentication";
        };
        match Frame::decode(&plain[..n]) {
            Ok(Frame::Keepalive) => update(shared, peer, link, |s| s.frames_in += 1),
            Ok(Frame::Goodbye) => return "goodbye",
            Err(e) => {
                shared.audit.record(Record::link("frame_rejected", e.reason(), Some(peer)));
                return e.reason();
            }
        }
    }
}

/// Sends a keepalive every [`KEEPALIVE`] until the link is done, and a goodbye on shutdown.
fn keepalive(
    shared: &Shared,
    mut out: TcpStream,
    transport: &Mutex<TransportState>,
    done: &AtomicBool,
    peer: u32,
    link: u64,
) {
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let mut next = Instant::now();
    while !done.load(Ordering::Acquire) {
        let stopping = shared.stop.load(Ordering::Acquire);
        if stopping || Instant::now() >= next {
            let frame = if stopping { Frame::Goodbye } else { Frame::Keepalive };
            let sent = lock(transport)
                .write_message(&frame.encode(), &mut buf[..])
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|n| wire::write_message(&mut out, &buf[..n]));
            if sent.is_err() || stopping {
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            update(shared, peer, link, |s| s.frames_out += 1);
            next = Instant::now() + KEEPALIVE;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Updates `peer`'s status if `link` is still the one that owns it.
fn update(shared: &Shared, peer: u32, link: u64, f: impl FnOnce(&mut LinkStatus)) {
    if lock(&shared.owner).get(&peer) != Some(&link) {
        return;
    }
    if let Some(status) = lock(&shared.status).get_mut(&peer) {
        f(status);
    }
}
