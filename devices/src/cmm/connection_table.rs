//! The connection table (claims 8, 13, 17): which local process may talk with which remote
//! process, in which partition, on which node. Guests read their own partition's entries
//! (LIST); keys are not here but in the key table, referred to by slot.
//!
//! Sized for a million channels: entries are found by ID or by endpoint pair in O(1), free
//! slots are reused oldest-first (so a stale ID takes long to name a new entry), and each
//! partition's entries are indexed so LIST and the per-partition limit never scan the table.
//! Memory grows with the entries in use, not with the capacity.

use std::collections::{BTreeSet, HashMap, VecDeque};

use guest_agent::channel::abi::{closed, state, ChannelInfo, Endpoint};

use super::credit::Flow;
use super::frames::CloseReason;
use super::key_table::KeySlot;
use crate::crypto::channel::SALT_SIZE;

/// Identifies an entry: its slot index in the low bits (as many as the capacity needs), the
/// slot's generation in the rest, so that a stale ID never names a newer entry. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelId(pub u32);

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// A LISTEN waiting for the remote endpoint's offer.
    Listening,
    /// An OPEN whose offer awaits the remote CMM's answer.
    Offering,
    /// Keyed: messages flow.
    Open,
    /// The peer's end is gone, for this reason; so is the key.
    PeerClosed(Closure),
}

/// Why a channel's peer end is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closure {
    /// The peer's CMM closed it, for this reason.
    Peer(CloseReason),
    /// The host link to the peer's node was lost.
    LinkDown,
}

impl Closure {
    /// The code LIST carries (`abi::closed`).
    pub fn code(self) -> u32 {
        match self {
            Self::Peer(CloseReason::Closed) => closed::BY_PEER,
            Self::Peer(CloseReason::Revoked) => closed::REVOKED,
            Self::Peer(CloseReason::PartitionStopped) => closed::PARTITION_STOPPED,
            Self::LinkDown => closed::LINK_DOWN,
        }
    }
}

/// One connection-table entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The local process (this node, its partition).
    pub local: Endpoint,
    /// The remote process.
    pub remote: Endpoint,
    /// State.
    pub state: ChannelState,
    /// The key-table slot, once keyed.
    pub key: Option<KeySlot>,
    /// Sequence number of the next message sent.
    pub tx_seq: u64,
    /// Sequence number the next received message must carry.
    pub rx_seq: u64,
    /// Key epoch of the messages sent.
    pub tx_epoch: u32,
    /// Key epoch of the messages received.
    pub rx_epoch: u32,
    /// Messages sealed in the current sending epoch.
    pub epoch_sent: u32,
    /// When the current sending epoch began, in seconds of the CMM's clock.
    pub epoch_since: u32,
    /// The offer's salt (public: it only makes this channel's keys its own).
    pub salt: [u8; SALT_SIZE],
    /// Messages sent.
    pub sent: u64,
    /// Messages delivered.
    pub received: u64,
    /// Messages dropped: bad proof, replay, no room.
    pub dropped: u64,
    /// How its messages are paced between nodes.
    pub flow: Flow,
}

impl Entry {
    /// A fresh entry.
    pub fn new(local: Endpoint, remote: Endpoint, state: ChannelState) -> Self {
        Self {
            local,
            remote,
            state,
            key: None,
            tx_seq: 0,
            rx_seq: 0,
            tx_epoch: 0,
            rx_epoch: 0,
            epoch_sent: 0,
            epoch_since: 0,
            salt: [0; SALT_SIZE],
            sent: 0,
            received: 0,
            dropped: 0,
            flow: Flow::Unmetered,
        }
    }

