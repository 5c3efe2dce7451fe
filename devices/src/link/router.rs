//! The router: every established link, run on the device thread beside the CMM, so a message
//! goes from a guest's buffer to the socket, and from the socket to a guest's buffer, without
//! a hand-over between threads.
//!
//! Out: frames for a peer are staged in its link's header block (secret memory: an OFFER
//! carries a key) and payload buffer; DATA payloads are copied there from guest memory and
//! sealed in place by the CMM. A record is sealed and written (one gathered write) when the
//! block or the payloads fill up, and at the end of every batch. What the socket does not take
//! at once waits in the link's backlog for the socket to become writable; a peer that lets it
//! pass [`RouterConfig::backlog`] or reads nothing for [`RouterConfig::dead_after`] loses its
//! link.
//!
//! In: each readable event reads as much as the socket holds (many records per read), opens
//! each record's header block with the link's session and hands its frames, with their
//! payloads in place in the receive buffer, to the CMM.
//!
//! The router also keeps links alive (KEEPALIVE after [`RouterConfig::keepalive`] of silence,
//! dead after [`RouterConfig::dead_after`] without an authenticated record) and rekeys their
//! sessions (`session.rs`).

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::directory::SharedDirectory;
use super::handshake;
use super::session::Sessions;
use super::setup::{Ended, Established};
use super::status::{Counters, LinkBook, LinkState};
use super::timestamp::ReplayGuard;
use super::wire::{
    self, check_block, DataHead, Frame, FrameError, CREDIT_VERSION, MAX_BLOCK, MAX_RECORD_PAYLOAD,
    MSG1_SIZE, NOISE_TAG,
};
use crate::cmm::audit::{Audit, Record};
use crate::crypto::channel::TAG_SIZE;
use crate::crypto::node_key::NodeKey;
use crate::memcopy;
use crate::secret::SecretBox;

/// Largest record: length, sealed header block, payloads.
const MAX_RECORD: usize = 2 + MAX_BLOCK + NOISE_TAG + MAX_RECORD_PAYLOAD;
/// Bytes of a link's receive buffer: room for a whole record and the start of the next.
const RX_BUFFER: usize = 2 * MAX_RECORD;
/// Bytes of each link socket's kernel buffers, each way (the kernel may cap it).
const SOCKET_BUFFER: usize = 4 << 20;
/// Payload bytes staged before a record goes out without waiting for the batch to end.
const FLUSH_AT: usize = 128 * 1024;

/// Timing and bounds of established links.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    /// Silence after which a KEEPALIVE is sent.
    pub keepalive: Duration,
    /// Time without an authenticated record, or without progress writing, after which a link
    /// is dead.
    pub dead_after: Duration,
    /// Session age after which the initiator starts a rekey.
    pub rekey_after: Duration,
    /// Records (sealed and opened) after which the initiator starts a rekey.
    pub rekey_after_records: u64,
    /// How long a rekey handshake may take.
    pub rekey_timeout: Duration,
    /// Bytes that may wait for a slow peer's socket.
    pub backlog: usize,
    /// Links on demand: a link is made when a channel needs it and closed after this long
    /// with no channel over it. `None`: every peer is linked all the time (a full mesh).
    pub idle_after: Option<Duration>,
}

impl RouterConfig {
    /// Session age after which the responder drops a link that was not rekeyed.
    pub fn reject_after(&self) -> Duration {
        self.rekey_after + self.rekey_after / 2
    }

    /// Records after which the responder drops a link that was not rekeyed (twice the
    /// rekey point: records keep flowing while the rekey handshake crosses).
    pub fn reject_after_records(&self) -> u64 {
        self.rekey_after_records.saturating_mul(2)
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            rekey_after: Duration::from_secs(120),
            rekey_after_records: 1 << 40,
            rekey_timeout: Duration::from_secs(5),
            backlog: 64 << 20,
            idle_after: None,
        }
    }
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No link to that node is up.
    NoLink,
    /// The payload could not be read or sealed; nothing was staged.
    Payload,
}

/// What the device thread must change in its epoll set.
#[derive(Debug)]
pub enum FdChange {
    /// Watch `fd` (readable; writable too if `writable`) with `token`.
    Watch {
        /// The socket.
        fd: RawFd,
        /// The link's token.
        token: usize,
        /// Whether to wait for writability too.
        writable: bool,
    },
    /// Stop watching this ended link's socket, then close it. The socket stays open until
    /// then: epoll cannot be told to forget a descriptor already closed, and a new link may
    /// soon reuse its number.
    Forget(TcpStream),
}

/// Frames for the CMM: `(node, frame, payload)`. A DATA frame's payload is its sealed bytes,
/// in place in the receive buffer, for the CMM to open in place.
pub type Handler<'h> = dyn FnMut(u32, Frame<'_>, &mut [u8]) + 'h;

/// What every link of the node shares.
pub(super) struct Context {
    pub(super) own_id: u32,
    pub(super) key: Arc<NodeKey>,
    pub(super) directory: Arc<SharedDirectory>,
    pub(super) replays: Arc<ReplayGuard>,
    pub(super) audit: Audit,
    pub(super) book: Arc<LinkBook>,
    pub(super) config: RouterConfig,
}

