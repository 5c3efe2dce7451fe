//! The secure-channel device's guest interface: request and response layouts, status codes,
//! and configuration space. Shared by the guest driver and the VMM's device model, so both
//! sides encode and decode with the same code. docs/DEVICE.md describes it for other drivers.
//!
//! Every structure is little-endian with fixed offsets and is encoded and decoded field by field:
//! nothing relies on the host's or the guest's in-memory layout.

/// Virtio device ID of the secure-channel device.
pub const DEVICE_ID: u32 = 0x4b48;
/// Version of this interface, in the configuration space.
pub const INTERFACE_VERSION: u32 = 1;

/// Queue indices.
pub const CONTROL_QUEUE: u16 = 0;
/// Queue of messages from the guest.
pub const TX_QUEUE: u16 = 1;
/// Queue of buffers the device fills with received messages.
pub const RX_QUEUE: u16 = 2;

/// Request operations on the control queue.
pub mod op {
    /// Accept a channel from one remote endpoint.
    pub const LISTEN: u32 = 1;
    /// Open a channel to a remote endpoint (key by the device, or the guest with `FLAG_GUEST_KEY`).
    pub const OPEN: u32 = 2;
    /// Close a channel (or withdraw a listen); the peer learns of it.
    pub const CLOSE: u32 = 3;
    /// List this partition's connection-table entries (never keys).
    pub const LIST: u32 = 4;
    /// Device counters.
    pub const STATS: u32 = 5;
}

/// OPEN flag: use the key in the request instead of one the device generates (claim 2).
pub const FLAG_GUEST_KEY: u32 = 1;

/// Status codes, in every response and in every transmit status.
pub mod status {
    /// Done.
    pub const OK: u32 = 0;
    /// The request is malformed: too short, bad field, reserved bits set.
    pub const BAD_REQUEST: u32 = 1;
    /// Unknown operation.
    pub const UNKNOWN_OP: u32 = 2;
    /// No channel with that ID in this partition.
    pub const NO_CHANNEL: u32 = 3;
    /// The source endpoint is not this partition's: the device refuses to send as someone else.
    pub const FORGED_SOURCE: u32 = 4;
    /// The remote CMM rejected the offer: no matching LISTEN there.
    pub const NO_LISTENER: u32 = 5;
    /// A matching entry already exists.
    pub const EXISTS: u32 = 6;
    /// The connection table (or key table) is full.
    pub const TABLE_FULL: u32 = 7;
    /// The message is larger than `max_message`.
    pub const TOO_BIG: u32 = 8;
    /// The channel is not open (still listening, or closed by the peer).
    pub const NOT_OPEN: u32 = 9;
    /// The channel belongs to another process of this partition.
    pub const NOT_OWNER: u32 = 10;
    /// The response buffer is too small for the answer.
    pub const BUFFER_TOO_SMALL: u32 = 11;
    /// The destination node is not reachable from this node.
    pub const UNREACHABLE: u32 = 12;
    /// The receiver has no room now (a partition of this node whose device holds a window of
    /// the channel's messages, or one on another node that has granted no more credit):
    /// nothing was sent; send it again later.
    pub const NO_ROOM: u32 = 13;
    /// The device failed internally; nothing was done.
    pub const INTERNAL: u32 = 14;
    /// The other node did not answer the OPEN in time; the channel was not opened.
    pub const TIMED_OUT: u32 = 15;

    /// The status's name, as the audit log writes it.
    pub fn name(code: u32) -> &'static str {
        match code {
            OK => "ok",
            BAD_REQUEST => "bad_request",
            UNKNOWN_OP => "unknown_op",
            NO_CHANNEL => "no_channel",
            FORGED_SOURCE => "forged_source",
            NO_LISTENER => "no_listener",
            EXISTS => "exists",
            TABLE_FULL => "table_full",
            TOO_BIG => "too_big",
            NOT_OPEN => "not_open",
            NOT_OWNER => "not_owner",
            BUFFER_TOO_SMALL => "buffer_too_small",
            UNREACHABLE => "unreachable",
            NO_ROOM => "no_room",
            INTERNAL => "internal",
            TIMED_OUT => "timed_out",
            _ => "unknown",
        }
    }
}

/// Channel states in LIST entries.
pub mod state {
    /// Waiting for the remote endpoint's offer.
    pub const LISTENING: u32 = 1;
    /// Keyed; messages flow.
    pub const OPEN: u32 = 2;
    /// The peer closed it; only CLOSE is useful now.
    pub const PEER_CLOSED: u32 = 3;
    /// Offered, waiting for the remote CMM's answer.
    pub const OFFERING: u32 = 4;
}