    /// The entry as LIST shows it.
    pub fn info(&self, id: ChannelId) -> ChannelInfo {
        let (state, closed) = match self.state {
            ChannelState::Listening => (state::LISTENING, closed::NOT_CLOSED),
            ChannelState::Offering => (state::OFFERING, closed::NOT_CLOSED),
            ChannelState::Open => (state::OPEN, closed::NOT_CLOSED),
            ChannelState::PeerClosed(why) => (state::PEER_CLOSED, why.code()),
        };
        ChannelInfo {
            channel: id.0,
            state,
            process: self.local.process,
            remote: self.remote,
            closed,
            sent: self.sent,
            received: self.received,
            dropped: self.dropped,
        }
    }
}

/// Why an entry could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// An entry for the same pair of endpoints exists.
    Exists,
    /// No free slot.
    Full,
}

/// Freed slots held back before one is reused.
const REUSE_AFTER: usize = 64;

struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// The by-pair index's key: both endpoints' six numbers as one array, which SipHash takes as
/// one slice where the two structs took six fields (the lookup runs for every message
/// received).
type PairKey = [u32; 6];

fn pair_key(local: &Endpoint, remote: &Endpoint) -> PairKey {
    // Destructured, so that a field added to `Endpoint` cannot be left out of the key.
    let Endpoint { node, partition, process } = *local;
    let Endpoint { node: rnode, partition: rpartition, process: rprocess } = *remote;
    [node, partition, process, rnode, rpartition, rprocess]
}

/// The table.
pub struct ConnectionTable {
    capacity: usize,
    index_bits: u32,
    slots: Vec<Slot>,
    free: VecDeque<u32>,
    by_pair: HashMap<PairKey, u32>,
    partitions: HashMap<u32, BTreeSet<u32>>,
    len: usize,
}

