//! The link manager: accepts links from any listed node, initiates links to the nodes with a
//! higher ID (so each pair has one link), keeps them alive, notices them die, and reconnects
//! with backoff. Frames for the CMM go to an [`Inbox`] the device thread drains; the CMM sends
//! through a [`LinkHandle`]. Every decision about a link is audited.
//!
//! Nothing a peer does can hold this node up for long: a peer that stops sending is dropped
//! after [`DEAD_AFTER`] (keepalives), one that stops reading after [`DEAD_AFTER`] too (a send
//! that makes no progress for that long fails), and one whose frames pile up unhandled is
//! dropped by the inbox's backlog limit.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snow::TransportState;

use super::directory::{Directory, Peer};
use super::handshake::{self, HandshakeError};
use super::inbox::{self, Inbox, Outbox, PEER_BACKLOG};
use super::wire::{self, Assembler, Frame, MAX_MESSAGE};
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

/// One authenticated link.
struct Conn {
    id: u64,
    /// Encrypting and writing a frame's messages happen under this lock, so the order on the
    /// wire is the order of the Noise nonces.
    writer: Mutex<Writer>,
    transport: Mutex<TransportState>,
    /// The socket again, to shut down without waiting for the writer.
    socket: TcpStream,
    /// Why this side ended the link, when it did (the reader then only sees the socket close).
    ended: Mutex<Option<&'static str>>,
}

/// The sending side of a link, with buffers reused from frame to frame.
struct Writer {
    stream: TcpStream,
    /// The encoded frame (wiped after each send: an offer carries a key).
    frame: Vec<u8>,
    /// One length-prefixed Noise message.
    message: Vec<u8>,
}

/// Encrypted messages gathered before one write, so a batch of frames costs one syscall.
const WRITE_BATCH: usize = 256 * 1024;

impl Conn {
    fn send(&self, frame: &Frame) -> io::Result<()> {
        self.send_all([frame])
    }

    /// Encrypts `frames` in order and writes them, gathering up to [`WRITE_BATCH`] bytes per
    /// write.
    fn send_all<'f>(&self, frames: impl IntoIterator<Item = &'f Frame>) -> io::Result<()> {
        let mut writer = lock(&self.writer);
        let Writer { stream, frame: bytes, message } = &mut *writer;
        message.clear();
        for frame in frames {
            frame.encode(bytes);
            let sealed = wire::chunks(bytes, |plain| {
                let start = message.len();
                message.resize(start + 2 + MAX_MESSAGE, 0);
                let n = lock(&self.transport)
                    .write_message(plain, &mut message[start + 2..])
                    .map_err(|e| io::Error::other(e.to_string()))?;
                // Noise messages are at most MAX_MESSAGE (65,535) bytes, so the length fits.
                message[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
                message.truncate(start + 2 + n);
                Ok(())
            });
            zeroize::Zeroize::zeroize(bytes);
            sealed?;
            if message.len() >= WRITE_BATCH {
                stream.write_all(message)?;
                message.clear();
            }
        }
        stream.write_all(message)
    }

    /// Ends the connection (both directions) for `reason`, waking its reader.
    fn shut_down(&self, reason: &'static str) {
        lock(&self.ended).get_or_insert(reason);
        // Not through the writer's lock: a send may hold it, stuck until its timeout.
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Ends the connection after a failed send.
    fn send_failed(&self, error: &io::Error) {
        let reason = match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "send_timeout",
            _ => "send_failed",
        };
        self.shut_down(reason);
    }
}

struct Shared {
    own_id: u32,
    own_key: [u8; 32],
    directory: Directory,
    audit: Audit,
    stop: AtomicBool,
    status: Mutex<BTreeMap<u32, LinkStatus>>,
    next_link: AtomicU64,
    links: Mutex<BTreeMap<u32, Arc<Conn>>>,
    outbox: Outbox,
    /// Threads serving accepted links, joined at shutdown so their last records are written.
    accepted: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.own_key);
    }
}

/// Sends frames to other nodes; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No link to that node is up.
    NoLink,
    /// The link failed while sending; it is being torn down.
    Broken,
}

impl LinkHandle {
    /// Sends `frame` to `node` over its link.
    pub fn send(&self, node: u32, frame: &Frame) -> Result<(), SendError> {
        let conn = lock(&self.shared.links).get(&node).cloned().ok_or(SendError::NoLink)?;
        conn.send(frame).map_err(|e| {
            conn.send_failed(&e);
            SendError::Broken
        })?;
        update(&self.shared, node, conn.id, |s| s.frames_out += 1);
        Ok(())
    }

