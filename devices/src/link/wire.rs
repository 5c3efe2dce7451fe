//! Link framing (docs/PROTOCOL.md).
//!
//! On the TCP stream every message is a 2-byte big-endian length and that many bytes: a Noise
//! handshake or transport message, so at most 65,535. A transport message's plaintext is one
//! flag byte (bit 0: the last chunk of a frame) and a chunk; chunks concatenate into a frame
//! of at most [`FRAME_MAX`] bytes, checked before it grows. A frame is a version byte, a type
//! byte and a body whose length each type fixes (DATA: a fixed head and the payload).

use std::io::{self, Read, Write};

use guest_agent::channel::abi::{Endpoint, ENDPOINT_SIZE};
use zeroize::Zeroize;

use crate::cmm::crypto::{KEY_SIZE, TAG_SIZE};
use crate::cmm::frames::{DataFrame, Offer, OfferResult};

/// Protocol version of the frames.
pub const VERSION: u8 = 1;
/// Largest Noise message.
pub const MAX_MESSAGE: usize = 65_535;
/// Largest plaintext of one Noise transport message (its tag takes 16 bytes).
pub const MAX_PLAINTEXT: usize = MAX_MESSAGE - 16;
/// Largest chunk of a frame in one transport message.
pub const MAX_CHUNK: usize = MAX_PLAINTEXT - 1;
/// Largest payload of a DATA frame: the device's `max_message`.
pub const MAX_PAYLOAD: usize = 64 * 1024;
const DATA_HEAD: usize = 2 * ENDPOINT_SIZE + 8 + TAG_SIZE;
/// Largest frame.
pub const FRAME_MAX: usize = 2 + DATA_HEAD + MAX_PAYLOAD;

/// Frame types.
pub mod kind {
    /// Nothing to say; proves the link alive.
    pub const KEEPALIVE: u8 = 1;
    /// The sender is closing the link on purpose.
    pub const GOODBYE: u8 = 2;
    /// A key offer: `(offer ID, key, source, destination)`.
    pub const OFFER: u8 = 3;
    /// The answer to an offer.
    pub const OFFER_REPLY: u8 = 4;
    /// A message sealed with its channel's key.
    pub const DATA: u8 = 5;
    /// A channel was closed at the sender's end.
    pub const CLOSE: u8 = 6;
}

/// A decoded frame.
pub enum Frame {
    /// [`kind::KEEPALIVE`].
    Keepalive,
    /// [`kind::GOODBYE`].
    Goodbye,
    /// [`kind::OFFER`].
    Offer {
        /// The offering CMM's reference, echoed in the reply.
        id: u32,
        /// The offer.
        offer: Offer,
    },
    /// [`kind::OFFER_REPLY`].
    OfferReply {
        /// The offer answered.
        id: u32,
        /// The answer.
        result: OfferResult,
    },
    /// [`kind::DATA`].
    Data(DataFrame),
    /// [`kind::CLOSE`].
    Close {
        /// Who closed.
        source: Endpoint,
        /// Its peer.
        destination: Endpoint,
    },
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than its type requires.
    Truncated,
    /// Another protocol version.
    Version(u8),
    /// An unknown type, a body of the wrong length, or a bad field.
    Malformed(u8),
    /// Chunks that add up to more than [`FRAME_MAX`].
    TooLong,
}

impl FrameError {
    /// The reason as the audit log names it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "truncated_frame",
            Self::Version(_) => "unsupported_version",
            Self::Malformed(_) => "malformed_frame",
            Self::TooLong => "frame_too_long",
        }
    }
}

