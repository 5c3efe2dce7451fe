//! The link manager: accepts links from any listed node, initiates links to the nodes with a
//! higher ID (so each pair has one link), keeps them alive, notices them die, and reconnects
//! with backoff. Frames for the CMM go to an [`Inbox`] the device thread drains; the CMM sends
//! through a [`LinkHandle`]. Every decision about a link is audited.
//!
//! Nothing a peer does can hold this node up: sends never wait on the peer (each link has a
//! writer thread for what the socket does not take at once, see `link/connection.rs`). A peer
//! that stops sending is dropped after [`DEAD_AFTER`] (keepalives); one that stops reading
//! after [`DEAD_AFTER`] too (the writer's send timeout), or sooner if more than its backlog
//! is queued for it; one whose frames pile up unhandled is dropped by the inbox's backlog.

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snow::TransportState;

use super::connection::Conn;
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
    /// Bytes sealed for the peer and not yet taken by its socket.
    pub queued_out: u64,
    /// Bytes of the peer's frames waiting for the CMM.
    pub queued_in: u64,
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
    /// Bytes of frames that may wait, either way, per link.
    backlog: usize,
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
        conn.send(frame).map_err(|reason| {
            conn.shut_down(reason);
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
        conn.send_all(frames).map_err(|reason| {
            conn.shut_down(reason);
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
        let mut all: Vec<LinkStatus> = lock(&self.shared.status).values().cloned().collect();
        let links = lock(&self.shared.links);
        for status in &mut all {
            status.queued_out = links.get(&status.peer).map_or(0, |c| c.queued() as u64);
            status.queued_in = self.shared.outbox.queued(status.peer) as u64;
        }
        all
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
                        queued_out: 0,
                        queued_in: 0,
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
            backlog,
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
    // A peer that takes nothing for this long is as dead as one that sends nothing.
    if let Err(e) = stream.set_write_timeout(Some(DEAD_AFTER)) {
        log::warn!("link to node {}: send timeout: {e}", peer.id);
        return;
    }
    let (Ok(writer), Ok(socket)) = (stream.try_clone(), stream.try_clone()) else { return };
    let id = shared.next_link.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn::new(id, transport, socket, shared.backlog));
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
    let writer = {
        let (s, c, d, id) = (shared.clone(), conn.clone(), done.clone(), peer.id);
        std::thread::Builder::new()
            .name(format!("link-{id}-out"))
            .spawn(move || write_frames(&s, &c, &d, id, writer))
    };
    let writer = match writer {
        Ok(writer) => Some(writer),
        Err(e) => {
            log::error!("link to node {}: no thread to write it: {e}", peer.id);
            conn.shut_down("no_thread");
            None
        }
    };
    // The first reason to end the link is the one reported: a send failing on the socket the
    // reader has just closed is a consequence, not a cause.
    let read_ended = read_frames(shared, &stream, &conn, peer.id);
    let reason = conn.ended(read_ended);
    done.store(true, Ordering::Release);
    let _ = stream.shutdown(Shutdown::Both);
    if let Some(writer) = writer {
        let _ = writer.join();
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

/// The link's writer: puts what senders queued on the wire, adds a keepalive every
/// [`KEEPALIVE`], and on shutdown a goodbye after everything queued before it.
fn write_frames(shared: &Shared, conn: &Conn, done: &AtomicBool, peer: u32, mut stream: TcpStream) {
    let mut next_keepalive = Instant::now();
    let mut out = Vec::new();
    while !done.load(Ordering::Acquire) {
        let stopping = shared.stop.load(Ordering::Acquire);
        if stopping || Instant::now() >= next_keepalive {
            let frame = if stopping { Frame::Goodbye } else { Frame::Keepalive };
            if let Err(reason) = conn.send(&frame) {
                conn.shut_down(reason);
                return;
            }
            update(shared, peer, conn.id, |s| s.frames_out += 1);
            next_keepalive = Instant::now() + KEEPALIVE;
        }
        // Short waits, so that stopping and the end of the link are noticed promptly.
        if !conn.write_queued(&mut stream, &mut out, Duration::from_millis(20)) {
            return;
        }
        if stopping {
            conn.shut_down("shutdown");
            return;
        }
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

    fn keypair() -> ([u8; 32], [u8; 32]) {
        let kp = snow::Builder::new(handshake::NOISE_PARAMS.parse().unwrap())
            .generate_keypair()
            .unwrap();
        (kp.private.try_into().unwrap(), kp.public.try_into().unwrap())
    }

    /// The test's side of a link, as node 2: it sends when and what it likes, and reads nothing.
    struct Rogue {
        conn: Conn,
        stream: TcpStream,
    }

    impl Rogue {
        /// Seals `frame` and writes it, waiting if need be; false once the link is gone.
        fn send(&mut self, frame: &Frame) -> bool {
            let mut out = Vec::new();
            self.conn.send(frame).is_ok()
                && self.conn.write_queued(&mut self.stream, &mut out, Duration::ZERO)
        }

        /// Keeps the link alive for about `secs` seconds, or until it is dropped.
        fn keep_alive(&mut self, secs: u64) {
            for _ in 0..secs * 10 {
                if !self.send(&Frame::Keepalive) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Node 1, a real link manager, and a link to it from the rogue node 2.
    struct Rig {
        manager: LinkManager,
        inbox: Inbox,
        audit: Audit,
        rogue: JoinHandle<()>,
    }

    impl Rig {
        fn finish(self) {
            drop(self.manager);
            self.rogue.join().unwrap();
        }
    }

    fn rig(backlog: usize, behave: impl FnOnce(Rogue) + Send + 'static) -> Rig {
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
                let conn = Conn::new(0, transport, stream.try_clone().unwrap(), usize::MAX);
                behave(Rogue { conn, stream });
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

    /// Sends 60 KB frames to node 2, `pause` apart, until that fails; returns the longest any
    /// one send took.
    fn send_until_refused(handle: &LinkHandle, pause: Duration) -> Duration {
        let frame = data(60_000);
        let mut longest = Duration::ZERO;
        loop {
            let start = Instant::now();
            let result = handle.send(2, &frame);
            longest = longest.max(start.elapsed());
            if result.is_err() {
                return longest;
            }
            std::thread::sleep(pause);
        }
    }

    #[test]
    fn a_peer_that_stops_reading_is_dropped_without_ever_holding_a_sender() {
        // The rogue proves it is alive but never reads a byte, for longer than the test waits.
        let rig = rig(PEER_BACKLOG, |mut rogue| rogue.keep_alive(30));
        let handle = rig.manager.handle();
        assert!(eventually(|| handle.is_up(2)), "the link never came up");
        // Slowly enough that the backlog is not what ends the link: the send timeout is.
        let longest = send_until_refused(&handle, Duration::from_millis(5));
        assert!(
            eventually(|| audited(&rig.audit, "link_down", "send_timeout")),
            "{:#?}",
            rig.audit.recent()
        );
        // A send only queues; the writer thread is the one that waits on the peer (the old,
        // blocking sends took the whole timeout, 3 s).
        assert!(longest < DEAD_AFTER / 3, "a send took {longest:?}");
        assert!(!handle.is_up(2));
        rig.finish();
    }

    #[test]
    fn a_peer_reading_too_slowly_is_dropped_when_its_backlog_fills() {
        let backlog = 1 << 20;
        let rig = rig(backlog, |mut rogue| rogue.keep_alive(30));
        let handle = rig.manager.handle();
        assert!(eventually(|| handle.is_up(2)), "the link never came up");
        send_until_refused(&handle, Duration::ZERO);
        assert!(
            eventually(|| audited(&rig.audit, "link_down", "send_backlog")),
            "{:#?}",
            rig.audit.recent()
        );
        rig.finish();
    }

    #[test]
    fn a_peer_flooding_the_inbox_is_dropped_and_what_was_queued_stays_bounded() {
        let backlog = 1 << 20;
        let rig = rig(backlog, |mut rogue| {
            let frame = data(60_000);
            while rogue.send(&frame) {}
        });
        // Nothing drains the inbox, as if the device thread were stuck.
        assert!(
            eventually(|| audited(&rig.audit, "frame_rejected", "inbox_overrun")),
            "{:#?}",
            rig.audit.recent()
        );
        assert!(eventually(|| audited(&rig.audit, "link_down", "inbox_overrun")));
        let queued_in = |handle: &LinkHandle| handle.status()[0].queued_in;
        let handle = rig.manager.handle();
        assert!(queued_in(&handle) > 0 && queued_in(&handle) <= backlog as u64);
        let items = rig.inbox.take();
        assert_eq!(queued_in(&handle), 0);
        let frames = items.iter().filter(|i| matches!(i, Inbound::Frame { .. })).count();
        assert!(frames > 0 && frames * 60_000 <= backlog, "{frames} frames were queued");
        assert!(items.iter().any(|i| matches!(i, Inbound::LinkDown(2))));
        rig.finish();
    }
}
