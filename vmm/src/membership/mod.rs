//! Membership from etcd (docs/OPERATOR.md, "Fleets on etcd"): an alternative to cluster.toml
//! in which each node registers `{id, address, public key}` under a key prefix, with a lease
//! it keeps alive, and follows every other node's registration. A registration counts only if
//! the cluster's operator key signed it ([`registration`]), so write access to etcd is not
//! enough to add a node or swap its key. Nodes that appear are linked, nodes whose lease
//! expires (a crash) or that deregister are unlinked, changed keys re-handshake: the link
//! threads follow the directory exactly as they follow a reloaded cluster file.
//!
//! One thread keeps the lease and reads; a second follows a watch (its answer never ends).
//! When etcd cannot be reached the node keeps its links and its last view, says so in the API
//! and metrics, and retries with backoff; once etcd answers again it reads the prefix afresh
//! and watches from just after that read's revision, so no change is missed.

pub mod config;
pub mod etcd;
pub mod operator;
pub mod registration;

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::VerifyingKey;
use keyhold_devices::bus::lock;
use keyhold_devices::cmm::audit::{Audit, Record};
use keyhold_devices::link::{Directory, Peer, Reloader};

use crate::seccomp::{Containment, ThreadKind};
use etcd::{Change, Claim, Etcd, EtcdError, Kv};
use registration::{Registration, RegistrationError};

/// Shortest and longest wait before etcd is tried again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// How long one watch is trusted: then the node reads afresh and watches anew, so that a
/// stream that went silent (its member cut off, a connection half-open) is not followed
/// for ever.
const WATCH_REFRESH: Duration = Duration::from_secs(300);
/// Batches of changes that may wait for the membership thread: past that the watch waits
/// (and a flood of changes cannot grow memory or starve the lease's renewal).
const QUEUED_BATCHES: usize = 64;

/// How a node finds its peers in etcd (node.toml `[etcd]`).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT`, tried in turn.
    pub endpoints: Vec<String>,
    /// Registrations live at `PREFIX<node ID>`.
    pub prefix: String,
    /// The lease's time to live: how soon peers drop a node that crashed.
    pub lease_ttl_secs: u64,
    /// The key that signs every registration.
    pub operator_key: VerifyingKey,
    /// This node's own registration, signed by the operator key.
    pub own: Registration,
    /// TLS to etcd (CA, client certificate), for https endpoints.
    pub tls: ureq::tls::TlsConfig,
}

/// Where the node stands with etcd, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipStatus {
    /// `registering`, `synced`, `unavailable` (etcd not answering: links and the last view
    /// stay) or `refused` (another live registration with another key holds this node's ID).
    pub state: &'static str,
    /// When it entered that state.
    pub since: SystemTime,
    /// The store revision the directory reflects.
    pub revision: i64,
    /// Nodes in the directory, this one included.
    pub members: usize,
    /// The endpoint last used.
    pub endpoint: String,
    /// Why etcd last failed, if it did.
    pub last_error: Option<String>,
}

impl Default for MembershipStatus {
    fn default() -> Self {
        Self {
            state: "registering",
            since: SystemTime::now(),
            revision: 0,
            members: 1,
            endpoint: String::new(),
            last_error: None,
        }
    }
}

/// The running membership: dropping it deregisters the node (revokes its lease) and stops.
pub struct Membership {
    events: SyncSender<Event>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<MembershipStatus>>,
}

enum Event {
    /// Changes a watch (of that generation) reported, and the revision after them.
    Changes(u64, i64, Vec<Change>),
    /// The watch of that generation ended.
    WatchEnded(u64, EtcdError),
    Stop,
}

