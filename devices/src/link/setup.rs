//! The link-setup thread: one event loop that accepts connections, runs every handshake (as
//! responder and as initiator) and hands confirmed links to the router on the device thread.
//! It never runs a link; the router tells it when one ends, so it can dial again.
//!
//! Nothing here gives an unauthenticated peer a thread, a large buffer, or unbounded time:
//! - each connection has one deadline for the whole handshake, from accept to confirmation;
//! - it reads at most a small hello before deciding anything ([`MAX_HELLO`] bytes);
//! - [`Admission`] caps connections not yet authenticated (evicting the oldest past the
//!   global cap) and rate-limits Diffie-Hellman work per address and overall;
//! - a responder makes a new link only after the initiator's first transport record proves it
//!   holds the session keys (CONFIRM), so a replayed first message, which the timestamp check
//!   refuses anyway, could never replace a live link.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::admission::{Admission, Admit, Limits};
use super::directory::{Directory, Peer, SharedDirectory};
use super::handshake::{self, HandshakeError, Initiation, Transport};
use super::status::{LinkBook, LinkState};
use super::timestamp::ReplayGuard;
use super::wire::{kind, Frame, MSG1_SIZE, NOISE_TAG, OLDEST_VERSION};
use crate::cmm::audit::{Audit, Record};
use crate::crypto::node_key::NodeKey;

/// Longest handshake message read from a peer not yet authenticated (version 2's first
/// message is [`MSG1_SIZE`] bytes, version 1's 100).
pub const MAX_HELLO: usize = 256;
/// Bytes of the initiator's first record: a length and a header block holding CONFIRM alone.
const CONFIRM_RECORD: usize = 2 + 1 + NOISE_TAG;

/// A link whose handshake completed and was confirmed: the router's from now on.
pub struct Established {
    /// The peer, authenticated by its static key.
    pub peer: Peer,
    /// The connection (non-blocking).
    pub socket: TcpStream,
    /// The session.
    pub transport: Transport,
    /// Whether this node initiated it (and so initiates its rekeys).
    pub initiator: bool,
    /// The other end's address.
    pub remote: SocketAddr,
    /// The protocol version the link speaks (docs/PROTOCOL.md, section 10).
    pub version: u8,
}

/// A link the router ended, so that the dialer may try again.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// The peer.
    pub peer: u32,
    /// How long the link lived.
    pub lived: Duration,
}

/// Timing of link set-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetupTimes {
    /// The whole handshake, from accept (or connect) to confirmation.
    pub handshake: Duration,
    /// First wait before dialing again after a failure.
    pub backoff_min: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
}

impl Default for SetupTimes {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What the setup thread shares with the rest of the link manager.
pub struct SetupShared {
    /// This node.
    pub own_id: u32,
    /// Its static key.
    pub key: Arc<NodeKey>,
    /// The cluster, as reloaded.
    pub directory: Arc<SharedDirectory>,
    /// Greatest handshake timestamp per peer (shared with the router's rekeys).
    pub replays: Arc<ReplayGuard>,
    /// The audit log.
    pub audit: Audit,
    /// Link states for the operator.
    pub book: Arc<LinkBook>,
    /// Set to stop the thread (then `wake` is written).
    pub stop: Arc<AtomicBool>,
    /// Links on demand: peers are dialled only when the router asks, by either side.
    /// Otherwise every peer with a higher ID is dialled, all the time.
    pub on_demand: bool,
}

const LISTENER: u64 = 1;
const WAKE: u64 = 2;
const PENDING: u64 = 1 << 32;
const DIAL: u64 = 2 << 32;

enum Phase {
    /// Reading the initiator's first message.
    Hello { buf: [u8; 2 + MAX_HELLO], have: usize },
    /// Answered; waiting for the initiator to prove it holds the session keys.
    Confirm {
        transport: Transport,
        peer: Peer,
        version: u8,
        buf: [u8; CONFIRM_RECORD],
        have: usize,
    },
}

struct Pending {
    socket: TcpStream,
    from: SocketAddr,
    deadline: Instant,
    serial: u64,
    phase: Phase,
}

enum DialState {
    /// Dial at this time.
    Idle(Instant),
    /// Connecting.
    Connecting { socket: TcpStream, deadline: Instant },
    /// First message sent; waiting for the answer.
    Awaiting {
        socket: TcpStream,
        initiation: Initiation,
        buf: Box<[u8; 2 + MAX_HELLO]>,
        have: usize,
        deadline: Instant,
    },
    /// Handed to the router (dialed by this node if `own`); waiting to hear that it ended.
    Linked { own: bool },
}

struct Dial {
    peer: Peer,
    state: DialState,
    backoff: Duration,
    /// The version to dial in: the newest, until the peer says it speaks only an older one.
    version: u8,
    /// Links on demand: the router asked for this link and has not heard how it went.
    wanted: bool,
}

impl Dial {
    fn new(peer: Peer, now: Instant, backoff: Duration) -> Self {
        let version = super::wire::VERSION;
        Self { peer, state: DialState::Idle(now), backoff, version, wanted: false }
    }