/// Where the router meets the link-setup thread.
pub struct Arrivals {
    /// New links.
    pub links: Receiver<Established>,
    /// Written with each new link.
    pub wake: EventFd,
    /// Tells the setup thread a link ended.
    pub ended: Sender<Ended>,
    /// Wakes the setup thread.
    pub setup_wake: EventFd,
    /// Links to end on the operator's word (a reloaded cluster file), with the reason;
    /// `wake` is written with each.
    pub closes: Receiver<(u32, &'static str)>,
    /// Asks the setup thread for a link (links on demand).
    pub wants: Sender<u32>,
    /// Peers the setup thread could not link with, as asked; `wake` is written with each.
    pub unreachable: Receiver<u32>,
}

/// Every established link of the node.
pub struct Router {
    context: Option<Context>,
    arrivals: Option<Arrivals>,
    links: Vec<Option<Link>>,
    by_node: HashMap<u32, usize>,
    fd_changes: Vec<FdChange>,
    downs: Vec<u32>,
    /// Peers asked of the setup thread and not linked or refused yet.
    wanted: HashSet<u32>,
    ups: Vec<u32>,
    unreachable: Vec<u32>,
}

struct Link {
    peer: u32,
    socket: TcpStream,
    remote: SocketAddr,
    initiator: bool,
    /// The protocol version the handshake settled on.
    version: u8,
    sessions: Sessions,
    born: Instant,
    last_rx: Instant,
    last_tx: Instant,
    stats: Arc<Counters>,
    backlog_limit: usize,
    /// Received bytes not yet processed: `rx[rx_start..rx_end]`.
    rx: memcopy::PageAligned,
    rx_start: usize,
    rx_end: usize,
    /// The header block of the record being received, decrypted, while its payloads arrive:
    /// its length and the payload bytes that follow it.
    open_block: Option<(usize, usize)>,
    /// Decrypted header blocks (they may carry a key).
    plain: SecretBox<[u8; MAX_BLOCK]>,
    /// Frames staged to send.
    block: SecretBox<[u8; MAX_BLOCK]>,
    block_len: usize,
    block_has_key: bool,
    frames: u64,
    /// Payloads staged to send, sealed: `payload[..payload_len]`.
    payload: Vec<u8>,
    payload_len: usize,
    /// The sealed header block of the record being written.
    record: Vec<u8>,
    /// Bytes the socket did not take yet: `backlog[backlog_start..]`.
    backlog: Vec<u8>,
    backlog_start: usize,
    /// Since when the backlog has been waiting without progress.
    stalled: Option<Instant>,
    writable: bool,
    /// Whether what is staged must go at the next flush. Lazy frames alone (grants of credit
    /// the sender does not need yet) wait for other frames, for the peer's next messages, or
    /// for the link timer, so that they ride in a record that goes anyway.
    urgent: bool,
    /// Whether a DATA frame came in the records read in this call.
    data_in: bool,
}

impl Router {
    /// A router with no links: a node outside any cluster.
    pub fn unlinked() -> Self {
        Self {
            context: None,
            arrivals: None,
            links: Vec::new(),
            by_node: HashMap::new(),
            fd_changes: Vec::new(),
            downs: Vec::new(),
            wanted: HashSet::new(),
            ups: Vec::new(),
            unreachable: Vec::new(),
        }
    }

    /// A router for the links the setup thread hands over through `arrivals`.
    pub(super) fn new(context: Context, arrivals: Arrivals) -> Self {
        Self { context: Some(context), arrivals: Some(arrivals), ..Self::unlinked() }
    }

    /// The eventfd written when a link arrives (`None` without a cluster).
    pub fn arrivals_fd(&self) -> Option<RawFd> {
        self.arrivals.as_ref().map(|a| a.wake.as_raw_fd())
    }

    /// The epoll changes the device thread must make, in order.
    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        std::mem::take(&mut self.fd_changes)
    }

    /// Whether epoll changes are waiting.
    pub fn has_fd_changes(&self) -> bool {
        !self.fd_changes.is_empty()
    }

    /// Whether links went down or came up, or peers proved unreachable, since the last
    /// `take_*` calls: the CMM looks at every message, and most find nothing.
    pub fn has_link_changes(&self) -> bool {
        !(self.downs.is_empty() && self.ups.is_empty() && self.unreachable.is_empty())
    }

