//! The vsock switch: packets from each partition's virtio-vsock device to another's, every
//! connection a channel of the CMM (`crate::virtio::vsock` says what that means).
//!
//! A transmit chain is one packet. Its header's `src_cid` must be the partition's own; the
//! destination CID must be a partition of this node. A REQUEST the policy allows becomes a
//! LISTEN entry for the destination port (its one allowed peer: the requester) and an OPEN
//! from the requester, which the CMM verifies against its table and keys; every RW is then a
//! SEND the CMM checks (owner, state, both entries' keys) before its payload is copied. What
//! goes to a partition waits in its device's outbox until the driver posts receive buffers; an
//! RW's payload is split over as many as it takes. Credit is enforced here: the device tracks,
//! for each end, what its peer last offered (`buf_alloc`, capped at `MAX_CREDIT`) and took
//! (`fwd_cnt`), and resets a connection whose sender exceeds it.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use guest_agent::channel::abi::{Endpoint, TxHeader};

use super::chain::Cursor;
use super::receive::next_buffer;
use super::vsock_host::{HostSide, HOST_CID};
use super::vsock_remote::RemoteSide;
use super::*;
use crate::cmm::{Opening, Payload, Sent};
use crate::virtio::vsock::packet::{op, Header, HEADER_SIZE, TYPE_STREAM};
use crate::virtio::vsock::policy::Policy;
use crate::virtio::vsock::{Outgoing, VsockDevice, MAX_CREDIT, MAX_PAYLOAD, RX_QUEUE, TX_QUEUE};

/// Packets waiting for a device past which the device's own RST answers are not queued.
const MAX_ANSWERS: usize = 1024;
/// Most connections a device may have asked for and not had answered.
pub(super) const MAX_ASKING: usize = 16;
/// What a waiting packet is charged beyond its payload.
const PACKET_COST: usize = 64;
/// Most a connection may have waiting in the outboxes: twice the most credit a receiver may
/// offer (payload, plus [`PACKET_COST`] a packet). A sender past it lied about credit, or its
/// peer did: the connection is reset, whatever the `fwd_cnt` the receiver claims.
pub(super) const MAX_HELD: usize = 2 * MAX_CREDIT as usize;

/// A connection as one of its ends sees it: `(own CID, own port, peer CID, peer port)`.
pub(super) type StreamKey = (u32, u32, u32, u32);

/// One end of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stream {
    /// This end's entry in the connection table.
    pub(super) channel: ChannelId,
    /// This end's device.
    pub(super) device: usize,
    /// Whether the peer asked for the connection (this end answers RESPONSE).
    pub(super) listener: bool,
    /// RESPONSE seen.
    pub(super) established: bool,
    /// What the peer last offered (`buf_alloc`, capped) and took (`fwd_cnt`).
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Payload bytes this end sent.
    pub(super) tx_cnt: u32,
}

impl Stream {
    /// A connection's end just asked for (`listener`: by its peer), on `channel`.
    pub(super) fn new(channel: ChannelId, device: usize, listener: bool) -> Self {
        Self {
            channel,
            device,
            listener,
            established: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }
}

/// Every vsock device of the node, their connections, and the operator's policy.
#[derive(Default)]
pub(super) struct Vsock {
    pub(super) devices: Vec<VsockDevice>,
    streams: HashMap<StreamKey, Stream>,
    pub(super) policy: Policy,
    /// Devices whose outbox got packets in this pass.
    pending: Vec<usize>,
    /// Bytes waiting in the outboxes per connection (addresses as in the packets).
    held: HashMap<(u64, u32, u64, u32), usize>,
    /// CID 2: the programs on the node.
    pub(super) host: HostSide,
    /// Connections to other nodes' partitions.
    pub(super) remote: RemoteSide,
}

/// Why a packet is refused, as the audit names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// `src_cid` is not the sender's.
    ForgedCid,
    /// No rule allows the flow.
    Policy,
    /// The destination CID is nobody's on this node.
    NoSuchCid,
    /// More payload than the peer offered room for.
    OverCredit,
    /// Not a packet this device carries (type, size, an operation out of order).
    BadPacket,
    /// A REQUEST from a guest with [`MAX_ASKING`] requests unanswered already.
    TooManyRequests,
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Self::ForgedCid => "forged_cid",
            Self::Policy => "policy",
            Self::NoSuchCid => "no_such_cid",
            Self::OverCredit => "over_credit",
            Self::BadPacket => "bad_packet",
            Self::TooManyRequests => "too_many_requests",
        }
    }
}