    fn in_progress(&self) -> bool {
        matches!(self.state, DialState::Connecting { .. } | DialState::Awaiting { .. })
    }
}

/// The setup thread's ends of its channels to the router.
pub struct RouterPipes {
    /// New links.
    pub to_router: Sender<Established>,
    /// Written with each new link or unreachable peer.
    pub router_wake: EventFd,
    /// Links the router ended.
    pub ended: Receiver<Ended>,
    /// Links the router asks for (links on demand).
    pub wants: Receiver<u32>,
    /// Peers asked for that could not be linked with.
    pub unreachable: Sender<u32>,
}

/// The loop's state.
pub struct Setup {
    shared: SetupShared,
    times: SetupTimes,
    listener: TcpListener,
    epoll: Epoll,
    wake: EventFd,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    order: VecDeque<(usize, u64)>,
    serial: u64,
    dials: HashMap<u32, Dial>,
    admission: Admission,
    refusals: Refusals,
    router: RouterPipes,
    reloads: Receiver<Arc<Directory>>,
}

/// Pre-authentication refusals, counted and audited together (at most one record per reason
/// every [`Refusals::EVERY`]) so a flood cannot flood the audit log.
#[derive(Default)]
struct Refusals {
    counts: HashMap<&'static str, u64>,
    last: Option<Instant>,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(5);

    fn count(&mut self, reason: &'static str) {
        *self.counts.entry(reason).or_default() += 1;
    }

