//! The key table (claims 9, 12, 14): one slot per keyed connection-table entry, in secret
//! memory that only the CMM reads. Nothing here is ever copied into a guest, a log line or a
//! response; a removed key is zeroed at once.
//!
//! A channel between partitions of this node keeps its channel key: the CMM proves the key of
//! each message by comparing the two entries' keys (claim 10 on one node). A channel to
//! another node keeps, instead, both directions' ratchet and AES-256-GCM state, built in place
//! when the channel is keyed and used in place for every message (`crypto/channel.rs`).

use std::io;
use std::mem::MaybeUninit;

use guest_agent::channel::abi::Endpoint;

use crate::crypto::channel::{ChannelCiphers, Direction, AAD_SIZE, KEY_SIZE, SALT_SIZE, TAG_SIZE};
use crate::secret::{SecretBox, Slab, SlabError};

/// A slot in the key table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    /// A channel on this node: its key.
    Local(u32),
    /// A channel to another node: its ciphers.
    Remote(u32),
}

/// Transient secrets: a key on its way into a slot, a receiving epoch being tried.
struct Scratch {
    key: [u8; KEY_SIZE],
    candidate: MaybeUninit<Direction>,
}

/// The table.
pub struct KeyTable {
    local: Slab<[u8; KEY_SIZE]>,
    remote: Slab<ChannelCiphers>,
    /// Keys of offers to other nodes not answered yet, kept so that an offer whose link was
    /// lost can be made again on the next one (links on demand).
    held: Slab<[u8; KEY_SIZE]>,
    scratch: SecretBox<Scratch>,
}

/// A key kept for an offer until its answer comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldKey(u32);

impl KeyTable {
    /// A table of at most `capacity` keys of each kind; secret memory is mapped as it fills.
    pub fn new(capacity: usize) -> io::Result<Self> {
        let scratch = SecretBox::new_with(|slot| {
            slot.write(Scratch { key: [0; KEY_SIZE], candidate: MaybeUninit::uninit() });
        })?;
        Ok(Self {
            local: Slab::new(capacity),
            remote: Slab::new(capacity),
            held: Slab::new(capacity),
            scratch,
        })
    }

    /// Where a new channel key is written (from the guest or the entropy source) before it is
    /// stored; [`KeyTable::wipe_scratch`] erases it.
    pub fn scratch_key(&mut self) -> &mut [u8; KEY_SIZE] {
        &mut self.scratch.key
    }

    /// The scratch key, to read.
    pub fn scratch(&self) -> &[u8; KEY_SIZE] {
        &self.scratch.key
    }

