//! The key table (claims 9, 12, 14): one slot per connection-table entry, in secret memory that
//! only the CMM reads. Nothing here is ever copied into a guest, a log line or a response; a
//! removed key is zeroed at once.

use std::io;

use zeroize::Zeroize;

use super::crypto::KEY_SIZE;
use super::secret_memory::SecretRegion;

/// What a slot holds: the channel key and the two keys derived from it (zeroized on drop).
pub struct ChannelKeys {
    /// The key exchanged in the offer.
    pub channel: [u8; KEY_SIZE],
    /// Key of messages this side sends.
    pub tx: [u8; KEY_SIZE],
    /// Key of messages this side receives.
    pub rx: [u8; KEY_SIZE],
}

const SLOT_SIZE: usize = 3 * KEY_SIZE;

/// A slot in the key table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot(usize);

/// Fixed-size table of channel keys in secret memory.
pub struct KeyTable {
    region: SecretRegion,
    used: Vec<bool>,
}

impl KeyTable {
    /// A table of `slots` keys.
    pub fn new(slots: usize) -> io::Result<Self> {
        Ok(Self { region: SecretRegion::new(slots * SLOT_SIZE)?, used: vec![false; slots] })
    }

    /// Stores `keys` in a free slot; `None` when the table is full. The caller's copy should
    /// be zeroized by the caller.
    pub fn insert(&mut self, keys: &ChannelKeys) -> Option<KeySlot> {
        let index = self.used.iter().position(|used| !used)?;
        self.used[index] = true;
        let slot = &mut self.region.bytes_mut()[index * SLOT_SIZE..(index + 1) * SLOT_SIZE];
        slot[..KEY_SIZE].copy_from_slice(&keys.channel);
        slot[KEY_SIZE..2 * KEY_SIZE].copy_from_slice(&keys.tx);
        slot[2 * KEY_SIZE..].copy_from_slice(&keys.rx);
        Some(KeySlot(index))
    }

    /// The sending key of `slot`.
    pub fn tx(&self, slot: KeySlot) -> &[u8; KEY_SIZE] {
        self.key_at(slot, KEY_SIZE)
    }

    /// The receiving key of `slot`.
    pub fn rx(&self, slot: KeySlot) -> &[u8; KEY_SIZE] {
        self.key_at(slot, 2 * KEY_SIZE)
    }

    fn key_at(&self, slot: KeySlot, offset: usize) -> &[u8; KEY_SIZE] {
        let start = slot.0 * SLOT_SIZE + offset;
        self.region.bytes()[start..start + KEY_SIZE]
            .try_into()
            .expect("slot bounds are fixed by SLOT_SIZE")
    }

    /// Zeroes and frees `slot`.
    pub fn remove(&mut self, slot: KeySlot) {
        if let Some(used) = self.used.get_mut(slot.0) {
            *used = false;
            self.region.bytes_mut()[slot.0 * SLOT_SIZE..(slot.0 + 1) * SLOT_SIZE].zeroize();
        }
    }

    /// Slots in use.
    pub fn len(&self) -> usize {
        self.used.iter().filter(|u| **u).count()
    }

    /// Whether no slot is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ChannelKeys {
    fn drop(&mut self) {
        self.channel.zeroize();
        self.tx.zeroize();
        self.rx.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_reads_and_wipes_keys() {
        let mut table = KeyTable::new(2).unwrap();
        let keys = ChannelKeys { channel: [1; 32], tx: [2; 32], rx: [3; 32] };
        let a = table.insert(&keys).unwrap();
        let b = table.insert(&keys).unwrap();
        assert!(table.insert(&keys).is_none(), "full");
        assert_eq!(table.tx(a), &[2; 32]);
        assert_eq!(table.rx(b), &[3; 32]);
        table.remove(a);
        assert_eq!(table.tx(a), &[0; 32], "zeroed on removal");
        assert_eq!(table.len(), 1);
        assert!(table.insert(&keys).is_some(), "slot reused");
    }
}