/// Where a packet goes.
enum Route {
    /// To the partition with this device index, on this connection.
    Guest(usize, StreamKey),
    /// To a program on the node (CID 2).
    Host,
    /// To a partition of another node: (node, partition), and the connection.
    Remote((u32, u32), StreamKey),
}

/// An RW's payload, still in the sender's guest memory.
struct Unread<'c, 'm>(&'c mut Cursor<'m>);

impl Payload for Unread<'_, '_> {
    fn read_into(&mut self, out: &mut [u8]) -> bool {
        self.0.read(out).unwrap_or(false)
    }
}

impl Vsock {
    /// The node's vsock devices, switched under `policy`, and the partitions' listening
    /// sockets for programs on the node.
    pub(super) fn new(
        devices: Vec<VsockDevice>,
        policy: Policy,
        host: Vec<(u32, UnixListener, PathBuf)>,
        peers: &[(u32, u32, u32)],
    ) -> Self {
        let (host, remote) = (HostSide::new(host), RemoteSide::new(peers));
        Self { devices, policy, host, remote, ..Self::default() }
    }

    /// Device `index`'s connections with partitions of this node, as its guest sees them.
    pub(super) fn local_keys_of(&self, index: usize) -> Vec<StreamKey> {
        let cid = self.devices[index].cid;
        self.streams.keys().filter(|k| k.0 == cid).copied().collect()
    }

    pub(super) fn device_of_cid(&self, cid: u32) -> Option<usize> {
        self.devices.iter().position(|d| d.cid == cid)
    }

    /// Queues `header` (and `payload`) for device `index`'s receive queue, where what waits
    /// stays bounded whatever the guests do: a packet joins the last one waiting for the same
    /// connection when both are RW (not yet started) or both the same notice (credit, shutdown),
    /// so that a connection's packets stay in order and a sender of tiny packets costs little
    /// more than its bytes; and [`Vsock::held`] counts what waits per connection, which the
    /// senders are held to. (The device's own answers are bounded in [`Vsock::answer`].)
    pub(super) fn post(
        &mut self,
        index: usize,
        header: Header,
        payload: Vec<u8>,
        channel: Option<ChannelId>,
    ) {
        let Some(device) = self.devices.get_mut(index) else { return };
        if !self.pending.contains(&index) {
            self.pending.push(index);
        }
        let connection = connection_of(&header);
        let last = device.outbox.iter_mut().rev().find(|o| connection_of(&o.header) == connection);
        if let Some(last) = last.filter(|o| o.header.op == header.op && o.sent == 0) {
            match header.op {
                op::RW if last.payload.len() + payload.len() <= MAX_PAYLOAD as usize => {
                    last.payload.extend_from_slice(&payload);
                    last.header = Header { len: last.payload.len() as u32, ..header };
                    *self.held.entry(connection).or_default() += payload.len();
                    return;
                }
                op::CREDIT_UPDATE | op::CREDIT_REQUEST | op::SHUTDOWN => {
                    last.header = Header { flags: last.header.flags | header.flags, ..header };
                    return;
                }
                _ => {}
            }
        }
        *self.held.entry(connection).or_default() += payload.len() + PACKET_COST;
        device.outbox.push_back(Outgoing { header, payload, sent: 0, channel });
    }

    /// What waits in the outboxes for the connection `header` is a packet of.
    pub(super) fn held(&self, header: &Header) -> usize {
        self.held.get(&connection_of(header)).copied().unwrap_or(0)
    }

