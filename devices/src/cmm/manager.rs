//! The connection management mechanism (claim 7): one per node, shared by all its partitions.
//!
//! Guest requests arrive stamped with the requesting partition by the device; the CMM checks
//! them against the connection table, keeps keys in the key table, and verifies offers and
//! messages on the way in. It reaches other nodes only through its [`Router`], and the devices
//! reach the links only through the CMM.
//!
//! [`Core`] is the mechanism itself (tables, keys, audit, counters): `channels.rs` sets
//! channels up and tears them down, `messages.rs` carries messages. [`Cmm`] pairs it with the
//! router, so that frames coming off a link can be handed to the core while the router holds
//! their bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use guest_agent::channel::abi::{ChannelInfo, Endpoint, RxHeader, Stats, TxHeader};

use super::audit::{Audit, Record};
use super::connection_table::{ChannelId, ConnectionTable};
use super::key_table::KeyTable;
use crate::link::router::{FdChange, Router};
use crate::link::wire::Frame;

/// Limits the device advertises to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one message.
    pub max_message: u32,
    /// Most connection-table entries per partition.
    pub max_channels: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message: 64 * 1024, max_channels: 64 }
    }
}

/// How long a channel's sending key is used before the channel moves to the next epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLifetime {
    /// Messages sealed under one key.
    pub messages: u32,
    /// Seconds one key is used.
    pub secs: u32,
}

impl Default for KeyLifetime {
    fn default() -> Self {
        Self { messages: 1 << 30, secs: 600 }
    }
}

/// How a CMM is sized and keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmmConfig {
    /// Channels the node can hold, across all its partitions.
    pub capacity: usize,
    /// What each partition may do.
    pub limits: Limits,
    /// Channel key lifetime.
    pub lifetime: KeyLifetime,
    /// How long an OPEN waits for another node's answer before it fails TIMED_OUT.
    pub open_timeout: Duration,
}

/// Default of [`CmmConfig::open_timeout`]: long enough for a link being re-established
/// (a handshake takes milliseconds), short enough that a guest is not left waiting.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for CmmConfig {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            limits: Limits::default(),
            lifetime: KeyLifetime::default(),
            open_timeout: DEFAULT_OPEN_TIMEOUT,
        }
    }
}

/// A status code for the guest (one of `abi::status`).
pub type Status = u32;

/// How an OPEN proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// The receiving CMM (on this node) accepted: the channel is open.
    Done(ChannelId),
    /// The offer went to another node; [`Cmm::take_answers`] gives the answer later.
    Pending(ChannelId),
}

/// Where a sent message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// To a partition of this node: the device copies it into the receiver's buffer.
    Local {
        /// The receiving partition.
        partition: u32,
        /// The receiving channel.
        channel: ChannelId,
        /// The header the receiver sees.
        header: RxHeader,
    },
    /// Sealed and staged for another node's link.
    Remote,
}

/// What a device did with a verified message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Written into a receive buffer.
    Written,
    /// Held until the guest posts a buffer (the device reports it later).
    Held,
    /// Dropped for want of room.
    Dropped,
}

/// Where verified messages from other nodes go: the devices.
pub trait Deliver {
    /// Delivers `payload` to `partition`'s receive queue, or holds or drops it. A `metered`
    /// message's sender is held to the credit it was granted, so it is held whatever else
    /// the device holds (docs/PROTOCOL.md, section 8).
    fn deliver(
        &mut self,
        partition: u32,
        header: &RxHeader,
        payload: &[u8],
        metered: bool,
    ) -> Delivered;
}

/// Where a message's payload comes from: the sender's guest memory.
pub trait Payload {
    /// Copies the payload into `out` (exactly its length); false if it cannot be read.
    fn read_into(&mut self, out: &mut [u8]) -> bool;
}

/// Where a guest-supplied key comes from: the guest's request, read straight into secret
/// memory.
pub trait KeySource {
    /// Copies the key into `out`; false if it cannot be read.
    fn read_key(&mut self, out: &mut [u8; 32]) -> bool;
}