    /// Sends `frames`, in order, to `node` with as few writes as possible.
    pub fn send_all<'f>(
        &self,
        node: u32,
        frames: impl ExactSizeIterator<Item = &'f Frame>,
    ) -> Result<(), SendError> {
        let conn = lock(&self.shared.links).get(&node).cloned().ok_or(SendError::NoLink)?;
        let count = frames.len() as u64;
        conn.send_all(frames).map_err(|e| {
            conn.send_failed(&e);
            SendError::Broken
        })?;
        update(&self.shared, node, conn.id, |s| s.frames_out += count);
        Ok(())
    }

    /// Whether a link to `node` is up.
    pub fn is_up(&self, node: u32) -> bool {
        lock(&self.shared.links).contains_key(&node)
    }

    /// Every peer's link status.
    pub fn status(&self) -> Vec<LinkStatus> {
        lock(&self.shared.status).values().cloned().collect()
    }
}

/// The running links of a node; dropping it says goodbye on every link.
pub struct LinkManager {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl LinkManager {
    /// Listens on `listen` and starts linking to the other nodes of `directory`; returns the
    /// manager and the inbox the CMM must drain.
    pub fn start(
        own_id: u32,
        own_key: [u8; 32],
        directory: Directory,
        listen: SocketAddr,
        audit: Audit,
    ) -> io::Result<(Self, Inbox)> {
        Self::start_with_backlog(own_id, own_key, directory, listen, audit, PEER_BACKLOG)
    }