impl Frame {
    /// Encodes the frame into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(VERSION);
        match self {
            Self::Keepalive => out.push(kind::KEEPALIVE),
            Self::Goodbye => out.push(kind::GOODBYE),
            Self::Offer { id, offer } => {
                out.push(kind::OFFER);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&offer.key);
                out.extend_from_slice(&offer.source.to_bytes());
                out.extend_from_slice(&offer.destination.to_bytes());
            }
            Self::OfferReply { id, result } => {
                out.push(kind::OFFER_REPLY);
                out.extend_from_slice(&id.to_le_bytes());
                out.push(result.code());
            }
            Self::Data(frame) => {
                out.push(kind::DATA);
                out.extend_from_slice(&frame.source.to_bytes());
                out.extend_from_slice(&frame.destination.to_bytes());
                out.extend_from_slice(&frame.seq.to_le_bytes());
                out.extend_from_slice(&frame.tag);
                out.extend_from_slice(&frame.payload);
            }
            Self::Close { source, destination } => {
                out.push(kind::CLOSE);
                out.extend_from_slice(&source.to_bytes());
                out.extend_from_slice(&destination.to_bytes());
            }
        }
    }

    /// Decodes a reassembled frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let (&version, rest) = bytes.split_first().ok_or(FrameError::Truncated)?;
        let (&kind, body) = rest.split_first().ok_or(FrameError::Truncated)?;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let exact =
            |len: usize| if body.len() == len { Ok(()) } else { Err(FrameError::Malformed(kind)) };
        let endpoint = |at: usize| Endpoint::decode(&body[at..at + ENDPOINT_SIZE]);
        let u32_at =
            |at: usize| u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        match kind {
            kind::KEEPALIVE => exact(0).map(|()| Self::Keepalive),
            kind::GOODBYE => exact(0).map(|()| Self::Goodbye),
            kind::OFFER => {
                exact(4 + KEY_SIZE + 2 * ENDPOINT_SIZE)?;
                let mut key = [0u8; KEY_SIZE];
                key.copy_from_slice(&body[4..4 + KEY_SIZE]);
                let offer = Offer {
                    key,
                    source: endpoint(4 + KEY_SIZE),
                    destination: endpoint(4 + KEY_SIZE + ENDPOINT_SIZE),
                };
                key.zeroize();
                Ok(Self::Offer { id: u32_at(0), offer })
            }
            kind::OFFER_REPLY => {
                exact(5)?;
                let result = OfferResult::from_code(body[4]).ok_or(FrameError::Malformed(kind))?;
                Ok(Self::OfferReply { id: u32_at(0), result })
            }
            kind::DATA => {
                if body.len() < DATA_HEAD || body.len() > DATA_HEAD + MAX_PAYLOAD {
                    return Err(FrameError::Malformed(kind));
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&body[24..32]);
                let mut tag = [0u8; TAG_SIZE];
                tag.copy_from_slice(&body[32..DATA_HEAD]);
                Ok(Self::Data(DataFrame {
                    source: endpoint(0),
                    destination: endpoint(ENDPOINT_SIZE),
                    seq: u64::from_le_bytes(seq),
                    payload: body[DATA_HEAD..].to_vec(),
                    tag,
                }))
            }
            kind::CLOSE => exact(2 * ENDPOINT_SIZE).map(|()| Self::Close {
                source: endpoint(0),
                destination: endpoint(ENDPOINT_SIZE),
            }),
            _ => Err(FrameError::Malformed(kind)),
        }
    }
}

/// Reassembles frames from transport-message plaintexts.
pub struct Assembler {
    buf: Vec<u8>,
}

impl Default for Assembler {
    fn default() -> Self {
        Self { buf: Vec::with_capacity(FRAME_MAX) }
    }
}

impl Assembler {
    /// Adds one plaintext; returns the frame's bytes when it was the last chunk.
    pub fn push(&mut self, plaintext: &[u8]) -> Result<Option<&[u8]>, FrameError> {
        let (&flags, chunk) = plaintext.split_first().ok_or(FrameError::Truncated)?;
        if flags & !1 != 0 {
            return Err(FrameError::Malformed(0));
        }
        if self.buf.len() + chunk.len() > FRAME_MAX {
            return Err(FrameError::TooLong);
        }
        self.buf.extend_from_slice(chunk);
        Ok((flags & 1 == 1).then_some(self.buf.as_slice()))
    }

    /// Forgets the frame just returned, wiping it (an offer's key passes through here).
    pub fn reset(&mut self) {
        self.buf.zeroize();
        self.buf.clear();
    }
}

/// Splits `frame` into transport-message plaintexts, each passed to `send`.
pub fn chunks(frame: &[u8], mut send: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    let mut plain = [0u8; MAX_PLAINTEXT];
    let mut parts = frame.chunks(MAX_CHUNK).peekable();
    while let Some(part) = parts.next() {
        plain[0] = u8::from(parts.peek().is_none());
        plain[1..=part.len()].copy_from_slice(part);
        send(&plain[..=part.len()])?;
    }
    plain.zeroize();
    Ok(())
}

/// Reads one length-prefixed message into `buf`; returns its length. The length is checked
/// before anything is read, and `buf` is never grown.
pub fn read_message(stream: &mut impl Read, buf: &mut [u8; MAX_MESSAGE]) -> io::Result<usize> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty link message"));
    }
    stream.read_exact(&mut buf[..len])?;
    Ok(len)
}

