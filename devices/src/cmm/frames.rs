//! What CMMs tell each other about offers, messages and closes, as codes the wire carries and
//! reasons the audit log names (docs/PROTOCOL.md).

/// Why a receiving CMM refused an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No LISTEN entry matches source and destination.
    NoListener,
    /// The source claims a node other than the one the offer came from.
    ForgedSourceNode,
    /// The destination is not on this node.
    NotLocal,
    /// The connection or key table is full.
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

/// Why a receiving CMM dropped a message.
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
    /// Sealed under an epoch the channel has moved past.
    RetiredEpoch,
    /// An epoch more than one ahead of the channel's.
    BadEpoch,
    /// Beyond the credit the receiver granted (docs/PROTOCOL.md, section 8).
    OverCredit,
}

impl DataRejection {
    /// The reason as the audit log names it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoChannel => "no_channel",
            Self::ForgedSourceNode => "forged_source_node",
            Self::Replayed => "replayed_or_reordered",
            Self::BadTag => "bad_tag",
            Self::RetiredEpoch => "retired_epoch",
            Self::BadEpoch => "bad_epoch",
            Self::OverCredit => "over_credit",
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

/// Why a channel was closed at its sender's end, as CLOSE carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The owning process closed it.
    Closed,
    /// The operator revoked it.
    Revoked,
    /// Its partition stopped.
    PartitionStopped,
}

impl CloseReason {
    /// The code CLOSE carries.
    pub fn code(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Revoked => 1,
            Self::PartitionStopped => 2,
        }
    }

    /// Decodes a code; `None` if unknown.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Closed,
            1 => Self::Revoked,
            2 => Self::PartitionStopped,
            _ => return None,
        })
    }

    /// The reason as the audit log names it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Closed => "peer_closed",
            Self::Revoked => "peer_revoked",
            Self::PartitionStopped => "peer_partition_stopped",
        }
    }
}