/// Why a channel is [`state::PEER_CLOSED`], in LIST entries (0 while it is not).
pub mod closed {
    /// The channel is not closed.
    pub const NOT_CLOSED: u32 = 0;
    /// The peer process closed its end.
    pub const BY_PEER: u32 = 1;
    /// An operator revoked the peer's end.
    pub const REVOKED: u32 = 2;
    /// The peer's partition stopped or crashed.
    pub const PARTITION_STOPPED: u32 = 3;
    /// The host link to the peer's node was lost.
    pub const LINK_DOWN: u32 = 4;

    /// The reason's name, as the control API writes it.
    pub fn name(code: u32) -> &'static str {
        match code {
            NOT_CLOSED => "none",
            BY_PEER => "closed_by_peer",
            REVOKED => "revoked",
            PARTITION_STOPPED => "partition_stopped",
            LINK_DOWN => "link_down",
            _ => "unknown",
        }
    }
}

/// A process somewhere in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Endpoint {
    /// The node.
    pub node: u32,
    /// The partition on that node.
    pub partition: u32,
    /// The process in that partition.
    pub process: u32,
}

/// Size of an encoded [`Endpoint`].
pub const ENDPOINT_SIZE: usize = 12;

impl Endpoint {
    /// Encodes into `out[..12]`.
    pub fn encode(&self, out: &mut [u8]) {
        put32(out, 0, self.node);
        put32(out, 4, self.partition);
        put32(out, 8, self.process);
    }

    /// Decodes from `bytes[..12]`.
    pub fn decode(bytes: &[u8]) -> Self {
        Self { node: get32(bytes, 0), partition: get32(bytes, 4), process: get32(bytes, 8) }
    }

    /// Parses `node:partition:process`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':').map(|p| p.parse::<u32>().ok());
        let endpoint =
            Self { node: parts.next()??, partition: parts.next()??, process: parts.next()?? };
        parts.next().is_none().then_some(endpoint)
    }

    /// The encoded bytes.
    pub fn to_bytes(&self) -> [u8; ENDPOINT_SIZE] {
        let mut out = [0u8; ENDPOINT_SIZE];
        self.encode(&mut out);
        out
    }
}

/// Writes `v` little-endian at `out[at..at + 4]`.
pub fn put32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `out[at..at + 8]`.
pub fn put64(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads a little-endian `u32` at `bytes[at..at + 4]`.
pub fn get32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Reads a little-endian `u64` at `bytes[at..at + 8]`.
pub fn get64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// A control request (the device-readable part of a control-queue chain): 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlRequest {
    /// One of [`op`].
    pub op: u32,
    /// OPEN: [`FLAG_GUEST_KEY`]; zero otherwise.
    pub flags: u32,
    /// The process of this partition the request is made for.
    pub process: u32,
    /// CLOSE: the channel.
    pub channel: u32,
    /// LISTEN, OPEN: the remote endpoint.
    pub remote: Endpoint,
    /// OPEN with [`FLAG_GUEST_KEY`]: the channel key.
    pub key: [u8; 32],
}

/// Size of an encoded [`ControlRequest`].
pub const CONTROL_REQUEST_SIZE: usize = 64;
/// Size of a request's head: everything before the key.
pub const CONTROL_HEAD_SIZE: usize = 32;

impl ControlRequest {
    /// Encodes the request.
    pub fn to_bytes(&self) -> [u8; CONTROL_REQUEST_SIZE] {
        let mut out = [0u8; CONTROL_REQUEST_SIZE];
        put32(&mut out, 0, self.op);
        put32(&mut out, 4, self.flags);
        put32(&mut out, 8, self.process);
        put32(&mut out, 12, self.channel);
        self.remote.encode(&mut out[16..28]);
        // 28..32 reserved, zero.
        out[32..64].copy_from_slice(&self.key);
        out
    }

    /// Decodes a request's head (its first [`CONTROL_HEAD_SIZE`] bytes), leaving the key
    /// zero: a device reads the key where it keeps keys; `None` if reserved bytes are not zero.
    pub fn head_from_bytes(bytes: &[u8; CONTROL_HEAD_SIZE]) -> Option<Self> {
        if get32(bytes, 28) != 0 {
            return None;
        }
        Some(Self {
            op: get32(bytes, 0),
            flags: get32(bytes, 4),
            process: get32(bytes, 8),
            channel: get32(bytes, 12),
            remote: Endpoint::decode(&bytes[16..28]),
            key: [0; 32],
        })
    }

    /// Decodes a request; `None` if reserved bytes are not zero.
    pub fn from_bytes(bytes: &[u8; CONTROL_REQUEST_SIZE]) -> Option<Self> {
        let mut head = [0u8; CONTROL_HEAD_SIZE];
        head.copy_from_slice(&bytes[..CONTROL_HEAD_SIZE]);
        let mut request = Self::head_from_bytes(&head)?;
        request.key.copy_from_slice(&bytes[CONTROL_HEAD_SIZE..]);
        Some(request)
    }
}