/// The mechanism: tables, keys, audit, counters.
pub(super) struct Core {
    pub(super) node: u32,
    pub(super) table: ConnectionTable,
    pub(super) keys: KeyTable,
    pub(super) audit: Audit,
    pub(super) stats: HashMap<u32, Stats>,
    pub(super) limits: Limits,
    pub(super) lifetime: KeyLifetime,
    pub(super) open_timeout: Duration,
    /// Offers sent, oldest first, with when they went: each is answered, or times out.
    pub(super) offers: VecDeque<(ChannelId, Instant)>,
    /// When the CMM started, in [`coarse_secs`].
    started: u64,
    /// Answers to remote OPENs, for the devices to complete.
    pub(super) answers: Vec<(ChannelId, Result<ChannelId, Status>)>,
    /// Frames to send once a received record has been handled.
    pub(super) replies: Vec<(u32, Reply)>,
    /// Whether an offer that finds no LISTEN entry may have one made for it.
    pub(super) implicit_listen: Option<ImplicitListen>,
    /// Nodes whose links meter channels with CREDIT frames (version 3).
    pub(super) credit_links: HashSet<u32>,
    /// Credit this node has granted, not yet taken, to each partition's senders.
    pub(super) promised: HashMap<u32, u64>,
    /// Metered channels waiting for credit the budget did not have, oldest first.
    pub(super) wanting: VecDeque<ChannelId>,
    /// Messages still held for channels that closed while they waited: `(partition, count)`.
    pub(super) closed_held: HashMap<ChannelId, (u32, u64)>,
    /// Links on demand: offers waiting for links, and links going unused.
    pub(super) demand: super::demand::Demand,
}

/// Says whether an offer from `source` to `destination` that finds no LISTEN entry may have one
/// made for it (a vsock port the node's policy opens to that peer).
pub type ImplicitListen = Box<dyn Fn(&Endpoint, &Endpoint) -> bool + Send>;

/// A frame the core sends in answer to one it received.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reply {
    /// OFFER_REPLY.
    Offer { id: u32, result: super::frames::OfferResult },
    /// CREDIT; `urgent` if its sender is about to run out (else it rides with the next
    /// record to that node).
    Credit { source: Endpoint, destination: Endpoint, limit: u64, urgent: bool },
}

impl Core {
    pub(super) fn endpoint(&self, partition: u32, process: u32) -> Endpoint {
        Endpoint { node: self.node, partition, process }
    }

    /// Seconds since the CMM started (for key lifetimes).
    pub(super) fn now(&self) -> u32 {
        u32::try_from(coarse_secs().saturating_sub(self.started)).unwrap_or(u32::MAX)
    }

    pub(super) fn stats(&mut self, partition: u32) -> &mut Stats {
        self.stats.entry(partition).or_default()
    }

    pub(super) fn audit(
        &self,
        event: &'static str,
        reason: &'static str,
        source: &Endpoint,
        destination: &Endpoint,
    ) {
        self.audit.record(Record::endpoints(event, reason, source, destination));
    }

    /// Audits a decision about what the CMM of `node` sent (a frame from another node names
    /// it as the peer, whose rate of records is then limited).
    pub(super) fn audit_from(
        &self,
        node: u32,
        event: &'static str,
        reason: &'static str,
        source: &Endpoint,
        destination: &Endpoint,
    ) {
        self.audit.record(Record {
            peer: (node != self.node).then_some(node),
            ..Record::endpoints(event, reason, source, destination)
        });
    }

    /// Counts and audits a refused guest request of `partition`.
    pub(super) fn refuse(&mut self, partition: u32, code: Status) -> Status {
        self.stats(partition).refused += 1;
        let source = self.endpoint(partition, 0);
        self.audit.record(Record {
            source: Some(&source),
            ..Record::link("request_refused", guest_agent::channel::abi::status::name(code), None)
        });
        code
    }
}

/// The CMM of one node, with its router.
pub struct Cmm {
    pub(super) core: Core,
    pub(super) router: Router,
}

impl Cmm {
    /// A CMM for `node`, reaching other nodes through `router`.
    pub fn new(node: u32, config: CmmConfig, audit: Audit, router: Router) -> io::Result<Self> {
        Ok(Self {
            core: Core {
                node,
                table: ConnectionTable::new(config.capacity),
                keys: KeyTable::new(config.capacity)?,
                audit,
                stats: HashMap::new(),
                limits: config.limits,
                lifetime: config.lifetime,
                open_timeout: config.open_timeout,
                offers: VecDeque::new(),
                started: coarse_secs(),
                answers: Vec::new(),
                replies: Vec::new(),
                implicit_listen: None,
                credit_links: router.credit_nodes().collect(),
                promised: HashMap::new(),
                wanting: VecDeque::new(),
                closed_held: HashMap::new(),
                demand: super::demand::Demand::new(router.idle_after()),
            },
            router,
        })
    }

