//! vsock connections to partitions of other nodes (docs/VSOCK.md, "Across nodes").
//!
//! The node knows other nodes' CIDs from `[[vsock.peer]]` (CID, node, partition). A REQUEST
//! to one is an OPEN to (its node, its partition, the port): the CMM offers the key over the
//! link, and the other node's CMM makes the LISTEN entry the offer needs only if that node's
//! policy allows the flow ([`ChannelNode::with_vsock`] gives it the rule). Every vsock packet
//! after that is a message on the channel, sealed with the channel key and checked like any
//! other: a 16-byte envelope (op, flags, `buf_alloc`, `fwd_cnt`; the addresses are the
//! channel's endpoints) and, for RW, the data. Credit is enforced at the sender's node, from
//! the envelopes its peer's node sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_agent::channel::abi::{Endpoint, RxHeader, TxHeader};

use super::chain::Cursor;
use super::vsock::{mirror, rst_from, Refused, Stream, StreamKey, Vsock};
use super::*;
use crate::cmm::{Delivered, Opening, Payload, Sent};
use crate::virtio::vsock::packet::{op, Header, TYPE_STREAM};
use crate::virtio::vsock::policy::Policy;
use crate::virtio::vsock::{MAX_CREDIT, MAX_PAYLOAD};

/// Size of the envelope at the start of every vsock message on a channel.
pub const ENVELOPE_SIZE: usize = 16;

/// Every connection of this node's partitions to other nodes'.
#[derive(Default)]
pub(super) struct RemoteSide {
    /// Other nodes' CIDs: where each is.
    peers: HashMap<u32, (u32, u32)>,
    /// The same, the other way.
    cids: HashMap<(u32, u32), u32>,
    /// LISTEN entries the CMM made for offers the policy allowed, (local, remote), and when:
    /// a REQUEST must follow within [`REQUEST_WAIT`].
    implicit: Arc<Mutex<HashMap<(Endpoint, Endpoint), Instant>>>,
    streams: HashMap<StreamKey, Stream>,
    by_channel: HashMap<ChannelId, StreamKey>,
    /// REQUESTs whose offer is out, by channel.
    opening: HashMap<ChannelId, Header>,
    /// Entries to close once the CMM is free (an RST came in while it delivered), and
    /// connections its peer's node overran, to audit then.
    closes: Vec<ChannelId>,
    overruns: Vec<(u32, Header)>,
    /// REQUESTs to nodes whose link is not up yet: tried again until their deadline.
    waiting: Vec<Waiting>,
}

/// A REQUEST waiting for its link: the device, the destination (node, partition), the
/// connection, the packet, and until when it may wait.
type Waiting = (usize, (u32, u32), StreamKey, Header, Instant);

/// How long a REQUEST waits for the link to its destination's node to come up (a node that
/// has just started, or is relinking), as a connecting socket would retry.
const LINK_WAIT: Duration = Duration::from_secs(5);
/// How long a channel opened for a vsock port may wait for its REQUEST before the node closes
/// it (a peer that opened it some other way, or never finished).
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// Most channels opened for vsock ports that may wait for their REQUEST at once.
const MAX_IMPLICIT: usize = 4096;
/// Most REQUESTs one device may have waiting for links.
const MAX_WAITING: usize = 64;

/// The envelope of a vsock message on a channel.
fn envelope(header: &Header) -> [u8; ENVELOPE_SIZE] {
    let mut out = [0u8; ENVELOPE_SIZE];
    out[0..2].copy_from_slice(&header.op.to_le_bytes());
    out[4..8].copy_from_slice(&header.flags.to_le_bytes());
    out[8..12].copy_from_slice(&header.buf_alloc.min(MAX_CREDIT).to_le_bytes());
    out[12..16].copy_from_slice(&header.fwd_cnt.to_le_bytes());
    out
}

/// `(op, flags, buf_alloc, fwd_cnt)` of an envelope.
fn open_envelope(bytes: &[u8]) -> Option<(u16, u32, u32, u32)> {
    let field =
        |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let op = u16::from_le_bytes(bytes.get(0..2)?.try_into().ok()?);
    Some((op, field(4)?, field(8)?.min(MAX_CREDIT), field(12)?))
}