impl Membership {
    /// Registers this node (`own` is its entry in the directory) and follows the others,
    /// handing every new directory to `reloader`.
    pub fn start(
        config: EtcdConfig,
        own: Peer,
        reloader: Reloader,
        audit: Audit,
        containment: Containment,
    ) -> std::io::Result<Self> {
        let status = Arc::new(Mutex::new(MembershipStatus::default()));
        let (events, receiver) = mpsc::sync_channel(QUEUED_BATCHES);
        let etcd = Etcd::new(config.endpoints.clone(), config.tls.clone());
        let worker = Worker {
            etcd,
            config,
            own,
            reloader,
            audit,
            status: status.clone(),
            containment: containment.clone(),
            events: events.clone(),
            lease: None,
            view: BTreeMap::new(),
            published: None,
            watching: None,
            watch_since: Instant::now(),
            generation: 0,
            backoff: BACKOFF_MIN,
            refused: None,
        };
        let thread = std::thread::Builder::new().name("membership".into()).spawn(move || {
            containment.install(ThreadKind::Membership);
            worker.run(&receiver);
        })?;
        Ok(Self { events, thread: Some(thread), status })
    }

    /// Where the node stands with etcd.
    pub fn status(&self) -> Arc<Mutex<MembershipStatus>> {
        self.status.clone()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    etcd: Etcd,
    config: EtcdConfig,
    own: Peer,
    reloader: Reloader,
    audit: Audit,
    status: Arc<Mutex<MembershipStatus>>,
    containment: Containment,
    events: SyncSender<Event>,
    /// Our registration's lease, once registered.
    lease: Option<i64>,
    /// Valid registrations by etcd key, each with the revision that created it.
    view: BTreeMap<Vec<u8>, (i64, Registration)>,
    /// The directory last handed to the links.
    published: Option<Directory>,
    /// The generation of the watch running, if one is.
    watching: Option<u64>,
    /// When it started.
    watch_since: Instant,
    generation: u64,
    backoff: Duration,
    /// The registration that holds our ID, while one does (audited once per value).
    refused: Option<Vec<u8>>,
}

impl Worker {
    fn run(mut self, events: &Receiver<Event>) {
        let mut next = Instant::now();
        loop {
            // The lease is renewed on time however many changes wait.
            if Instant::now() >= next {
                next = Instant::now() + self.tick();
            }
            match events.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Event::Changes(generation, revision, changes))
                    if self.watching == Some(generation) =>
                {
                    self.apply(changes, revision);
                }
                Ok(Event::WatchEnded(generation, why)) if self.watching == Some(generation) => {
                    self.watching = None;
                    self.unavailable(&why);
                    next = Instant::now() + self.backoff;
                }
                // From a watch given up on already.
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        // A clean leave: peers unlink at once instead of after the lease's time to live.
        if let Some(lease) = self.lease {
            let _ = self.etcd.revoke(lease);
        }
    }

    /// Keeps the lease, reads and watches as needed; how long until the next tick.
    fn tick(&mut self) -> Duration {
        match self.step() {
            Ok(()) => {
                self.backoff = BACKOFF_MIN;
                Duration::from_secs(self.config.lease_ttl_secs).div_f64(3.0).max(BACKOFF_MIN)
            }
            Err(why) => {
                // Whatever the watch says from now on may have missed something: once etcd
                // answers again, read afresh.
                self.watching = None;
                self.unavailable(&why);
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                wait
            }
        }
    }

    fn step(&mut self) -> Result<(), EtcdError> {
        if self.watching.is_some() && self.watch_since.elapsed() >= WATCH_REFRESH {
            self.watching = None;
        }
        // Without a watch, read first: whoever then sees this node's registration and dials
        // it is in its directory already (or comes in the watch, from just after the read).
        let read = match self.watching {
            None => Some(self.read_view()?),
            Some(_) => None,
        };
        match self.lease {
            Some(lease) if self.etcd.keep_alive(lease)? > 0 => {}
            // Never registered, or the lease expired while etcd could not be reached.
            _ => self.register()?,
        }
        if let Some(revision) = read {
            let watch = self.etcd.watch(self.config.prefix.as_bytes(), revision + 1)?;
            self.generation += 1;
            let (generation, events) = (self.generation, self.events.clone());
            let containment = self.containment.clone();
            let started =
                std::thread::Builder::new().name("membership-watch".into()).spawn(move || {
                    containment.install(ThreadKind::Membership);
                    for batch in watch {
                        let event = match batch {
                            Ok((revision, changes)) => {
                                Event::Changes(generation, revision, changes)
                            }
                            Err(why) => Event::WatchEnded(generation, why),
                        };
                        let ended = matches!(event, Event::WatchEnded(..));
                        if events.send(event).is_err() || ended {
                            return;
                        }
                    }
                    let gone = EtcdError::Unreachable("the watch's stream ended".into());
                    let _ = events.send(Event::WatchEnded(generation, gone));
                });
            started.map_err(|e| EtcdError::Unreachable(format!("starting the watch: {e}")))?;
            self.watching = Some(generation);
            self.watch_since = Instant::now();
            lock(&self.status).revision = revision;
        }
        let state = if self.refused.is_some() { "refused" } else { "synced" };
        self.set_state(state, None);
        Ok(())
    }

