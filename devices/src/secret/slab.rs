//! Many objects of one type in secret memory: fixed slots, O(1) to allocate and free, mapped in
//! chunks only as they are needed, so a table sized for a million channels costs nothing until
//! it holds them.

use std::io;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use thiserror::Error;

use super::region::SecretRegion;

/// Bytes of the first chunk; each later chunk is twice the one before, up to [`MAX_CHUNK`].
const FIRST_CHUNK: usize = 64 * 1024;
/// Bytes of the largest chunk.
const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// Why a slot could not be had.
#[derive(Debug, Error)]
pub enum SlabError {
    /// Every slot up to the capacity is in use.
    #[error("all {0} slots are in use")]
    Full(usize),
    /// The kernel refused more secret memory.
    #[error("mapping secret memory: {0}")]
    Map(#[from] io::Error),
}

/// Slots of `T` in secret memory.
///
/// `T` must not own memory outside itself that holds secrets (a heap pointer to a key would
/// defeat the point); the types stored here are plain key schedules and byte arrays.
pub struct Slab<T> {
    chunks: Vec<SecretRegion>,
    /// Index of the first slot of each chunk, and one past the last slot mapped.
    starts: Vec<usize>,
    occupied: Vec<u64>,
    free: Vec<u32>,
    len: usize,
    capacity: usize,
    _marker: PhantomData<T>,
}

// SAFETY: the slab owns its `T`s (in memory only it maps); sending it sends them.
unsafe impl<T: Send> Send for Slab<T> {}

impl<T> std::fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slab")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("mapped", &self.mapped())
            .finish()
    }
}

impl<T> Slab<T> {
    /// An empty slab of at most `capacity` slots; nothing is mapped yet.
    pub fn new(capacity: usize) -> Self {
        assert!(std::mem::align_of::<T>() <= 4096, "slots are page-aligned at most");
        let capacity = capacity.min(u32::MAX as usize);
        Self {
            chunks: Vec::new(),
            starts: vec![0],
            occupied: Vec::new(),
            free: Vec::new(),
            len: 0,
            capacity,
            _marker: PhantomData,
        }
    }

    fn stride() -> usize {
        std::mem::size_of::<T>().max(1).next_multiple_of(std::mem::align_of::<T>())
    }