    /// Connections device `index` asked for that are not answered yet (here and to other
    /// nodes): each holds an entry in another partition's table, which that partition did not
    /// choose.
    pub(super) fn asking(&self, index: usize) -> usize {
        let unanswered = |s: &&Stream| s.device == index && !s.listener && !s.established;
        self.streams.values().filter(unanswered).count() + self.remote.unanswered(index)
    }

    /// Whether `len` more bytes for `header`'s connection would hold more than the node
    /// holds for one connection.
    pub(super) fn over_held(&self, header: &Header, len: u32) -> bool {
        self.held(header) + len as usize > MAX_HELD
    }

    /// A packet left the outboxes (delivered, or dropped with its partition).
    fn release(&mut self, packet: &Outgoing) {
        let connection = connection_of(&packet.header);
        if let Some(held) = self.held.get_mut(&connection) {
            *held = held.saturating_sub(packet.payload.len() + PACKET_COST);
            if *held == 0 {
                self.held.remove(&connection);
            }
        }
    }
}

/// A packet's connection, as its addresses name it.
fn connection_of(header: &Header) -> (u64, u32, u64, u32) {
    (header.src_cid, header.src_port, header.dst_cid, header.dst_port)
}

impl Vsock {
    /// Queues the device's RST in answer to a packet `index` sent, unless [`MAX_ANSWERS`]
    /// packets already wait there: a guest that sends bad packets and reads nothing must not
    /// make the node hold an answer for each.
    pub(super) fn answer(&mut self, index: usize, header: &Header) {
        let waiting = self.devices.get(index).map_or(usize::MAX, |d| d.outbox.len());
        if header.op != op::RST && waiting < MAX_ANSWERS {
            self.post(index, header.answer(op::RST), Vec::new(), None);
        }
    }
}

impl ChannelNode {
    /// The node's vsock devices; the policy their connections are opened under; for the
    /// partitions that have one, the listening socket (`vsock_uds`) through which programs on
    /// the node reach them, with its path; and other nodes' CIDs `(CID, node, partition)`.
    pub fn with_vsock(
        mut self,
        devices: Vec<VsockDevice>,
        policy: Policy,
        host: Vec<(u32, UnixListener, PathBuf)>,
        peers: &[(u32, u32, u32)],
    ) -> Self {
        let local: HashMap<u32, u32> = devices.iter().map(|d| (d.partition, d.cid)).collect();
        for device in &devices {
            self.cmm.add_partition(device.partition);
        }
        self.vsock = Vsock::new(devices, policy.clone(), host, peers);
        if !peers.is_empty() {
            self.cmm.set_implicit_listen(self.vsock.remote.implicit_listen(policy, local));
        }
        self
    }

    /// A notification of queue `queue` of vsock device `index`: packets to switch (transmit),
    /// buffers to fill (receive).
    pub(super) fn vsock_notified(&mut self, index: usize, queue: usize) {
        self.vsock_check_reset(index);
        if queue == TX_QUEUE {
            if let Err(Malformed(why)) = self.vsock_transmit(index) {
                self.vsock.devices[index].shared.fail(why);
            }
        } else if queue == RX_QUEUE && !self.vsock.pending.contains(&index) {
            self.vsock.pending.push(index);
        }
        self.vsock_flush();
    }

    /// Switches up to a budget of transmit chains of device `index` (the rest wait for the
    /// next pass, as for the native device).
    fn vsock_transmit(&mut self, index: usize) -> Result<(), Malformed> {
        let device = &self.vsock.devices[index];
        let (shared, mem) = (device.shared.clone(), device.mem.clone());
        let mut chains = Vec::with_capacity(BUDGET);
        let epoch = take_chains(&shared, TX_QUEUE, &mem, BUDGET, &mut chains)?;
        let mut used = Vec::with_capacity(chains.len());
        for chain in chains {
            used.push((chain.head_index(), 0));
            let mut reader = Cursor::readable(chain, &mem);
            self.vsock_packet(index, &mut reader)?;
        }
        // What went to other nodes leaves now, not with the next batch.
        self.cmm.flush();
        if return_chains(&shared, TX_QUEUE, &mem, epoch, &used, true)? {
            shared.counters.deferred.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(evt) = self.vsock.devices[index].queue_evts.get(TX_QUEUE) {
                let _ = evt.write(1);
            }
        }
        Ok(())
    }