/// A message's payload: the envelope, then the data still in the sender's guest memory.
struct Enveloped<'c, 'm> {
    envelope: [u8; ENVELOPE_SIZE],
    data: Option<&'c mut Cursor<'m>>,
}

impl Payload for Enveloped<'_, '_> {
    fn read_into(&mut self, out: &mut [u8]) -> bool {
        let Some((head, rest)) = out.split_at_mut_checked(ENVELOPE_SIZE) else { return false };
        head.copy_from_slice(&self.envelope);
        match &mut self.data {
            Some(cursor) => cursor.read(rest).unwrap_or(false),
            None => rest.is_empty(),
        }
    }
}

impl RemoteSide {
    /// Other nodes' CIDs: `(CID, node, partition)`.
    pub(super) fn new(peers: &[(u32, u32, u32)]) -> Self {
        Self {
            peers: peers.iter().map(|&(cid, node, partition)| (cid, (node, partition))).collect(),
            cids: peers.iter().map(|&(cid, node, partition)| ((node, partition), cid)).collect(),
            ..Self::default()
        }
    }

    /// Connections device `index` asked other nodes for that are not answered yet.
    pub(super) fn unanswered(&self, index: usize) -> usize {
        let asked =
            self.streams.values().filter(|s| s.device == index && !s.listener && !s.established);
        asked.count() + self.waiting.iter().filter(|w| w.0 == index).count()
    }

    /// Where CID `cid` is, if on another node.
    pub(super) fn place_of(&self, cid: u32) -> Option<(u32, u32)> {
        self.peers.get(&cid).copied()
    }

    /// The rule the CMM applies to offers that find no LISTEN entry: the source must be a
    /// known CID, the destination a vsock partition of this node (`local`: partition to CID),
    /// and the policy must allow the flow.
    pub(super) fn implicit_listen(
        &self,
        policy: Policy,
        local: HashMap<u32, u32>,
    ) -> crate::cmm::ImplicitListen {
        let (cids, implicit) = (self.cids.clone(), self.implicit.clone());
        Box::new(move |source: &Endpoint, destination: &Endpoint| {
            let from = cids.get(&(source.node, source.partition));
            let to = local.get(&destination.partition);
            let (Some(&from), Some(&to)) = (from, to) else { return false };
            let allowed = policy.allows((from, source.process), (to, destination.process));
            // Bounded whatever a peer node offers: past it, offers wait for the tidy-up.
            let mut waiting = lock(&implicit);
            if !allowed || waiting.len() >= MAX_IMPLICIT {
                return false;
            }
            waiting.insert((*destination, *source), Instant::now());
            true
        })
    }
}