impl ConnectionTable {
    /// A table of at most `capacity` entries (at most 2^24); nothing is allocated up front.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, 1 << 24);
        let index_bits = usize::BITS - (capacity - 1).max(1).leading_zeros();
        Self {
            capacity,
            index_bits,
            slots: Vec::new(),
            free: VecDeque::new(),
            by_pair: HashMap::new(),
            partitions: HashMap::new(),
            len: 0,
        }
    }

    /// Most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn generations(&self) -> u32 {
        1 << (32 - self.index_bits).min(31)
    }

    fn id(&self, index: u32, generation: u32) -> ChannelId {
        ChannelId((generation << self.index_bits) | index)
    }

    fn index(&self, id: ChannelId) -> Option<usize> {
        let index = (id.0 & ((1 << self.index_bits) - 1)) as usize;
        let slot = self.slots.get(index)?;
        (slot.entry.is_some() && slot.generation == id.0 >> self.index_bits).then_some(index)
    }

    /// Adds `entry`.
    pub fn insert(&mut self, entry: Entry) -> Result<ChannelId, InsertError> {
        let pair = pair_key(&entry.local, &entry.remote);
        if self.by_pair.contains_key(&pair) {
            return Err(InsertError::Exists);
        }
        // A freed slot waits until REUSE_AFTER others were freed after it (or the table is
        // full), so a stale ID rarely even names a live slot.
        let index = if self.free.len() > REUSE_AFTER || self.slots.len() >= self.capacity {
            self.free.pop_front().ok_or(InsertError::Full)?
        } else {
            self.slots.push(Slot { generation: 1, entry: None });
            (self.slots.len() - 1) as u32
        };
        self.partitions.entry(entry.local.partition).or_default().insert(index);
        self.by_pair.insert(pair, index);
        let slot = &mut self.slots[index as usize];
        slot.entry = Some(entry);
        self.len += 1;
        let generation = slot.generation;
        Ok(self.id(index, generation))
    }

    /// The entry `id`.
    pub fn get(&self, id: ChannelId) -> Option<&Entry> {
        self.slots[self.index(id)?].entry.as_ref()
    }

    /// The entry `id`, mutable.
    pub fn get_mut(&mut self, id: ChannelId) -> Option<&mut Entry> {
        let index = self.index(id)?;
        self.slots[index].entry.as_mut()
    }

    /// The entry for `local` talking with `remote`.
    pub fn find(&self, local: &Endpoint, remote: &Endpoint) -> Option<ChannelId> {
        let index = *self.by_pair.get(&pair_key(local, remote))?;
        Some(self.id(index, self.slots[index as usize].generation))
    }

    /// Removes and returns entry `id`; its slot gets a new generation.
    pub fn remove(&mut self, id: ChannelId) -> Option<Entry> {
        let index = self.index(id)?;
        let generations = self.generations();
        let slot = &mut self.slots[index];
        let entry = slot.entry.take()?;
        // Generation 0 is skipped, so that no ID is ever 0.
        slot.generation = (slot.generation + 1) % generations;
        if slot.generation == 0 {
            slot.generation = 1;
        }
        self.by_pair.remove(&pair_key(&entry.local, &entry.remote));
        if let Some(set) = self.partitions.get_mut(&entry.local.partition) {
            set.remove(&(index as u32));
            if set.is_empty() {
                self.partitions.remove(&entry.local.partition);
            }
        }
        self.free.push_back(index as u32);
        self.len -= 1;
        Some(entry)
    }

    /// Every entry, with its ID.
    pub fn all(&self) -> impl Iterator<Item = (ChannelId, &Entry)> {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            Some((self.id(index as u32, slot.generation), slot.entry.as_ref()?))
        })
    }

    /// Entries of `partition`.
    pub fn count_of(&self, partition: u32) -> usize {
        self.partitions.get(&partition).map_or(0, BTreeSet::len)
    }

    /// The entries of `partition`, with their IDs, in slot order.
    pub fn of_partition(&self, partition: u32) -> impl Iterator<Item = (ChannelId, &Entry)> {
        self.partitions.get(&partition).into_iter().flatten().filter_map(move |&index| {
            let slot = &self.slots[index as usize];
            Some((self.id(index, slot.generation), slot.entry.as_ref()?))
        })
    }

    /// The IDs of `partition`'s entries.
    pub fn ids_of(&self, partition: u32) -> Vec<ChannelId> {
        self.of_partition(partition).map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmm::test_endpoints::{A, B};

    #[test]
    fn ids_find_entries_and_go_stale_on_removal() {
        let mut table = ConnectionTable::new(2);
        let id = table.insert(Entry::new(A, B, ChannelState::Listening)).unwrap();
        assert_ne!(id.0, 0);
        assert_eq!(table.find(&A, &B), Some(id));
        assert_eq!(
            table.insert(Entry::new(A, B, ChannelState::Open)).unwrap_err(),
            InsertError::Exists
        );
        assert!(table.remove(id).is_some());
        assert!(table.get(id).is_none());
        let again = table.insert(Entry::new(A, B, ChannelState::Open)).unwrap();
        assert_ne!(again, id, "a new generation");
        assert!(table.get(id).is_none(), "the stale ID names nothing");
        table.insert(Entry::new(B, A, ChannelState::Open)).unwrap();
        assert_eq!(
            table.insert(Entry::new(A, A, ChannelState::Open)).unwrap_err(),
            InsertError::Full
        );
        assert_eq!(table.count_of(1), 1);
        assert_eq!(table.of_partition(2).count(), 1);
        assert!(table.get(ChannelId(0xffff_ffff)).is_none());
    }

    #[test]
    fn ids_fit_the_capacity_and_freed_slots_wait_their_turn() {
        let ep = |process| Endpoint { node: 1, partition: 1, process };
        let mut table = ConnectionTable::new(1 << 20);
        let first = table.insert(Entry::new(ep(1), ep(0), ChannelState::Open)).unwrap();
        let second = table.insert(Entry::new(ep(2), ep(0), ChannelState::Open)).unwrap();
        assert_eq!(first.0 & 0xf_ffff, 0);
        assert_eq!(second.0 & 0xf_ffff, 1);
        table.remove(first);
        let third = table.insert(Entry::new(ep(3), ep(0), ChannelState::Open)).unwrap();
        assert_eq!(third.0 & 0xf_ffff, 2, "a fresh slot before a freed one");
        assert_eq!(table.len(), 2);
    }
}
