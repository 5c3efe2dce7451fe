//! The connection management mechanism (claim 7): one per node, shared by all its partitions.
//!
//! Guest requests arrive stamped with the requesting partition by the device; the CMM checks
//! them against the connection table, keeps keys in the key table, and verifies offers and
//! messages on the way in. Between partitions of one node it passes offers and frames to its
//! own receive side, so the verification is the same code a host link will feed.

use std::collections::HashMap;
use std::io;

use guest_agent::channel::abi::{status, ChannelInfo, Endpoint, RxHeader, Stats, TxHeader};
use zeroize::Zeroize;

use super::audit::{Audit, Record};
use super::connection_table::{ChannelId, ChannelState, ConnectionTable, Entry, InsertError};
use super::crypto::{self, KEY_SIZE};
use super::frames::{DataFrame, DataRejection, Offer, Rejection};
use super::key_table::{ChannelKeys, KeyTable};

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

/// A verified message for a local partition.
#[derive(Debug)]
pub struct Delivery {
    /// The receiving partition.
    pub partition: u32,
    /// The receiving channel.
    pub channel: ChannelId,
    /// The header the guest will see.
    pub header: RxHeader,
    /// The decrypted payload.
    pub payload: Vec<u8>,
}

/// How an OPEN proceeds.
pub enum Opening {
    /// The receiving CMM (on this node) answered: the channel is open.
    Done(ChannelId),
    /// The offer must go to another node; the channel stays OFFERING until it answers.
    Remote {
        /// The channel, whose ID is the offer's ID on the wire.
        channel: ChannelId,
        /// The offer to send.
        offer: Offer,
    },
}

/// Where a sealed message goes.
pub enum Routed {
    /// To a partition of this node, verified and decrypted.
    Local(Delivery),
    /// To another node, over its host link.
    Remote {
        /// The destination node.
        node: u32,
        /// The sealed frame.
        frame: DataFrame,
    },
}

/// A close the peer on another node must hear of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// The peer's node.
    pub node: u32,
    /// The closing endpoint.
    pub source: Endpoint,
    /// Its peer.
    pub destination: Endpoint,
}

/// A status code for the guest (one of `abi::status`).
pub type Status = u32;

/// The CMM of one node.
pub struct Cmm {
    node: u32,
    table: ConnectionTable,
    keys: KeyTable,
    audit: Audit,
    stats: HashMap<u32, Stats>,
    limits: Limits,
}

impl Cmm {
    /// A CMM for `node` with room for `capacity` channels.
    pub fn new(node: u32, capacity: usize, limits: Limits, audit: Audit) -> io::Result<Self> {
        Ok(Self {
            node,
            table: ConnectionTable::new(capacity),
            keys: KeyTable::new(capacity)?,
            audit,
            stats: HashMap::new(),
            limits,
        })
    }

    /// This node.
    pub fn node(&self) -> u32 {
        self.node
    }

    /// The limits guests are told.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Tells the CMM that `partition` is one of this node's (its counters start at zero).
    pub fn add_partition(&mut self, partition: u32) {
        self.stats.entry(partition).or_default();
    }

    /// The counters of `partition`.
    pub fn stats(&mut self, partition: u32) -> &mut Stats {
        self.stats.entry(partition).or_default()
    }

    fn endpoint(&self, partition: u32, process: u32) -> Endpoint {
        Endpoint { node: self.node, partition, process }
    }

    fn audit(
        &self,
        event: &'static str,
        reason: &'static str,
        source: &Endpoint,
        destination: &Endpoint,
    ) {
        self.audit.record(Record::endpoints(event, reason, source, destination));
    }

    /// Counts and audits a refused guest request of `partition`.
    pub fn refuse(&mut self, partition: u32, code: Status) -> Status {
        self.stats(partition).refused += 1;
        let source = self.endpoint(partition, 0);
        self.audit.record(Record {
            source: Some(&source),
            ..Record::link("request_refused", status::name(code), None)
        });
        code
    }

