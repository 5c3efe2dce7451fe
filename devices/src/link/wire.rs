//! The host-link wire format, protocol version 3, which also speaks version 2 (docs/PROTOCOL.md).
//!
//! During the handshake each message on the TCP stream is a 2-byte big-endian length and a
//! Noise handshake message. After it the stream is a sequence of **records**:
//!
//! ```text
//! record = length (u16, big-endian) | header block (a Noise transport message of `length`
//!          bytes) | the payloads of the block's DATA frames, in order, as their heads say
//! ```
//!
//! The header block's plaintext is one or more frames, each a type byte and a body of the
//! length the type fixes. A DATA frame's payload is already sealed with its channel key, so
//! the link's cipher covers only the heads (who talks to whom, sequence numbers, epochs, the
//! payloads' tags and lengths): one bulk cryptographic pass per payload byte per hop. Every
//! length is checked before anything is allocated or read.

use guest_agent::channel::abi::{Endpoint, ENDPOINT_SIZE};

use crate::cmm::frames::{CloseReason, OfferResult};
use crate::crypto::channel::{KEY_SIZE, SALT_SIZE, TAG_SIZE};

/// The protocol version this node speaks when it dials.
pub const VERSION: u8 = 3;
/// The oldest version it still speaks: a link of version 2 carries no CREDIT frames.
pub const OLDEST_VERSION: u8 = 2;
/// The first version whose channels are flow-controlled with CREDIT frames.
pub const CREDIT_VERSION: u8 = 3;
/// Largest Noise message, handshake or transport.
pub const MAX_MESSAGE: usize = 65_535;
/// Bytes of a Noise transport message's tag.
pub const NOISE_TAG: usize = 16;
/// Largest header block plaintext, either way: small, so that every link can keep its
/// staging and its receiving block in secret memory.
pub const MAX_BLOCK: usize = 4096;
/// Largest payload of one DATA frame: the device's `max_message`.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most payload bytes that may follow one header block.
pub const MAX_RECORD_PAYLOAD: usize = 256 * 1024;
/// Bytes of the initiator's first handshake message: ephemeral key, encrypted static key,
/// encrypted payload ([`HELLO_SIZE`] bytes).
pub const MSG1_SIZE: usize = 32 + (32 + NOISE_TAG) + (HELLO_SIZE + NOISE_TAG);
/// Bytes of the responder's handshake message: ephemeral key, encrypted version byte.
pub const MSG2_SIZE: usize = 32 + (1 + NOISE_TAG);
/// Bytes of the initiator's handshake payload: version, node ID, TAI64N timestamp.
pub const HELLO_SIZE: usize = 1 + 4 + 12;

/// Frame types.
pub mod kind {
    /// Nothing to say; proves the link alive.
    pub const KEEPALIVE: u8 = 1;
    /// The sender is closing the link on purpose.
    pub const GOODBYE: u8 = 2;
    /// The initiator's first frame: it holds the session's keys.
    pub const CONFIRM: u8 = 3;
    /// A key offer: `(offer ID, source, destination, salt, key)`.
    pub const OFFER: u8 = 4;
    /// The answer to an offer.
    pub const OFFER_REPLY: u8 = 5;
    /// The head of a message sealed with its channel's key; the payload follows the block.
    pub const DATA: u8 = 6;
    /// A channel was closed at the sender's end.
    pub const CLOSE: u8 = 7;
    /// A fresh handshake's first message (from the link's initiator).
    pub const REKEY: u8 = 8;
    /// The fresh handshake's answer; the responder's last frame under its old sending key.
    pub const REKEY_REPLY: u8 = 9;
    /// The initiator's last frame under its old sending key.
    pub const REKEY_DONE: u8 = 10;
    /// How far the other end of a channel may send (version 3).
    pub const CREDIT: u8 = 11;
}

