//! What CMMs say to each other: key offers and their answers, data and close notices. On one
//! node they are passed by value; between nodes the host link carries them (docs/PROTOCOL.md).

use guest_agent::channel::abi::Endpoint;
use zeroize::Zeroize;

use super::crypto::{KEY_SIZE, TAG_SIZE};

/// A key offer (claim 1): the key, and who it is from and for.
pub struct Offer {
    /// The channel key.
    pub key: [u8; KEY_SIZE],
    /// The offering endpoint.
    pub source: Endpoint,
    /// The endpoint it is offered to.
    pub destination: Endpoint,
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Why a receiving CMM refused an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No LISTEN entry matches source and destination.
    NoListener,
    /// The source claims a node other than the one the offer came from.
    ForgedSourceNode,
    /// The destination is not on this node.
    NotLocal,
    /// The key table is full.
    TableFull,
}

impl Rejection {
    /// The reason as the audit log and the protocol name it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoListener => "no_listener",
            Self::ForgedSourceNode => "forged_source_node",
            Self::NotLocal => "destination_not_local",
            Self::TableFull => "table_full",
        }
    }
}

/// One message on its way: the ciphertext and its proof.
pub struct DataFrame {
    /// Sender.
    pub source: Endpoint,
    /// Receiver.
    pub destination: Endpoint,
    /// Position on the channel, in the sender's direction.
    pub seq: u64,
    /// Encrypted payload.
    pub payload: Vec<u8>,
    /// AES-GCM tag over payload, endpoints and sequence number.
    pub tag: [u8; TAG_SIZE],
}

/// Why a receiving CMM dropped a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRejection {
    /// No open channel between the endpoints.
    NoChannel,
    /// The source claims a node other than the one the frame came from.
    ForgedSourceNode,
    /// The sequence number was seen before, or is out of order.
    Replayed,
    /// The proof of the key failed.
    BadTag,
}

impl DataRejection {
    /// The reason as the audit log names it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoChannel => "no_channel",
            Self::ForgedSourceNode => "forged_source_node",
            Self::Replayed => "replayed_or_reordered",
            Self::BadTag => "bad_tag",
        }
    }
}

/// The answer to an offer, as OFFER_REPLY carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferResult {
    /// Stored; the channel is open.
    Accepted,
    /// Refused.
    Rejected(Rejection),
}

impl OfferResult {
    /// The code OFFER_REPLY carries.
    pub fn code(self) -> u8 {
        match self {
            Self::Accepted => 0,
            Self::Rejected(Rejection::NoListener) => 1,
            Self::Rejected(Rejection::ForgedSourceNode) => 2,
            Self::Rejected(Rejection::NotLocal) => 3,
            Self::Rejected(Rejection::TableFull) => 4,
        }
    }

    /// Decodes a code; `None` if unknown.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Accepted,
            1 => Self::Rejected(Rejection::NoListener),
            2 => Self::Rejected(Rejection::ForgedSourceNode),
            3 => Self::Rejected(Rejection::NotLocal),
            4 => Self::Rejected(Rejection::TableFull),
            _ => return None,
        })
    }
}