    fn insert(&mut self, partition: u32, entry: Entry) -> Result<ChannelId, Status> {
        let used = self.table.of_partition(partition).count();
        if used >= self.limits.max_channels as usize {
            return Err(self.refuse(partition, status::TABLE_FULL));
        }
        self.table.insert(entry).map_err(|e| {
            let code = match e {
                InsertError::Exists => status::EXISTS,
                InsertError::Full => status::TABLE_FULL,
            };
            self.refuse(partition, code)
        })
    }

    /// LISTEN: `process` of `partition` will accept a channel from `remote`.
    pub fn listen(
        &mut self,
        partition: u32,
        process: u32,
        remote: Endpoint,
    ) -> Result<ChannelId, Status> {
        let local = self.endpoint(partition, process);
        self.insert(partition, Entry::new(local, remote, ChannelState::Listening))
    }

    /// OPEN: `process` of `partition` opens a channel to `remote`, keyed with `guest_key` or
    /// with a key the CMM makes. On one node the answer is immediate; for another node the
    /// offer goes out over the host link and [`Cmm::offer_answered`] completes it.
    pub fn open(
        &mut self,
        partition: u32,
        process: u32,
        remote: Endpoint,
        guest_key: Option<[u8; KEY_SIZE]>,
    ) -> Result<Opening, Status> {
        let local = self.endpoint(partition, process);
        let mut key = match guest_key {
            Some(key) => key,
            None => {
                let mut key = [0u8; KEY_SIZE];
                if crate::entropy::fill(&mut key).is_err() {
                    return Err(self.refuse(partition, status::INTERNAL));
                }
                key
            }
        };
        let id = self.insert(partition, Entry::new(local, remote, ChannelState::Offering))?;
        let offer = Offer { key, source: local, destination: remote };
        key.zeroize();
        if self.install_keys(id, &offer.key, ChannelState::Offering).is_none() {
            self.table.remove(id);
            return Err(self.refuse(partition, status::TABLE_FULL));
        }
        if remote.node != self.node {
            return Ok(Opening::Remote { channel: id, offer });
        }
        let answer = self.receive_offer(&offer, self.node);
        self.offer_answered(id, answer.map(|_| ()), self.node).map(Opening::Done)
    }

    /// The answer to the offer of channel `id`, from `link_node`: the channel opens, or its
    /// entry and keys go and the guest learns why.
    pub fn offer_answered(
        &mut self,
        id: ChannelId,
        answer: Result<(), Rejection>,
        link_node: u32,
    ) -> Result<ChannelId, Status> {
        let Some(entry) = self
            .table
            .get(id)
            .filter(|e| e.state == ChannelState::Offering && e.remote.node == link_node)
        else {
            // Not an offer of ours pending with that node: a stale or forged answer.
            self.audit.record(Record::link("reply_rejected", "no_such_offer", Some(link_node)));
            return Err(status::INTERNAL);
        };
        let partition = entry.local.partition;
        match answer {
            Ok(()) => {
                if let Some(entry) = self.table.get_mut(id) {
                    entry.state = ChannelState::Open;
                }
                Ok(id)
            }
            Err(rejection) => {
                self.remove(id);
                let code = match rejection {
                    Rejection::NoListener => status::NO_LISTENER,
                    Rejection::TableFull => status::TABLE_FULL,
                    Rejection::ForgedSourceNode | Rejection::NotLocal => status::INTERNAL,
                };
                Err(self.refuse(partition, code))
            }
        }
    }

    /// The offer of channel `id` could not be sent: the destination node is unreachable.
    pub fn offer_failed(&mut self, id: ChannelId) -> Status {
        let partition = self.table.get(id).map(|e| e.local.partition);
        self.remove(id);
        match partition {
            Some(p) => self.refuse(p, status::UNREACHABLE),
            None => status::UNREACHABLE,
        }
    }