/// Body bytes of each frame type (`None`: no such type).
pub fn body_len(kind: u8) -> Option<usize> {
    Some(match kind {
        kind::KEEPALIVE | kind::GOODBYE | kind::CONFIRM | kind::REKEY_DONE => 0,
        kind::OFFER => 4 + 2 * ENDPOINT_SIZE + SALT_SIZE + KEY_SIZE,
        kind::OFFER_REPLY => 5,
        kind::DATA => DATA_HEAD,
        kind::CLOSE => 2 * ENDPOINT_SIZE + 1,
        kind::REKEY => MSG1_SIZE,
        kind::REKEY_REPLY => MSG2_SIZE,
        kind::CREDIT => 2 * ENDPOINT_SIZE + 8,
        _ => return None,
    })
}

/// Bytes of a DATA frame's body: endpoints, epoch, seq, length, tag.
pub const DATA_HEAD: usize = 2 * ENDPOINT_SIZE + 4 + 8 + 4 + TAG_SIZE;

/// The head of one sealed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    /// Sender.
    pub source: Endpoint,
    /// Receiver.
    pub destination: Endpoint,
    /// The sender's key epoch on this channel.
    pub epoch: u32,
    /// Position on the channel, in the sender's direction.
    pub seq: u64,
    /// Payload bytes that follow the header block.
    pub len: u32,
    /// AES-GCM tag over payload, endpoints, epoch and sequence number.
    pub tag: [u8; TAG_SIZE],
}

impl DataHead {
    fn encode(&self, out: &mut [u8]) {
        self.source.encode(&mut out[..12]);
        self.destination.encode(&mut out[12..24]);
        out[24..28].copy_from_slice(&self.epoch.to_le_bytes());
        out[28..36].copy_from_slice(&self.seq.to_le_bytes());
        out[36..40].copy_from_slice(&self.len.to_le_bytes());
        out[40..56].copy_from_slice(&self.tag);
    }

    fn decode(body: &[u8]) -> Self {
        let mut tag = [0u8; TAG_SIZE];
        tag.copy_from_slice(&body[40..56]);
        Self {
            source: Endpoint::decode(&body[..12]),
            destination: Endpoint::decode(&body[12..24]),
            epoch: u32_at(body, 24),
            seq: u64::from_le_bytes(array(&body[28..36])),
            len: u32_at(body, 36),
            tag,
        }
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(&bytes[at..at + 4]))
}

/// A frame, borrowed from a header block (received) or from its owner (to send).
#[derive(Debug, Clone, Copy)]
pub enum Frame<'a> {
    /// [`kind::KEEPALIVE`].
    Keepalive,
    /// [`kind::GOODBYE`].
    Goodbye,
    /// [`kind::CONFIRM`].
    Confirm,
    /// [`kind::OFFER`]: the key stays where it is (secret memory) until it is used.
    Offer {
        /// The offering CMM's reference (its channel ID), echoed in the reply.
        id: u32,
        /// The offering endpoint.
        source: Endpoint,
        /// The endpoint it is offered to.
        destination: Endpoint,
        /// Makes this channel's keys unlike any earlier channel's.
        salt: [u8; SALT_SIZE],
        /// The channel key.
        key: &'a [u8; KEY_SIZE],
    },
    /// [`kind::OFFER_REPLY`].
    OfferReply {
        /// The offer answered.
        id: u32,
        /// The answer.
        result: OfferResult,
    },
    /// [`kind::DATA`].
    Data(DataHead),
    /// [`kind::CLOSE`].
    Close {
        /// Who closed.
        source: Endpoint,
        /// Its peer.
        destination: Endpoint,
        /// Why.
        reason: CloseReason,
    },
    /// [`kind::REKEY`].
    Rekey(&'a [u8; MSG1_SIZE]),
    /// [`kind::REKEY_REPLY`].
    RekeyReply(&'a [u8; MSG2_SIZE]),
    /// [`kind::REKEY_DONE`].
    RekeyDone,
    /// [`kind::CREDIT`]: `source` lets `destination` send on their channel every message
    /// whose `seq` is below `limit`.
    Credit {
        /// The receiving end, granting.
        source: Endpoint,
        /// The sending end, granted.
        destination: Endpoint,
        /// The first `seq` it may not send yet.
        limit: u64,
    },
}

/// Why a record or frame was refused; the link ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A header block that ends inside a frame, or holds none.
    Truncated,
    /// An unknown frame type.
    UnknownType(u8),
    /// A field out of range: a result code, a close reason, a DATA length.
    Malformed(u8),
    /// More payload after one header block than [`MAX_RECORD_PAYLOAD`].
    RecordTooLong,
    /// A frame that must end its header block did not.
    NotLast(u8),
}