/// The head of every control response (the device-writable part): 16 bytes, followed by
/// `count` records for LIST (each [`CHANNEL_INFO_SIZE`]) or one [`Stats`] for STATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlResponse {
    /// One of [`status`].
    pub status: u32,
    /// OPEN, LISTEN: the new channel's ID.
    pub channel: u32,
    /// LIST: records that follow (all of them fit, or the status says BUFFER_TOO_SMALL).
    pub count: u32,
}

/// Size of an encoded [`ControlResponse`].
pub const CONTROL_RESPONSE_SIZE: usize = 16;

impl ControlResponse {
    /// Encodes the response head.
    pub fn to_bytes(&self) -> [u8; CONTROL_RESPONSE_SIZE] {
        let mut out = [0u8; CONTROL_RESPONSE_SIZE];
        put32(&mut out, 0, self.status);
        put32(&mut out, 4, self.channel);
        put32(&mut out, 8, self.count);
        out
    }

    /// Decodes a response head.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self { status: get32(bytes, 0), channel: get32(bytes, 4), count: get32(bytes, 8) }
    }
}

/// One LIST record: a connection-table entry as the guest may see it (no key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelInfo {
    /// Channel ID.
    pub channel: u32,
    /// One of [`state`].
    pub state: u32,
    /// The local process.
    pub process: u32,
    /// The remote endpoint.
    pub remote: Endpoint,
    /// Why the channel is closed (one of [`closed`]).
    pub closed: u32,
    /// Messages sent.
    pub sent: u64,
    /// Messages delivered to the local process.
    pub received: u64,
    /// Messages for this channel dropped: bad proof, replayed, or no room.
    pub dropped: u64,
}

/// Size of an encoded [`ChannelInfo`].
pub const CHANNEL_INFO_SIZE: usize = 56;

impl ChannelInfo {
    /// Encodes the record.
    pub fn to_bytes(&self) -> [u8; CHANNEL_INFO_SIZE] {
        let mut out = [0u8; CHANNEL_INFO_SIZE];
        put32(&mut out, 0, self.channel);
        put32(&mut out, 4, self.state);
        put32(&mut out, 8, self.process);
        self.remote.encode(&mut out[12..24]);
        put32(&mut out, 24, self.closed);
        // 28..32 reserved.
        put64(&mut out, 32, self.sent);
        put64(&mut out, 40, self.received);
        put64(&mut out, 48, self.dropped);
        out
    }

    /// Decodes a record.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            channel: get32(bytes, 0),
            state: get32(bytes, 4),
            process: get32(bytes, 8),
            remote: Endpoint::decode(&bytes[12..24]),
            closed: get32(bytes, 24),
            sent: get64(bytes, 32),
            received: get64(bytes, 40),
            dropped: get64(bytes, 48),
        }
    }
}

/// STATS: the device's counters for this partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Messages accepted from the guest.
    pub sent: u64,
    /// Messages delivered to the guest.
    pub received: u64,
    /// Payload bytes accepted from the guest.
    pub sent_bytes: u64,
    /// Payload bytes delivered to the guest.
    pub received_bytes: u64,
    /// Requests refused with a status other than OK.
    pub refused: u64,
    /// Sends refused because the source endpoint was not the sender's.
    pub forged: u64,
    /// Incoming messages dropped: bad proof or replay.
    pub rejected: u64,
    /// Incoming messages dropped for want of receive buffers.
    pub dropped_no_room: u64,
    /// Queue notifications handled.
    pub notifications: u64,
}

/// Size of an encoded [`Stats`].
pub const STATS_SIZE: usize = 72;

impl Stats {
    fn fields(&self) -> [u64; 9] {
        [
            self.sent,
            self.received,
            self.sent_bytes,
            self.received_bytes,
            self.refused,
            self.forged,
            self.rejected,
            self.dropped_no_room,
            self.notifications,
        ]
    }

    /// Encodes the counters.
    pub fn to_bytes(&self) -> [u8; STATS_SIZE] {
        let mut out = [0u8; STATS_SIZE];
        for (i, v) in self.fields().iter().enumerate() {
            put64(&mut out, i * 8, *v);
        }
        out
    }

    /// Decodes the counters.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let f = |i: usize| get64(bytes, i * 8);
        Self {
            sent: f(0),
            received: f(1),
            sent_bytes: f(2),
            received_bytes: f(3),
            refused: f(4),
            forged: f(5),
            rejected: f(6),
            dropped_no_room: f(7),
            notifications: f(8),
        }
    }
}

/// The head of a transmit chain: 24 bytes, followed by `len` payload bytes; the chain ends in
/// a 4-byte device-writable status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxHeader {
    /// The channel.
    pub channel: u32,
    /// Who sends: must be this node, this partition, and the channel's process.
    pub source: Endpoint,
    /// Payload length.
    pub len: u32,
}