    /// One packet from device `index`.
    fn vsock_packet(&mut self, index: usize, reader: &mut Cursor<'_>) -> Result<(), Malformed> {
        let partition = self.vsock.devices[index].partition;
        let mut raw = [0u8; HEADER_SIZE];
        if !reader.read(&mut raw)? {
            self.vsock_refuse(partition, Refused::BadPacket, None);
            return Ok(());
        }
        let header = Header::from_bytes(&raw);
        let payload_ok = header.op != op::RW
            || header.len <= MAX_PAYLOAD && reader.remaining()? >= header.len as usize;
        match self.vsock_check(index, &header, payload_ok) {
            Err(why) => {
                if let Some(why) = why {
                    self.vsock_refuse(partition, why, Some(&header));
                }
                self.vsock.answer(index, &header);
            }
            Ok(Route::Host) => self.vsock_to_host(index, &header, reader),
            Ok(Route::Remote(place, key)) => {
                self.vsock_to_remote(index, place, key, &header, reader)
            }
            Ok(Route::Guest(peer, key)) => match header.op {
                op::REQUEST => self.vsock_request(index, peer, key, &header),
                op::RST => self.vsock_reset(key, Some(peer)),
                _ => self.vsock_on_stream(index, peer, key, &header, reader),
            },
        }
        Ok(())
    }

    /// What every packet must be: from the partition's own CID, a stream packet of a size the
    /// device carries, to a CID of this node. The peer's device and the connection, or why
    /// not (`None`: an RST is answer enough, nothing to audit).
    fn vsock_check(
        &self,
        index: usize,
        header: &Header,
        payload_ok: bool,
    ) -> Result<Route, Option<Refused>> {
        let cid = self.vsock.devices[index].cid;
        if header.src_cid != u64::from(cid) {
            return Err(Some(Refused::ForgedCid));
        }
        if header.kind != TYPE_STREAM || !payload_ok {
            return Err(Some(Refused::BadPacket));
        }
        let destination = u32::try_from(header.dst_cid).ok();
        if destination == Some(HOST_CID) {
            return Ok(Route::Host);
        }
        let Some(peer) = destination.and_then(|cid| self.vsock.device_of_cid(cid)) else {
            if let Some((cid_there, place)) =
                destination.and_then(|d| Some((d, self.vsock.remote.place_of(d)?)))
            {
                return Ok(Route::Remote(
                    place,
                    (cid, header.src_port, cid_there, header.dst_port),
                ));
            }
            return Err((header.op == op::REQUEST).then_some(Refused::NoSuchCid));
        };
        let key = (cid, header.src_port, self.vsock.devices[peer].cid, header.dst_port);
        Ok(Route::Guest(peer, key))
    }