    /// This node.
    pub fn node(&self) -> u32 {
        self.core.node
    }

    /// The limits guests are told.
    pub fn limits(&self) -> Limits {
        self.core.limits
    }

    /// Tells the CMM that `partition` is one of this node's (its counters start at zero).
    pub fn add_partition(&mut self, partition: u32) {
        self.core.stats.entry(partition).or_default();
    }

    /// The counters of `partition`.
    pub fn stats(&mut self, partition: u32) -> &mut Stats {
        self.core.stats(partition)
    }

    /// Every partition's counters.
    pub fn all_stats(&self) -> Vec<(u32, Stats)> {
        let mut all: Vec<(u32, Stats)> = self.core.stats.iter().map(|(p, s)| (*p, *s)).collect();
        all.sort_by_key(|(p, _)| *p);
        all
    }

    /// Counts and audits a refused guest request of `partition`.
    pub fn refuse(&mut self, partition: u32, code: Status) -> Status {
        self.core.refuse(partition, code)
    }

    /// Lets offers from other nodes that find no LISTEN entry have one made for them where
    /// `allows` says so (vsock ports opened by the node's policy).
    pub fn set_implicit_listen(&mut self, allows: ImplicitListen) {
        self.core.implicit_listen = Some(allows);
    }

    /// Ends channel `id` whatever its state (an offer still out included: the peer closes
    /// what it accepted); nothing if it is gone already.
    pub fn abandon(&mut self, id: ChannelId) {
        self.core.abandon(&mut self.router, id);
        self.flush();
    }

    /// The entry of `local` for a channel with `remote`, if there is one.
    pub fn find(&self, local: &Endpoint, remote: &Endpoint) -> Option<ChannelId> {
        self.core.table.find(local, remote)
    }

    /// The receiving end on this node of the channel `header` names, sent by `partition`: its
    /// partition and entry; `None` if the channel is not `partition`'s, `header.source` is not
    /// its local endpoint, or it is not between partitions of this node (SEND then decides, and
    /// refuses a forgery as one).
    pub fn local_receiver(&self, partition: u32, header: &TxHeader) -> Option<(u32, ChannelId)> {
        let entry = self.core.table.get(ChannelId(header.channel)).filter(|e| {
            e.local.partition == partition
                && e.local == header.source
                && e.remote.node == self.core.node
        })?;
        let peer = self.core.table.find(&entry.remote, &entry.local)?;
        Some((entry.remote.partition, peer))
    }

    /// Whether an OPEN to `node` can be offered now: its link is up, or links are made on
    /// demand (the offer then waits for one).
    pub fn can_offer(&self, node: u32) -> bool {
        self.core.demand.on() || self.router.is_up(node)
    }

    /// Whether channel `id` is open (its peer has not closed it, its link has not gone).
    pub fn is_open(&self, id: ChannelId) -> bool {
        self.core
            .table
            .get(id)
            .is_some_and(|e| e.state == super::connection_table::ChannelState::Open)
    }

    /// Counts and audits a vsock packet of `partition` refused before it reached the CMM's
    /// own checks: `vsock_refused` with `reason`; `forged` counts it as a forgery too.
    pub fn refuse_vsock(
        &mut self,
        partition: u32,
        reason: &'static str,
        forged: bool,
        source: &Endpoint,
        destination: &Endpoint,
    ) {
        let stats = self.core.stats(partition);
        stats.refused += 1;
        if forged {
            stats.forged += 1;
        }
        self.core.audit("vsock_refused", reason, source, destination);
    }

    /// Audits the operator's reset of `partition`'s vsock transport, which ended `ended`
    /// connections.
    pub fn audit_vsock_reset(&self, partition: u32, ended: usize) {
        let source = self.core.endpoint(partition, 0);
        self.core.audit.record(Record {
            by_node: true,
            source: Some(&source),
            count: Some(ended as u64),
            ..Record::link("vsock_transport_reset", "operator", None)
        });
    }

    /// LIST: the partition's entries, without keys.
    pub fn list(&self, partition: u32) -> Vec<ChannelInfo> {
        self.core.table.of_partition(partition).map(|(id, e)| e.info(id)).collect()
    }