impl Vsock {
    /// A message from another node on `partition`'s channel, if it is a vsock connection's:
    /// its packet goes to the partition's vsock device. `None`: not a vsock channel.
    pub(super) fn deliver_remote(
        &mut self,
        node: u32,
        partition: u32,
        rx: &RxHeader,
        payload: &[u8],
        buffers: &mut pool::BufferPool,
    ) -> Option<Delivered> {
        if self.remote.peers.is_empty() {
            return None;
        }
        let channel = ChannelId(rx.channel);
        let key = match self.remote.by_channel.get(&channel) {
            Some(key) => *key,
            None => {
                let local = Endpoint { node, partition, process: rx.process };
                lock(&self.remote.implicit).remove(&(local, rx.source))?;
                match self.remote_arrival(partition, rx) {
                    Some(key) => key,
                    None => {
                        // Its partition stopped meanwhile, or the peer is unknown now.
                        self.remote.closes.push(channel);
                        return Some(Delivered::Dropped);
                    }
                }
            }
        };
        let (op, flags, buf_alloc, fwd_cnt) = match open_envelope(payload) {
            Some(fields) => fields,
            None => return Some(Delivered::Dropped),
        };
        let stream = self.remote.streams.get_mut(&key)?;
        stream.peer_buf_alloc = buf_alloc;
        stream.peer_fwd_cnt = fwd_cnt;
        let data = &payload[ENVELOPE_SIZE..];
        let fits = match op {
            op::REQUEST => stream.listener && !stream.established,
            op::RESPONSE => !stream.listener && !stream.established,
            op::RW => stream.established && !data.is_empty(),
            op::SHUTDOWN | op::CREDIT_UPDATE | op::CREDIT_REQUEST => stream.established,
            _ => op == op::RST,
        };
        let device = stream.device;
        if op == op::RESPONSE && fits {
            stream.established = true;
        }
        if !fits {
            // Out of order: the connection ends, here and (by the closed channel) there.
            self.remote_end(key);
            return Some(Delivered::Dropped);
        }
        let header = Header {
            src_cid: u64::from(key.2),
            dst_cid: u64::from(key.0),
            src_port: key.3,
            dst_port: key.1,
            len: data.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        if op == op::RW && self.over_held(&header, header.len) {
            // Its node let it past the credit this guest offered, or lied about it.
            self.remote.overruns.push((partition, header));
            self.post(device, rst_from(mirror(key)), Vec::new(), None);
            self.remote_end(key);
            return Some(Delivered::Dropped);
        }
        let mut copy = buffers.take(data.len());
        crate::memcopy::copy(&mut copy, data);
        self.post(device, header, copy, (op == op::RW).then_some(channel));
        if op == op::RST {
            self.remote_end(key);
        }
        Some(Delivered::Held)
    }

    /// The first message on a channel the CMM opened for an offer the policy allowed: a
    /// connection a partition of another node asks for.
    fn remote_arrival(&mut self, partition: u32, rx: &RxHeader) -> Option<StreamKey> {
        let device = self.devices.iter().position(|d| d.partition == partition && !d.stopped)?;
        let peer_cid = *self.remote.cids.get(&(rx.source.node, rx.source.partition))?;
        let key = (self.devices[device].cid, rx.process, peer_cid, rx.source.process);
        let stream = Stream::new(ChannelId(rx.channel), device, true);
        self.remote.streams.insert(key, stream);
        self.remote.by_channel.insert(stream.channel, key);
        Some(key)
    }

    /// Forgets connection `key`; its channel entry is closed once the CMM is free.
    fn remote_end(&mut self, key: StreamKey) {
        if let Some(stream) = self.remote.streams.remove(&key) {
            self.remote.by_channel.remove(&stream.channel);
            self.remote.closes.push(stream.channel);
        }
    }
}

impl ChannelNode {
    /// A packet for a partition of node `node` (its source already checked).
    pub(super) fn vsock_to_remote(
        &mut self,
        index: usize,
        place: (u32, u32),
        key: StreamKey,
        header: &Header,
        reader: &mut Cursor<'_>,
    ) {
        let partition = self.vsock.devices[index].partition;
        if header.op == op::REQUEST {
            return self.remote_request(index, place, key, header);
        }
        let Some(stream) = self.vsock.remote.streams.get(&key).copied() else {
            return self.vsock.answer(index, header);
        };
        let allowed = match header.op {
            op::RESPONSE => stream.listener && !stream.established,
            op::RW => {
                let in_flight = stream.tx_cnt.wrapping_sub(stream.peer_fwd_cnt);
                let room = u64::from(stream.peer_buf_alloc)
                    - u64::from(in_flight).min(u64::from(stream.peer_buf_alloc));
                if stream.established && u64::from(header.len) > room {
                    self.vsock_refuse(partition, Refused::OverCredit, Some(header));
                    return self.remote_reset(index, key, header);
                }
                stream.established && header.len <= MAX_PAYLOAD - ENVELOPE_SIZE as u32
            }
            op::SHUTDOWN | op::CREDIT_UPDATE | op::CREDIT_REQUEST | op::RST => {
                stream.established || op::RST == header.op
            }
            _ => false,
        };
        if !allowed {
            self.vsock_refuse(partition, Refused::BadPacket, Some(header));
            return self.remote_reset(index, key, header);
        }
        let data = (header.op == op::RW).then_some(reader);
        if !self.send_envelope(partition, key, stream.channel, header, data) {
            return self.remote_reset(index, key, header);
        }
        if let Some(s) = self.vsock.remote.streams.get_mut(&key) {
            s.tx_cnt = s.tx_cnt.wrapping_add(if header.op == op::RW { header.len } else { 0 });
            s.established |= header.op == op::RESPONSE;
        }
        if header.op == op::RST {
            self.remote_forget(key);
        }
    }