    /// Peers whose links went down since the last call: their channels are gone.
    pub fn take_downs(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.downs)
    }

    /// Whether a link to `node` is up.
    pub fn is_up(&self, node: u32) -> bool {
        self.by_node.contains_key(&node)
    }

    /// The peers with a link up.
    pub fn up_nodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_node.keys().copied()
    }

    /// How long a link on demand may go unused (`None`: links are a full mesh).
    pub fn idle_after(&self) -> Option<Duration> {
        self.context.as_ref().and_then(|c| c.config.idle_after)
    }

    /// Asks for a link to `node` (links on demand): [`Router::take_ups`] or
    /// [`Router::take_unreachable`] says later how it went.
    pub fn want(&mut self, node: u32) {
        if self.is_up(node) || !self.wanted.insert(node) {
            return;
        }
        let Some(arrivals) = &self.arrivals else {
            self.wanted.remove(&node);
            return self.unreachable.push(node);
        };
        if arrivals.wants.send(node).is_ok() {
            let _ = arrivals.setup_wake.write(1);
        }
    }

    /// Peers whose links came up since the last call.
    pub fn take_ups(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.ups)
    }

    /// Peers asked for that could not be linked with, since the last call.
    pub fn take_unreachable(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.unreachable)
    }

    /// Ends the link to `node`, unused for its idle time, with a GOODBYE if its socket takes
    /// it at once (the device thread does not wait on a peer that stopped reading).
    pub fn close_idle(&mut self, node: u32) {
        let Some(&token) = self.by_node.get(&node) else { return };
        self.say_goodbye(token, None);
        self.end(token, "idle");
    }

    /// Frames sent to `node` on its current link (for tests of what goes when).
    #[cfg(test)]
    pub fn frames_sent(&self, node: u32) -> u64 {
        let link = self.by_node.get(&node).and_then(|&t| self.links.get(t)?.as_ref());
        link.map_or(0, |l| l.stats.frames_out.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The static public key the directory names for `node` now.
    pub fn peer_key(&self, node: u32) -> Option<[u8; 32]> {
        let context = self.context.as_ref()?;
        context.directory.get().by_id(node).map(|p| p.public_key)
    }

    /// The nodes whose links are up and meter their channels with CREDIT (version 3).
    pub fn credit_nodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.links.iter().flatten().filter(|l| l.version >= CREDIT_VERSION).map(|l| l.peer)
    }

    /// Whether any link is up (the device thread then needs its timer).
    pub fn has_links(&self) -> bool {
        !self.by_node.is_empty()
    }

    fn link_mut(&mut self, node: u32) -> Option<&mut Link> {
        let token = *self.by_node.get(&node)?;
        self.links.get_mut(token)?.as_mut()
    }

    /// Takes the links the setup thread handed over. A link to a peer that already has one
    /// replaces it (the peer restarted): the old one's channels are gone.
    pub fn accept_arrivals(&mut self) {
        let Some(arrivals) = &self.arrivals else { return };
        let _ = arrivals.wake.read();
        let new: Vec<Established> = arrivals.links.try_iter().collect();
        let closes: Vec<(u32, &'static str)> = arrivals.closes.try_iter().collect();
        for node in arrivals.unreachable.try_iter() {
            if self.wanted.remove(&node) {
                self.unreachable.push(node);
            }
        }
        for (peer, reason) in closes {
            if let Some(&token) = self.by_node.get(&peer) {
                self.end(token, reason);
            }
        }
        for link in new {
            self.add(link);
        }
    }

    fn add(&mut self, established: Established) {
        let peer = established.peer.id;
        let Some(context) = &self.context else { return };
        // A handshake that finished as the cluster file was reloaded: the key it proved must
        // still be this node's.
        let current = context.directory.get();
        if current.by_id(peer).map(|p| p.public_key) != Some(established.peer.public_key) {
            context.audit.record(Record::link("link_rejected", "not_in_cluster", Some(peer)));
            let _ = established.socket.shutdown(Shutdown::Both);
            self.no_link(peer);
            return self.tell_setup(peer, Duration::ZERO);
        }
        if let Some(&old) = self.by_node.get(&peer) {
            self.end(old, "replaced");
        }
        let Some(context) = &self.context else { return };
        let stats = context.book.counters(peer);
        let Ok(link) = Link::new(established, stats, context.config.backlog) else {
            log::error!("link to node {peer}: no secret memory for its buffers");
            context.book.failed(peer, "no_secret_memory", LinkState::Backoff);
            self.no_link(peer);
            return self.tell_setup(peer, Duration::ZERO);
        };
        let token = self.links.iter().position(Option::is_none).unwrap_or_else(|| {
            self.links.push(None);
            self.links.len() - 1
        });
        self.fd_changes.push(FdChange::Watch {
            fd: link.socket.as_raw_fd(),
            token,
            writable: false,
        });
        context.book.up(peer, link.remote, link.version);
        context.audit.record(Record {
            address: Some(link.remote),
            ..Record::link("link_up", "authenticated", Some(peer))
        });
        self.by_node.insert(peer, token);
        self.links[token] = Some(link);
        self.wanted.remove(&peer);
        self.ups.push(peer);
    }

    /// A link to `peer` came and could not be taken: if it was asked for, the asker hears
    /// that there is none (the setup thread has stopped trying).
    fn no_link(&mut self, peer: u32) {
        if self.wanted.remove(&peer) {
            self.unreachable.push(peer);
        }
    }

    /// Ends link `token` for `reason`: audited, its channels gone, the setup thread told.
    fn end(&mut self, token: usize, reason: &'static str) {
        let Some(link) = self.links.get_mut(token).and_then(Option::take) else { return };
        if self.by_node.get(&link.peer) == Some(&token) {
            self.by_node.remove(&link.peer);
        }
        let _ = link.socket.shutdown(Shutdown::Both);
        self.downs.push(link.peer);
        let (peer, born) = (link.peer, link.born);
        // Its buffers go now; its socket once the device thread has stopped watching it.
        let Link { socket, .. } = link;
        self.fd_changes.push(FdChange::Forget(socket));
        let Some(context) = &self.context else { return };
        context.audit.record(Record::link("link_down", reason, Some(peer)));
        let next = match context.config.idle_after {
            Some(_) => LinkState::Idle,
            None if peer > context.own_id => LinkState::Backoff,
            None => LinkState::Waiting,
        };
        context.book.failed(peer, reason, next);
        // A replaced link's successor is already here: there is nothing to dial.
        if reason != "replaced" {
            self.tell_setup(peer, born.elapsed());
        }
    }

    /// Tells the setup thread that the link to `peer` ended, so that it may dial again.
    fn tell_setup(&self, peer: u32, lived: Duration) {
        if let Some(arrivals) = &self.arrivals {
            if arrivals.ended.send(Ended { peer, lived }).is_ok() {
                let _ = arrivals.setup_wake.write(1);
            }
        }
    }

    /// Audits a protocol violation and ends the link.
    fn reject(&mut self, token: usize, reason: &'static str) {
        if let (Some(context), Some(Some(link))) = (&self.context, self.links.get(token)) {
            context.audit.record(Record::link("frame_rejected", reason, Some(link.peer)));
        }
        self.end(token, reason);
    }

    // ----- sending -----

    /// Stages `frame` (not DATA) for `node`.
    pub fn stage(&mut self, node: u32, frame: &Frame<'_>) -> Result<(), SendError> {
        self.stage_as(node, frame, Link::push_frame)
    }

    /// Stages `frame` (not DATA) for `node` to go with the next record that goes anyway: with
    /// other frames, once the peer sends more messages, or with the link timer.
    pub fn stage_lazy(&mut self, node: u32, frame: &Frame<'_>) -> Result<(), SendError> {
        self.stage_as(node, frame, Link::push_lazy)
    }

    fn stage_as(
        &mut self,
        node: u32,
        frame: &Frame<'_>,
        push: fn(&mut Link, &Frame<'_>),
    ) -> Result<(), SendError> {
        let outcome = {
            let link = self.link_mut(node).ok_or(SendError::NoLink)?;
            link.make_room(frame.size(), 0).map(|()| push(link, frame))
        };
        outcome.or_else(|reason| self.fail_node(node, reason))
    }

    /// Stages a DATA frame for `node`: `fill` writes the sealed payload into the `head.len`
    /// bytes it is given and returns its tag.
    pub fn stage_data(
        &mut self,
        node: u32,
        head: DataHead,
        fill: impl FnOnce(&mut [u8]) -> Option<[u8; TAG_SIZE]>,
    ) -> Result<(), SendError> {
        let len = head.len as usize;
        let outcome = {
            let link = self.link_mut(node).ok_or(SendError::NoLink)?;
            link.make_room(Frame::Data(head).size(), len).map(|()| {
                let at = link.payload_len;
                let tag = fill(&mut link.payload[at..at + len]);
                tag.map(|tag| {
                    link.payload_len += len;
                    link.push_frame(&Frame::Data(DataHead { tag, ..head }));
                    link.payload_len >= FLUSH_AT
                })
            })
        };
        match outcome {
            Ok(Some(true)) => {
                self.flush_node(node);
                Ok(())
            }
            Ok(Some(false)) => Ok(()),
            Ok(None) => Err(SendError::Payload),
            Err(reason) => self.fail_node(node, reason),
        }
    }

    fn fail_node(&mut self, node: u32, reason: &'static str) -> Result<(), SendError> {
        if let Some(&token) = self.by_node.get(&node) {
            self.end(token, reason);
        }
        Err(SendError::NoLink)
    }

    /// Sends what is staged for `node`.
    pub fn flush_node(&mut self, node: u32) {
        let Some(&token) = self.by_node.get(&node) else { return };
        self.flush_token(token);
    }

    /// Sends what is staged on every link.
    pub fn flush_all(&mut self) {
        for token in 0..self.links.len() {
            self.flush_token(token);
        }
    }

    fn flush_token(&mut self, token: usize) {
        if let Err(reason) = self.maybe_rekey(token, Instant::now()) {
            return self.end(token, reason);
        }
        let Some(Some(link)) = self.links.get_mut(token) else { return };
        if link.block_len == 0 || !link.urgent {
            return;
        }
        let was_writable = link.writable;
        match link.flush() {
            Ok(()) => {
                if link.writable != was_writable {
                    let fd = link.socket.as_raw_fd();
                    self.fd_changes.push(FdChange::Watch { fd, token, writable: link.writable });
                }
            }
            Err(reason) => self.end(token, reason),
        }
    }

    /// The socket of link `token` can take more bytes.
    pub fn writable(&mut self, token: usize) {
        let Some(Some(link)) = self.links.get_mut(token) else { return };
        match link.write_backlog() {
            Ok(()) if !link.writable => {
                let fd = link.socket.as_raw_fd();
                self.fd_changes.push(FdChange::Watch { fd, token, writable: false });
            }
            Ok(()) => {}
            Err(reason) => self.end(token, reason),
        }
    }

    // ----- receiving -----

    /// The socket of link `token` is readable: reads what it holds and hands every whole
    /// record's frames to `handler`.
    pub fn readable(&mut self, token: usize, handler: &mut Handler<'_>) {
        let (result, lazy_waiting) = match self.links.get_mut(token) {
            Some(Some(link)) => (link.fill(), link.block_len > 0 && !link.urgent),
            _ => return,
        };
        if let Err(reason) = result {
            return self.end(token, reason);
        }
        loop {
            match self.next_record(token, handler) {
                Ok(true) => {}
                Ok(false) => break,
                Err(Failure::Protocol(reason)) => return self.reject(token, reason),
                Err(Failure::Ended(reason)) => return self.end(token, reason),
            }
        }
        // A peer that sends more messages may soon need the credit staged lazily for it.
        if let Some(Some(link)) = self.links.get_mut(token) {
            if std::mem::take(&mut link.data_in) && lazy_waiting {
                link.urgent = true;
            }
        }
        // Rekey answers and the like go out at once.
        self.flush_token(token);
    }

    /// Processes the next whole record of link `token`; false when none is whole yet.
    fn next_record(&mut self, token: usize, handler: &mut Handler<'_>) -> Result<bool, Failure> {
        let Some(Some(link)) = self.links.get_mut(token) else { return Ok(false) };
        let Some((block_len, payload)) = link.open_next_block()? else { return Ok(false) };
        let peer = link.peer;
        let now = Instant::now();
        link.last_rx = now;
        link.sessions.records += 1;
        // The record is whole: its payloads follow the sealed block.
        let mut actions = Vec::new();
        let mut frames = 0;
        {
            let Link { plain, rx, rx_start, data_in, .. } = link;
            let mut payloads = &mut rx[*rx_start..*rx_start + payload];
            for frame in wire::frames(&plain[..block_len]) {
                let frame = frame.map_err(|e| Failure::Protocol(e.reason()))?;
                frames += 1;
                match frame {
                    Frame::Data(head) => {
                        let (this, rest) =
                            std::mem::take(&mut payloads).split_at_mut(head.len as usize);
                        payloads = rest;
                        handler(peer, frame, this);
                        *data_in = true;
                    }
                    Frame::Keepalive => {}
                    Frame::Goodbye => actions.push(Action::Goodbye),
                    Frame::Confirm => return Err(Failure::Protocol("unexpected_confirm")),
                    Frame::Rekey(msg1) => actions.push(Action::Rekey(*msg1)),
                    Frame::RekeyReply(msg2) => actions.push(Action::RekeyReply(*msg2)),
                    Frame::RekeyDone => actions.push(Action::RekeyDone),
                    // (On a link of version 2, check_block refused CREDIT already.)
                    Frame::Offer { .. }
                    | Frame::OfferReply { .. }
                    | Frame::Close { .. }
                    | Frame::Credit { .. } => handler(peer, frame, &mut []),
                }
            }
        }
        link.consume(block_len, payload);
        Counters::add(&link.stats.frames_in, frames);
        for action in actions {
            self.act(token, action, now)?;
        }
        Ok(true)
    }

    fn act(&mut self, token: usize, action: Action, now: Instant) -> Result<(), Failure> {
        let Some(context) = &self.context else { return Ok(()) };
        let Some(Some(link)) = self.links.get_mut(token) else { return Ok(()) };
        match action {
            Action::Goodbye => return Err(Failure::Ended("goodbye")),
            Action::Rekey(msg1) => {
                if link.initiator || link.sessions.switching() {
                    return Err(Failure::Protocol("unexpected_rekey"));
                }
                let response = handshake::respond(
                    &context.key,
                    &context.directory.get(),
                    &context.replays,
                    &msg1,
                    Some(link.peer),
                )
                .map_err(|e| Failure::Protocol(e.reason()))?;
                // A rekey does not change what the link speaks.
                if response.version != link.version {
                    return Err(Failure::Protocol("unsupported_version"));
                }
                link.sessions.install(response.transport);
                // REKEY_REPLY ends this record; later ones are sealed under the new session.
                link.stage_last(&Frame::RekeyReply(&response.msg2)).map_err(Failure::Ended)?;
                link.sessions.switch_tx(now);
            }
            Action::RekeyReply(msg2) => {
                let Some((initiation, _)) = link.sessions.rekey.take() else {
                    return Err(Failure::Protocol("unexpected_rekey"));
                };
                let next = initiation.finish(&msg2).map_err(|e| Failure::Protocol(e.reason()))?;
                link.sessions.install(next);
                link.sessions.switch_rx(now);
                link.stage_last(&Frame::RekeyDone).map_err(Failure::Ended)?;
                if link.sessions.switch_tx(now) {
                    context.book.rekeyed(link.peer);
                }
            }
            Action::RekeyDone => {
                if link.initiator || !link.sessions.switching() {
                    return Err(Failure::Protocol("unexpected_rekey"));
                }
                if link.sessions.switch_rx(now) {
                    context.book.rekeyed(link.peer);
                }
            }
        }
        Ok(())
    }

    // ----- time -----

    /// Keepalives, dead links, stalled writes and rekeys; called a few times a second.
    pub fn tick(&mut self) {
        let now = Instant::now();
        for token in 0..self.links.len() {
            if let Err(reason) = self.tick_link(token, now) {
                self.end(token, reason);
            }
        }
    }

    fn tick_link(&mut self, token: usize, now: Instant) -> Result<(), &'static str> {
        let Some(context) = &self.context else { return Ok(()) };
        let config = context.config;
        let Some(Some(link)) = self.links.get_mut(token) else { return Ok(()) };
        if now.saturating_duration_since(link.last_rx) >= config.dead_after {
            return Err("keepalive_timeout");
        }
        if link.stalled.is_some_and(|t| now.saturating_duration_since(t) >= config.dead_after) {
            return Err("send_timeout");
        }
        let age = now.saturating_duration_since(link.sessions.started);
        if link.initiator {
            if let Some((_, started)) = &link.sessions.rekey {
                if now.saturating_duration_since(*started) >= config.rekey_timeout {
                    return Err("rekey_timeout");
                }
            }
        } else if !link.sessions.switching()
            && (age >= config.reject_after()
                || link.sessions.records >= config.reject_after_records())
        {
            return Err("session_expired");
        }
        self.maybe_rekey(token, now)?;
        let Some(Some(link)) = self.links.get_mut(token) else { return Ok(()) };
        if link.block_len == 0 && now.saturating_duration_since(link.last_tx) >= config.keepalive {
            link.push_frame(&Frame::Keepalive);
        }
        let was_writable = link.writable;
        link.flush()?;
        if link.writable != was_writable {
            let fd = link.socket.as_raw_fd();
            self.fd_changes.push(FdChange::Watch { fd, token, writable: link.writable });
        }
        Ok(())
    }

    /// Starts a rekey of link `token` if this side initiates its rekeys and its session is
    /// due: old enough, or enough records sealed and opened under it. Checked on every flush,
    /// so a busy link rekeys on time, not only when the timer runs.
    fn maybe_rekey(&mut self, token: usize, now: Instant) -> Result<(), &'static str> {
        let Some(context) = &self.context else { return Ok(()) };
        let Some(Some(link)) = self.links.get_mut(token) else { return Ok(()) };
        let config = &context.config;
        let due = now.saturating_duration_since(link.sessions.started) >= config.rekey_after
            || link.sessions.records >= config.rekey_after_records;
        if !link.initiator || link.sessions.switching() || !due {
            return Ok(());
        }
        let mut msg1 = [0u8; MSG1_SIZE];
        let directory = context.directory.get();
        let peer = directory.by_id(link.peer).ok_or("peer_unknown")?;
        let initiation =
            handshake::initiate(&context.key, peer, context.own_id, link.version, &mut msg1)
                .map_err(|e| e.reason())?;
        link.sessions.rekey = Some((initiation, now));
        link.make_room(Frame::Rekey(&msg1).size(), 0)?;
        link.push_frame(&Frame::Rekey(&msg1));
        Ok(())
    }

    /// Says goodbye on every link and closes them (the node is stopping).
    pub fn shut_down(&mut self) {
        for token in 0..self.links.len() {
            self.say_goodbye(token, Some(Duration::from_millis(500)));
            self.end(token, "shutdown");
        }
    }

    /// Sends GOODBYE on link `token`, after what is staged, waiting up to `wait` for a slow
    /// socket to take it (not at all without one).
    fn say_goodbye(&mut self, token: usize, wait: Option<Duration>) {
        let Some(Some(link)) = self.links.get_mut(token) else { return };
        if link.make_room(1, 0).is_ok() {
            link.push_frame(&Frame::Goodbye);
            let _ = link.flush();
            if let Some(wait) = wait {
                let _ = link.write_backlog_blocking(wait);
            }
        }
    }
}