    /// A connection request: allowed by the policy, entered and keyed by the CMM, then passed
    /// to the peer's driver, which accepts (RESPONSE) or refuses (RST).
    fn vsock_request(&mut self, index: usize, peer: usize, key: StreamKey, header: &Header) {
        let (own, theirs) = (&self.vsock.devices[index], &self.vsock.devices[peer]);
        let (partition, peer_partition) = (own.partition, theirs.partition);
        if self.vsock.streams.contains_key(&key) {
            // A second REQUEST for a live connection: the driver lost track of it.
            self.vsock_refuse(partition, Refused::BadPacket, Some(header));
            return self.vsock_reset(key, Some(peer));
        }
        let (src, dst) = ((key.0, key.1), (key.2, key.3));
        if !self.vsock.policy.allows(src, dst) {
            self.vsock_refuse(partition, Refused::Policy, Some(header));
            return self.vsock.answer(index, header);
        }
        if self.vsock.asking(index) >= MAX_ASKING {
            // Each would hold an entry in a table the other partition did not choose to fill.
            self.vsock_refuse(partition, Refused::TooManyRequests, Some(header));
            return self.vsock.answer(index, header);
        }
        if self.vsock.devices[peer].stopped {
            // Nobody to answer: no entry is made in its table for a REQUEST that would wait.
            return self.vsock.answer(index, header);
        }
        let node = self.cmm.node();
        let from = Endpoint { node, partition, process: key.1 };
        let to = Endpoint { node, partition: peer_partition, process: key.3 };
        let Ok(listening) = self.cmm.listen(peer_partition, key.3, from) else {
            return self.vsock.answer(index, header);
        };
        let channel = match self.cmm.open(partition, key.1, to, None) {
            Ok(Opening::Done(channel)) => channel,
            _ => {
                // Refused and audited by the CMM; the LISTEN it was to meet goes too.
                let _ = self.cmm.close(peer_partition, key.3, listening.0);
                return self.vsock.answer(index, header);
            }
        };
        self.vsock.streams.insert(key, Stream::new(channel, index, false));
        self.vsock.streams.insert(mirror(key), Stream::new(listening, peer, true));
        self.vsock_forward(peer, key, header, Vec::new(), None);
    }

    /// A packet of a connection that exists (or should).
    fn vsock_on_stream(
        &mut self,
        index: usize,
        peer: usize,
        key: StreamKey,
        header: &Header,
        reader: &mut Cursor<'_>,
    ) {
        let partition = self.vsock.devices[index].partition;
        let Some(&stream) = self.vsock.streams.get(&key) else {
            return self.vsock.answer(index, header);
        };
        match header.op {
            op::RESPONSE if stream.listener && !stream.established => {
                for end in [key, mirror(key)] {
                    if let Some(s) = self.vsock.streams.get_mut(&end) {
                        s.established = true;
                    }
                }
                self.vsock_forward(peer, key, header, Vec::new(), None);
            }
            op::RW if stream.established => {
                let in_flight = stream.tx_cnt.wrapping_sub(stream.peer_fwd_cnt);
                let over =
                    u64::from(in_flight) + u64::from(header.len) > u64::from(stream.peer_buf_alloc);
                if over || self.vsock.over_held(header, header.len) {
                    self.vsock_refuse(partition, Refused::OverCredit, Some(header));
                    return self.vsock_reset_both(index, key, peer, header);
                }
                self.vsock_data(index, peer, key, stream, header, reader);
            }
            op::SHUTDOWN | op::CREDIT_UPDATE | op::CREDIT_REQUEST if stream.established => {
                self.vsock_forward(peer, key, header, Vec::new(), None);
            }
            _ => {
                self.vsock_refuse(partition, Refused::BadPacket, Some(header));
                self.vsock_reset_both(index, key, peer, header);
            }
        }
    }

    /// An RW: the CMM checks it as a SEND on the sender's channel, then its payload is copied
    /// out of the sender's buffer and queued for the peer.
    fn vsock_data(
        &mut self,
        index: usize,
        peer: usize,
        key: StreamKey,
        stream: Stream,
        header: &Header,
        reader: &mut Cursor<'_>,
    ) {
        let partition = self.vsock.devices[index].partition;
        let source = Endpoint { node: self.cmm.node(), partition, process: key.1 };
        let tx = TxHeader { channel: stream.channel.0, source, len: header.len };
        let received = match self.cmm.send(partition, &tx, &mut Unread(reader)) {
            Ok(Sent::Local { channel, .. }) => channel,
            _ => return self.vsock_reset_both(index, key, peer, header),
        };
        let mut payload = self.buffers.take(header.len as usize);
        if !reader.read(&mut payload).unwrap_or(false) {
            self.buffers.give(payload);
            return self.vsock_reset_both(index, key, peer, header);
        }
        if let Some(s) = self.vsock.streams.get_mut(&key) {
            s.tx_cnt = s.tx_cnt.wrapping_add(header.len);
        }
        self.vsock_forward(peer, key, header, payload, Some(received));
    }

