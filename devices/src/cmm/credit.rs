//! Flow control between nodes (docs/PROTOCOL.md, section 8, "Credit"): on a link of version 3
//! each direction of a channel may run at most [`WINDOW`] messages ahead of what the receiving
//! guest has taken. The receiver grants with CREDIT frames (a limit on `seq`); a sender out of
//! credit answers its guest NO_ROOM and sends nothing, so a receiver that falls behind stalls
//! its own sender and never makes its node drop a message. Channels within one node need no
//! frames (the device sees the receiver's room itself), and vsock connections carry their own
//! credit in their envelope.

use guest_agent::channel::abi::Endpoint;

use super::connection_table::{ChannelId, ChannelState};
use super::manager::{Core, Reply};

/// Messages a sender may have sent beyond what its receiver has taken.
pub const WINDOW: u64 = 64;

/// How a channel's messages are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flow {
    /// Not by CREDIT frames: a channel within this node, or over a link of version 2.
    #[default]
    Unmetered,
    /// By the vsock envelope's own credit fields (docs/VSOCK.md).
    Vsock,
    /// By CREDIT frames.
    Metered(Credit),
}

/// Both directions' credit on a metered channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The first `seq` this end may not send yet (granted by the peer).
    pub tx_limit: u64,
    /// The first `seq` the peer may not send yet (granted by this end).
    pub rx_granted: u64,
    /// Messages the guest has taken (written into its buffers, or dropped as too big).
    pub rx_taken: u64,
}

impl Core {
    /// Channel `id` just opened with `node`: over a link of version 3 it becomes metered and
    /// the peer is granted its first window.
    pub(super) fn meter(&mut self, node: u32, id: ChannelId) {
        if !self.credit_links.contains(&node) {
            return;
        }
        let Some(entry) = self.table.get_mut(id) else { return };
        if entry.flow != Flow::Unmetered {
            return;
        }
        entry.flow = Flow::Metered(Credit { tx_limit: 0, rx_granted: WINDOW, rx_taken: 0 });
        let (source, destination) = (entry.local, entry.remote);
        self.replies.push((node, Reply::Credit { source, destination, limit: WINDOW }));
    }

    /// Channel `id` carries a vsock connection: its envelope paces it.
    pub(super) fn carries_vsock(&mut self, id: ChannelId) {
        if let Some(entry) = self.table.get_mut(id) {
            entry.flow = Flow::Vsock;
        }
    }

    /// Whether channel `id` may send its next message to another node now.
    pub(super) fn may_send(&self, id: ChannelId) -> bool {
        self.table.get(id).is_none_or(|entry| match entry.flow {
            Flow::Metered(credit) => entry.tx_seq < credit.tx_limit,
            Flow::Unmetered | Flow::Vsock => true,
        })
    }

    /// Whether the message `seq` from the peer of channel `id` is within what was granted.
    pub(super) fn within_credit(&self, id: ChannelId, seq: u64) -> bool {
        self.table.get(id).is_none_or(|entry| match entry.flow {
            Flow::Metered(credit) => seq < credit.rx_granted,
            Flow::Unmetered | Flow::Vsock => true,
        })
    }

    /// CREDIT from `node`: `source` (there) lets `destination` (here) send below `limit`.
    /// Limits only grow; a grant for a channel that is gone (it may cross a CLOSE) or is not
    /// metered changes nothing.
    pub(super) fn receive_credit(
        &mut self,
        node: u32,
        source: Endpoint,
        destination: Endpoint,
        limit: u64,
    ) {
        if source.node != node {
            self.audit_from(node, "credit_rejected", "forged_source_node", &source, &destination);
            return;
        }
        let Some(id) = self.table.find(&destination, &source) else { return };
        let Some(entry) = self.table.get_mut(id) else { return };
        if let (ChannelState::Open, Flow::Metered(credit)) = (entry.state, &mut entry.flow) {
            credit.tx_limit = credit.tx_limit.max(limit);
        }
    }

    /// The guest took a message of channel `id`: once it has taken half the window since the
    /// last grant, the peer is granted a whole window beyond what it took.
    pub(super) fn taken(&mut self, id: ChannelId) {
        let Some(entry) = self.table.get_mut(id) else { return };
        let Flow::Metered(credit) = &mut entry.flow else { return };
        credit.rx_taken += 1;
        if credit.rx_granted.saturating_sub(credit.rx_taken) > WINDOW / 2 {
            return;
        }
        credit.rx_granted = credit.rx_taken + WINDOW;
        let limit = credit.rx_granted;
        let (source, destination) = (entry.local, entry.remote);
        if entry.state == ChannelState::Open {
            self.replies.push((destination.node, Reply::Credit { source, destination, limit }));
        }
    }
}