    /// Erases the scratch key.
    pub fn wipe_scratch(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.scratch.key);
    }

    /// Stores the scratch key for a channel on this node.
    pub fn insert_local_from_scratch(&mut self) -> Result<KeySlot, SlabError> {
        let key = &self.scratch.key;
        self.local
            .insert_with(|slot| {
                slot.write(*key);
            })
            .map(KeySlot::Local)
    }

    /// Stores `key` for a channel on this node.
    pub fn insert_local(&mut self, key: &[u8; KEY_SIZE]) -> Result<KeySlot, SlabError> {
        self.local
            .insert_with(|slot| {
                slot.write(*key);
            })
            .map(KeySlot::Local)
    }

    /// Builds the ciphers of `local`'s channel with `remote` from `key` and `salt`.
    pub fn insert_remote(
        &mut self,
        key: &[u8; KEY_SIZE],
        salt: &[u8; SALT_SIZE],
        local: &Endpoint,
        remote: &Endpoint,
    ) -> Result<KeySlot, SlabError> {
        insert_ciphers(&mut self.remote, key, salt, local, remote)
    }

    /// As [`KeyTable::insert_remote`], from the scratch key.
    pub fn insert_remote_from_scratch(
        &mut self,
        salt: &[u8; SALT_SIZE],
        local: &Endpoint,
        remote: &Endpoint,
    ) -> Result<KeySlot, SlabError> {
        insert_ciphers(&mut self.remote, &self.scratch.key, salt, local, remote)
    }

    /// Keeps the scratch key for an offer until it is answered.
    pub fn hold_scratch(&mut self) -> Result<HeldKey, SlabError> {
        let key = &self.scratch.key;
        self.held
            .insert_with(|slot| {
                slot.write(*key);
            })
            .map(HeldKey)
    }

    /// A held offer key.
    pub fn held(&self, held: HeldKey) -> Option<&[u8; KEY_SIZE]> {
        self.held.get(held.0)
    }

    /// Zeroes and frees a held offer key (its offer was answered or ended).
    pub fn release(&mut self, held: HeldKey) {
        self.held.remove(held.0);
    }

    /// Replaces cross-node `slot` with ciphers built from `held` and a new `salt` (`None` if no slot
    /// could be had): an offer
    /// made again must not reuse the derived keys of one its peer may have used.
    pub fn rebuild_remote(
        &mut self,
        slot: KeySlot,
        held: HeldKey,
        salt: &[u8; SALT_SIZE],
        local: &Endpoint,
        remote: &Endpoint,
    ) -> Option<KeySlot> {
        self.remove(slot);
        let key = self.held.get(held.0)?;
        insert_ciphers(&mut self.remote, key, salt, local, remote).ok()
    }

    /// Whether two on-node slots hold the same key (in constant time).
    pub fn same_key(&self, a: KeySlot, b: KeySlot) -> bool {
        let (KeySlot::Local(a), KeySlot::Local(b)) = (a, b) else { return false };
        match (self.local.get(a), self.local.get(b)) {
            (Some(a), Some(b)) => constant_time_eq(a, b),
            _ => false,
        }
    }

    /// The ciphers of a cross-node slot.
    pub fn ciphers(&self, slot: KeySlot) -> Option<&ChannelCiphers> {
        match slot {
            KeySlot::Remote(i) => self.remote.get(i),
            KeySlot::Local(_) => None,
        }
    }

    /// The ciphers of a cross-node slot, to advance an epoch.
    pub fn ciphers_mut(&mut self, slot: KeySlot) -> Option<&mut ChannelCiphers> {
        match slot {
            KeySlot::Remote(i) => self.remote.get_mut(i),
            KeySlot::Local(_) => None,
        }
    }

    /// Opens a received message in place under the slot's receiving key, or under the next
    /// epoch's key if `next_epoch` (the channel then moves to it: its old key is erased).
    pub fn open(
        &mut self,
        slot: KeySlot,
        next_epoch: bool,
        aad: &[u8; AAD_SIZE],
        seq: u64,
        buf: &mut [u8],
        tag: &[u8; TAG_SIZE],
    ) -> bool {
        let KeySlot::Remote(index) = slot else { return false };
        let Some(ciphers) = self.remote.get_mut(index) else { return false };
        if !next_epoch {
            return ciphers.rx.open(aad, seq, buf, tag);
        }
        let scratch = &mut *self.scratch;
        ciphers.rx.next_into(&mut scratch.candidate);
        // SAFETY: `next_into` initialised the candidate.
        let candidate = unsafe { scratch.candidate.assume_init_ref() };
        let opened = candidate.open(aad, seq, buf, tag);
        if opened {
            ciphers.rx.advance();
        }
        // SAFETY: the candidate is plain key state (no resources); wiping its bytes ends it.
        unsafe { wipe(&mut scratch.candidate) };
        opened
    }

    /// Zeroes and frees `slot`.
    pub fn remove(&mut self, slot: KeySlot) {
        match slot {
            KeySlot::Local(i) => self.local.remove(i),
            KeySlot::Remote(i) => self.remove_remote(i),
        }
    }

    fn remove_remote(&mut self, index: u32) {
        self.remote.remove(index);
    }

    /// Keys in use.
    pub fn len(&self) -> usize {
        self.local.len() + self.remote.len()
    }

    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Zeroes a value's bytes.