    /// Slots mapped so far.
    pub fn mapped(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Slots in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most slots the slab will hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Puts a `T` into a free slot, built by `init` in place (it must initialise the slot);
    /// returns the slot's index.
    pub fn insert_with(
        &mut self,
        init: impl FnOnce(&mut MaybeUninit<T>),
    ) -> Result<u32, SlabError> {
        let index = match self.free.pop() {
            Some(index) => index as usize,
            None => self.grow()?,
        };
        let slot = self.slot_ptr(index);
        // SAFETY: `slot` is a free slot of a live chunk, aligned for `T` (chunks are
        // page-aligned and the stride is a multiple of T's alignment); nobody else refers to
        // it while it is free.
        init(unsafe { &mut *slot.cast::<MaybeUninit<T>>() });
        self.occupied[index / 64] |= 1 << (index % 64);
        self.len += 1;
        Ok(index as u32)
    }

    /// Maps a new chunk if the capacity allows; returns the first of its slots (the others
    /// join the free list).
    fn grow(&mut self) -> Result<usize, SlabError> {
        let mapped = self.mapped();
        if mapped >= self.capacity {
            return Err(SlabError::Full(self.capacity));
        }
        let bytes = (FIRST_CHUNK << self.chunks.len().min(16)).min(MAX_CHUNK);
        let slots = (bytes / Self::stride()).max(1).min(self.capacity - mapped);
        let region = SecretRegion::new(slots * Self::stride())?;
        self.chunks.push(region);
        self.starts.push(mapped + slots);
        self.occupied.resize((mapped + slots).div_ceil(64), 0);
        // Lowest indices are handed out first.
        self.free.extend((mapped as u32 + 1..(mapped + slots) as u32).rev());
        Ok(mapped)
    }

    fn slot_ptr(&self, index: usize) -> *mut u8 {
        let chunk = self.starts.partition_point(|&start| start <= index) - 1;
        let offset = (index - self.starts[chunk]) * Self::stride();
        // SAFETY: `index` is below `mapped()`, so `offset` lies inside chunk `chunk`.
        unsafe { self.chunks[chunk].as_ptr().add(offset) }
    }

    fn is_occupied(&self, index: usize) -> bool {
        self.occupied.get(index / 64).is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// The object in slot `index`, if it holds one.
    pub fn get(&self, index: u32) -> Option<&T> {
        let index = index as usize;
        // SAFETY: an occupied slot holds an initialised `T` (see `insert_with`), borrowed
        // for no longer than `self`.
        self.is_occupied(index).then(|| unsafe { &*self.slot_ptr(index).cast::<T>() })
    }

    /// The object in slot `index`, writable, if it holds one.
    pub fn get_mut(&mut self, index: u32) -> Option<&mut T> {
        let index = index as usize;
        // SAFETY: as for `get`, and `&mut self` makes the borrow exclusive.
        self.is_occupied(index).then(|| unsafe { &mut *self.slot_ptr(index).cast::<T>() })
    }

    /// Two different slots at once, both writable.
    pub fn get_pair_mut(&mut self, a: u32, b: u32) -> Option<(&mut T, &mut T)> {
        if a == b || !self.is_occupied(a as usize) || !self.is_occupied(b as usize) {
            return None;
        }
        let (pa, pb) = (self.slot_ptr(a as usize), self.slot_ptr(b as usize));
        // SAFETY: two distinct occupied slots never overlap; `&mut self` makes both borrows
        // exclusive for its lifetime.
        Some(unsafe { (&mut *pa.cast::<T>(), &mut *pb.cast::<T>()) })
    }

    /// Drops the object in slot `index`, zeroes the slot and frees it.
    pub fn remove(&mut self, index: u32) {
        let i = index as usize;
        if !self.is_occupied(i) {
            return;
        }
        let slot = self.slot_ptr(i);
        // SAFETY: the slot holds an initialised `T`, dropped once here and then zeroed; its
        // occupied bit is cleared below, so nothing reads it as a `T` again.
        unsafe {
            std::ptr::drop_in_place(slot.cast::<T>());
            wipe(slot, Self::stride());
        }
        self.occupied[i / 64] &= !(1 << (i % 64));
        self.len -= 1;
        self.free.push(index);
    }
}

impl<T> Drop for Slab<T> {
    fn drop(&mut self) {
        for index in 0..self.mapped() as u32 {
            self.remove(index);
        }
        // The regions zero and unmap themselves.
    }
}

/// Zeroes `len` bytes at `ptr` in a way the compiler may not leave out.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
pub(super) unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller vouches for `ptr`/`len`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    zeroize::Zeroize::zeroize(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_zeroed_and_bounded() {
        let mut slab: Slab<[u8; 1000]> = Slab::new(200);
        assert_eq!(slab.mapped(), 0, "nothing mapped before the first insert");
        let a = slab
            .insert_with(|s| {
                s.write([7; 1000]);
            })
            .unwrap();
        assert_eq!(slab.get(a).unwrap()[999], 7);
        let mut all = vec![a];
        while let Ok(i) = slab.insert_with(|s| {
            s.write([1; 1000]);
        }) {
            all.push(i);
        }
        assert_eq!(all.len(), 200, "exactly the capacity");
        assert!(matches!(
            slab.insert_with(|s| {
                s.write([0; 1000]);
            }),
            Err(SlabError::Full(200))
        ));
        slab.remove(a);
        assert!(slab.get(a).is_none());
        let again = slab
            .insert_with(|s| {
                s.write([2; 1000]);
            })
            .unwrap();
        assert_eq!(again, a, "the freed slot");
        assert_eq!(slab.len(), 200);
        let (x, y) = slab.get_pair_mut(all[1], all[2]).unwrap();
        x[0] = 9;
        y[0] = 8;
        assert!(slab.get_pair_mut(all[1], all[1]).is_none());
        assert_eq!(slab.get(all[1]).unwrap()[0], 9);
    }

    #[test]
    fn a_removed_slot_is_zeroed_in_place() {
        let mut slab: Slab<[u8; 64]> = Slab::new(4);
        let i = slab
            .insert_with(|s| {
                s.write([0xaa; 64]);
            })
            .unwrap();
        let ptr = slab.get(i).unwrap().as_ptr();
        slab.remove(i);
        // SAFETY: the chunk is still mapped (the slab lives); reading its zeroed bytes.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, 64) };
        assert!(bytes.iter().all(|&b| b == 0));
    }
}