    /// Stores the keys of channel `id` derived from `channel_key` and puts it in `state`.
    fn install_keys(
        &mut self,
        id: ChannelId,
        channel_key: &[u8; KEY_SIZE],
        state: ChannelState,
    ) -> Option<()> {
        let entry = self.table.get(id)?;
        let keys = ChannelKeys {
            channel: *channel_key,
            tx: crypto::direction_key(channel_key, &entry.local, &entry.remote),
            rx: crypto::direction_key(channel_key, &entry.remote, &entry.local),
        };
        let slot = self.keys.insert(&keys)?;
        drop(keys);
        let entry = self.table.get_mut(id)?;
        entry.key = Some(slot);
        entry.state = state;
        Some(())
    }

    /// The link to `node` is gone: its open channels are closed (keys erased) and offers
    /// pending with it fail. Returns the channels whose OPEN must be answered UNREACHABLE.
    pub fn link_down(&mut self, node: u32) -> Vec<ChannelId> {
        let affected: Vec<(ChannelId, ChannelState)> = self
            .table
            .all()
            .filter(|(_, e)| e.remote.node == node && e.state != ChannelState::Listening)
            .map(|(id, e)| (id, e.state))
            .collect();
        let mut failed = Vec::new();
        for (id, state) in affected {
            if state == ChannelState::Offering {
                self.offer_failed(id);
                failed.push(id);
            } else if let Some(entry) = self.table.get_mut(id) {
                entry.state = ChannelState::PeerClosed;
                if let Some(slot) = entry.key.take() {
                    self.keys.remove(slot);
                }
            }
        }
        self.audit.record(Record::link("channels_closed", "link_down", Some(node)));
        failed
    }

    /// Receives an offer that came from `link_node` (claim 1): both IDs are verified against
    /// the connection table before the key is stored.
    pub fn receive_offer(&mut self, offer: &Offer, link_node: u32) -> Result<ChannelId, Rejection> {
        let verdict = self.check_offer(offer, link_node);
        match verdict {
            Ok(_) => {
                self.audit("offer_accepted", "listener_matched", &offer.source, &offer.destination)
            }
            Err(r) => self.audit("offer_rejected", r.reason(), &offer.source, &offer.destination),
        }
        verdict
    }

    fn check_offer(&mut self, offer: &Offer, link_node: u32) -> Result<ChannelId, Rejection> {
        if offer.source.node != link_node {
            return Err(Rejection::ForgedSourceNode);
        }
        if offer.destination.node != self.node {
            return Err(Rejection::NotLocal);
        }
        let id = self.table.find(&offer.destination, &offer.source).ok_or(Rejection::NoListener)?;
        let listening = self.table.get(id).is_some_and(|e| e.state == ChannelState::Listening);
        if !listening {
            return Err(Rejection::NoListener);
        }
        self.install_keys(id, &offer.key, ChannelState::Open).ok_or(Rejection::TableFull)?;
        Ok(id)
    }

    /// CLOSE: removes the entry and its key; the peer learns the channel is closed (at once on
    /// this node; for another node the returned notice goes out over the link).
    pub fn close(
        &mut self,
        partition: u32,
        process: u32,
        channel: u32,
    ) -> Result<Option<Closing>, Status> {
        let id = ChannelId(channel);
        let local = self.endpoint(partition, process);
        match self.table.get(id) {
            Some(e) if e.local.partition == partition && e.local.process == process => {}
            Some(e) if e.local.partition == partition => {
                return Err(self.refuse(partition, status::NOT_OWNER))
            }
            _ => return Err(self.refuse(partition, status::NO_CHANNEL)),
        }
        Ok(self.end(id, &local))
    }

    /// Removes channel `id` of `local` and tells its peer; the notice for another node is
    /// returned for the link.
    fn end(&mut self, id: ChannelId, local: &Endpoint) -> Option<Closing> {
        let entry = self.remove(id)?;
        if entry.state != ChannelState::Open {
            return None;
        }
        if entry.remote.node == self.node {
            self.receive_close(local, &entry.remote, self.node);
            return None;
        }
        Some(Closing { node: entry.remote.node, source: *local, destination: entry.remote })
    }