    /// A REQUEST to another node's partition: allowed here, then offered by the CMM; the
    /// packet itself follows on the channel once the offer is accepted.
    fn remote_request(&mut self, index: usize, place: (u32, u32), key: StreamKey, header: &Header) {
        let partition = self.vsock.devices[index].partition;
        let why = if self.vsock.remote.streams.contains_key(&key) {
            Some(Refused::BadPacket)
        } else if self.vsock.asking(index) >= super::vsock::MAX_ASKING {
            Some(Refused::TooManyRequests)
        } else if !self.vsock.policy.allows((key.0, key.1), (key.2, key.3)) {
            Some(Refused::Policy)
        } else {
            None
        };
        if let Some(why) = why {
            self.vsock_refuse(partition, why, Some(header));
            return self.vsock.answer(index, header);
        }
        self.remote_offer(index, place, key, header, Instant::now() + LINK_WAIT);
    }

    /// Offers the channel of a REQUEST (again, if its link was not up).
    fn remote_offer(
        &mut self,
        index: usize,
        place: (u32, u32),
        key: StreamKey,
        header: &Header,
        deadline: Instant,
    ) {
        let partition = self.vsock.devices[index].partition;
        let to = Endpoint { node: place.0, partition: place.1, process: key.3 };
        if !self.cmm.can_offer(place.0) && Instant::now() < deadline {
            let waiting = &self.vsock.remote.waiting;
            let mine = waiting.iter().filter(|w| w.0 == index).count();
            if mine < MAX_WAITING && !waiting.iter().any(|w| w.2 == key) {
                self.vsock.remote.waiting.push((index, place, key, *header, deadline));
                return;
            }
            return self.vsock.answer(index, header);
        }
        let Ok(Opening::Pending(channel)) = self.cmm.open(partition, key.1, to, None) else {
            return self.vsock.answer(index, header);
        };
        self.cmm.carries_vsock(channel);
        let stream = Stream::new(channel, index, false);
        self.vsock.remote.streams.insert(key, stream);
        self.vsock.remote.by_channel.insert(channel, key);
        self.vsock.remote.opening.insert(channel, *header);
    }

    /// The answer to a remote OPEN, if it was a vsock REQUEST's: accepted, the REQUEST goes on
    /// the channel; refused, the guest gets an RST. False: not a vsock channel.
    pub(super) fn remote_answered(&mut self, channel: ChannelId, accepted: bool) -> bool {
        let Some(request) = self.vsock.remote.opening.remove(&channel) else { return false };
        let Some(&key) = self.vsock.remote.by_channel.get(&channel) else { return true };
        let Some(stream) = self.vsock.remote.streams.get(&key).copied() else { return true };
        let partition = self.vsock.devices[stream.device].partition;
        if accepted && self.send_envelope(partition, key, channel, &request, None) {
            self.cmm.flush();
            return true;
        }
        self.vsock.remote.streams.remove(&key);
        self.vsock.remote.by_channel.remove(&channel);
        self.vsock.answer(stream.device, &request);
        true
    }

    /// Sends `header`'s envelope (and, for RW, the data `reader` holds) as a message on the
    /// channel of `partition`'s end `key` of a connection; whether the CMM took it.
    fn send_envelope(
        &mut self,
        partition: u32,
        key: StreamKey,
        channel: ChannelId,
        header: &Header,
        data: Option<&mut Cursor<'_>>,
    ) -> bool {
        let len = ENVELOPE_SIZE as u32 + if data.is_some() { header.len } else { 0 };
        let source = Endpoint { node: self.cmm.node(), partition, process: key.1 };
        let tx = TxHeader { channel: channel.0, source, len };
        let mut payload = Enveloped { envelope: envelope(header), data };
        matches!(self.cmm.send(partition, &tx, &mut payload), Ok(Sent::Remote))
    }

    /// Ends connection `key` from this node: an RST to its guest and (as a message) to its
    /// peer, the channel closed.
    fn remote_reset(&mut self, index: usize, key: StreamKey, header: &Header) {
        self.vsock.answer(index, header);
        let partition = self.vsock.devices[index].partition;
        self.remote_say_rst(partition, key);
        self.remote_forget(key);
    }

    /// An RST envelope on connection `key`'s channel (to the other node's end).
    fn remote_say_rst(&mut self, partition: u32, key: StreamKey) {
        if let Some(stream) = self.vsock.remote.streams.get(&key).copied() {
            let rst = Header { op: op::RST, ..Header::default() };
            self.send_envelope(partition, key, stream.channel, &rst, None);
        }
    }

