//! Channels set up and torn down: LISTEN, OPEN and the key offer (claim 1), the answers,
//! CLOSE, revocation and link loss.

use guest_agent::channel::abi::{status, Endpoint};

use super::audit::Record;
use super::connection_table::{ChannelId, ChannelState, Closure, Entry, InsertError};
use super::frames::{CloseReason, OfferResult, Rejection};
use super::manager::{Core, KeySource, Opening, Reply, Status};
use crate::crypto::channel::{KEY_SIZE, SALT_SIZE};
use crate::link::router::Router;
use crate::link::wire::Frame;

/// An offer as it arrived: the key still where the link decrypted it.
pub(super) struct ReceivedOffer<'a> {
    pub(super) source: Endpoint,
    pub(super) destination: Endpoint,
    pub(super) salt: [u8; SALT_SIZE],
    pub(super) key: &'a [u8; KEY_SIZE],
}

impl Core {
    fn insert(&mut self, partition: u32, entry: Entry) -> Result<ChannelId, Status> {
        if self.table.count_of(partition) >= self.limits.max_channels as usize {
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
    pub(super) fn listen(
        &mut self,
        partition: u32,
        process: u32,
        remote: Endpoint,
    ) -> Result<ChannelId, Status> {
        let local = self.endpoint(partition, process);
        self.insert(partition, Entry::new(local, remote, ChannelState::Listening))
    }

    /// OPEN: on this node the receiving side answers at once; to another node the offer is
    /// staged for its link, and the answer comes back later.
    pub(super) fn open(
        &mut self,
        router: &mut Router,
        partition: u32,
        process: u32,
        remote: Endpoint,
        key: Option<&mut dyn KeySource>,
    ) -> Result<Opening, Status> {
        let local = self.endpoint(partition, process);
        // The key goes straight into secret memory, whoever makes it (claim 2).
        let made = match key {
            Some(source) => source.read_key(self.keys.scratch_key()),
            None => crate::entropy::fill(self.keys.scratch_key()).is_ok(),
        };
        if !made {
            self.keys.wipe_scratch();
            return Err(self.refuse(partition, status::BAD_REQUEST));
        }
        let opened = self
            .insert(partition, Entry::new(local, remote, ChannelState::Offering))
            .and_then(|id| {
                if remote.node == self.node {
                    self.open_here(id, local, remote).map(Opening::Done)
                } else {
                    self.offer(router, id, local, remote).map(|()| Opening::Pending(id))
                }
            });
        self.keys.wipe_scratch();
        opened
    }

    /// The offer to a partition of this node: verified as another node's CMM would, then both
    /// entries keyed with the same key.
    fn open_here(
        &mut self,
        id: ChannelId,
        local: Endpoint,
        remote: Endpoint,
    ) -> Result<ChannelId, Status> {
        let listener = self
            .table
            .find(&remote, &local)
            .filter(|l| self.table.get(*l).is_some_and(|e| e.state == ChannelState::Listening));
        let Some(listener) = listener else {
            self.audit("offer_rejected", Rejection::NoListener.reason(), &local, &remote);
            self.table.remove(id);
            return Err(self.refuse(local.partition, status::NO_LISTENER));
        };
        let (Ok(mine), Ok(theirs)) =
            (self.keys.insert_local_from_scratch(), self.keys.insert_local_from_scratch())
        else {
            self.remove(id);
            return Err(self.refuse(local.partition, status::TABLE_FULL));
        };
        self.audit("offer_accepted", "listener_matched", &local, &remote);
        let now = self.now();
        for (entry, slot) in [(id, mine), (listener, theirs)] {
            if let Some(e) = self.table.get_mut(entry) {
                e.state = ChannelState::Open;
                e.key = Some(slot);
                e.epoch_since = now;
            }
        }
        Ok(id)
    }

    /// Keys channel `id` for `remote`'s node and stages the offer `(key, source, destination)`
    /// for its link (claim 1). The key travels from secret memory into the link's secret
    /// staging, and on the wire only inside the link's encryption.
    fn offer(
        &mut self,
        router: &mut Router,
        id: ChannelId,
        local: Endpoint,
        remote: Endpoint,
    ) -> Result<(), Status> {
        let on_demand = self.demand.on();
        if !on_demand && !router.is_up(remote.node) {
            self.table.remove(id);
            return Err(self.refuse(local.partition, status::UNREACHABLE));
        }
        let mut salt = [0u8; SALT_SIZE];
        if crate::entropy::fill(&mut salt).is_err() {
            self.table.remove(id);
            return Err(self.refuse(local.partition, status::INTERNAL));
        }
        let Ok(slot) = self.keys.insert_remote_from_scratch(&salt, &local, &remote) else {
            self.table.remove(id);
            return Err(self.refuse(local.partition, status::TABLE_FULL));
        };
        let now = self.now();
        if let Some(entry) = self.table.get_mut(id) {
            entry.key = Some(slot);
            entry.salt = salt;
            entry.epoch_since = now;
        }
        if !self.hold_offer_key(router, id, remote.node) {
            self.remove(id);
            return Err(self.refuse(local.partition, status::TABLE_FULL));
        }
        if router.is_up(remote.node) && self.stage_offer(router, id) {
            self.offers.push_back((id, std::time::Instant::now()));
            return Ok(());
        }
        if !on_demand {
            self.remove(id);
            return Err(self.refuse(local.partition, status::UNREACHABLE));
        }
        // Links on demand: the offer waits for a link, within the same timeout.
        self.offers.push_back((id, std::time::Instant::now()));
        self.await_link(router, remote.node, id);
        Ok(())
    }

    /// Fails the OPENs whose offers have waited past the timeout: TIMED_OUT to the guest, and
    /// a CLOSE to the peer in case it accepted after all.
    pub(super) fn expire_offers(&mut self, router: &mut Router, now: std::time::Instant) {
        while let Some(&(id, sent)) = self.offers.front() {
            if now.saturating_duration_since(sent) < self.open_timeout {
                break;
            }
            self.offers.pop_front();
            let Some(entry) = self.table.get(id).filter(|e| e.state == ChannelState::Offering)
            else {
                continue; // answered meanwhile
            };
            let (local, remote) = (entry.local, entry.remote);
            self.audit.record(Record {
                peer: Some(remote.node),
                ..Record::endpoints("offer_timed_out", "no_answer", &local, &remote)
            });
            self.end(router, id, CloseReason::Closed);
            let code = self.refuse(local.partition, status::TIMED_OUT);
            self.answers.push((id, Err(code)));
        }
    }

    /// Partition `partition` stopped: its listeners go, and its channels are closed with
    /// their peers told why. Returns how many entries it held.
    pub(super) fn partition_stopped(&mut self, router: &mut Router, partition: u32) -> usize {
        let ids = self.table.ids_of(partition);
        for &id in &ids {
            self.end(router, id, CloseReason::PartitionStopped);
        }
        self.forget_credit(partition);
        let source = self.endpoint(partition, 0);
        self.audit.record(Record {
            source: Some(&source),
            count: Some(ids.len() as u64),
            by_node: true,
            ..Record::link("channels_closed", "partition_stopped", None)
        });
        ids.len()
    }

    /// An offer that came from `node` (claim 1): both IDs are verified against the connection
    /// table before the key is stored. The key is read where the link decrypted it (secret
    /// memory) and goes straight into the key table.
    pub(super) fn receive_offer(
        &mut self,
        node: u32,
        offer: &ReceivedOffer<'_>,
    ) -> Result<ChannelId, Rejection> {
        let verdict = self.check_offer(node, offer);
        let reason = match verdict {
            Ok(_) => "listener_matched",
            Err(r) => r.reason(),
        };
        let event = if verdict.is_ok() { "offer_accepted" } else { "offer_rejected" };
        self.audit_from(node, event, reason, &offer.source, &offer.destination);
        verdict
    }

    fn check_offer(
        &mut self,
        node: u32,
        offer: &ReceivedOffer<'_>,
    ) -> Result<ChannelId, Rejection> {
        let (source, destination) = (offer.source, offer.destination);
        if source.node != node {
            return Err(Rejection::ForgedSourceNode);
        }
        if destination.node != self.node {
            return Err(Rejection::NotLocal);
        }
        let id = match self.table.find(&destination, &source) {
            Some(id) => id,
            // A listener the node's policy stands for (a vsock port: docs/VSOCK.md).
            None if self
                .implicit_listen
                .as_ref()
                .is_some_and(|allows| allows(&source, &destination)) =>
            {
                let entry = Entry {
                    flow: super::credit::Flow::Vsock,
                    ..Entry::new(destination, source, ChannelState::Listening)
                };
                self.insert(destination.partition, entry).map_err(|_| Rejection::TableFull)?
            }
            None => return Err(Rejection::NoListener),
        };
        if self.table.get(id).is_none_or(|e| e.state != ChannelState::Listening) {
            return Err(Rejection::NoListener);
        }
        let slot = self
            .keys
            .insert_remote(offer.key, &offer.salt, &destination, &source)
            .map_err(|_| Rejection::TableFull)?;
        let now = self.now();
        let entry = self.table.get_mut(id).ok_or(Rejection::NoListener)?;
        entry.state = ChannelState::Open;
        entry.key = Some(slot);
        entry.salt = offer.salt;
        entry.epoch_since = now;
        Ok(id)
    }

    /// Answers offer `id` from `node` (the reply is sent once the record is handled).
    pub(super) fn answer_offer(&mut self, node: u32, id: u32, offer: &ReceivedOffer<'_>) {
        let accepted = self.receive_offer(node, offer);
        let result = match accepted {
            Ok(_) => OfferResult::Accepted,
            Err(rejection) => OfferResult::Rejected(rejection),
        };
        self.replies.push((node, Reply::Offer { id, result }));
        // The first grant follows the reply, in the same record.
        if let Ok(channel) = accepted {
            self.meter(node, channel);
        }
    }

    /// The answer to the offer of channel `id`, from `node`: the channel opens, or its entry
    /// and keys go and the guest learns why.
    pub(super) fn offer_answered(&mut self, node: u32, id: ChannelId, result: OfferResult) {
        let Some(entry) = self
            .table
            .get(id)
            .filter(|e| e.state == ChannelState::Offering && e.remote.node == node)
        else {
            // Not an offer of ours pending with that node: a stale or forged answer.
            self.audit.record(Record::link("reply_rejected", "no_such_offer", Some(node)));
            return;
        };
        let partition = entry.local.partition;
        let outcome = match result {
            OfferResult::Accepted => {
                self.release_offer_key(id, node);
                let now = self.now();
                if let Some(entry) = self.table.get_mut(id) {
                    entry.state = ChannelState::Open;
                    entry.epoch_since = now;
                }
                self.meter(node, id);
                Ok(id)
            }
            OfferResult::Rejected(rejection) => {
                self.remove(id);
                let code = match rejection {
                    Rejection::NoListener => status::NO_LISTENER,
                    Rejection::TableFull => status::TABLE_FULL,
                    Rejection::ForgedSourceNode | Rejection::NotLocal => status::INTERNAL,
                };
                Err(self.refuse(partition, code))
            }
        };
        self.answers.push((id, outcome));
    }

    /// CLOSE: removes the entry and its key; the peer learns the channel is closed.
    pub(super) fn close(
        &mut self,
        router: &mut Router,
        partition: u32,
        process: u32,
        channel: u32,
    ) -> Result<(), Status> {
        let id = ChannelId(channel);
        match self.table.get(id) {
            Some(e) if e.local.partition == partition && e.local.process == process => {}
            Some(e) if e.local.partition == partition => {
                return Err(self.refuse(partition, status::NOT_OWNER))
            }
            _ => return Err(self.refuse(partition, status::NO_CHANNEL)),
        }
        self.end(router, id, CloseReason::Closed);
        Ok(())
    }

    /// Revocation by the operator: as CLOSE, whatever process owns the channel.
    pub(super) fn revoke(
        &mut self,
        router: &mut Router,
        partition: u32,
        channel: u32,
    ) -> Result<(), Status> {
        let id = ChannelId(channel);
        let (local, remote) = match self.table.get(id) {
            Some(e) if e.local.partition == partition => (e.local, e.remote),
            _ => return Err(status::NO_CHANNEL),
        };
        self.audit.record(Record {
            by_node: true,
            ..Record::endpoints("channel_revoked", "operator", &local, &remote)
        });
        self.end(router, id, CloseReason::Revoked);
        Ok(())
    }

    /// Ends channel `id` whatever its state or owner (a vsock connection the device gave up
    /// on): as a CLOSE by its process, without a refusal if it is already gone.
    pub(super) fn abandon(&mut self, router: &mut Router, id: ChannelId) {
        self.end(router, id, CloseReason::Closed);
    }

    /// Removes channel `id` and tells its peer: at once on this node, over the link for
    /// another (an offer still pending is closed too, in case the peer accepted it).
    fn end(&mut self, router: &mut Router, id: ChannelId, reason: CloseReason) {
        let Some(entry) = self.remove(id) else { return };
        if !matches!(entry.state, ChannelState::Open | ChannelState::Offering) {
            return;
        }
        if entry.remote.node == self.node {
            self.receive_close(self.node, entry.local, entry.remote, reason);
        } else {
            let frame = Frame::Close { source: entry.local, destination: entry.remote, reason };
            // An unreachable peer learns of the close when its link goes down.
            let _ = router.stage(entry.remote.node, &frame);
        }
    }

    pub(super) fn remove(&mut self, id: ChannelId) -> Option<Entry> {
        self.release_credit(id);
        let entry = self.table.remove(id)?;
        self.release_offer_key(id, entry.remote.node);
        if let Some(slot) = entry.key {
            self.keys.remove(slot);
        }
        Some(entry)
    }

    fn forget_key(&mut self, id: ChannelId) {
        self.release_credit(id);
        let Some((node, slot)) = self.table.get_mut(id).map(|e| (e.remote.node, e.key.take()))
        else {
            return;
        };
        self.release_offer_key(id, node);
        if let Some(slot) = slot {
            self.keys.remove(slot);
        }
    }

    /// The peer `source` (on `node`) closed its end of the channel to `destination`.
    pub(super) fn receive_close(
        &mut self,
        node: u32,
        source: Endpoint,
        destination: Endpoint,
        reason: CloseReason,
    ) {
        if source.node != node {
            self.audit_from(node, "close_rejected", "forged_source_node", &source, &destination);
            return;
        }
        let Some(id) = self.table.find(&destination, &source) else { return };
        if self.table.get(id).is_some_and(|e| e.state == ChannelState::Listening) {
            return; // nothing was keyed: the listener stays
        }
        self.forget_key(id);
        if let Some(entry) = self.table.get_mut(id) {
            entry.state = ChannelState::PeerClosed(Closure::Peer(reason));
        }
        self.audit_from(node, "channel_closed", reason.reason(), &source, &destination);
    }

    /// The link to `node` is gone: its open channels are closed (keys erased) and offers
    /// pending with it fail UNREACHABLE.
    pub(super) fn link_down(&mut self, router: &mut Router, node: u32) {
        let affected: Vec<(ChannelId, ChannelState)> = self
            .table
            .all()
            // Listeners stay; entries already closed keep the reason they were closed for.
            .filter(|(_, e)| {
                e.remote.node == node
                    && matches!(e.state, ChannelState::Open | ChannelState::Offering)
            })
            .map(|(id, e)| (id, e.state))
            .collect();
        for (id, state) in affected {
            if state == ChannelState::Offering {
                self.offer_again(router, node, id);
            } else {
                self.forget_key(id);
                if let Some(entry) = self.table.get_mut(id) {
                    entry.state = ChannelState::PeerClosed(Closure::LinkDown);
                }
            }
        }
        self.audit.record(Record::link("channels_closed", "link_down", Some(node)));
    }
}