    /// Revocation by the operator: ends channel `channel` of `partition` whatever process owns
    /// it, as CLOSE would; `Err` if there is no such channel.
    pub fn revoke(&mut self, partition: u32, channel: u32) -> Result<Option<Closing>, Status> {
        let id = ChannelId(channel);
        let local = match self.table.get(id) {
            Some(e) if e.local.partition == partition => e.local,
            _ => return Err(status::NO_CHANNEL),
        };
        self.audit("channel_revoked", "operator", &local, &local);
        Ok(self.end(id, &local))
    }

    /// Every connection-table entry of the node, with its partition (never a key).
    pub fn list_all(&self) -> Vec<(u32, ChannelInfo)> {
        self.table.all().map(|(id, e)| (e.local.partition, e.info(id))).collect()
    }

    /// Every partition's counters.
    pub fn all_stats(&self) -> Vec<(u32, Stats)> {
        let mut all: Vec<(u32, Stats)> = self.stats.iter().map(|(p, s)| (*p, *s)).collect();
        all.sort_by_key(|(p, _)| *p);
        all
    }

    fn remove(&mut self, id: ChannelId) -> Option<Entry> {
        let entry = self.table.remove(id)?;
        if let Some(slot) = entry.key {
            self.keys.remove(slot);
        }
        Some(entry)
    }

    /// The peer `source` closed its end of the channel to `destination`.
    pub fn receive_close(&mut self, source: &Endpoint, destination: &Endpoint, link_node: u32) {
        if source.node != link_node {
            self.audit("close_rejected", "forged_source_node", source, destination);
            return;
        }
        let Some(id) = self.table.find(destination, source) else {
            return;
        };
        if let Some(slot) = self.table.get_mut(id).and_then(|e| e.key.take()) {
            self.keys.remove(slot);
        }
        if let Some(entry) = self.table.get_mut(id) {
            entry.state = ChannelState::PeerClosed;
        }
        self.audit("channel_closed", "peer_closed", source, destination);
    }

    /// LIST: the partition's entries, without keys.
    pub fn list(&self, partition: u32) -> Vec<ChannelInfo> {
        self.table.of_partition(partition).map(|(id, e)| e.info(id)).collect()
    }

    /// SEND (claim 10): checks that the sender is who it says, proves the key over the
    /// message and hands it to the receiving side; returns what to deliver locally.
    pub fn send(
        &mut self,
        partition: u32,
        header: &TxHeader,
        mut payload: Vec<u8>,
    ) -> Result<Routed, Status> {
        let id = ChannelId(header.channel);
        let claimed = header.source;
        let owner = self
            .table
            .get(id)
            .filter(|e| e.local.partition == partition)
            .map(|e| (e.local, e.remote, e.state, e.key));
        let Some((local, remote, state, key)) = owner else {
            if claimed.node != self.node || claimed.partition != partition {
                return Err(self.forged(partition, &claimed, &claimed));
            }
            return Err(self.refuse(partition, status::NO_CHANNEL));
        };
        if claimed != local {
            return Err(self.forged(partition, &claimed, &remote));
        }
        if payload.len() > self.limits.max_message as usize {
            return Err(self.refuse(partition, status::TOO_BIG));
        }
        let (ChannelState::Open, Some(slot)) = (state, key) else {
            return Err(self.refuse(partition, status::NOT_OPEN));
        };
        let entry = self.table.get_mut(id).ok_or(status::INTERNAL)?;
        let seq = entry.tx_seq;
        entry.tx_seq += 1;
        entry.sent += 1;
        let aad = crypto::associated_data(&local, &remote, seq);
        let tag = crypto::seal(self.keys.tx(slot), seq, &aad, &mut payload);
        let stats = self.stats(partition);
        stats.sent += 1;
        stats.sent_bytes += payload.len() as u64;
        let frame = DataFrame { source: local, destination: remote, seq, payload, tag };
        if remote.node != self.node {
            return Ok(Routed::Remote { node: remote.node, frame });
        }
        self.receive_data(frame, self.node).map(Routed::Local).map_err(|r| match r {
            DataRejection::NoChannel => status::NOT_OPEN,
            _ => status::INTERNAL,
        })
    }