    /// Every connection-table entry of the node, with its partition and public keying
    /// details (salt, epochs), never a key.
    pub fn list_all(&self) -> Vec<ChannelView> {
        self.core
            .table
            .all()
            .map(|(id, e)| ChannelView {
                partition: e.local.partition,
                info: e.info(id),
                salt: e.salt,
                tx_epoch: e.tx_epoch,
                rx_epoch: e.rx_epoch,
            })
            .collect()
    }

    /// Keys in the key table (for tests and stats; never the keys themselves).
    pub fn key_count(&self) -> usize {
        self.core.keys.len()
    }

    /// Entries in the connection table.
    pub fn channel_count(&self) -> usize {
        self.core.table.len()
    }

    /// LISTEN: `process` of `partition` will accept a channel from `remote`.
    pub fn listen(
        &mut self,
        partition: u32,
        process: u32,
        remote: Endpoint,
    ) -> Result<ChannelId, Status> {
        self.core.listen(partition, process, remote)
    }

    /// OPEN: `process` of `partition` opens a channel to `remote`, keyed with the guest's key
    /// (`key`) or one the CMM makes.
    pub fn open(
        &mut self,
        partition: u32,
        process: u32,
        remote: Endpoint,
        key: Option<&mut dyn KeySource>,
    ) -> Result<Opening, Status> {
        self.core.open(&mut self.router, partition, process, remote, key)
    }

    /// CLOSE by the owning process.
    pub fn close(&mut self, partition: u32, process: u32, channel: u32) -> Result<(), Status> {
        self.core.close(&mut self.router, partition, process, channel)
    }

    /// Revocation by the operator: ends channel `channel` of `partition` whatever process owns
    /// it; its peer learns of it.
    pub fn revoke(&mut self, partition: u32, channel: u32) -> Result<(), Status> {
        self.core.revoke(&mut self.router, partition, channel)
    }

    /// SEND (claim 10).
    pub fn send(
        &mut self,
        partition: u32,
        header: &TxHeader,
        payload: &mut dyn Payload,
    ) -> Result<Sent, Status> {
        let sent = self.core.send(&mut self.router, partition, header, payload);
        self.handle_downs();
        sent
    }

    /// Counts a message written into `partition`'s receive buffer; its sender may be
    /// granted more credit (staged: it leaves with the next [`Cmm::flush`]).
    pub fn delivered(&mut self, partition: u32, channel: ChannelId, len: usize) {
        self.core.delivered(partition, channel, len);
        self.stage_replies();
    }

    /// Counts a verified message dropped because the guest had no receive buffer (staged as
    /// [`Cmm::delivered`]).
    pub fn dropped_no_room(&mut self, partition: u32, channel: ChannelId) {
        self.core.dropped_no_room(partition, channel);
        self.stage_replies();
    }

    /// Channel `channel` (just opened) carries a vsock connection, paced by its envelope's
    /// credit rather than by CREDIT frames.
    pub fn carries_vsock(&mut self, channel: ChannelId) {
        self.core.carries_vsock(channel);
    }

    /// Sends what requests and messages staged for other nodes (end of a batch).
    pub fn flush(&mut self) {
        self.router.flush_all();
        self.handle_downs();
    }

    /// Answers to remote OPENs that arrived (or failed) since the last call.
    pub fn take_answers(&mut self) -> Vec<(ChannelId, Result<ChannelId, Status>)> {
        std::mem::take(&mut self.core.answers)
    }

    // ----- the links -----

    /// The eventfd written when the setup thread hands over a link.
    pub fn arrivals_fd(&self) -> Option<std::os::fd::RawFd> {
        self.router.arrivals_fd()
    }

    /// Whether the node has links up.
    pub fn has_links(&self) -> bool {
        self.router.has_links()
    }

    /// Whether the link timer must run: links are up, or offers wait for an answer or a link.
    pub fn needs_timer(&self) -> bool {
        self.router.has_links() || !self.core.offers.is_empty()
    }

    /// Takes links the setup thread handed over.
    pub fn links_arrived(&mut self) {
        self.router.accept_arrivals();
        self.handle_downs();
        self.router.flush_all();
    }

    /// Whether the links have epoll changes waiting for the device thread.
    pub fn has_fd_changes(&self) -> bool {
        self.router.has_fd_changes()
    }