    fn start_with_backlog(
        own_id: u32,
        own_key: [u8; 32],
        directory: Directory,
        listen: SocketAddr,
        audit: Audit,
        backlog: usize,
    ) -> io::Result<(Self, Inbox)> {
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
        let peers = directory.peers().iter().map(|p| p.id).filter(|&id| id != own_id);
        let (outbox, inbox) = inbox::inbox(peers, backlog)?;
        let shared = Arc::new(Shared {
            own_id,
            own_key,
            directory,
            audit,
            stop: AtomicBool::new(false),
            status: Mutex::new(status),
            next_link: AtomicU64::new(1),
            links: Mutex::new(BTreeMap::new()),
            outbox,
            accepted: Mutex::new(Vec::new()),
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
        Ok((Self { shared, local_addr, threads }, inbox))
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to send frames with.
    pub fn handle(&self) -> LinkHandle {
        LinkHandle { shared: self.shared.clone() }
    }
}

impl Drop for LinkManager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The accept loop has ended, so no thread is added any more.
        let accepted = std::mem::take(&mut *lock(&self.shared.accepted));
        for thread in accepted {
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
                match spawned {
                    Ok(thread) => {
                        let mut accepted = lock(&shared.accepted);
                        accepted.retain(|t| !t.is_finished());
                        accepted.push(thread);
                    }
                    Err(e) => log::error!("link from {from}: no thread for it: {e}"),
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
        if let Err(e) = connect_one(shared, peer) {
            log::debug!("link to node {} at {}: {e}", peer.id, peer.address);
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
    // Frames are written whole; Nagle's algorithm would hold small ones back for an ACK that
    // the peer delays (40 ms per round trip).
    if let Err(e) = stream.set_nodelay(true) {
        log::warn!("link to node {}: TCP_NODELAY: {e}", peer.id);
    }
    // A peer that takes nothing for this long is as dead as one that sends nothing; without
    // the limit it could hold the device thread (and every local channel) in a send forever.
    if let Err(e) = stream.set_write_timeout(Some(DEAD_AFTER)) {
        log::warn!("link to node {}: send timeout: {e}", peer.id);
        return;
    }
    let (Ok(writer), Ok(socket)) = (stream.try_clone(), stream.try_clone()) else { return };
    let conn = Arc::new(Conn {
        id: shared.next_link.fetch_add(1, Ordering::Relaxed),
        writer: Mutex::new(Writer { stream: writer, frame: Vec::new(), message: Vec::new() }),
        transport: Mutex::new(transport),
        socket,
        ended: Mutex::new(None),
    });
    // A newer link to the same node (it restarted) replaces the older one.
    if let Some(old) = lock(&shared.links).insert(peer.id, conn.clone()) {
        old.shut_down("replaced");
    }
    update(shared, peer.id, conn.id, |s| {
        s.up = true;
        s.frames_in = 0;
        s.frames_out = 0;
        s.established += 1;
    });
    shared.audit.record(Record::link("link_up", "authenticated", Some(peer.id)));
    log::info!("link to node {} up", peer.id);
    let done = Arc::new(AtomicBool::new(false));
    let keeper = {
        let (s, c, d, id) = (shared.clone(), conn.clone(), done.clone(), peer.id);
        std::thread::Builder::new()
            .name(format!("link-{id}-alive"))
            .spawn(move || keepalive(&s, &c, &d, id))
            .ok()
    };
    // The first reason to end the link is the one reported: a send failing on the socket the
    // reader has just closed is a consequence, not a cause.
    let read_ended = read_frames(shared, &stream, &conn, peer.id);
    let reason = *lock(&conn.ended).get_or_insert(read_ended);
    done.store(true, Ordering::Release);
    let _ = stream.shutdown(Shutdown::Both);
    if let Some(keeper) = keeper {
        let _ = keeper.join();
    }
    update(shared, peer.id, conn.id, |s| s.up = false);
    let current = {
        let mut links = lock(&shared.links);
        let current = links.get(&peer.id).is_some_and(|c| c.id == conn.id);
        if current {
            links.remove(&peer.id);
        }
        current
    };
    shared.audit.record(Record::link("link_down", reason, Some(peer.id)));
    log::info!("link to node {} down: {reason}", peer.id);
    if current {
        shared.outbox.link_down(peer.id);
    }
}

/// Reads and checks frames until the link ends; returns why it ended.
fn read_frames(shared: &Shared, stream: &TcpStream, conn: &Conn, peer: u32) -> &'static str {
    if stream.set_read_timeout(Some(DEAD_AFTER)).is_err() {
        return "socket_error";
    }
    let mut reader = stream;
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let mut plain = Box::new([0u8; MAX_MESSAGE]);
    let mut assembler = Assembler::default();
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
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return reject(shared, peer, "malformed_message")
            }
            Err(_) => {
                return if shared.stop.load(Ordering::Acquire) {
                    "shutdown"
                } else {
                    "connection_lost"
                }
            }
        };
        let Ok(n) = lock(&conn.transport).read_message(&buf[..len], &mut plain[..]) else {
            return reject(shared, peer, "bad_link_authentication");
        };
        let frame = match assembler.push(&plain[..n]) {
            Ok(None) => continue,
            Ok(Some(bytes)) => Frame::decode(bytes),
            Err(e) => Err(e),
        };
        assembler.reset();
        update(shared, peer, conn.id, |s| s.frames_in += 1);
        match frame {
            Ok(Frame::Keepalive) => {}
            Ok(Frame::Goodbye) => return "goodbye",
            Ok(frame) => {
                if shared.outbox.frame(peer, frame).is_err() {
                    return reject(shared, peer, "inbox_overrun");
                }
            }
            Err(e) => return reject(shared, peer, e.reason()),
        }
    }
}

/// Audits a frame that ends the link.
fn reject(shared: &Shared, peer: u32, reason: &'static str) -> &'static str {
    shared.audit.record(Record::link("frame_rejected", reason, Some(peer)));
    reason
}

/// Sends a keepalive every [`KEEPALIVE`] until the link is done, and a goodbye on shutdown.
fn keepalive(shared: &Shared, conn: &Conn, done: &AtomicBool, peer: u32) {
    let mut next = Instant::now();
    while !done.load(Ordering::Acquire) {
        let stopping = shared.stop.load(Ordering::Acquire);
        if stopping || Instant::now() >= next {
            let frame = if stopping { Frame::Goodbye } else { Frame::Keepalive };
            if let Err(e) = conn.send(&frame) {
                conn.send_failed(&e);
                return;
            }
            if stopping {
                conn.shut_down("shutdown");
                return;
            }
            update(shared, peer, conn.id, |s| s.frames_out += 1);
            next = Instant::now() + KEEPALIVE;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Updates `peer`'s status if `link` is still the one that owns it.
fn update(shared: &Shared, peer: u32, link: u64, f: impl FnOnce(&mut LinkStatus)) {
    if lock(&shared.links).get(&peer).is_none_or(|c| c.id != link) {
        return;
    }
    if let Some(status) = lock(&shared.status).get_mut(&peer) {
        f(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::inbox::tests::data;
    use crate::link::Inbound;
    use std::sync::mpsc;

    fn keypair() -> ([u8; 32], [u8; 32]) {
        let kp = snow::Builder::new(handshake::NOISE_PARAMS.parse().unwrap())
            .generate_keypair()
            .unwrap();
        (kp.private.try_into().unwrap(), kp.public.try_into().unwrap())
    }

    /// Node 1, a real link manager, and a link to it from the test acting as node 2 (whose
    /// behaviour is `rogue`, given the authenticated connection).
    struct Rig {
        manager: LinkManager,
        inbox: Inbox,
        audit: Audit,
        rogue: JoinHandle<()>,
    }

    fn rig(backlog: usize, rogue: impl FnOnce(Conn) + Send + 'static) -> Rig {
        let (key1, pub1) = keypair();
        let (key2, pub2) = keypair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![
            Peer { id: 1, address: "127.0.0.1:1".parse().unwrap(), public_key: pub1 },
            Peer { id: 2, address: listener.local_addr().unwrap(), public_key: pub2 },
        ];
        let directory = Directory::new(peers);
        let rogue = {
            let directory = directory.clone();
            std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let (transport, peer) = handshake::respond(&mut stream, &key2, &directory).unwrap();
                assert_eq!(peer.id, 1);
                let conn = Conn {
                    id: 0,
                    writer: Mutex::new(Writer {
                        stream: stream.try_clone().unwrap(),
                        frame: Vec::new(),
                        message: Vec::new(),
                    }),
                    transport: Mutex::new(transport),
                    socket: stream,
                    ended: Mutex::new(None),
                };
                rogue(conn);
            })
        };
        let audit = Audit::new(1, None);
        let any = "127.0.0.1:0".parse().unwrap();
        let (manager, inbox) =
            LinkManager::start_with_backlog(1, key1, directory, any, audit.clone(), backlog)
                .unwrap();
        Rig { manager, inbox, audit, rogue }
    }

    /// Waits (up to 20 s) for `what` to hold.
    fn eventually(what: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn audited(audit: &Audit, event: &str, reason: &str) -> bool {
        let wanted = format!("\"event\":\"{event}\",\"reason\":\"{reason}\"");
        audit.recent().iter().any(|r| r.contains(&wanted))
    }

    #[test]
    fn a_peer_that_stops_reading_cannot_hold_a_sender_forever() {
        // The rogue proves it is alive but never reads a byte, for longer than the test waits.
        let rig = rig(PEER_BACKLOG, |conn| {
            for _ in 0..300 {
                if conn.send(&Frame::Keepalive).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let handle = rig.manager.handle();
        assert!(eventually(|| handle.is_up(2)), "the link never came up");
        let (done, outcome) = mpsc::channel();
        let sender = handle.clone();
        std::thread::spawn(move || {
            let frame = data(60_000);
            let result = loop {
                if let Err(e) = sender.send(2, &frame) {
                    break e;
                }
            };
            let _ = done.send(result);
        });
        let result = outcome.recv_timeout(DEAD_AFTER * 5).expect("a send hung on a silent peer");
        assert_eq!(result, SendError::Broken);
        assert!(
            eventually(|| audited(&rig.audit, "link_down", "send_timeout")),
            "{:#?}",
            rig.audit.recent()
        );
        assert!(!handle.is_up(2));
        drop(rig.manager);
        rig.rogue.join().unwrap();
    }

    #[test]
    fn a_peer_flooding_the_inbox_is_dropped_and_what_was_queued_stays_bounded() {
        let backlog = 1 << 20;
        let rig = rig(backlog, |conn| {
            let frame = data(60_000);
            while conn.send(&frame).is_ok() {}
        });
        // Nothing drains the inbox, as if the device thread were stuck.
        assert!(
            eventually(|| audited(&rig.audit, "frame_rejected", "inbox_overrun")),
            "{:#?}",
            rig.audit.recent()
        );
        assert!(eventually(|| audited(&rig.audit, "link_down", "inbox_overrun")));
        let items = rig.inbox.take();
        let frames = items.iter().filter(|i| matches!(i, Inbound::Frame { .. })).count();
        assert!(frames > 0 && frames * 60_000 <= backlog, "{frames} frames were queued");
        assert!(items.iter().any(|i| matches!(i, Inbound::LinkDown(2))));
        drop(rig.manager);
        rig.rogue.join().unwrap();
    }
}