    fn forged(&mut self, partition: u32, claimed: &Endpoint, destination: &Endpoint) -> Status {
        // Its own audit record says more than the generic refusal would.
        let stats = self.stats(partition);
        stats.forged += 1;
        stats.refused += 1;
        self.audit("send_refused", "forged_source", claimed, destination);
        status::FORGED_SOURCE
    }

    /// Receives a data frame that came from `link_node`: checks the channel, the order and the
    /// proof of the key, then decrypts it for delivery.
    pub fn receive_data(
        &mut self,
        mut frame: DataFrame,
        link_node: u32,
    ) -> Result<Delivery, DataRejection> {
        let verdict = self.check_data(&mut frame, link_node);
        match verdict {
            Ok(channel) => {
                let header = RxHeader {
                    channel: channel.0,
                    len: frame.payload.len() as u32,
                    source: frame.source,
                    process: frame.destination.process,
                    seq: frame.seq,
                };
                Ok(Delivery {
                    partition: frame.destination.partition,
                    channel,
                    header,
                    payload: frame.payload,
                })
            }
            Err(r) => {
                self.audit("message_rejected", r.reason(), &frame.source, &frame.destination);
                // Counted against the destination partition if it is one of ours; a peer naming
                // partitions that do not exist must not grow the statistics table.
                if let Some(stats) = self.stats.get_mut(&frame.destination.partition) {
                    stats.rejected += 1;
                }
                Err(r)
            }
        }
    }

    fn check_data(
        &mut self,
        frame: &mut DataFrame,
        link_node: u32,
    ) -> Result<ChannelId, DataRejection> {
        if frame.source.node != link_node {
            return Err(DataRejection::ForgedSourceNode);
        }
        let id =
            self.table.find(&frame.destination, &frame.source).ok_or(DataRejection::NoChannel)?;
        let entry = self.table.get_mut(id).ok_or(DataRejection::NoChannel)?;
        let (ChannelState::Open, Some(slot)) = (entry.state, entry.key) else {
            return Err(DataRejection::NoChannel);
        };
        if frame.seq != entry.rx_seq {
            entry.dropped += 1;
            return Err(DataRejection::Replayed);
        }
        let aad = crypto::associated_data(&frame.source, &frame.destination, frame.seq);
        if !crypto::open(self.keys.rx(slot), frame.seq, &aad, &mut frame.payload, &frame.tag) {
            if let Some(entry) = self.table.get_mut(id) {
                entry.dropped += 1;
            }
            return Err(DataRejection::BadTag);
        }
        let entry = self.table.get_mut(id).ok_or(DataRejection::NoChannel)?;
        entry.rx_seq += 1;
        Ok(id)
    }

    /// Counts a verified message as delivered to the guest.
    pub fn delivered(&mut self, delivery: &Delivery) {
        if let Some(entry) = self.table.get_mut(delivery.channel) {
            entry.received += 1;
        }
        let stats = self.stats(delivery.partition);
        stats.received += 1;
        stats.received_bytes += delivery.payload.len() as u64;
    }

    /// Counts a verified message dropped because the guest had no receive buffer.
    pub fn dropped_no_room(&mut self, delivery: &Delivery) {
        if let Some(entry) = self.table.get_mut(delivery.channel) {
            entry.dropped += 1;
        }
        self.stats(delivery.partition).dropped_no_room += 1;
    }

    /// Keys in the key table (for tests and stats; never the keys themselves).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: u32 = 1;

    fn cmm() -> Cmm {
        let mut cmm = Cmm::new(NODE, 16, Limits::default(), Audit::new(NODE, None)).unwrap();
        for partition in 1..=3 {
            cmm.add_partition(partition);
        }
        cmm
    }