/// Writes one length-prefixed message.
pub fn write_message(stream: &mut impl Write, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "link message too long"))?;
    let mut out = Vec::with_capacity(2 + message.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    stream.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Endpoint = Endpoint { node: 1, partition: 2, process: 3 };
    const B: Endpoint = Endpoint { node: 4, partition: 5, process: 6 };

    fn round_trip(frame: &Frame) -> Frame {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        let mut assembler = Assembler::default();
        let mut out = None;
        chunks(&bytes, |plain| {
            if let Some(frame) = assembler.push(plain).unwrap() {
                out = Some(Frame::decode(frame).unwrap());
            }
            Ok(())
        })
        .unwrap();
        out.unwrap()
    }

    #[test]
    fn messages_are_length_prefixed_and_bounded() {
        let mut wire = Vec::new();
        write_message(&mut wire, b"abc").unwrap();
        assert_eq!(wire, [0, 3, b'a', b'b', b'c']);
        let mut buf = Box::new([0u8; MAX_MESSAGE]);
        assert_eq!(read_message(&mut wire.as_slice(), &mut buf).unwrap(), 3);
        assert!(read_message(&mut [0u8, 0].as_slice(), &mut buf).is_err(), "empty");
        assert!(read_message(&mut [0u8, 9, 1].as_slice(), &mut buf).is_err(), "truncated");
        assert!(write_message(&mut Vec::new(), &vec![0; 70_000]).is_err());
    }

    #[test]
    fn every_frame_round_trips_even_across_chunks() {
        let offer = Offer { key: [9; 32], source: A, destination: B };
        let Frame::Offer { id, offer: back } = round_trip(&Frame::Offer { id: 7, offer }) else {
            panic!()
        };
        assert_eq!((id, back.key, back.source, back.destination), (7, [9; 32], A, B));
        let reply = Frame::OfferReply {
            id: 7,
            result: OfferResult::Rejected(crate::cmm::frames::Rejection::NoListener),
        };
        assert!(matches!(
            round_trip(&reply),
            Frame::OfferReply {
                id: 7,
                result: OfferResult::Rejected(crate::cmm::frames::Rejection::NoListener)
            }
        ));
        let data = DataFrame {
            source: A,
            destination: B,
            seq: 42,
            payload: vec![5; MAX_PAYLOAD],
            tag: [1; 16],
        };
        let Frame::Data(back) = round_trip(&Frame::Data(data)) else { panic!() };
        assert_eq!(
            (back.seq, back.payload.len(), back.tag, back.source),
            (42, MAX_PAYLOAD, [1; 16], A)
        );
        assert!(matches!(
            round_trip(&Frame::Close { source: A, destination: B }),
            Frame::Close { .. }
        ));
        assert!(matches!(round_trip(&Frame::Keepalive), Frame::Keepalive));
    }

    #[test]
    fn frames_decode_strictly() {
        let err = |bytes: &[u8]| Frame::decode(bytes).err();
        assert_eq!(err(&[]), Some(FrameError::Truncated));
        assert_eq!(err(&[1]), Some(FrameError::Truncated));
        assert_eq!(err(&[2, 1]), Some(FrameError::Version(2)));
        assert_eq!(err(&[1, 99]), Some(FrameError::Malformed(99)));
        assert_eq!(err(&[1, kind::KEEPALIVE, 0]), Some(FrameError::Malformed(kind::KEEPALIVE)));
        assert_eq!(err(&[1, kind::OFFER, 0, 0]), Some(FrameError::Malformed(kind::OFFER)));
        assert_eq!(
            err(&[1, kind::OFFER_REPLY, 0, 0, 0, 0, 9]),
            Some(FrameError::Malformed(kind::OFFER_REPLY))
        );
        assert_eq!(err(&[1, kind::DATA, 0]), Some(FrameError::Malformed(kind::DATA)));
        let mut assembler = Assembler::default();
        assert_eq!(assembler.push(&[]).err(), Some(FrameError::Truncated));
        assert_eq!(assembler.push(&[2, 0]).err(), Some(FrameError::Malformed(0)));
        let big = vec![0u8; MAX_CHUNK + 1];
        assert!(assembler.push(&big).unwrap().is_none());
        assert_eq!(assembler.push(&big).err(), Some(FrameError::TooLong));
    }

    /// A small deterministic generator, so the random tests below are reproducible.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut state = 0x5eed_u64;
        let mut assembler = Assembler::default();
        for _ in 0..50_000 {
            let len = (xorshift(&mut state) % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
            // Half the time, a valid version and type, so the bodies' checks are reached too.
            if len >= 2 && xorshift(&mut state).is_multiple_of(2) {
                bytes[0] = VERSION;
                bytes[1] = (xorshift(&mut state) % 8) as u8;
            }
            let _ = Frame::decode(&bytes);
            if let Ok(Some(frame)) = assembler.push(&bytes) {
                let _ = Frame::decode(frame);
            }
            assembler.reset();
        }
    }
}