    /// Registers this node under a new lease, unless a live registration with another key
    /// holds its ID (no takeover: that is refused, audited, and tried again next tick).
    fn register(&mut self) -> Result<(), EtcdError> {
        self.lease = None;
        let lease = self.etcd.grant(self.config.lease_ttl_secs)?;
        let key = registration_key(&self.config.prefix, self.own.id);
        let (own_id, own_key) = (self.own.id, self.own.public_key);
        let operator = self.config.operator_key;
        // Ours from before a restart, or no valid registration of this ID at all.
        let replaceable = |held: &[u8]| {
            Registration::verified(held, &operator)
                .map_or(true, |r| r.public_key == own_key || r.id != own_id)
        };
        match self.etcd.claim(&key, self.config.own.to_json().as_bytes(), lease, replaceable)? {
            Claim::Ours => {
                self.lease = Some(lease);
                self.refused = None;
                log::info!("registered as node {} in etcd ({})", self.own.id, self.etcd.endpoint());
            }
            Claim::Held(held) => {
                let _ = self.etcd.revoke(lease);
                if self.refused.as_ref() != Some(&held) {
                    log::error!(
                        "node ID {} is held in etcd by a live registration with another key; \
                         retrying until it expires",
                        self.own.id
                    );
                    self.audit.record(Record::link(
                        "registration_refused",
                        "held_by_another_key",
                        Some(self.own.id),
                    ));
                    self.refused = Some(held);
                }
                self.set_state("refused", Some("another live registration holds this node's ID"));
            }
        }
        Ok(())
    }

    /// A fresh read: the view is what it holds (the registrations that verify; the others
    /// are audited and dropped as each page arrives). Returns the revision read.
    fn read_view(&mut self) -> Result<i64, EtcdError> {
        let mut view = BTreeMap::new();
        let Self { etcd, config, audit, .. } = self;
        let revision = etcd.read(config.prefix.as_bytes(), &mut |kv| {
            if let Some((key, registration)) = checked(config, audit, kv) {
                view.insert(key, registration);
            }
        })?;
        self.view = view;
        self.check_own();
        self.publish(revision);
        Ok(revision)
    }

    /// If this node's registration is gone from etcd (deleted) or replaced while its lease
    /// lives, it registers again at the next tick; the old lease is left to expire.
    fn check_own(&mut self) {
        let own = self.view.get(&registration_key(&self.config.prefix, self.own.id));
        if self.lease.is_some() && own.is_none_or(|(_, r)| *r != self.config.own) {
            log::warn!("this node's registration in etcd is gone or replaced; registering again");
            self.lease = None;
        }
    }

    fn apply(&mut self, changes: Vec<Change>, revision: i64) {
        for change in changes {
            match change {
                Change::Put(kv) => self.put(kv),
                Change::Delete { key } => {
                    self.view.remove(&key);
                }
            }
        }
        self.check_own();
        self.publish(revision);
    }

    /// Takes the registration at `kv` into the view if it is valid; else audits it and drops
    /// any earlier one there.
    fn put(&mut self, kv: Kv) {
        let key = kv.key.clone();
        match checked(&self.config, &self.audit, kv) {
            Some((key, registration)) => {
                self.view.insert(key, registration);
            }
            None => {
                self.view.remove(&key);
            }
        }
    }