    /// OPEN on one node, which answers at once.
    fn open_local(
        cmm: &mut Cmm,
        partition: u32,
        process: u32,
        remote: Endpoint,
        key: Option<[u8; 32]>,
    ) -> Result<ChannelId, Status> {
        match cmm.open(partition, process, remote, key)? {
            Opening::Done(id) => Ok(id),
            Opening::Remote { .. } => panic!("a local OPEN went remote"),
        }
    }

    /// SEND on one node: the delivery it makes.
    fn send_local(
        cmm: &mut Cmm,
        partition: u32,
        header: &TxHeader,
        payload: Vec<u8>,
    ) -> Result<Delivery, Status> {
        match cmm.send(partition, header, payload)? {
            Routed::Local(delivery) => Ok(delivery),
            Routed::Remote { .. } => panic!("a local SEND went remote"),
        }
    }

    fn ep(partition: u32, process: u32) -> Endpoint {
        Endpoint { node: NODE, partition, process }
    }

    /// Partition 1 process 10 listens for partition 2 process 20, which opens.
    fn open_pair(cmm: &mut Cmm, key: Option<[u8; 32]>) -> (ChannelId, ChannelId) {
        let listener = cmm.listen(1, 10, ep(2, 20)).unwrap();
        let opener = open_local(cmm, 2, 20, ep(1, 10), key).unwrap();
        (listener, opener)
    }

    fn tx(channel: ChannelId, source: Endpoint, len: usize) -> TxHeader {
        TxHeader { channel: channel.0, source, len: len as u32 }
    }

    #[test]
    fn offer_needs_a_matching_listen() {
        let mut cmm = cmm();
        assert_eq!(open_local(&mut cmm, 2, 20, ep(1, 10), None), Err(status::NO_LISTENER));
        cmm.listen(1, 10, ep(2, 99)).unwrap();
        assert_eq!(
            open_local(&mut cmm, 2, 20, ep(1, 10), None),
            Err(status::NO_LISTENER),
            "listens for another process"
        );
        assert_eq!(cmm.key_count(), 0);
        assert!(cmm.list(2).is_empty(), "the failed OPEN left no entry");
    }

    #[test]
    fn messages_flow_both_ways_with_verified_sources() {
        let mut cmm = cmm();
        let (listener, opener) = open_pair(&mut cmm, None);
        assert_eq!(cmm.key_count(), 2);
        let d = send_local(&mut cmm, 2, &tx(opener, ep(2, 20), 5), b"hello".to_vec()).unwrap();
        assert_eq!((d.partition, d.channel, d.payload.as_slice()), (1, listener, &b"hello"[..]));
        assert_eq!(d.header.source, ep(2, 20));
        assert_eq!(d.header.process, 10);
        let back = send_local(&mut cmm, 1, &tx(listener, ep(1, 10), 3), b"hi!".to_vec()).unwrap();
        assert_eq!((back.partition, back.payload.as_slice()), (2, &b"hi!"[..]));
        assert_eq!(back.header.seq, 0);
        let again = send_local(&mut cmm, 1, &tx(listener, ep(1, 10), 1), b"x".to_vec()).unwrap();
        assert_eq!(again.header.seq, 1);
    }

    #[test]
    fn guest_supplied_keys_work_too() {
        let mut cmm = cmm();
        let (_, opener) = open_pair(&mut cmm, Some([42; 32]));
        assert!(send_local(&mut cmm, 2, &tx(opener, ep(2, 20), 2), b"ok".to_vec()).is_ok());
    }