/// What a record asked of the router itself.
enum Action {
    Goodbye,
    Rekey([u8; MSG1_SIZE]),
    RekeyReply([u8; wire::MSG2_SIZE]),
    RekeyDone,
}

/// Why reading a record ended the link.
enum Failure {
    /// The peer broke the protocol: audited as `frame_rejected`.
    Protocol(&'static str),
    /// The link ended (closed, goodbye, a send failed).
    Ended(&'static str),
}

impl From<FrameError> for Failure {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e.reason())
    }
}

impl Link {
    fn new(
        established: Established,
        stats: Arc<Counters>,
        backlog_limit: usize,
    ) -> io::Result<Self> {
        let now = Instant::now();
        established.socket.set_nonblocking(true)?;
        // Records are written whole; Nagle's algorithm would hold small ones back for an ACK
        // the peer delays (40 ms per round trip).
        established.socket.set_nodelay(true)?;
        // Room for a few records in flight, so that a batch of large messages does not stop
        // at the socket and wait in the backlog (a copy, and a wake-up for writability).
        let socket = socket2::SockRef::from(&established.socket);
        socket.set_send_buffer_size(SOCKET_BUFFER)?;
        socket.set_recv_buffer_size(SOCKET_BUFFER)?;
        Ok(Self {
            peer: established.peer.id,
            socket: established.socket,
            remote: established.remote,
            initiator: established.initiator,
            version: established.version,
            sessions: Sessions::new(established.transport, now),
            born: now,
            last_rx: now,
            last_tx: now,
            stats,
            backlog_limit,
            rx: memcopy::PageAligned::new(RX_BUFFER),
            rx_start: 0,
            rx_end: 0,
            open_block: None,
            plain: SecretBox::zeroed()?,
            block: SecretBox::zeroed()?,
            block_len: 0,
            block_has_key: false,
            frames: 0,
            payload: vec![0; MAX_RECORD_PAYLOAD],
            payload_len: 0,
            record: vec![0; 2 + MAX_BLOCK + NOISE_TAG],
            backlog: Vec::new(),
            backlog_start: 0,
            stalled: None,
            writable: false,
            urgent: false,
            data_in: false,
        })
    }