    /// Passes a packet of connection `key` on to device `peer`, taking note of the credit its
    /// sender offers (capped: what the node may have to hold for the connection).
    fn vsock_forward(
        &mut self,
        peer: usize,
        key: StreamKey,
        header: &Header,
        payload: Vec<u8>,
        channel: Option<ChannelId>,
    ) {
        let buf_alloc = header.buf_alloc.min(MAX_CREDIT);
        if let Some(theirs) = self.vsock.streams.get_mut(&mirror(key)) {
            theirs.peer_buf_alloc = buf_alloc;
            theirs.peer_fwd_cnt = header.fwd_cnt;
        }
        self.vsock.post(peer, Header { buf_alloc, ..*header }, payload, channel);
    }

    /// Resets connection `key` from the device: an RST to each end, both entries closed.
    fn vsock_reset_both(&mut self, index: usize, key: StreamKey, peer: usize, header: &Header) {
        self.vsock.answer(index, header);
        self.vsock_reset(key, Some(peer));
    }

    /// Ends connection `key` (an RST from its sender, a reset, a stopped partition): the
    /// other end (`peer`, if it still runs) gets an RST; both table entries are closed.
    pub(super) fn vsock_reset(&mut self, key: StreamKey, peer: Option<usize>) {
        let (Some(own), theirs) =
            (self.vsock.streams.remove(&key), self.vsock.streams.remove(&mirror(key)))
        else {
            return;
        };
        if let Some(peer) = peer {
            self.vsock.post(peer, rst_from(key), Vec::new(), None);
        }
        let partition_of =
            |cid| self.vsock.device_of_cid(cid).map(|i| self.vsock.devices[i].partition);
        let ends = [(partition_of(key.0), key.1, Some(own)), (partition_of(key.2), key.3, theirs)];
        for (partition, port, stream) in ends {
            if let (Some(partition), Some(stream)) = (partition, stream) {
                let _ = self.cmm.close(partition, port, stream.channel.0);
            }
        }
    }

    /// Counts and audits a refused packet of `partition`.
    pub(super) fn vsock_refuse(&mut self, partition: u32, why: Refused, header: Option<&Header>) {
        let node = self.cmm.node();
        let port = |p: Option<u32>| p.unwrap_or(0);
        let source = Endpoint { node, partition, process: port(header.map(|h| h.src_port)) };
        // The destination as claimed: its CID stands where a partition would.
        let destination = Endpoint {
            node,
            partition: header.map_or(0, |h| h.dst_cid as u32),
            process: port(header.map(|h| h.dst_port)),
        };
        self.cmm.refuse_vsock(
            partition,
            why.reason(),
            why == Refused::ForgedCid,
            &source,
            &destination,
        );
    }

    /// Moves what waits in the outboxes touched in this pass into receive buffers.
    pub(super) fn vsock_flush(&mut self) {
        // A reset found here posts RSTs to other devices: they go out in this flush too.
        while !self.vsock.pending.is_empty() {
            for index in std::mem::take(&mut self.vsock.pending) {
                // Nothing of a connection the driver reset away goes into its new buffers.
                self.vsock_check_reset(index);
                if let Err(why) = self.vsock_fill(index) {
                    self.vsock.devices[index].shared.fail(why);
                }
            }
        }
    }