    #[test]
    fn forged_sources_and_foreign_channels_are_refused() {
        let mut cmm = cmm();
        let (listener, opener) = open_pair(&mut cmm, None);
        let other_partition = Endpoint { node: NODE, partition: 3, process: 20 };
        assert_eq!(
            send_local(&mut cmm, 2, &tx(opener, other_partition, 1), vec![0]).unwrap_err(),
            status::FORGED_SOURCE
        );
        let other_node = Endpoint { node: 9, partition: 2, process: 20 };
        assert_eq!(
            send_local(&mut cmm, 2, &tx(opener, other_node, 1), vec![0]).unwrap_err(),
            status::FORGED_SOURCE
        );
        let other_process = ep(2, 21);
        assert_eq!(
            send_local(&mut cmm, 2, &tx(opener, other_process, 1), vec![0]).unwrap_err(),
            status::FORGED_SOURCE
        );
        // Partition 2 naming partition 1's channel: it does not exist for partition 2.
        assert_eq!(
            send_local(&mut cmm, 2, &tx(listener, ep(2, 20), 1), vec![0]).unwrap_err(),
            status::NO_CHANNEL
        );
        assert_eq!(
            send_local(&mut cmm, 2, &tx(ChannelId(0x7777), ep(2, 20), 1), vec![0]).unwrap_err(),
            status::NO_CHANNEL
        );
        assert_eq!(cmm.stats(2).forged, 3);
    }

    #[test]
    fn replays_reordering_and_bad_tags_are_dropped() {
        let mut cmm = cmm();
        let (_, opener) = open_pair(&mut cmm, Some([1; 32]));
        let (src, dst) = (ep(2, 20), ep(1, 10));
        // A frame sealed like the CMM would, then replayed and tampered with.
        let keyed = crypto::direction_key(&[1; 32], &src, &dst);
        let seal = |seq: u64, text: &[u8]| {
            let mut payload = text.to_vec();
            let tag =
                crypto::seal(&keyed, seq, &crypto::associated_data(&src, &dst, seq), &mut payload);
            DataFrame { source: src, destination: dst, seq, payload, tag }
        };
        assert!(cmm.receive_data(seal(0, b"first"), NODE).is_ok());
        assert_eq!(cmm.receive_data(seal(0, b"first"), NODE).unwrap_err(), DataRejection::Replayed);
        assert_eq!(cmm.receive_data(seal(5, b"later"), NODE).unwrap_err(), DataRejection::Replayed);
        let mut bad = seal(1, b"tampered");
        bad.payload[0] ^= 1;
        assert_eq!(cmm.receive_data(bad, NODE).unwrap_err(), DataRejection::BadTag);
        assert_eq!(
            cmm.receive_data(seal(1, b"from elsewhere"), 7).unwrap_err(),
            DataRejection::ForgedSourceNode
        );
        assert!(cmm.receive_data(seal(1, b"second"), NODE).is_ok());
        assert_eq!(cmm.stats(1).rejected, 4);
        let _ = opener;
    }

    #[test]
    fn close_removes_keys_on_both_sides() {
        let mut cmm = cmm();
        let (listener, opener) = open_pair(&mut cmm, None);
        assert_eq!(cmm.close(1, 11, listener.0), Err(status::NOT_OWNER));
        assert_eq!(cmm.close(2, 20, listener.0), Err(status::NO_CHANNEL));
        cmm.close(2, 20, opener.0).unwrap();
        assert_eq!(cmm.key_count(), 0);
        assert_eq!(cmm.list(1)[0].state, guest_agent::channel::abi::state::PEER_CLOSED);
        assert_eq!(
            send_local(&mut cmm, 1, &tx(listener, ep(1, 10), 1), vec![0]).unwrap_err(),
            status::NOT_OPEN
        );
        assert!(cmm.list(2).is_empty());
    }

    #[test]
    fn offers_from_the_wrong_node_are_refused() {
        let mut cmm = cmm();
        cmm.listen(1, 10, ep(2, 20)).unwrap();
        let offer = Offer { key: [0; 32], source: ep(2, 20), destination: ep(1, 10) };
        assert_eq!(cmm.receive_offer(&offer, 5).unwrap_err(), Rejection::ForgedSourceNode);
        let elsewhere = Offer {
            key: [0; 32],
            source: ep(2, 20),
            destination: Endpoint { node: 4, ..ep(1, 10) },
        };
        assert_eq!(cmm.receive_offer(&elsewhere, NODE).unwrap_err(), Rejection::NotLocal);
        assert_eq!(cmm.key_count(), 0);
    }