impl FrameError {
    /// The reason as the audit log names it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "truncated_frame",
            Self::UnknownType(_) => "unknown_frame_type",
            Self::Malformed(_) => "malformed_frame",
            Self::RecordTooLong => "record_too_long",
            Self::NotLast(_) => "frame_not_last",
        }
    }
}

impl Frame<'_> {
    /// Its type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Keepalive => kind::KEEPALIVE,
            Self::Goodbye => kind::GOODBYE,
            Self::Confirm => kind::CONFIRM,
            Self::Offer { .. } => kind::OFFER,
            Self::OfferReply { .. } => kind::OFFER_REPLY,
            Self::Data(_) => kind::DATA,
            Self::Close { .. } => kind::CLOSE,
            Self::Rekey(_) => kind::REKEY,
            Self::RekeyReply(_) => kind::REKEY_REPLY,
            Self::RekeyDone => kind::REKEY_DONE,
            Self::Credit { .. } => kind::CREDIT,
        }
    }

    /// Bytes the frame takes in a header block.
    pub fn size(&self) -> usize {
        1 + body_len(self.kind()).unwrap_or(0)
    }

    /// Writes the frame at the start of `out` (at least [`Frame::size`] bytes).
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = self.kind();
        let body = &mut out[1..self.size()];
        match self {
            Self::Keepalive | Self::Goodbye | Self::Confirm | Self::RekeyDone => {}
            Self::Offer { id, source, destination, salt, key } => {
                body[..4].copy_from_slice(&id.to_le_bytes());
                source.encode(&mut body[4..16]);
                destination.encode(&mut body[16..28]);
                body[28..44].copy_from_slice(salt);
                body[44..76].copy_from_slice(&key[..]);
            }
            Self::OfferReply { id, result } => {
                body[..4].copy_from_slice(&id.to_le_bytes());
                body[4] = result.code();
            }
            Self::Data(head) => head.encode(body),
            Self::Close { source, destination, reason } => {
                source.encode(&mut body[..12]);
                destination.encode(&mut body[12..24]);
                body[24] = reason.code();
            }
            Self::Rekey(message) => body.copy_from_slice(&message[..]),
            Self::RekeyReply(message) => body.copy_from_slice(&message[..]),
            Self::Credit { source, destination, limit } => {
                source.encode(&mut body[..12]);
                destination.encode(&mut body[12..24]);
                body[24..32].copy_from_slice(&limit.to_le_bytes());
            }
        }
    }
}

/// The frames of a decrypted header block, in order.
pub struct Frames<'a> {
    rest: &'a [u8],
}

/// Iterates over the frames of `block` (a header block's plaintext).
pub fn frames(block: &[u8]) -> Frames<'_> {
    Frames { rest: block }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&kind, rest) = self.rest.split_first()?;
        let Some(len) = body_len(kind) else {
            self.rest = &[];
            return Some(Err(FrameError::UnknownType(kind)));
        };
        if rest.len() < len {
            self.rest = &[];
            return Some(Err(FrameError::Truncated));
        }
        let (body, rest) = rest.split_at(len);
        self.rest = rest;
        Some(decode(kind, body))
    }
}

