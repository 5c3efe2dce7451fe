//! Link framing. On the TCP stream every message is a 2-byte big-endian length and that many
//! bytes (a Noise handshake or transport message, so at most 65,535). Inside the transport
//! encryption every frame starts with a version byte and a type byte.

use std::io::{self, Read, Write};

/// Protocol version of the frames.
pub const VERSION: u8 = 1;
/// Largest Noise message.
pub const MAX_MESSAGE: usize = 65_535;

/// Frame types.
pub mod kind {
    /// Nothing to say; proves the link alive.
    pub const KEEPALIVE: u8 = 1;
    /// The sender is closing the link on purpose.
    pub const GOODBYE: u8 = 2;
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

/// A decrypted frame, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// [`kind::KEEPALIVE`].
    Keepalive,
    /// [`kind::GOODBYE`].
    Goodbye,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the two header bytes.
    Truncated,
    /// Another protocol version.
    Version(u8),
    /// An unknown type, or a known one with a body it must not have.
    Malformed(u8),
}

impl FrameError {
    /// The reason as the audit log names it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "truncated_frame",
            Self::Version(_) => "unsupported_version",
            Self::Malformed(_) => "malformed_frame",
        }
    }
}

impl Frame {
    /// Encodes the frame.
    pub fn encode(self) -> [u8; 2] {
        match self {
            Self::Keepalive => [VERSION, kind::KEEPALIVE],
            Self::Goodbye => [VERSION, kind::GOODBYE],
        }
    }

    /// Decodes a decrypted frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let (&version, rest) = bytes.split_first().ok_or(FrameError::Truncated)?;
        let (&kind, body) = rest.split_first().ok_or(FrameError::Truncated)?;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        match (kind, body.is_empty()) {
            (kind::KEEPALIVE, true) => Ok(Self::Keepalive),
            (kind::GOODBYE, true) => Ok(Self::Goodbye),
            _ => Err(FrameError::Malformed(kind)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn frames_decode_strictly() {
        assert_eq!(Frame::decode(&Frame::Keepalive.encode()), Ok(Frame::Keepalive));
        assert_eq!(Frame::decode(&Frame::Goodbye.encode()), Ok(Frame::Goodbye));
        assert_eq!(Frame::decode(&[]), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[1]), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[2, 1]), Err(FrameError::Version(2)));
        assert_eq!(Frame::decode(&[1, 9]), Err(FrameError::Malformed(9)));
        assert_eq!(Frame::decode(&[1, 1, 0]), Err(FrameError::Malformed(1)));
    }
}