    #[test]
    fn limits_hold() {
        let mut cmm =
            Cmm::new(NODE, 16, Limits { max_message: 8, max_channels: 2 }, Audit::new(NODE, None))
                .unwrap();
        let (_, opener) = open_pair(&mut cmm, None);
        assert_eq!(
            send_local(&mut cmm, 2, &tx(opener, ep(2, 20), 9), vec![0; 9]).unwrap_err(),
            status::TOO_BIG
        );
        cmm.listen(1, 11, ep(2, 20)).unwrap();
        assert_eq!(cmm.listen(1, 12, ep(2, 20)), Err(status::TABLE_FULL));
        assert_eq!(cmm.listen(2, 20, ep(1, 10)), Err(status::EXISTS));
    }
}

#[cfg(test)]
mod remote_tests {
    use super::*;

    fn ep(node: u32, partition: u32, process: u32) -> Endpoint {
        Endpoint { node, partition, process }
    }

    /// Two CMMs, nodes 1 and 2, passing frames by hand as the links would.
    #[test]
    fn offers_and_messages_cross_nodes_and_link_loss_closes_channels() {
        let mut a = Cmm::new(1, 16, Limits::default(), Audit::new(1, None)).unwrap();
        let mut b = Cmm::new(2, 16, Limits::default(), Audit::new(2, None)).unwrap();
        let listener = b.listen(1, 10, ep(1, 1, 20)).unwrap();
        let Ok(Opening::Remote { channel, offer }) = a.open(1, 20, ep(2, 1, 10), None) else {
            panic!()
        };
        assert_eq!(a.list(1)[0].state, guest_agent::channel::abi::state::OFFERING);
        // B checks the link's node against the offer's source.
        assert_eq!(b.receive_offer(&offer, 3).unwrap_err(), Rejection::ForgedSourceNode);
        assert_eq!(b.receive_offer(&offer, 1).unwrap(), listener);
        // A reply from the wrong node is ignored; the right one opens the channel.
        assert!(a.offer_answered(channel, Ok(()), 3).is_err());
        assert_eq!(a.offer_answered(channel, Ok(()), 2), Ok(channel));

        let header = TxHeader { channel: channel.0, source: ep(1, 1, 20), len: 5 };
        let Ok(Routed::Remote { node: 2, frame }) = a.send(1, &header, b"hello".to_vec()) else {
            panic!()
        };
        let delivery = b.receive_data(frame, 1).unwrap();
        assert_eq!(
            (delivery.payload.as_slice(), delivery.header.source),
            (&b"hello"[..], ep(1, 1, 20))
        );

        assert!(b.link_down(1).is_empty());
        assert_eq!(b.list(1)[0].state, guest_agent::channel::abi::state::PEER_CLOSED);
        assert_eq!(b.key_count(), 0);
    }

    #[test]
    fn a_rejected_or_unsent_offer_leaves_nothing_behind() {
        let mut a = Cmm::new(1, 16, Limits::default(), Audit::new(1, None)).unwrap();
        let Ok(Opening::Remote { channel, .. }) = a.open(1, 20, ep(2, 1, 10), None) else {
            panic!()
        };
        assert_eq!(
            a.offer_answered(channel, Err(Rejection::NoListener), 2),
            Err(status::NO_LISTENER)
        );
        assert!(a.list(1).is_empty());
        let Ok(Opening::Remote { channel, .. }) = a.open(1, 20, ep(2, 1, 10), None) else {
            panic!()
        };
        assert_eq!(a.offer_failed(channel), status::UNREACHABLE);
        let Ok(Opening::Remote { channel, .. }) = a.open(1, 20, ep(2, 1, 10), None) else {
            panic!()
        };
        assert_eq!(a.link_down(2), vec![channel]);
        assert!(a.list(1).is_empty());
        assert_eq!(a.key_count(), 0);
    }
}
