//! The connection table (claims 8, 13, 17): which local process may talk with which remote
//! process, in which partition, on which node. Guests read their own partition's entries
//! (LIST); keys are not here but in the key table, referred to by slot.

use std::collections::HashMap;

use guest_agent::channel::abi::{state, ChannelInfo, Endpoint};

use super::key_table::KeySlot;

/// Identifies an entry: slot index in the low 16 bits, the slot's generation in the high 16,
/// so that a stale ID never names a newer entry. Never 0.
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
    /// The peer closed it (or it was revoked); its key is gone.
    PeerClosed,
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
    /// Messages sent.
    pub sent: u64,
    /// Messages delivered.
    pub received: u64,
    /// Messages dropped: bad proof, replay, no room.
    pub dropped: u64,
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
            sent: 0,
            received: 0,
            dropped: 0,
        }
    }

    /// The entry as LIST shows it.
    pub fn info(&self, id: ChannelId) -> ChannelInfo {
        let state = match self.state {
            ChannelState::Listening => state::LISTENING,
            ChannelState::Offering => state::OFFERING,
            ChannelState::Open => state::OPEN,
            ChannelState::PeerClosed => state::PEER_CLOSED,
        };
        ChannelInfo {
            channel: id.0,
            state,
            process: self.local.process,
            remote: self.remote,
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

struct Slot {
    generation: u16,
    entry: Option<Entry>,
}

/// The table: fixed number of slots, indexed by endpoint pair as well as by ID.
pub struct ConnectionTable {
    slots: Vec<Slot>,
    by_pair: HashMap<(Endpoint, Endpoint), usize>,
}

impl ConnectionTable {
    /// A table of `capacity` entries (at most 65,535).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(usize::from(u16::MAX));
        Self {
            slots: (0..capacity).map(|_| Slot { generation: 1, entry: None }).collect(),
            by_pair: HashMap::with_capacity(capacity),
        }
    }

    fn id(index: usize, generation: u16) -> ChannelId {
        ChannelId((u32::from(generation) << 16) | index as u32)
    }

    fn index(&self, id: ChannelId) -> Option<usize> {
        let index = (id.0 & 0xffff) as usize;
        let slot = self.slots.get(index)?;
        (slot.entry.is_some() && u32::from(slot.generation) == id.0 >> 16).then_some(index)
    }

    /// Adds `entry`.
    pub fn insert(&mut self, entry: Entry) -> Result<ChannelId, InsertError> {
        let pair = (entry.local, entry.remote);
        if self.by_pair.contains_key(&pair) {
            return Err(InsertError::Exists);
        }
        let index = self.slots.iter().position(|s| s.entry.is_none()).ok_or(InsertError::Full)?;
        let slot = &mut self.slots[index];
        slot.entry = Some(entry);
        self.by_pair.insert(pair, index);
        Ok(Self::id(index, slot.generation))
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
        let index = *self.by_pair.get(&(*local, *remote))?;
        Some(Self::id(index, self.slots[index].generation))
    }

    /// Removes and returns entry `id`; its slot gets a new generation.
    pub fn remove(&mut self, id: ChannelId) -> Option<Entry> {
        let index = self.index(id)?;
        let slot = &mut self.slots[index];
        let entry = slot.entry.take()?;
        slot.generation = slot.generation.checked_add(1).unwrap_or(1);
        self.by_pair.remove(&(entry.local, entry.remote));
        Some(entry)
    }

    /// Every entry, with its ID.
    pub fn all(&self) -> impl Iterator<Item = (ChannelId, &Entry)> {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            Some((Self::id(index, slot.generation), slot.entry.as_ref()?))
        })
    }

    /// The entries of `partition`, with their IDs.
    pub fn of_partition(&self, partition: u32) -> impl Iterator<Item = (ChannelId, &Entry)> {
        self.slots.iter().enumerate().filter_map(move |(index, slot)| {
            let entry = slot.entry.as_ref()?;
            (entry.local.partition == partition).then(|| (Self::id(index, slot.generation), entry))
        })
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
        assert_eq!(table.of_partition(1).count(), 1);
        assert!(table.get(ChannelId(0xffff_ffff)).is_none());
    }
}