    /// The connections of device `index` to other nodes.
    pub(super) fn remote_keys_of(&self, index: usize) -> Vec<StreamKey> {
        let ends = self.vsock.remote.streams.iter().filter(|(_, s)| s.device == index);
        ends.map(|(k, _)| *k).collect()
    }

    /// Forgets connection `key` and closes its channel entry.
    fn remote_forget(&mut self, key: StreamKey) {
        if let Some(stream) = self.vsock.remote.streams.remove(&key) {
            self.vsock.remote.by_channel.remove(&stream.channel);
            self.vsock.remote.opening.remove(&stream.channel);
            // An offer still out is closed too: the peer's node closes what it accepted.
            self.cmm.abandon(stream.channel);
        }
    }

    /// After the links' records are handled: closes what RSTs ended, and resets the
    /// connections whose channel went (its link lost, its peer's partition stopped).
    pub(super) fn remote_tidy(&mut self) {
        for (index, place, key, header, deadline) in std::mem::take(&mut self.vsock.remote.waiting)
        {
            self.remote_offer(index, place, key, &header, deadline);
        }
        for channel in std::mem::take(&mut self.vsock.remote.closes) {
            self.cmm.abandon(channel);
        }
        for (partition, header) in std::mem::take(&mut self.vsock.remote.overruns) {
            self.vsock_refuse(partition, Refused::OverCredit, Some(&header));
        }
        // Channels opened for a vsock port whose REQUEST never came.
        let expired: Vec<(Endpoint, Endpoint)> = lock(&self.vsock.remote.implicit)
            .iter()
            .filter(|(_, since)| since.elapsed() > REQUEST_WAIT)
            .map(|(ends, _)| *ends)
            .collect();
        for (local, remote) in expired {
            lock(&self.vsock.remote.implicit).remove(&(local, remote));
            if let Some(channel) = self.cmm.find(&local, &remote) {
                self.cmm.abandon(channel);
            }
        }
        let gone: Vec<(StreamKey, Stream)> = self
            .vsock
            .remote
            .streams
            .iter()
            .filter(|(_, s)| {
                !self.vsock.remote.opening.contains_key(&s.channel) && !self.cmm.is_open(s.channel)
            })
            .map(|(k, s)| (*k, *s))
            .collect();
        for (key, stream) in gone {
            self.vsock.remote.streams.remove(&key);
            self.vsock.remote.by_channel.remove(&stream.channel);
            self.vsock.post(stream.device, rst_from(mirror(key)), Vec::new(), None);
        }
    }

    /// The driver of device `index` reset it: its connections to other nodes end (an RST on
    /// each channel, then the channel closed).
    pub(super) fn remote_device_reset(&mut self, index: usize) {
        let partition = self.vsock.devices[index].partition;
        for key in self.remote_keys_of(index) {
            self.remote_say_rst(partition, key);
            self.remote_forget(key);
        }
        self.vsock.remote.waiting.retain(|w| w.0 != index);
    }

    /// Partition `partition` is stopping: its connections to other nodes say RST on their
    /// channels before the CMM closes them.
    pub(super) fn remote_partition_stopping(&mut self, partition: u32) {
        let Some(index) = self.vsock.devices.iter().position(|d| d.partition == partition) else {
            return;
        };
        self.vsock.remote.waiting.retain(|w| w.0 != index);
        for key in self.remote_keys_of(index) {
            self.remote_say_rst(partition, key);
            // The CMM closes the channel with the partition (its peer learns why).
            if let Some(stream) = self.vsock.remote.streams.remove(&key) {
                self.vsock.remote.by_channel.remove(&stream.channel);
                self.vsock.remote.opening.remove(&stream.channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_carries_op_flags_and_credit() {
        let header = Header {
            op: op::SHUTDOWN,
            flags: 3,
            buf_alloc: 4096,
            fwd_cnt: 77,
            ..Header::default()
        };
        assert_eq!(open_envelope(&envelope(&header)), Some((op::SHUTDOWN, 3, 4096, 77)));
        let huge = Header { buf_alloc: u32::MAX, ..header };
        assert_eq!(open_envelope(&envelope(&huge)).map(|e| e.2), Some(MAX_CREDIT));
        assert_eq!(open_envelope(&[0u8; 15]), None, "too short");
    }
}