    fn flush(&mut self, audit: &Audit, now: Instant, force: bool) {
        if self.counts.is_empty() || (!force && self.last.is_some_and(|t| now < t + Self::EVERY)) {
            return;
        }
        for (reason, count) in self.counts.drain() {
            audit.record(Record {
                count: Some(count),
                batched: true,
                ..Record::link("link_refused", reason, None)
            });
        }
        self.last = Some(now);
    }
}

impl Setup {
    /// The loop, listening on `listener`, dialing every peer with a higher ID (or, for links
    /// on demand, the peers the router asks for).
    pub fn new(
        shared: SetupShared,
        times: SetupTimes,
        limits: Limits,
        listener: TcpListener,
        wake: EventFd,
        router: RouterPipes,
        reloads: Receiver<Arc<Directory>>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE))?;
        let now = Instant::now();
        let dials = shared
            .directory
            .get()
            .peers()
            .iter()
            .filter(|p| p.id > shared.own_id && !shared.on_demand)
            .map(|p| (p.id, Dial::new(p.clone(), now, times.backoff_min)))
            .collect();
        Ok(Self {
            shared,
            times,
            listener,
            epoll,
            wake,
            pending: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            serial: 0,
            dials,
            admission: Admission::new(limits, now),
            refusals: Refusals::default(),
            router,
            reloads,
        })
    }

    /// Runs until told to stop.
    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            self.expire(now);
            self.dial_due(now);
            self.refusals.flush(&self.shared.audit, now, false);
            let timeout = self.next_deadline().map_or(1000, |at| {
                at.saturating_duration_since(Instant::now()).as_millis().clamp(1, 1000) as i32
            });
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("link set-up: epoll: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER => self.accept_all(),
                    WAKE => self.woken(),
                    data if data & DIAL != 0 => {
                        self.dial_event((data & 0xffff_ffff) as u32, event.event_set())
                    }
                    data => self.pending_event((data & 0xffff_ffff) as usize),
                }
            }
        }
        self.refusals.flush(&self.shared.audit, Instant::now(), true);
    }

    fn woken(&mut self) {
        let _ = self.wake.read();
        while let Ok(directory) = self.reloads.try_recv() {
            self.follow(&directory);
        }
        while let Ok(ended) = self.router.ended.try_recv() {
            let backoff_max = self.times.backoff_max;
            let backoff_min = self.times.backoff_min;
            if let Some(dial) = self.dials.get_mut(&ended.peer) {
                // The peer may have been upgraded meanwhile.
                dial.version = super::wire::VERSION;
                // A want that came while the link was on its way to the router was met by it;
                // one that comes after the router saw it end arrives after this (links on
                // demand).
                dial.wanted = false;
                // A link that lived a while earns a quick reconnect.
                if ended.lived > backoff_max {
                    dial.backoff = backoff_min;
                }
                dial.state = DialState::Idle(Instant::now() + dial.backoff);
                dial.backoff = (dial.backoff * 2).min(backoff_max);
            }
        }
        while let Ok(peer) = self.router.wants.try_recv() {
            self.want(peer);
        }
    }

    /// The router needs a link to `peer` (links on demand): it is dialled now, or when its
    /// backoff ends; the router hears of the link, or that there is none to be had.
    fn want(&mut self, peer: u32) {
        if !self.dials.contains_key(&peer) {
            let Some(p) = self.shared.directory.get().by_id(peer).cloned() else {
                return self.tell_unreachable(peer);
            };
            self.dials.insert(peer, Dial::new(p, Instant::now(), self.times.backoff_min));
        }
        if let Some(dial) = self.dials.get_mut(&peer) {
            dial.wanted = true;
        }
    }

    fn tell_unreachable(&self, peer: u32) {
        if self.router.unreachable.send(peer).is_ok() {
            let _ = self.router.router_wake.write(1);
        }
    }

    /// Whether a peer whose dial is idle should be dialled when its time comes.
    fn dials_when_due(&self, dial: &Dial) -> bool {
        !self.shared.on_demand || dial.wanted
    }

    /// Dials as a reloaded cluster file says: new nodes (with higher IDs) are dialled now,
    /// removed ones no longer, and an attempt made with a key that changed starts again.
    /// Established links to removed or rekeyed nodes are the router's to end.
    fn follow(&mut self, directory: &Directory) {
        let now = Instant::now();
        let gone: Vec<u32> = self
            .dials
            .iter()
            .filter(|(id, d)| d.wanted && directory.by_id(**id).is_none())
            .map(|(id, _)| *id)
            .collect();
        for peer in gone {
            self.tell_unreachable(peer);
        }
        self.dials.retain(|id, _| directory.by_id(*id).is_some());
        for p in directory.peers().iter().filter(|p| p.id != self.shared.own_id) {
            match self.dials.get_mut(&p.id) {
                None if self.shared.on_demand || p.id < self.shared.own_id => {}
                None => {
                    self.dials.insert(p.id, Dial::new(p.clone(), now, self.times.backoff_min));
                }
                Some(dial) if dial.peer != *p => {
                    let rekeyed = dial.peer.public_key != p.public_key;
                    dial.peer = p.clone();
                    if rekeyed && !matches!(dial.state, DialState::Linked { .. }) {
                        dial.state = DialState::Idle(now);
                        dial.backoff = self.times.backoff_min;
                    }
                }
                Some(_) => {}
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.iter().flatten().map(|p| p.deadline);
        let dials = self.dials.values().filter_map(|d| match &d.state {
            DialState::Idle(at) if self.dials_when_due(d) => Some(*at),
            DialState::Idle(_) => None,
            DialState::Connecting { deadline, .. } | DialState::Awaiting { deadline, .. } => {
                Some(*deadline)
            }
            DialState::Linked { .. } => None,
        });
        pending.chain(dials).min()
    }

    // ----- responder side -----

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((socket, from)) => self.admit(socket, from),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, most likely: the pending cap makes room over time.
                    log::warn!("accepting a link: {e}");
                    return;
                }
            }
        }
    }

    fn admit(&mut self, socket: TcpStream, from: SocketAddr) {
        let now = Instant::now();
        match self.admission.connection(from.ip(), now) {
            Admit::TooManyFromAddress => {
                self.refusals.count("too_many_from_address");
                return;
            }
            Admit::EvictOldest => self.evict_oldest(),
            Admit::Yes => {}
        }
        if socket.set_nonblocking(true).is_err() {
            self.admission.done(from.ip());
            return;
        }
        let phase = Phase::Hello { buf: [0; 2 + MAX_HELLO], have: 0 };
        self.hold(Pending { socket, from, deadline: now + self.times.handshake, serial: 0, phase });
    }

    /// Keeps `pending` (counted by the admission already) until its next message or deadline.
    fn hold(&mut self, mut pending: Pending) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        self.serial += 1;
        let event = EpollEvent::new(EventSet::IN, PENDING | slot as u64);
        if self.epoll.ctl(ControlOperation::Add, pending.socket.as_raw_fd(), event).is_err() {
            self.free.push(slot);
            self.admission.done(pending.from.ip());
            return;
        }
        self.order.push_back((slot, self.serial));
        pending.serial = self.serial;
        self.pending[slot] = Some(pending);
    }

    fn evict_oldest(&mut self) {
        while let Some((slot, serial)) = self.order.pop_front() {
            if self.pending[slot].as_ref().is_some_and(|p| p.serial == serial) {
                self.refusals.count("evicted");
                self.close_pending(slot);
                return;
            }
        }
    }

    fn close_pending(&mut self, slot: usize) -> Option<Pending> {
        let pending = self.pending.get_mut(slot)?.take()?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            pending.socket.as_raw_fd(),
            EpollEvent::default(),
        );
        self.admission.done(pending.from.ip());
        self.free.push(slot);
        Some(pending)
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter_map(|(slot, p)| p.as_ref().filter(|p| p.deadline <= now).map(|_| slot))
            .collect();
        for slot in late {
            self.refusals.count("handshake_timeout");
            self.close_pending(slot);
        }
        let late: Vec<u32> =
            self.dials
                .iter()
                .filter(|(_, d)| match &d.state {
                    DialState::Connecting { deadline, .. }
                    | DialState::Awaiting { deadline, .. } => *deadline <= now,
                    _ => false,
                })
                .map(|(id, _)| *id)
                .collect();
        for peer in late {
            self.dial_failed(peer, "handshake_timeout");
        }
    }

    fn pending_event(&mut self, slot: usize) {
        let Some(pending) = self.pending.get_mut(slot).and_then(Option::as_mut) else { return };
        let outcome = match &mut pending.phase {
            Phase::Hello { buf, have } => read_message(&mut pending.socket, buf, have),
            Phase::Confirm { buf, have, .. } => read_exact(&mut pending.socket, buf, have),
        };
        let authenticated = match &pending.phase {
            Phase::Confirm { peer, .. } => Some(peer.id),
            Phase::Hello { .. } => None,
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => self.pending_complete(slot),
            Err(reason) => {
                let from = pending.from;
                self.close_pending(slot);
                // An authenticated peer that fails its confirmation is audited on its own;
                // anonymous failures are counted together.
                match authenticated {
                    Some(peer) => self.audit_rejected(reason, Some(peer), from),
                    None => self.refusals.count(reason),
                }
            }
        }
    }

    /// A pending connection has a whole message: the hello, or the confirmation.
    fn pending_complete(&mut self, slot: usize) {
        let Some(mut pending) = self.close_pending(slot) else { return };
        match std::mem::replace(
            &mut pending.phase,
            Phase::Hello { buf: [0; 2 + MAX_HELLO], have: 0 },
        ) {
            Phase::Hello { buf, have } => self.answer_hello(pending, &buf[2..have]),
            Phase::Confirm { mut transport, peer, version, buf, .. } => {
                let mut plain = [0u8; 1];
                let confirmed =
                    transport.open(&buf[2..], &mut plain) == Some(1) && plain[0] == kind::CONFIRM;
                if !confirmed {
                    self.audit_rejected("bad_confirmation", Some(peer.id), pending.from);
                    return;
                }
                if !self.take_incoming(peer.id) {
                    log::debug!("link from node {} crossed this node's own; dropped", peer.id);
                    return;
                }
                self.hand_over(Established {
                    peer,
                    socket: pending.socket,
                    transport,
                    initiator: false,
                    remote: pending.from,
                    version,
                });
            }
        }
    }

    fn answer_hello(&mut self, mut pending: Pending, msg1: &[u8]) {
        let from = pending.from;
        if !self.admission.handshake(from.ip(), Instant::now()) {
            self.refusals.count("handshake_rate_limited");
            return;
        }
        let s = &self.shared;
        match handshake::respond(&s.key, &s.directory.get(), &s.replays, msg1, None) {
            Ok(response) => {
                if write_record(&mut pending.socket, &response.msg2).is_err() {
                    return;
                }
                // Back into the pending set, now waiting for the confirmation.
                let phase = Phase::Confirm {
                    transport: response.transport,
                    peer: response.peer,
                    version: response.version,
                    buf: [0; CONFIRM_RECORD],
                    have: 0,
                };
                self.readmit(pending.socket, from, pending.deadline, phase);
            }
            Err(e) => {
                if let HandshakeError::Version { reply: Some(reply), .. } = &e {
                    let _ = write_record(&mut pending.socket, reply);
                }
                match &e {
                    HandshakeError::UnknownKey { key } => log::warn!(
                        "link from {from} refused: its key {} is not in the cluster config",
                        base64_key(key)
                    ),
                    HandshakeError::Version { peer, version, .. } => log::warn!(
                        "link from node {peer} ({from}) refused: it speaks link protocol version {version}, this node speaks {}",
                        super::wire::VERSION
                    ),
                    _ => {}
                }
                self.audit_rejected(e.reason(), e.peer(), from);
            }
        }
    }

    fn readmit(&mut self, socket: TcpStream, from: SocketAddr, deadline: Instant, phase: Phase) {
        // It was counted out when its hello completed; it counts again until confirmed.
        match self.admission.connection(from.ip(), Instant::now()) {
            Admit::TooManyFromAddress => return self.refusals.count("too_many_from_address"),
            Admit::EvictOldest => self.evict_oldest(),
            Admit::Yes => {}
        }
        self.hold(Pending { socket, from, deadline, serial: 0, phase });
    }

    fn audit_rejected(&self, reason: &'static str, peer: Option<u32>, from: SocketAddr) {
        self.shared
            .audit
            .record(Record { address: Some(from), ..Record::link("link_rejected", reason, peer) });
    }

    /// Whether a confirmed link from `peer` is taken. Links on demand may be dialled by both
    /// sides at once; then the link dialled by the node with the lower ID is the one kept,
    /// on both nodes, whichever finishes first (docs/PROTOCOL.md, section 1).
    fn take_incoming(&mut self, peer: u32) -> bool {
        let own = self.shared.own_id;
        let Some(dial) = self.dials.get_mut(&peer) else {
            if self.shared.on_demand {
                let p = self.shared.directory.get().by_id(peer).cloned();
                if let Some(p) = p {
                    let mut dial = Dial::new(p, Instant::now(), self.times.backoff_min);
                    dial.state = DialState::Linked { own: false };
                    self.dials.insert(peer, dial);
                }
            }
            return true;
        };
        // Only this node's own dial, or a link it dialed, wins: a link the peer dialed before
        // is replaced (the peer started again, or saw that link die first).
        let own_link = dial.in_progress() || matches!(dial.state, DialState::Linked { own: true });
        if own < peer && own_link {
            return false;
        }
        if let DialState::Connecting { socket, .. } | DialState::Awaiting { socket, .. } =
            &dial.state
        {
            let _ =
                self.epoll.ctl(ControlOperation::Delete, socket.as_raw_fd(), EpollEvent::default());
        }
        dial.state = DialState::Linked { own: false };
        dial.wanted = false;
        true
    }

    fn hand_over(&mut self, link: Established) {
        if self.router.to_router.send(link).is_ok() {
            if let Err(e) = self.router.router_wake.write(1) {
                log::error!("waking the device thread for a new link: {e}");
            }
        }
    }

    // ----- initiator side -----

    fn dial_due(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .dials
            .iter()
            .filter(|(_, d)| {
                matches!(d.state, DialState::Idle(at) if at <= now) && self.dials_when_due(d)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in due {
            self.dial(peer, now);
        }
    }

    fn dial(&mut self, peer: u32, now: Instant) {
        let Some(dial) = self.dials.get_mut(&peer) else { return };
        self.shared.book.connecting(peer);
        let address = dial.peer.address;
        match connect_nonblocking(address) {
            Ok(socket) => {
                let event = EpollEvent::new(EventSet::OUT, DIAL | u64::from(peer));
                if self.epoll.ctl(ControlOperation::Add, socket.as_raw_fd(), event).is_err() {
                    self.dial_failed(peer, "connection_error");
                    return;
                }
                dial.state = DialState::Connecting { socket, deadline: now + self.times.handshake };
            }
            Err(e) => self.dial_failed(peer, io_reason(&e)),
        }
    }

    fn dial_event(&mut self, peer: u32, events: EventSet) {
        let Some(dial) = self.dials.get_mut(&peer) else { return };
        match std::mem::replace(&mut dial.state, DialState::Linked { own: false }) {
            DialState::Connecting { socket, deadline } => {
                let failure = match socket.take_error() {
                    Ok(Some(e)) | Err(e) => Some(io_reason(&e)),
                    Ok(None) if events.intersects(EventSet::ERROR | EventSet::HANG_UP) => {
                        Some("connection_error")
                    }
                    Ok(None) => None,
                };
                match failure {
                    Some(reason) => {
                        dial.state = DialState::Connecting { socket, deadline };
                        self.dial_failed(peer, reason);
                    }
                    None => self.send_hello(peer, socket, deadline),
                }
            }
            DialState::Awaiting { mut socket, initiation, mut buf, mut have, deadline } => {
                match read_message(&mut socket, &mut buf, &mut have) {
                    Ok(false) => {
                        let d = self.dials.get_mut(&peer);
                        if let Some(d) = d {
                            d.state =
                                DialState::Awaiting { socket, initiation, buf, have, deadline };
                        }
                    }
                    Ok(true) => self.finish_dial(peer, socket, initiation, &buf[2..have]),
                    Err(reason) => {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            socket.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        self.dial_failed(peer, reason);
                    }
                }
            }
            other => dial.state = other,
        }
    }

    fn send_hello(&mut self, peer: u32, mut socket: TcpStream, deadline: Instant) {
        let Some(dial) = self.dials.get(&peer) else { return };
        let mut msg1 = [0u8; MSG1_SIZE];
        let initiation = match handshake::initiate(
            &self.shared.key,
            &dial.peer,
            self.shared.own_id,
            dial.version,
            &mut msg1,
        ) {
            Ok(initiation) => initiation,
            Err(e) => {
                self.drop_socket(&socket);
                return self.dial_failed(peer, e.reason());
            }
        };
        let event = EpollEvent::new(EventSet::IN, DIAL | u64::from(peer));
        if write_record(&mut socket, &msg1).is_err()
            || self.epoll.ctl(ControlOperation::Modify, socket.as_raw_fd(), event).is_err()
        {
            self.drop_socket(&socket);
            return self.dial_failed(peer, "connection_lost");
        }
        if let Some(dial) = self.dials.get_mut(&peer) {
            dial.state = DialState::Awaiting {
                socket,
                initiation,
                buf: Box::new([0; 2 + MAX_HELLO]),
                have: 0,
                deadline,
            };
        }
    }

    fn finish_dial(
        &mut self,
        peer: u32,
        mut socket: TcpStream,
        initiation: Initiation,
        msg2: &[u8],
    ) {
        self.drop_socket(&socket);
        let version = initiation.version();
        let mut transport = match initiation.finish(msg2) {
            Ok(transport) => transport,
            Err(HandshakeError::Version { version: older, .. })
                if (OLDEST_VERSION..version).contains(&older) =>
            {
                return self.dial_older(peer, older);
            }
            Err(e) => {
                if let HandshakeError::Version { version, .. } = e {
                    log::warn!(
                        "node {peer} speaks link protocol version {version}; this node speaks {OLDEST_VERSION} to {}",
                        super::wire::VERSION
                    );
                }
                return self.dial_failed(peer, e.reason());
            }
        };
        // The first record proves this side holds the session keys (key confirmation).
        let mut block = [0u8; 1];
        Frame::Confirm.encode(&mut block);
        let mut sealed = [0u8; 1 + NOISE_TAG];
        let sent = transport.seal(&block, &mut sealed) == Some(sealed.len())
            && write_record(&mut socket, &sealed).is_ok();
        if !sent {
            return self.dial_failed(peer, "connection_lost");
        }
        let Some(dial) = self.dials.get_mut(&peer) else { return };
        dial.state = DialState::Linked { own: true };
        dial.wanted = false;
        let remote = dial.peer.address;
        let peer = dial.peer.clone();
        let established = Established { peer, socket, transport, initiator: true, remote, version };
        self.hand_over(established);
    }

    /// The peer refused the version dialled and named an older one it speaks: dial again in
    /// that one, now. Its answer was authenticated by its key, so this is its own word.
    fn dial_older(&mut self, peer: u32, version: u8) {
        log::info!("node {peer} speaks link protocol version {version}; linking in it");
        if let Some(dial) = self.dials.get_mut(&peer) {
            dial.version = version;
            dial.state = DialState::Idle(Instant::now());
        }
    }

    fn drop_socket(&self, socket: &TcpStream) {
        let _ = self.epoll.ctl(ControlOperation::Delete, socket.as_raw_fd(), EpollEvent::default());
    }

    fn dial_failed(&mut self, peer: u32, reason: &'static str) {
        let Some(dial) = self.dials.get_mut(&peer) else { return };
        if let DialState::Connecting { socket, .. } | DialState::Awaiting { socket, .. } =
            &dial.state
        {
            let _ =
                self.epoll.ctl(ControlOperation::Delete, socket.as_raw_fd(), EpollEvent::default());
        }
        dial.state = DialState::Idle(Instant::now() + dial.backoff);
        dial.backoff = (dial.backoff * 2).min(self.times.backoff_max);
        let wanted = std::mem::take(&mut dial.wanted);
        let next = if self.shared.on_demand { LinkState::Idle } else { LinkState::Backoff };
        let fresh = self.shared.book.failed(peer, reason, next);
        if fresh {
            self.shared.audit.record(Record {
                address: Some(dial.peer.address),
                ..Record::link("link_failed", reason, Some(peer))
            });
        }
        if wanted {
            self.tell_unreachable(peer);
        }
    }
}

fn base64_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The reason an I/O error gives.
fn io_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection_refused",
        io::ErrorKind::TimedOut => "handshake_timeout",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "connection_reset",
        _ => "connection_error",
    }
}