    /// The epoll changes the device thread must make for the links.
    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        self.router.take_fd_changes()
    }

    /// Link `token`'s socket is readable: verified messages go to `sink`.
    pub fn link_readable(&mut self, token: usize, sink: &mut dyn Deliver) {
        let core = &mut self.core;
        self.router
            .readable(token, &mut |node, frame, payload| core.receive(node, frame, payload, sink));
        self.send_replies();
        self.handle_downs();
    }

    /// Link `token`'s socket is writable.
    pub fn link_writable(&mut self, token: usize) {
        self.router.writable(token);
        self.handle_downs();
    }

    /// Keepalives, dead links, rekeys; OPENs that waited too long for an answer.
    pub fn tick(&mut self) {
        let now = Instant::now();
        self.router.tick();
        self.handle_downs();
        self.core.expire_offers(&mut self.router, now);
        self.core.close_idle_links(&mut self.router, now);
        self.handle_downs();
        self.router.flush_all();
    }

    /// Partition `partition` stopped: every channel it held is closed, its peers told why.
    /// Returns how many channels it held.
    pub fn partition_stopped(&mut self, partition: u32) -> usize {
        let closed = self.core.partition_stopped(&mut self.router, partition);
        self.flush();
        closed
    }

    /// Says goodbye on every link (the node is stopping).
    pub fn shut_down(&mut self) {
        self.router.shut_down();
        self.handle_downs();
    }

    fn send_replies(&mut self) {
        if !self.core.replies.is_empty() {
            self.stage_replies();
            self.router.flush_all();
        }
    }

    fn stage_replies(&mut self) {
        for (node, reply) in std::mem::take(&mut self.core.replies) {
            // A link that broke meanwhile takes its channels with it (below).
            let _ = match reply {
                Reply::Offer { id, result } => {
                    self.router.stage(node, &Frame::OfferReply { id, result })
                }
                Reply::Credit { source, destination, limit, urgent } => {
                    let frame = Frame::Credit { source, destination, limit };
                    if urgent {
                        self.router.stage(node, &frame)
                    } else {
                        self.router.stage_lazy(node, &frame)
                    }
                }
            };
        }
    }

    /// Follows the links' changes: channels over links that went down close (offers are made
    /// again, on demand), offers waiting for links that came up go, and OPENs waiting for
    /// links that could not be had fail.
    fn handle_downs(&mut self) {
        while self.router.has_link_changes() {
            let downs = self.router.take_downs();
            for &node in &downs {
                self.core.credit_links.remove(&node);
                self.core.link_down(&mut self.router, node);
            }
            let ups = self.router.take_ups();
            if !ups.is_empty() {
                self.core.credit_links = self.router.credit_nodes().collect();
                self.core.links_up(&mut self.router, &ups);
            }
            let unreachable = self.router.take_unreachable();
            self.core.links_unreachable(&unreachable);
        }
    }
}

/// Whole seconds on the monotonic clock, read at its coarse resolution (a few milliseconds).
/// Key lifetimes are counted in seconds and checked on every message sent to another node;
/// the precise clock's read (the TSC through the vDSO) was 1 % of a node's time at 64 B.
fn coarse_secs() -> u64 {
    // Both clocks count from the same start, so the precise one can stand in. Linux has had
    // the coarse one since 2.6.32: neither fails there (std's `Instant` would panic if the
    // precise one did); were both to fail, key lifetimes would count messages only.
    read_clock(libc::CLOCK_MONOTONIC_COARSE)
        .or_else(|| read_clock(libc::CLOCK_MONOTONIC))
        .unwrap_or(0)
}

fn read_clock(clock: libc::clockid_t) -> Option<u64> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec, borrowed exclusively for the call to fill; the call
    // touches nothing else.
    let rc = unsafe { libc::clock_gettime(clock, &mut now) };
    (rc == 0).then(|| u64::try_from(now.tv_sec).unwrap_or(0))
}

/// A connection-table entry as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    /// The partition that holds it.
    pub partition: u32,
    /// What LIST shows.
    pub info: ChannelInfo,
    /// The offer's salt (public).
    pub salt: [u8; 16],
    /// The sending key epoch.
    pub tx_epoch: u32,
    /// The receiving key epoch.
    pub rx_epoch: u32,
}