/// Decodes a frame body whose length [`body_len`] has already checked.
fn decode(kind: u8, body: &[u8]) -> Result<Frame<'_>, FrameError> {
    let endpoint = |at: usize| Endpoint::decode(&body[at..at + ENDPOINT_SIZE]);
    Ok(match kind {
        kind::KEEPALIVE => Frame::Keepalive,
        kind::GOODBYE => Frame::Goodbye,
        kind::CONFIRM => Frame::Confirm,
        kind::REKEY_DONE => Frame::RekeyDone,
        kind::OFFER => Frame::Offer {
            id: u32_at(body, 0),
            source: endpoint(4),
            destination: endpoint(16),
            salt: array(&body[28..44]),
            key: body[44..76].try_into().map_err(|_| FrameError::Truncated)?,
        },
        kind::OFFER_REPLY => Frame::OfferReply {
            id: u32_at(body, 0),
            result: OfferResult::from_code(body[4]).ok_or(FrameError::Malformed(kind))?,
        },
        kind::DATA => {
            let head = DataHead::decode(body);
            if head.len as usize > MAX_PAYLOAD {
                return Err(FrameError::Malformed(kind));
            }
            Frame::Data(head)
        }
        kind::CLOSE => Frame::Close {
            source: endpoint(0),
            destination: endpoint(12),
            reason: CloseReason::from_code(body[24]).ok_or(FrameError::Malformed(kind))?,
        },
        kind::REKEY => Frame::Rekey(body.try_into().map_err(|_| FrameError::Truncated)?),
        kind::REKEY_REPLY => Frame::RekeyReply(body.try_into().map_err(|_| FrameError::Truncated)?),
        kind::CREDIT => Frame::Credit {
            source: endpoint(0),
            destination: endpoint(12),
            limit: u64::from_le_bytes(array(&body[24..32])),
        },
        other => return Err(FrameError::UnknownType(other)),
    })
}