    /// Makes room for a frame of `frame` bytes and `payload` payload bytes, sending what is
    /// staged if they would not fit.
    fn make_room(&mut self, frame: usize, payload: usize) -> Result<(), &'static str> {
        if self.block_len + frame > MAX_BLOCK || self.payload_len + payload > MAX_RECORD_PAYLOAD {
            self.flush()?;
        }
        Ok(())
    }

    fn push_frame(&mut self, frame: &Frame<'_>) {
        frame.encode(&mut self.block[self.block_len..]);
        self.block_len += frame.size();
        self.block_has_key |= matches!(frame, Frame::Offer { .. });
        self.frames += 1;
        self.urgent = true;
    }

    /// Stages `frame` without making the record urgent.
    fn push_lazy(&mut self, frame: &Frame<'_>) {
        let urgent = self.urgent;
        self.push_frame(frame);
        self.urgent = urgent;
    }

    /// Stages `frame` as the last of its record and sends the record at once.
    fn stage_last(&mut self, frame: &Frame<'_>) -> Result<(), &'static str> {
        self.make_room(frame.size(), 0)?;
        self.push_frame(frame);
        self.flush()
    }

    /// Seals the staged header block and writes the record (block and payloads in one
    /// gathered write); what the socket does not take joins the backlog.
    fn flush(&mut self) -> Result<(), &'static str> {
        if self.block_len == 0 {
            return Ok(());
        }
        let Some(transport) = self.sessions.tx() else { return Err("no_session") };
        let sealed = transport.seal(&self.block[..self.block_len], &mut self.record[2..]);
        if self.block_has_key {
            zeroize::Zeroize::zeroize(&mut self.block[..self.block_len]);
            self.block_has_key = false;
        }
        let n = sealed.ok_or("seal_failed")?;
        self.record[..2].copy_from_slice(&(n as u16).to_be_bytes());
        self.sessions.records += 1;
        let (head, body) = (2 + n, self.payload_len);
        Counters::add(&self.stats.frames_out, self.frames);
        Counters::add(&self.stats.bytes_out, (head + body) as u64);
        self.block_len = 0;
        self.payload_len = 0;
        self.frames = 0;
        self.urgent = false;
        self.last_tx = Instant::now();
        let mut written = 0;
        if self.backlog_start == self.backlog.len() {
            let parts = [IoSlice::new(&self.record[..head]), IoSlice::new(&self.payload[..body])];
            written = match self.socket.write_vectored(&parts) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(_) => return Err("send_failed"),
            };
        }
        if written < head + body {
            self.queue_rest(head, body, written)?;
        }
        Ok(())
    }

    /// Copies what the socket did not take of the record just sealed into the backlog.
    fn queue_rest(&mut self, head: usize, body: usize, written: usize) -> Result<(), &'static str> {
        if self.backlog.len() - self.backlog_start + head + body - written > self.backlog_limit {
            return Err("send_backlog");
        }
        if written < head {
            self.backlog.extend_from_slice(&self.record[written..head]);
            self.backlog.extend_from_slice(&self.payload[..body]);
        } else {
            self.backlog.extend_from_slice(&self.payload[written - head..body]);
        }
        self.stalled.get_or_insert_with(Instant::now);
        self.writable = true;
        self.publish_backlog();
        Ok(())
    }

    fn publish_backlog(&self) {
        let queued = (self.backlog.len() - self.backlog_start) as u64;
        self.stats.queued_out.store(queued, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes what the backlog holds, as far as the socket takes it.
    fn write_backlog(&mut self) -> Result<(), &'static str> {
        while self.backlog_start < self.backlog.len() {
            match self.socket.write(&self.backlog[self.backlog_start..]) {
                Ok(0) => return Err("send_failed"),
                Ok(n) => {
                    self.backlog_start += n;
                    self.stalled = Some(Instant::now());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err("send_failed"),
            }
        }
        if self.backlog_start == self.backlog.len() {
            self.backlog.clear();
            self.backlog_start = 0;
            self.stalled = None;
            self.writable = false;
        }
        self.publish_backlog();
        Ok(())
    }

    /// Writes the backlog, waiting up to `limit` (only when the node stops).
    fn write_backlog_blocking(&mut self, limit: Duration) -> Result<(), &'static str> {
        let until = Instant::now() + limit;
        while self.backlog_start < self.backlog.len() && Instant::now() < until {
            self.write_backlog()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Reads what the socket holds into the receive buffer.
    fn fill(&mut self) -> Result<(), &'static str> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_end == self.rx.len() || self.rx_start > self.rx.len() / 2 {
            memcopy::move_to_front(&mut self.rx[..self.rx_end], self.rx_start);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        if self.rx_end == self.rx.len() {
            return Ok(()); // full of whole records: they are processed first
        }
        match self.socket.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => Err("connection_lost"),
            Ok(n) => {
                self.rx_end += n;
                Counters::add(&self.stats.bytes_in, n as u64);
                Ok(())
            }
            Err(e)
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) =>
            {
                Ok(())
            }
            Err(_) => Err("connection_lost"),
        }
    }

    /// Opens the next record's header block if it is all here (once per record), and checks
    /// it; returns its length and its payload bytes once those are all here too.
    fn open_next_block(&mut self) -> Result<Option<(usize, usize)>, Failure> {
        if self.open_block.is_none() {
            let available = self.rx_end - self.rx_start;
            if available < 2 {
                return Ok(None);
            }
            let at = self.rx_start;
            let len = usize::from(u16::from_be_bytes([self.rx[at], self.rx[at + 1]]));
            if len <= NOISE_TAG || len > MAX_BLOCK + NOISE_TAG {
                return Err(Failure::Protocol("bad_record_length"));
            }
            if available < 2 + len {
                return Ok(None);
            }
            let transport = self.sessions.rx().ok_or(Failure::Ended("no_session"))?;
            let block_len = transport
                .open(&self.rx[at + 2..at + 2 + len], &mut self.plain[..])
                .ok_or(Failure::Protocol("bad_link_authentication"))?;
            let payload = check_block(&self.plain[..block_len], self.version)?;
            self.rx_start += 2 + len;
            self.open_block = Some((block_len, payload));
        }
        match self.open_block {
            Some((block_len, payload)) if self.rx_end - self.rx_start >= payload => {
                Ok(Some((block_len, payload)))
            }
            _ => Ok(None),
        }
    }

    /// Forgets the record just processed, wiping its header block.
    fn consume(&mut self, block_len: usize, payload: usize) {
        zeroize::Zeroize::zeroize(&mut self.plain[..block_len]);
        self.rx_start += payload;
        self.open_block = None;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::link::loopback::linked;

    fn head(len: u32, seq: u64) -> DataHead {
        let source = crate::cmm::test_endpoints::A;
        let destination = crate::cmm::test_endpoints::B;
        DataHead { source, destination, epoch: 0, seq, len, tag: [0; 16] }
    }

    /// Stages a DATA frame of `len` bytes of `byte` from node 1 to node 2.
    fn data(router: &mut Router, len: usize, byte: u8, seq: u64) -> Result<(), SendError> {
        router.stage_data(2, head(len as u32, seq), |buf| {
            buf.fill(byte);
            Some([byte; 16])
        })
    }

    #[test]
    fn records_carry_frames_and_payloads_both_ways() {
        let (mut a, mut b) = linked(RouterConfig::default()).unwrap();
        for (i, len) in
            [0usize, 1, 1000, 65_536, 65_536, 65_536, 65_536, 10].into_iter().enumerate()
        {
            data(&mut a.router, len, i as u8, i as u64).unwrap();
        }
        a.router.flush_all();
        let got = b.pump(8);
        let lens: Vec<usize> = got.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(lens, [0, 1, 1000, 65_536, 65_536, 65_536, 65_536, 10]);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, (kind, p))| *kind == wire::kind::DATA && p.iter().all(|&x| x == i as u8)));
        b.router
            .stage(
                1,
                &Frame::Close {
                    source: head(0, 0).destination,
                    destination: head(0, 0).source,
                    reason: crate::cmm::frames::CloseReason::Closed,
                },
            )
            .unwrap();
        b.router.flush_all();
        assert_eq!(a.pump(1)[0].0, wire::kind::CLOSE);
        assert_eq!(b.book.status()[0].frames_in, 8);
    }

    #[test]
    fn sessions_rekey_under_traffic_and_nothing_is_lost() {
        let config = RouterConfig { rekey_after_records: 16, ..RouterConfig::default() };
        let (mut a, mut b) = linked(config).unwrap();
        let mut received = 0;
        for round in 0..200u64 {
            for i in 0..3 {
                data(&mut a.router, 100, (round * 3 + i) as u8, round * 3 + i).unwrap();
                a.router.flush_all();
            }
            let got = b.pump(3);
            received += got.len();
            // The reverse direction carries the responder's part of each rekey.
            b.router.stage(1, &Frame::Keepalive).unwrap();
            b.router.flush_all();
            a.router.readable(a.token, &mut |_, _, _| {});
        }
        assert_eq!(received, 600, "every frame arrived once");
        let rekeys = a.book.status()[0].rekeys;
        assert!(rekeys >= 20, "{rekeys} rekeys");
        assert!(b.book.status()[0].rekeys >= rekeys - 1);
        assert!(a.router.is_up(2) && b.router.is_up(1));
    }

    #[test]
    fn a_peer_that_stops_reading_loses_its_link_without_holding_the_sender() {
        let config = RouterConfig {
            backlog: 4 << 20,
            dead_after: Duration::from_millis(300),
            ..RouterConfig::default()
        };
        let (mut a, b) = linked(config).unwrap();
        // Node 2 reads nothing; node 1's sends never wait on it.
        let mut longest = Duration::ZERO;
        let mut sent = 0;
        while a.router.is_up(2) && sent < 10_000 {
            let start = Instant::now();
            let _ = data(&mut a.router, 60_000, 1, sent);
            a.router.flush_all();
            longest = longest.max(start.elapsed());
            sent += 1;
        }
        assert!(a.audited("link_down", "send_backlog"), "{:#?}", a.audit.recent());
        assert!(longest < Duration::from_millis(100), "a send took {longest:?}");
        drop(b);
    }

    #[test]
    fn a_peer_that_reads_nothing_for_a_while_is_dropped_by_the_send_timeout() {
        let config =
            RouterConfig { dead_after: Duration::from_millis(300), ..RouterConfig::default() };
        let (mut a, mut b) = linked(config).unwrap();
        // Enough to fill the socket's buffers, not the backlog.
        for seq in 0..200 {
            let _ = data(&mut a.router, 60_000, 1, seq);
        }
        a.router.flush_all();
        // Node 2 proves itself alive but never reads.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && a.router.is_up(2) {
            b.router.stage(1, &Frame::Keepalive).unwrap();
            b.router.flush_all();
            a.router.readable(a.token, &mut |_, _, _| {});
            a.router.tick();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(a.audited("link_down", "send_timeout"), "{:#?}", a.audit.recent());
        assert!(!a.router.is_up(2));
    }

    #[test]
    fn garbage_and_replayed_records_end_the_link_and_are_audited() {
        let (mut a, mut b) = linked(RouterConfig::default()).unwrap();
        a.router.stage(2, &Frame::Keepalive).unwrap();
        a.router.flush_all();
        b.pump(0);
        // Bytes injected on the stream, as an attacker on the path would.
        let Some(Some(link)) = a.router.links.get_mut(a.token) else { panic!() };
        link.socket.write_all(&[0, 40]).unwrap();
        link.socket.write_all(&[7; 40]).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while b.router.is_up(1) && Instant::now() < until {
            b.router.readable(b.token, &mut |_, _, _| {});
        }
        assert!(b.audited("frame_rejected", "bad_link_authentication"), "{:#?}", b.audit.recent());
        assert_eq!(b.router.take_downs(), [1]);
    }

    #[test]
    fn silence_ends_a_link() {
        let config = RouterConfig {
            keepalive: Duration::from_secs(60),
            dead_after: Duration::from_millis(200),
            ..RouterConfig::default()
        };
        let (mut a, _b) = linked(config).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        a.router.tick();
        assert!(a.audited("link_down", "keepalive_timeout"), "{:#?}", a.audit.recent());
    }
}