    /// Fills device `index`'s posted receive buffers from its outbox, splitting payloads over
    /// buffers as it must; signals the driver once.
    fn vsock_fill(&mut self, index: usize) -> Result<(), &'static str> {
        let device = &mut self.vsock.devices[index];
        let mem = device.mem.clone();
        let mut activation = lock(&device.shared.activation);
        let Some(queue) = ready_queue(&mut activation, RX_QUEUE) else { return Ok(()) };
        let mut used = false;
        let mut delivered = Vec::new();
        let mut released = Vec::new();
        while let Some(packet) = device.outbox.front_mut() {
            let Some(chain) = next_buffer(queue, &mem)? else { break };
            let head = chain.head_index();
            let mut writer = Cursor::writable(chain, &mem);
            let room = writer.remaining().map_err(|_| "receive buffer outside guest RAM")?;
            let Some(space) = room.checked_sub(HEADER_SIZE) else {
                return Err("a receive buffer too small for a packet header");
            };
            let part = (packet.payload.len() - packet.sent).min(space);
            if part == 0 && packet.sent < packet.payload.len() {
                // Data waits and the driver gave a buffer with room for a header alone.
                return Err("a receive buffer with no room for data while data waits");
            }
            let header = Header { len: part as u32, ..packet.header };
            let body = &packet.payload[packet.sent..packet.sent + part];
            let outside = |_| "receive buffer outside guest RAM";
            writer.write(&header.to_bytes()).map_err(outside)?;
            writer.write(body).map_err(outside)?;
            queue
                .add_used(&mem, head, (HEADER_SIZE + part) as u32)
                .map_err(|_| "used ring not writable")?;
            used = true;
            packet.sent += part;
            if let Some(channel) = packet.channel.filter(|_| part > 0) {
                delivered.push((channel, part));
            }
            if packet.sent == packet.payload.len() {
                if let Some(done) = device.outbox.pop_front() {
                    released.push(done);
                }
            }
        }
        let interrupt = used && queue.needs_notification(&mem).unwrap_or(true);
        drop(activation);
        if used {
            device.shared.used();
        }
        if interrupt {
            device.shared.signal(INT_USED_BUFFER);
        }
        let partition = device.partition;
        for (channel, len) in delivered {
            self.cmm.delivered(partition, channel, len);
        }
        for packet in released {
            self.vsock.release(&packet);
            self.buffers.give(packet.payload);
        }
        Ok(())
    }

    /// Partition `partition` stopped (the CMM has closed its entries): the other end of each of
    /// its connections gets an RST and its entry is closed, and the device lets go of what it
    /// held.
    pub(super) fn vsock_partition_stopped(&mut self, partition: u32) {
        let Some(index) = self.vsock.devices.iter().position(|d| d.partition == partition) else {
            return;
        };
        for key in self.vsock.local_keys_of(index) {
            self.vsock.streams.remove(&key);
            let Some(theirs) = self.vsock.streams.remove(&mirror(key)) else { continue };
            if let Some(peer) = self.vsock.device_of_cid(key.2) {
                let peer_partition = self.vsock.devices[peer].partition;
                let _ = self.cmm.close(peer_partition, key.3, theirs.channel.0);
                self.vsock.post(peer, rst_from(key), Vec::new(), None);
            }
        }
        self.host_partition_stopped(index);
        self.vsock_drop_outbox(index);
        let device = &mut self.vsock.devices[index];
        *lock(&device.shared.activation) = Activation::Inactive;
        device.stopped = true;
        self.vsock.pending.retain(|&i| i != index);
        self.vsock_flush();
    }

    /// Lets go of what waits for device `index`.
    pub(super) fn vsock_drop_outbox(&mut self, index: usize) {
        let dropped: Vec<Outgoing> = self.vsock.devices[index].outbox.drain(..).collect();
        for packet in dropped {
            self.vsock.release(&packet);
            self.buffers.give(packet.payload);
        }
    }
}

/// An RST from the first end of `key` to the second.
pub(super) fn rst_from((own_cid, own_port, peer_cid, peer_port): StreamKey) -> Header {
    Header {
        src_cid: u64::from(own_cid),
        dst_cid: u64::from(peer_cid),
        src_port: own_port,
        dst_port: peer_port,
        kind: TYPE_STREAM,
        op: op::RST,
        ..Header::default()
    }
}

/// The same connection as its other end sees it.
pub(super) fn mirror((own_cid, own_port, peer_cid, peer_port): StreamKey) -> StreamKey {
    (peer_cid, peer_port, own_cid, own_port)
}