    /// The directory the view makes: this node as configured, and every other registered
    /// node whose ID and key no node registered earlier (by creation revision) has. Handed to
    /// the links when it changed.
    fn publish(&mut self, revision: i64) {
        let mut peers = vec![self.own.clone()];
        let mut registered: Vec<&(i64, Registration)> = self.view.values().collect();
        registered.sort_by_key(|(created, r)| (*created, r.id));
        for (_, registration) in registered {
            let duplicate = peers
                .iter()
                .any(|p| p.id == registration.id || p.public_key == registration.public_key);
            if duplicate {
                if registration.id != self.own.id {
                    self.audit.record(Record::link(
                        "registration_rejected",
                        "duplicate_key",
                        Some(registration.id),
                    ));
                }
                continue;
            }
            peers.push(Peer {
                id: registration.id,
                address: registration.address,
                public_key: registration.public_key,
            });
        }
        peers.sort_by_key(|p| p.id);
        let directory = Directory::new(peers);
        let members = directory.peers().len();
        if self.published.as_ref() != Some(&directory) {
            match self.reloader.follow(directory.clone(), "etcd") {
                Ok(changes) => {
                    log::info!(
                        "membership from etcd: added {:?}, removed {:?}, new keys {:?}, moved {:?}",
                        changes.added,
                        changes.removed,
                        changes.rekeyed,
                        changes.moved
                    );
                    let events = [
                        ("member_added", "registered", &changes.added),
                        ("member_removed", "deregistered", &changes.removed),
                        ("member_changed", "new_key", &changes.rekeyed),
                        ("member_changed", "new_address", &changes.moved),
                    ];
                    for (event, reason, ids) in events {
                        for &id in ids {
                            self.audit.record(Record::link(event, reason, Some(id)));
                        }
                    }
                }
                Err(e) => log::error!("membership from etcd not applied: {e}"),
            }
            self.published = Some(directory);
        }
        let mut status = lock(&self.status);
        status.members = members;
        if revision >= 0 {
            status.revision = revision;
        }
    }

    fn unavailable(&mut self, why: &EtcdError) {
        let first = lock(&self.status).state != "unavailable";
        if first {
            log::warn!("etcd unavailable, keeping the links and the last view: {why}");
            self.audit.record(Record::link("membership_unavailable", "etcd_unreachable", None));
        }
        self.set_state("unavailable", Some(&why.to_string()));
    }

    fn set_state(&mut self, state: &'static str, error: Option<&str>) {
        let mut status = lock(&self.status);
        if status.state == "unavailable" && state == "synced" {
            log::info!("etcd available again; membership read afresh");
            self.audit.record(Record::link("membership_restored", "etcd_reachable", None));
        }
        if status.state != state {
            status.state = state;
            status.since = SystemTime::now();
        }
        if let Some(error) = error {
            status.last_error = Some(error.to_owned());
        }
        status.endpoint = self.etcd.endpoint().to_owned();
    }
}

/// The registration `kv` holds, with its key and creation revision, if it verifies against
/// the operator key and sits under its own node ID; otherwise `None`, logged and audited.
fn checked(config: &EtcdConfig, audit: &Audit, kv: Kv) -> Option<(Vec<u8>, (i64, Registration))> {
    let Kv { key, value, created } = kv;
    let checked = Registration::verified(&value, &config.operator_key).and_then(|r| {
        if key != registration_key(&config.prefix, r.id) {
            return Err(RegistrationError::Malformed("its key names another node ID".into()));
        }
        Ok(r)
    });
    match checked {
        Ok(registration) => Some((key, (created, registration))),
        Err(why) => {
            let claimed = String::from_utf8_lossy(&key[..key.len().min(256)]);
            let id = claimed.strip_prefix(&config.prefix).and_then(|s| s.parse().ok());
            log::warn!("etcd registration {claimed} ignored: {why}");
            audit.record(Record::link("registration_rejected", why.reason(), id));
            None
        }
    }
}

/// The etcd key of node `id`'s registration under `prefix`.
fn registration_key(prefix: &str, id: u32) -> Vec<u8> {
    format!("{prefix}{id}").into_bytes()
}
