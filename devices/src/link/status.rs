//! What an operator sees of each link (`keyhold ctl links`, `GET /v1/links`): its state, why
//! it last failed, when it last completed a handshake, its traffic and its rekeys.
//!
//! The link-setup thread and the router (on the device thread) both write here; the control
//! API reads. Traffic counters are atomics, so the data path takes no lock for them. A change
//! of state is logged once at the default level (not once per retry).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use super::directory::Directory;
use crate::bus::lock;

/// Where a link is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Waiting for the peer to connect (this node has the higher ID), or not tried yet.
    Waiting,
    /// Connecting or in the handshake.
    Connecting,
    /// Authenticated and confirmed: frames flow.
    Up,
    /// The last attempt failed; the next one waits for the backoff.
    Backoff,
    /// Links on demand: no channel needs a link to this peer now.
    Idle,
}

impl LinkState {
    /// The state as the API names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Connecting => "connecting",
            Self::Up => "up",
            Self::Backoff => "backoff",
            Self::Idle => "idle",
        }
    }
}

/// Traffic of the current or last link to a peer.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes received (records and payloads).
    pub bytes_in: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Bytes sealed and waiting for the socket.
    pub queued_out: AtomicU64,
}

impl Counters {
    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn reset(&self) {
        for c in
            [&self.bytes_in, &self.bytes_out, &self.frames_in, &self.frames_out, &self.queued_out]
        {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct PeerState {
    state: LinkState,
    since: SystemTime,
    last_failure: Option<(String, SystemTime)>,
    last_handshake: Option<SystemTime>,
    established: u64,
    rekeys: u64,
    remote: Option<SocketAddr>,
    protocol: Option<u8>,
}

#[derive(Debug)]
struct PeerRecord {
    address: SocketAddr,
    state: Mutex<PeerState>,
    counters: Arc<Counters>,
}

impl PeerRecord {
    fn new(address: SocketAddr, state: LinkState) -> Self {
        let state = PeerState {
            state,
            since: SystemTime::now(),
            last_failure: None,
            last_handshake: None,
            established: 0,
            rekeys: 0,
            remote: None,
            protocol: None,
        };
        Self { address, state: Mutex::new(state), counters: Arc::default() }
    }
}

/// Every peer's link, as the node knows it.
#[derive(Debug)]
pub struct LinkBook {
    peers: RwLock<BTreeMap<u32, PeerRecord>>,
    /// The state of a peer with no link yet: `Waiting`, or `Idle` for links on demand.
    initial: LinkState,
}

/// One peer's link, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// The peer node.
    pub peer: u32,
    /// Its address in the cluster config.
    pub address: SocketAddr,
    /// The address of the current link's other end, while up.
    pub remote: Option<SocketAddr>,
    /// The protocol version the current link speaks, while up.
    pub protocol: Option<u8>,
    /// [`LinkState::name`].
    pub state: &'static str,
    /// When it entered that state.
    pub since: SystemTime,
    /// Why the last link or attempt failed, and when.
    pub last_failure: Option<(String, SystemTime)>,
    /// When the last handshake (new link or rekey) completed.
    pub last_handshake: Option<SystemTime>,
    /// Times a link to this peer came up.
    pub established: u64,
    /// Rekeys of the current link's session.
    pub rekeys: u64,
    /// Bytes received on the current or last link.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes sealed for the peer and not yet taken by its socket.
    pub queued_out: u64,
}

impl LinkBook {
    /// A book for every node of `directory` but `own_id`, linked all the time.
    pub fn new(directory: &Directory, own_id: u32) -> Self {
        Self::with_initial(directory, own_id, LinkState::Waiting)
    }

    /// A book for every node of `directory` but `own_id`, linked when channels need it.
    pub fn on_demand(directory: &Directory, own_id: u32) -> Self {
        Self::with_initial(directory, own_id, LinkState::Idle)
    }

    fn with_initial(directory: &Directory, own_id: u32, initial: LinkState) -> Self {
        let peers = directory
            .peers()
            .iter()
            .filter(|p| p.id != own_id)
            .map(|p| (p.id, PeerRecord::new(p.address, initial)))
            .collect();
        Self { peers: RwLock::new(peers), initial }
    }

    /// Follows a reloaded cluster file: new nodes get a record, removed ones lose theirs,
    /// moved ones show their new address; the others keep their history.
    pub fn follow(&self, directory: &Directory, own_id: u32) {
        let mut peers = self.write();
        peers.retain(|id, _| directory.by_id(*id).is_some());
        for p in directory.peers().iter().filter(|p| p.id != own_id) {
            let record =
                peers.entry(p.id).or_insert_with(|| PeerRecord::new(p.address, self.initial));
            record.address = p.address;
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, PeerRecord>> {
        self.peers.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, PeerRecord>> {
        self.peers.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The traffic counters of `peer`'s link (fresh ones for a node not in the book).
    pub fn counters(&self, peer: u32) -> Arc<Counters> {
        self.read().get(&peer).map(|p| p.counters.clone()).unwrap_or_default()
    }

    /// The attempt to link with `peer` started.
    pub fn connecting(&self, peer: u32) {
        self.update(peer, |s| s.state = LinkState::Connecting);
    }

    /// A link to `peer`, from or at `remote`, speaking protocol version `protocol`, is up.
    pub fn up(&self, peer: u32, remote: SocketAddr, protocol: u8) {
        if let Some(record) = self.read().get(&peer) {
            record.counters.reset();
        }
        self.update(peer, |s| {
            s.state = LinkState::Up;
            s.remote = Some(remote);
            s.protocol = Some(protocol);
            s.established += 1;
            s.rekeys = 0;
            s.last_handshake = Some(SystemTime::now());
        });
        log::info!("link to node {peer} up ({remote}, protocol version {protocol})");
    }

    /// The link's session was rekeyed.
    pub fn rekeyed(&self, peer: u32) {
        self.update(peer, |s| {
            s.rekeys += 1;
            s.last_handshake = Some(SystemTime::now());
        });
        log::debug!("link to node {peer} rekeyed");
    }

    /// The link or attempt failed for `reason`; `next` is the state it goes to. Logged once
    /// per change of state or reason, not once per retry; returns whether it was logged.
    pub fn failed(&self, peer: u32, reason: &str, next: LinkState) -> bool {
        let peers = self.read();
        let Some(record) = peers.get(&peer) else { return false };
        let mut s = lock(&record.state);
        let repeated = s.state != LinkState::Up
            && s.last_failure.as_ref().is_some_and(|(last, _)| last == reason);
        if !repeated {
            // A link that was up names where it ran (a peer that dialled in comes from a port of
            // its own); an attempt, the address it dials.
            let addr = s.remote.unwrap_or(record.address);
            match s.state {
                LinkState::Up if next == LinkState::Idle => {
                    log::info!("link to node {peer} ({addr}) closed: {reason}")
                }
                LinkState::Up => log::warn!("link to node {peer} ({addr}) down: {reason}"),
                _ => {
                    log::warn!("link to node {peer} ({addr}) failing: {reason} (retrying quietly)")
                }
            }
        }
        s.last_failure = Some((reason.to_owned(), SystemTime::now()));
        s.remote = None;
        s.protocol = None;
        if s.state != next {
            s.state = next;
            s.since = SystemTime::now();
        }
        !repeated
    }

    fn update(&self, peer: u32, f: impl FnOnce(&mut PeerState)) {
        if let Some(record) = self.read().get(&peer) {
            let mut s = lock(&record.state);
            let before = s.state;
            f(&mut s);
            if s.state != before {
                s.since = SystemTime::now();
            }
        }
    }

    /// Whether the link to `peer` is up.
    pub fn is_up(&self, peer: u32) -> bool {
        self.read().get(&peer).is_some_and(|p| lock(&p.state).state == LinkState::Up)
    }

    /// Every peer's link.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.read()
            .iter()
            .map(|(&peer, record)| {
                let s = lock(&record.state);
                let c = &record.counters;
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                LinkStatus {
                    peer,
                    address: record.address,
                    remote: s.remote,
                    protocol: s.protocol,
                    state: s.state.name(),
                    since: s.since,
                    last_failure: s.last_failure.clone(),
                    last_handshake: s.last_handshake,
                    established: s.established,
                    rekeys: s.rekeys,
                    bytes_in: get(&c.bytes_in),
                    bytes_out: get(&c.bytes_out),
                    frames_in: get(&c.frames_in),
                    frames_out: get(&c.frames_out),
                    queued_out: get(&c.queued_out),
                }
            })
            .collect()
    }
}
