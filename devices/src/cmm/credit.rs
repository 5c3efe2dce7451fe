//! Flow control between nodes (docs/PROTOCOL.md, section 8, "Credit"): on a link of version 3
//! each direction of a channel may run at most [`WINDOW`] messages ahead of what the receiving
//! guest has taken. The receiver grants with CREDIT frames (a limit on `seq`); a sender out of
//! credit answers its guest NO_ROOM and sends nothing, so a receiver that falls behind stalls
//! its own sender and never makes its node drop a message. Channels within one node need no
//! frames (the device sees the receiver's room itself), and vsock connections carry their own
//! credit in their envelope.
//!
//! A grant is a promise to hold what it lets in, so what a partition's senders on other nodes
//! were granted and its guest has not taken is bounded by [`BUDGET`] messages, plus a
//! [`FLOOR`] that every channel gets whatever the others hold, whatever they do: a channel that
//! closes gives back what it will never use and keeps charged what its guest has still to take.
//! Channels the budget cannot serve beyond their floor wait for it, oldest first.

use guest_agent::channel::abi::Endpoint;

use super::connection_table::{ChannelId, ChannelState};
use super::manager::{Core, Reply};

/// Messages a sender may have sent beyond what its receiver has taken.
pub const WINDOW: u64 = 64;
/// Messages all of a partition's metered channels together may have been granted and not
/// taken beyond their floors (at most 64 MiB at 64 KiB a message).
pub const BUDGET: u64 = 1024;
/// Messages each open metered channel may have granted and not taken, budget or not, so that
/// a partition's channels beyond the first `BUDGET / WINDOW` still move while the first hold
/// the budget. What all of a partition's channels hold is bounded by `BUDGET + FLOOR *` its
/// channel limit (1,280 messages with the default 64 channels).
pub const FLOOR: u64 = 4;

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
    /// the peer is granted its first window, as far as the budget allows.
    pub(super) fn meter(&mut self, node: u32, id: ChannelId) {
        if !self.credit_links.contains(&node) {
            return;
        }
        let Some(entry) = self.table.get_mut(id) else { return };
        if entry.flow != Flow::Unmetered {
            return;
        }
        entry.flow = Flow::Metered(Credit { tx_limit: 0, rx_granted: 0, rx_taken: 0 });
        let partition = entry.local.partition;
        self.wanting.push_back(id);
        self.serve_wanting(partition);
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

    /// The guest of `partition` took a message of channel `id`: once it has taken half the
    /// window since the last grant, the channel asks for a whole window beyond what it took.
    pub(super) fn taken(&mut self, partition: u32, id: ChannelId) {
        if let Some((owner, held)) = self.closed_held.get_mut(&id) {
            *held -= 1;
            let owner = *owner;
            if *held == 0 {
                self.closed_held.remove(&id);
            }
            self.unpromise(owner, 1);
            return self.serve_wanting(owner);
        }
        let Some(entry) = self.table.get_mut(id) else { return };
        let Flow::Metered(credit) = &mut entry.flow else { return };
        credit.rx_taken += 1;
        let low = credit.rx_granted.saturating_sub(credit.rx_taken) <= WINDOW / 2;
        self.unpromise(partition, 1);
        if low && !self.wanting.contains(&id) {
            self.wanting.push_back(id);
        }
        self.serve_wanting(partition);
    }

    /// Grants the channels of `partition` that wait for credit, oldest first, as far as its
    /// budget goes: each up to a window beyond what its guest took.
    fn serve_wanting(&mut self, partition: u32) {
        let mut waiting = std::mem::take(&mut self.wanting);
        waiting.retain(|&id| {
            let Some(entry) = self.table.get_mut(id) else { return false };
            let Flow::Metered(credit) = &mut entry.flow else { return false };
            if entry.local.partition != partition {
                return true;
            }
            let promised = self.promised.get(&partition).copied().unwrap_or(0);
            let want = (credit.rx_taken + WINDOW).saturating_sub(credit.rx_granted);
            let outstanding = credit.rx_granted.saturating_sub(credit.rx_taken);
            // Up to its floor, any channel is served while the hard bound has room; beyond
            // it, from the budget.
            let hard = BUDGET + FLOOR * u64::from(self.limits.max_channels);
            let floor = FLOOR.saturating_sub(outstanding).min(hard.saturating_sub(promised));
            let grant = want.min(floor.max(BUDGET.saturating_sub(promised)));
            if grant > 0 && entry.state == ChannelState::Open {
                // A sender with a quarter of a window still to use by what came in needs no
                // record of its own for this: the grant rides with the next one.
                let urgent = credit.rx_granted.saturating_sub(entry.rx_seq) < WINDOW / 4;
                credit.rx_granted += grant;
                *self.promised.entry(partition).or_default() += grant;
                let (source, destination) = (entry.local, entry.remote);
                let limit = credit.rx_granted;
                let reply = Reply::Credit { source, destination, limit, urgent };
                self.replies.push((destination.node, reply));
            }
            grant < want
        });
        self.wanting = waiting;
    }

    /// A metered channel `id` ends: what it was granted and will never receive goes back to
    /// its partition's budget; what it received and its guest has not taken stays charged
    /// until taken.
    pub(super) fn release_credit(&mut self, id: ChannelId) {
        let Some(entry) = self.table.get_mut(id) else { return };
        let Flow::Metered(credit) = entry.flow else { return };
        entry.flow = Flow::Unmetered;
        let partition = entry.local.partition;
        let unused = credit.rx_granted.saturating_sub(entry.rx_seq);
        let held = entry.rx_seq.saturating_sub(credit.rx_taken);
        self.unpromise(partition, unused);
        if held > 0 {
            self.closed_held.insert(id, (partition, held));
        }
        self.wanting.retain(|&w| w != id);
        self.serve_wanting(partition);
    }

    /// Partition `partition` stopped (its channels ended already): what its device held went
    /// with it, so nothing stays charged to it, and a run started again has its whole budget.
    pub(super) fn forget_credit(&mut self, partition: u32) {
        self.promised.remove(&partition);
        self.closed_held.retain(|_, (owner, _)| *owner != partition);
    }

    fn unpromise(&mut self, partition: u32, count: u64) {
        if let Some(promised) = self.promised.get_mut(&partition) {
            *promised = promised.saturating_sub(count);
        }
    }
}
