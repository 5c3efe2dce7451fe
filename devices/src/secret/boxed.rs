//! One object in secret memory, like a `Box`, from a process-wide arena of size classes.

use std::io;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

use super::slab::{Slab, SlabError};

/// A block of a size class; 64-byte aligned so any key schedule fits it.
#[repr(C, align(64))]
struct Block<const N: usize>([u8; N]);

/// The size classes, smallest first.
const CLASSES: [usize; 4] = [64, 256, 1024, 4096];
/// Blocks per class at most: far more than a node with thousands of links needs.
const BLOCKS_PER_CLASS: usize = 1 << 20;

struct Arena {
    c64: Slab<Block<64>>,
    c256: Slab<Block<256>>,
    c1024: Slab<Block<1024>>,
    c4096: Slab<Block<4096>>,
}

static ARENA: Mutex<Option<Arena>> = Mutex::new(None);

impl Arena {
    fn new() -> Self {
        Self {
            c64: Slab::new(BLOCKS_PER_CLASS),
            c256: Slab::new(BLOCKS_PER_CLASS),
            c1024: Slab::new(BLOCKS_PER_CLASS),
            c4096: Slab::new(BLOCKS_PER_CLASS),
        }
    }

    /// A zeroed block of class `class`: its index and address.
    fn take(&mut self, class: usize) -> Result<(u32, *mut u8), SlabError> {
        fn zeroed<const N: usize>(slab: &mut Slab<Block<N>>) -> Result<(u32, *mut u8), SlabError> {
            let index = slab.insert_with(|slot| {
                slot.write(Block([0; N]));
            })?;
            let ptr = slab.get_mut(index).map_or(std::ptr::null_mut(), |b| b.0.as_mut_ptr());
            Ok((index, ptr))
        }
        match class {
            0 => zeroed(&mut self.c64),
            1 => zeroed(&mut self.c256),
            2 => zeroed(&mut self.c1024),
            _ => zeroed(&mut self.c4096),
        }
    }

    /// Zeroes and frees a block.
    fn give(&mut self, class: usize, index: u32) {
        match class {
            0 => self.c64.remove(index),
            1 => self.c256.remove(index),
            2 => self.c1024.remove(index),
            _ => self.c4096.remove(index),
        }
    }
}

fn arena<R>(f: impl FnOnce(&mut Arena) -> R) -> R {
    let mut guard = crate::bus::lock(&ARENA);
    f(guard.get_or_insert_with(Arena::new))
}

/// A `T` in secret memory, dropped and zeroed when the box is.
///
/// Build secrets inside it ([`SecretBox::new_with`], or [`SecretBox::zeroed`] and then fill
/// it) rather than moving a finished secret in: a value moved in leaves its old bytes behind.
pub struct SecretBox<T> {
    ptr: NonNull<T>,
    class: u8,
    index: u32,
}

// SAFETY: the box owns its `T` exclusively, like `Box<T>`.
unsafe impl<T: Send> Send for SecretBox<T> {}
// SAFETY: shared access hands out `&T` only, like `Box<T>`.
unsafe impl<T: Sync> Sync for SecretBox<T> {}

impl<T> std::fmt::Debug for SecretBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl<T> SecretBox<T> {
    /// A box whose `T` is built in place by `init`, which must initialise it.
    pub fn new_with(init: impl FnOnce(&mut MaybeUninit<T>)) -> io::Result<Self> {
        let size = std::mem::size_of::<T>();
        assert!(std::mem::align_of::<T>() <= 64, "secret boxes are 64-byte aligned");
        let class = CLASSES.iter().position(|&c| size <= c).unwrap_or_else(|| {
            panic!("a secret box holds at most {} bytes, not {size}", CLASSES[3])
        });
        let (index, raw) = arena(|a| a.take(class)).map_err(|e| match e {
            SlabError::Map(e) => e,
            full => io::Error::other(full.to_string()),
        })?;
        let ptr = NonNull::new(raw.cast::<T>()).ok_or_else(|| io::Error::other("no block"))?;
        // SAFETY: the block is ours alone, at least `size` bytes, 64-byte aligned, and stays
        // mapped until `give` in `drop`; `init` runs without the arena's lock held.
        init(unsafe { &mut *ptr.as_ptr().cast::<MaybeUninit<T>>() });
        Ok(Self { ptr, class: class as u8, index })
    }
}

impl<T> SecretBox<T> {
    /// Moves the `T` out and frees (zeroes) the block. The value is then wherever the caller
    /// puts it: call this inside [`super::scrubbed`] when the `T` holds secrets.
    pub fn into_inner(self) -> T {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the `T` is initialised; it is read out once and the block is then given
        // back without dropping it again.
        let value = unsafe { std::ptr::read(this.ptr.as_ptr()) };
        arena(|a| a.give(usize::from(this.class), this.index));
        value
    }
}

impl<const N: usize> SecretBox<[u8; N]> {
    /// `N` zero bytes in secret memory, to be filled in place.
    pub fn zeroed() -> io::Result<Self> {
        Self::new_with(|slot| {
            slot.write([0; N]);
        })
    }
}

impl<T> Deref for SecretBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` owned by this box for its whole life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for SecretBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`; `&mut self` makes the access exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for SecretBox<T> {
    fn drop(&mut self) {
        // SAFETY: the `T` is initialised and dropped exactly once, here; the arena zeroes the
        // block when it takes it back.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        arena(|a| a.give(usize::from(self.class), self.index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_hold_values_of_each_class_and_wipe_them() {
        let mut small = SecretBox::<[u8; 32]>::zeroed().unwrap();
        small.copy_from_slice(&[5; 32]);
        let big = SecretBox::<[u64; 300]>::new_with(|s| {
            s.write([9; 300]);
        })
        .unwrap();
        assert_eq!(small[31], 5);
        assert_eq!(big[299], 9);
        let addr = small.as_ptr();
        drop(small);
        let again = SecretBox::<[u8; 32]>::zeroed().unwrap();
        assert_eq!(again.as_ptr(), addr, "the block is reused");
        assert_eq!(*again, [0; 32], "and came back zeroed");
    }

    #[test]
    fn contents_are_dropped() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Counted;
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }
        drop(SecretBox::new_with(|s| {
            s.write(Counted);
        }));
        assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    }
}