/// Checks a decrypted header block as a whole: it holds at least one frame, every frame
/// decodes, REKEY_REPLY and REKEY_DONE come last, and its DATA payloads add up to at most
/// [`MAX_RECORD_PAYLOAD`]; returns that sum.
pub fn check_block(block: &[u8], version: u8) -> Result<usize, FrameError> {
    if block.is_empty() {
        return Err(FrameError::Truncated);
    }
    let mut payload = 0usize;
    let mut ended = None;
    for frame in frames(block) {
        let frame = frame?;
        if let Some(kind) = ended {
            return Err(FrameError::NotLast(kind));
        }
        match frame {
            Frame::Data(head) => payload += head.len as usize,
            Frame::RekeyReply(_) | Frame::RekeyDone => ended = Some(frame.kind()),
            // Version 2 has no such frame: refused before any frame of the block is acted on.
            Frame::Credit { .. } if version < CREDIT_VERSION => {
                return Err(FrameError::UnknownType(frame.kind()))
            }
            _ => {}
        }
        if payload > MAX_RECORD_PAYLOAD {
            return Err(FrameError::RecordTooLong);
        }
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmm::frames::Rejection;

    const A: Endpoint = Endpoint { node: 1, partition: 2, process: 3 };
    const B: Endpoint = Endpoint { node: 4, partition: 5, process: 6 };

    fn block(frames: &[Frame<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for frame in frames {
            let at = out.len();
            out.resize(at + frame.size(), 0);
            frame.encode(&mut out[at..]);
        }
        out
    }

    #[test]
    fn every_frame_round_trips() {
        let key = [9u8; 32];
        let head =
            DataHead { source: A, destination: B, epoch: 3, seq: 42, len: 100, tag: [1; 16] };
        let msg1 = [5u8; MSG1_SIZE];
        let msg2 = [6u8; MSG2_SIZE];
        let sent = [
            Frame::Confirm,
            Frame::Keepalive,
            Frame::Offer { id: 7, source: A, destination: B, salt: [2; 16], key: &key },
            Frame::OfferReply { id: 7, result: OfferResult::Rejected(Rejection::NoListener) },
            Frame::Data(head),
            Frame::Close { source: A, destination: B, reason: CloseReason::Revoked },
            Frame::Rekey(&msg1),
            Frame::Goodbye,
            Frame::RekeyDone,
        ];
        let bytes = block(&sent);
        assert_eq!(check_block(&bytes, VERSION), Ok(100));
        let back: Vec<Frame<'_>> = frames(&bytes).map(Result::unwrap).collect();
        assert_eq!(back.len(), sent.len());
        for (a, b) in sent.iter().zip(&back) {
            assert_eq!(block(&[*a]), block(&[*b]), "{a:?}");
        }
        let Frame::Offer { key: k, salt, .. } = back[2] else { panic!() };
        assert_eq!((k, salt), (&key, [2; 16]));
        assert!(matches!(back[4], Frame::Data(h) if h == head));
        assert!(
            matches!(frames(&block(&[Frame::RekeyReply(&msg2)])).next(), Some(Ok(Frame::RekeyReply(m))) if m == &msg2)
        );
    }

    #[test]
    fn blocks_are_checked_strictly() {
        assert_eq!(check_block(&[], VERSION), Err(FrameError::Truncated));
        assert_eq!(check_block(&[99], VERSION), Err(FrameError::UnknownType(99)));
        assert_eq!(check_block(&[kind::OFFER, 0, 0], VERSION), Err(FrameError::Truncated));
        assert_eq!(
            check_block(&[kind::OFFER_REPLY, 0, 0, 0, 0, 9], VERSION),
            Err(FrameError::Malformed(kind::OFFER_REPLY))
        );
        let close =
            block(&[Frame::Close { source: A, destination: B, reason: CloseReason::Closed }]);
        let mut bad = close.clone();
        *bad.last_mut().unwrap() = 200;
        assert_eq!(check_block(&bad, VERSION), Err(FrameError::Malformed(kind::CLOSE)));
        let head = |len| {
            Frame::Data(DataHead { source: A, destination: B, epoch: 0, seq: 0, len, tag: [0; 16] })
        };
        assert_eq!(
            check_block(&block(&[head(MAX_PAYLOAD as u32 + 1)]), VERSION),
            Err(FrameError::Malformed(kind::DATA))
        );
        let many: Vec<Frame<'_>> = (0..5).map(|_| head(MAX_PAYLOAD as u32)).collect();
        assert_eq!(check_block(&block(&many), VERSION), Err(FrameError::RecordTooLong));
        assert_eq!(
            check_block(&block(&[Frame::RekeyDone, Frame::Keepalive]), VERSION),
            Err(FrameError::NotLast(kind::REKEY_DONE))
        );
        assert_eq!(check_block(&block(&[Frame::Keepalive, Frame::RekeyDone]), VERSION), Ok(0));
        // CREDIT is a version-3 frame: refused on a version-2 link before anything is done.
        let credit = Frame::Credit { source: A, destination: B, limit: 64 };
        assert_eq!(check_block(&block(&[credit]), VERSION), Ok(0));
        assert_eq!(
            check_block(&block(&[Frame::Keepalive, credit]), 2),
            Err(FrameError::UnknownType(kind::CREDIT))
        );
    }

    /// A small deterministic generator, so the random test below is reproducible.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_blocks_never_panic_the_decoder() {
        let mut state = 0x5eed_u64;
        for _ in 0..50_000 {
            let len = (xorshift(&mut state) % 300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
            if len > 0 && xorshift(&mut state).is_multiple_of(2) {
                bytes[0] = (xorshift(&mut state) % 12) as u8;
            }
            let _ = check_block(&bytes, VERSION);
            for frame in frames(&bytes) {
                let _ = frame;
            }
        }
    }
}
