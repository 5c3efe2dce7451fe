//! Messages (claim 10): a partition's message is checked against the channel it names and
//! either handed to a partition of this node (the CMM compares the two entries' keys: claim
//! 10's check on one node, with the payload copied guest to guest and no cipher) or sealed
//! with the channel's sending key, straight from guest memory into the link's buffer. A
//! message from another node is checked (source node, channel, order, epoch) and its key
//! proved by opening it in place, before any guest sees it.

use guest_agent::channel::abi::{status, Endpoint, RxHeader, TxHeader};

use super::channels::ReceivedOffer;
use super::connection_table::{ChannelId, ChannelState};
use super::frames::DataRejection;
use super::key_table::KeySlot;
use super::manager::{Core, Deliver, Delivered, Payload, Sent, Status};
use crate::crypto::channel::associated_data;
use crate::link::router::{Router, SendError};
use crate::link::wire::{DataHead, Frame};

impl Core {
    /// SEND: checks that the sender is who it says, then routes the message.
    pub(super) fn send(
        &mut self,
        router: &mut Router,
        partition: u32,
        header: &TxHeader,
        payload: &mut dyn Payload,
    ) -> Result<Sent, Status> {
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
        if header.len > self.limits.max_message {
            return Err(self.refuse(partition, status::TOO_BIG));
        }
        let (ChannelState::Open, Some(slot)) = (state, key) else {
            return Err(self.refuse(partition, status::NOT_OPEN));
        };
        // Out of credit: flow control, not a refusal; the guest sends again later.
        if !self.may_send(id) {
            return Err(status::NO_ROOM);
        }
        let sent = if remote.node == self.node {
            self.send_here(id, slot, local, remote, header.len)
        } else {
            self.send_remote(router, id, slot, local, remote, header.len, payload)
        };
        let sent = sent.map_err(|code| self.refuse(partition, code))?;
        let stats = self.stats(partition);
        stats.sent += 1;
        stats.sent_bytes += u64::from(header.len);
        Ok(sent)
    }

    /// To a partition of this node: the receiving entry must hold the same key.
    fn send_here(
        &mut self,
        id: ChannelId,
        slot: KeySlot,
        local: Endpoint,
        remote: Endpoint,
        len: u32,
    ) -> Result<Sent, Status> {
        let peer = self.table.find(&remote, &local).ok_or(status::NOT_OPEN)?;
        let peer_slot = self
            .table
            .get(peer)
            .filter(|e| e.state == ChannelState::Open)
            .and_then(|e| e.key)
            .ok_or(status::NOT_OPEN)?;
        if !self.keys.same_key(slot, peer_slot) {
            self.audit("message_rejected", "key_mismatch", &local, &remote);
            return Err(status::INTERNAL);
        }
        let entry = self.table.get_mut(id).ok_or(status::INTERNAL)?;
        let seq = entry.tx_seq;
        entry.tx_seq += 1;
        entry.sent += 1;
        if let Some(peer) = self.table.get_mut(peer) {
            peer.rx_seq += 1;
        }
        let header = RxHeader { channel: peer.0, len, source: local, process: remote.process, seq };
        Ok(Sent::Local { partition: remote.partition, channel: peer, header })
    }

    /// To another node: sealed in place in the link's buffer, under the current epoch (moving
    /// to the next one when this one's lifetime is spent).
    #[allow(clippy::too_many_arguments)]
    fn send_remote(
        &mut self,
        router: &mut Router,
        id: ChannelId,
        slot: KeySlot,
        local: Endpoint,
        remote: Endpoint,
        len: u32,
        payload: &mut dyn Payload,
    ) -> Result<Sent, Status> {
        let now = self.now();
        let lifetime = self.lifetime;
        let entry = self.table.get_mut(id).ok_or(status::INTERNAL)?;
        let spent = entry.epoch_sent >= lifetime.messages
            || now.saturating_sub(entry.epoch_since) >= lifetime.secs;
        if spent && entry.tx_epoch < u32::MAX {
            self.keys.ciphers_mut(slot).ok_or(status::INTERNAL)?.tx.advance();
            entry.tx_epoch += 1;
            entry.epoch_sent = 0;
            entry.epoch_since = now;
        }
        let (epoch, seq) = (entry.tx_epoch, entry.tx_seq);
        let head = DataHead { source: local, destination: remote, epoch, seq, len, tag: [0; 16] };
        let aad = associated_data(&local, &remote, epoch, seq);
        let ciphers = self.keys.ciphers(slot).ok_or(status::INTERNAL)?;
        router
            .stage_data(remote.node, head, |buf| {
                if !payload.read_into(buf) {
                    return None;
                }
                ciphers.tx.seal(&aad, seq, buf)
            })
            .map_err(|e| match e {
                SendError::NoLink => status::UNREACHABLE,
                SendError::Payload => status::BAD_REQUEST,
            })?;
        let entry = self.table.get_mut(id).ok_or(status::INTERNAL)?;
        entry.tx_seq += 1;
        entry.epoch_sent += 1;
        entry.sent += 1;
        Ok(Sent::Remote)
    }