/// Starts a non-blocking connect to `address`.
fn connect_nonblocking(address: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&address.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// Writes one length-prefixed message. Handshake messages are small and go to a socket whose
/// buffer is empty, so a short write means the connection is broken.
fn write_record(socket: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let mut out = [0u8; 2 + MAX_HELLO];
    let len = message.len().min(MAX_HELLO);
    out[..2].copy_from_slice(&(len as u16).to_be_bytes());
    out[2..2 + len].copy_from_slice(&message[..len]);
    match socket.write(&out[..2 + len]) {
        Ok(n) if n == 2 + len => Ok(()),
        Ok(_) => Err(io::ErrorKind::WriteZero.into()),
        Err(e) => Err(e),
    }
}

/// Reads into `buf` (a 2-byte length and a message of at most [`MAX_HELLO`] bytes) without
/// blocking; true once the message is whole.
fn read_message(
    socket: &mut TcpStream,
    buf: &mut [u8; 2 + MAX_HELLO],
    have: &mut usize,
) -> Result<bool, &'static str> {
    loop {
        let need = if *have < 2 {
            2
        } else {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if len == 0 || len > MAX_HELLO {
                return Err("bad_handshake_message");
            }
            2 + len
        };
        if *have == need && need > 2 {
            return Ok(true);
        }
        if !read_some(socket, &mut buf[*have..need], have)? {
            return Ok(false);
        }
    }
}

/// Reads all of `buf` without blocking; true once it is full.
fn read_exact<const N: usize>(
    socket: &mut TcpStream,
    buf: &mut [u8; N],
    have: &mut usize,
) -> Result<bool, &'static str> {
    while *have < N {
        if !read_some(socket, &mut buf[*have..], have)? {
            return Ok(false);
        }
    }
    // A confirmation is a 2-byte length then the sealed CONFIRM frame: check the length.
    if N == CONFIRM_RECORD && usize::from(u16::from_be_bytes([buf[0], buf[1]])) != N - 2 {
        return Err("bad_confirmation");
    }
    Ok(true)
}

/// One read; false when it would block.
fn read_some(
    socket: &mut TcpStream,
    into: &mut [u8],
    have: &mut usize,
) -> Result<bool, &'static str> {
    match socket.read(into) {
        Ok(0) => Err("closed_early"),
        Ok(n) => {
            *have += n;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(_) => Err("connection_error"),
    }
}