///
/// # Safety
/// `T` must own no resources (its bytes are all there is to it).
unsafe fn wipe<T>(value: &mut MaybeUninit<T>) {
    // SAFETY: any bytes are valid for a `MaybeUninit`, and the caller vouches that nothing is
    // lost by overwriting it.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(value.as_mut_ptr().cast::<u8>(), std::mem::size_of::<T>())
    };
    zeroize::Zeroize::zeroize(bytes);
}

/// Compares two keys without branching on their contents.
fn constant_time_eq(a: &[u8; KEY_SIZE], b: &[u8; KEY_SIZE]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Builds a cross-node channel's ciphers from `key` and `salt` in a slot of `table` (a free
/// function, so that `key` may borrow another part of the key table).
fn insert_ciphers(
    table: &mut Slab<ChannelCiphers>,
    key: &[u8; KEY_SIZE],
    salt: &[u8; SALT_SIZE],
    local: &Endpoint,
    remote: &Endpoint,
) -> Result<KeySlot, SlabError> {
    table
        .insert_with(|slot| ChannelCiphers::init(slot, key, salt, local, remote))
        .map(KeySlot::Remote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmm::test_endpoints::{A, B};
    use crate::crypto::channel::associated_data;

    #[test]
    fn local_keys_compare_and_are_wiped() {
        let mut table = KeyTable::new(4).unwrap();
        let a = table.insert_local(&[1; 32]).unwrap();
        let b = table.insert_local(&[1; 32]).unwrap();
        let c = table.insert_local(&[2; 32]).unwrap();
        assert!(table.same_key(a, b));
        assert!(!table.same_key(a, c));
        table.remove(b);
        assert!(!table.same_key(a, b), "a removed key matches nothing");
        assert_eq!(table.len(), 2);
        table.scratch_key().copy_from_slice(&[7; 32]);
        let d = table.insert_local_from_scratch().unwrap();
        table.wipe_scratch();
        assert_eq!(*table.scratch_key(), [0; 32]);
        let e = table.insert_local(&[7; 32]).unwrap();
        assert!(table.same_key(d, e));
    }

    #[test]
    fn remote_slots_open_the_next_epoch_and_move_to_it() {
        let mut table = KeyTable::new(4).unwrap();
        let mine = table.insert_remote(&[3; 32], &[4; 16], &A, &B).unwrap();
        let theirs = table.insert_remote(&[3; 32], &[4; 16], &B, &A).unwrap();
        let seal = |table: &mut KeyTable, epoch: u32, seq: u64, text: &[u8]| {
            let mut buf = text.to_vec();
            let tag = table
                .ciphers(theirs)
                .unwrap()
                .tx
                .seal(&associated_data(&B, &A, epoch, seq), seq, &mut buf)
                .unwrap();
            (buf, tag)
        };
        let (mut m0, t0) = seal(&mut table, 0, 0, b"zero");
        assert!(table.open(mine, false, &associated_data(&B, &A, 0, 0), 0, &mut m0, &t0));
        table.ciphers_mut(theirs).unwrap().tx.advance();
        let (m1, t1) = seal(&mut table, 1, 1, b"one");
        let mut tampered = m1.clone();
        tampered[0] ^= 1;
        assert!(!table.open(mine, true, &associated_data(&B, &A, 1, 1), 1, &mut tampered, &t1));
        let mut m1 = m1;
        assert!(table.open(mine, true, &associated_data(&B, &A, 1, 1), 1, &mut m1, &t1));
        assert_eq!(&m1, b"one");
        let (mut m2, t2) = seal(&mut table, 1, 2, b"two");
        assert!(
            table.open(mine, false, &associated_data(&B, &A, 1, 2), 2, &mut m2, &t2),
            "now at epoch 1"
        );
    }
}