    fn forged(&mut self, partition: u32, claimed: &Endpoint, destination: &Endpoint) -> Status {
        // Its own audit record says more than the generic refusal would.
        let stats = self.stats(partition);
        stats.forged += 1;
        stats.refused += 1;
        self.audit("send_refused", "forged_source", claimed, destination);
        status::FORGED_SOURCE
    }

    /// A frame for the CMM from `node`, authenticated by its link.
    pub(super) fn receive(
        &mut self,
        node: u32,
        frame: Frame<'_>,
        payload: &mut [u8],
        sink: &mut dyn Deliver,
    ) {
        match frame {
            Frame::Offer { id, source, destination, salt, key } => {
                self.answer_offer(node, id, &ReceivedOffer { source, destination, salt, key })
            }
            Frame::OfferReply { id, result } => self.offer_answered(node, ChannelId(id), result),
            Frame::Data(head) => self.receive_data(node, &head, payload, sink),
            Frame::Close { source, destination, reason } => {
                self.receive_close(node, source, destination, reason)
            }
            Frame::Credit { source, destination, limit } => {
                self.receive_credit(node, source, destination, limit)
            }
            // The router handles the link's own frames.
            _ => {}
        }
    }

    fn receive_data(
        &mut self,
        node: u32,
        head: &DataHead,
        payload: &mut [u8],
        sink: &mut dyn Deliver,
    ) {
        match self.check_data(node, head, payload) {
            Ok(channel) => {
                let header = RxHeader {
                    channel: channel.0,
                    len: head.len,
                    source: head.source,
                    process: head.destination.process,
                    seq: head.seq,
                };
                let partition = head.destination.partition;
                let metered = self
                    .table
                    .get(channel)
                    .is_some_and(|e| matches!(e.flow, super::credit::Flow::Metered(_)));
                match sink.deliver(partition, &header, payload, metered) {
                    Delivered::Written => self.delivered(partition, channel, payload.len()),
                    Delivered::Dropped => self.dropped_no_room(partition, channel),
                    Delivered::Held => {}
                }
            }
            Err(r) => {
                self.audit_from(
                    node,
                    "message_rejected",
                    r.reason(),
                    &head.source,
                    &head.destination,
                );
                // Counted against the destination partition if it is one of ours; a peer
                // naming partitions that do not exist must not grow the statistics table.
                if let Some(stats) = self.stats.get_mut(&head.destination.partition) {
                    stats.rejected += 1;
                }
            }
        }
    }

    /// Checks a message from `node` and opens it in place.
    fn check_data(
        &mut self,
        node: u32,
        head: &DataHead,
        payload: &mut [u8],
    ) -> Result<ChannelId, DataRejection> {
        if head.source.node != node {
            return Err(DataRejection::ForgedSourceNode);
        }
        let id =
            self.table.find(&head.destination, &head.source).ok_or(DataRejection::NoChannel)?;
        let entry = self.table.get_mut(id).ok_or(DataRejection::NoChannel)?;
        let (ChannelState::Open, Some(slot)) = (entry.state, entry.key) else {
            return Err(DataRejection::NoChannel);
        };
        if head.seq != entry.rx_seq {
            entry.dropped += 1;
            return Err(DataRejection::Replayed);
        }
        if !self.within_credit(id, head.seq) {
            if let Some(entry) = self.table.get_mut(id) {
                entry.dropped += 1;
            }
            return Err(DataRejection::OverCredit);
        }
        let entry = self.table.get_mut(id).ok_or(DataRejection::NoChannel)?;
        let next = match head.epoch.checked_sub(entry.rx_epoch) {
            None => {
                entry.dropped += 1;
                return Err(DataRejection::RetiredEpoch);
            }
            Some(0) => false,
            Some(1) => true,
            Some(_) => {
                entry.dropped += 1;
                return Err(DataRejection::BadEpoch);
            }
        };
        let aad = associated_data(&head.source, &head.destination, head.epoch, head.seq);
        if !self.keys.open(slot, next, &aad, head.seq, payload, &head.tag) {
            if let Some(entry) = self.table.get_mut(id) {
                entry.dropped += 1;
            }
            return Err(DataRejection::BadTag);
        }
        let entry = self.table.get_mut(id).ok_or(DataRejection::NoChannel)?;
        entry.rx_seq += 1;
        if next {
            entry.rx_epoch += 1;
        }
        Ok(id)
    }

    /// Counts a message written into `partition`'s receive buffer.
    pub(super) fn delivered(&mut self, partition: u32, channel: ChannelId, len: usize) {
        if let Some(entry) = self.table.get_mut(channel) {
            entry.received += 1;
        }
        self.taken(partition, channel);
        let stats = self.stats(partition);
        stats.received += 1;
        stats.received_bytes += len as u64;
    }

    /// Counts a verified message dropped because the guest had no receive buffer.
    pub(super) fn dropped_no_room(&mut self, partition: u32, channel: ChannelId) {
        if let Some(entry) = self.table.get_mut(channel) {
            entry.dropped += 1;
        }
        self.taken(partition, channel);
        self.stats(partition).dropped_no_room += 1;
    }
}