/// Size of an encoded [`TxHeader`].
pub const TX_HEADER_SIZE: usize = 24;

impl TxHeader {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; TX_HEADER_SIZE] {
        let mut out = [0u8; TX_HEADER_SIZE];
        put32(&mut out, 0, self.channel);
        self.source.encode(&mut out[4..16]);
        put32(&mut out, 16, self.len);
        out
    }

    /// Decodes a header; `None` if reserved bytes are not zero.
    pub fn from_bytes(bytes: &[u8; TX_HEADER_SIZE]) -> Option<Self> {
        if get32(bytes, 20) != 0 {
            return None;
        }
        Some(Self {
            channel: get32(bytes, 0),
            source: Endpoint::decode(&bytes[4..16]),
            len: get32(bytes, 16),
        })
    }
}

/// The head the device writes into a receive buffer: 32 bytes, then the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxHeader {
    /// The receiving channel.
    pub channel: u32,
    /// Payload length.
    pub len: u32,
    /// The verified sender.
    pub source: Endpoint,
    /// The receiving process.
    pub process: u32,
    /// The message's sequence number on its channel.
    pub seq: u64,
}

/// Size of an encoded [`RxHeader`].
pub const RX_HEADER_SIZE: usize = 32;

impl RxHeader {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; RX_HEADER_SIZE] {
        let mut out = [0u8; RX_HEADER_SIZE];
        put32(&mut out, 0, self.channel);
        put32(&mut out, 4, self.len);
        self.source.encode(&mut out[8..20]);
        put32(&mut out, 20, self.process);
        put64(&mut out, 24, self.seq);
        out
    }

    /// Decodes a header.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            channel: get32(bytes, 0),
            len: get32(bytes, 4),
            source: Endpoint::decode(&bytes[8..20]),
            process: get32(bytes, 20),
            seq: get64(bytes, 24),
        }
    }
}

/// The configuration space: 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    /// This node.
    pub node: u32,
    /// This partition.
    pub partition: u32,
    /// Largest payload of one message.
    pub max_message: u32,
    /// Most connection-table entries this partition may hold.
    pub max_channels: u32,
    /// [`INTERFACE_VERSION`].
    pub version: u32,
}

/// Size of the encoded [`Config`].
pub const CONFIG_SIZE: usize = 20;

impl Config {
    /// Encodes the configuration space.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut out = [0u8; CONFIG_SIZE];
        put32(&mut out, 0, self.node);
        put32(&mut out, 4, self.partition);
        put32(&mut out, 8, self.max_message);
        put32(&mut out, 12, self.max_channels);
        put32(&mut out, 16, self.version);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let remote = Endpoint { node: 1, partition: 2, process: 3 };
        let req = ControlRequest {
            op: op::OPEN,
            flags: FLAG_GUEST_KEY,
            process: 9,
            channel: 0,
            remote,
            key: [7; 32],
        };
        assert_eq!(ControlRequest::from_bytes(&req.to_bytes()), Some(req));
        let mut bad = req.to_bytes();
        bad[30] = 1;
        assert_eq!(ControlRequest::from_bytes(&bad), None);
        let tx = TxHeader { channel: 5, source: remote, len: 100 };
        assert_eq!(TxHeader::from_bytes(&tx.to_bytes()), Some(tx));
        let rx = RxHeader { channel: 5, len: 4, source: remote, process: 8, seq: 1 << 40 };
        assert_eq!(RxHeader::from_bytes(&rx.to_bytes()), rx);
        let info = ChannelInfo {
            channel: 1,
            state: state::PEER_CLOSED,
            process: 2,
            remote,
            closed: closed::PARTITION_STOPPED,
            sent: 3,
            received: 4,
            dropped: 5,
        };
        assert_eq!(ChannelInfo::from_bytes(&info.to_bytes()), info);
        let stats = Stats { sent: 1, notifications: 9, ..Default::default() };
        assert_eq!(Stats::from_bytes(&stats.to_bytes()), stats);
    }

    #[test]
    fn endpoints_parse_strictly() {
        assert_eq!(Endpoint::parse("1:2:3"), Some(Endpoint { node: 1, partition: 2, process: 3 }));
        for bad in ["", "1:2", "1:2:3:4", "1:x:3", "-1:2:3"] {
            assert_eq!(Endpoint::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn layout_is_fixed() {
        let tx = TxHeader {
            channel: 0x0102_0304,
            source: Endpoint { node: 5, partition: 6, process: 7 },
            len: 8,
        };
        let b = tx.to_bytes();
        assert_eq!(&b[0..4], &[4, 3, 2, 1]);
        assert_eq!(&b[4..8], &[5, 0, 0, 0]);
        assert_eq!(&b[16..20], &[8, 0, 0, 0]);
    }
}
