//! One mapping of secret memory: `memfd_secret(2)` pages, or, where the kernel lacks them,
//! anonymous memory locked with `mlock` and excluded from core dumps with `MADV_DONTDUMP`.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

/// What secret memory is made of in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Nothing mapped yet.
    Unknown,
    /// `memfd_secret(2)`: unreadable by any other process, root included.
    MemfdSecret,
    /// `mlock` + `MADV_DONTDUMP`: never swapped or dumped, but readable by root.
    Locked,
}

static BACKING: AtomicU8 = AtomicU8::new(0);

/// What the secret memory mapped so far is made of.
pub fn backing() -> Backing {
    match BACKING.load(Ordering::Acquire) {
        1 => Backing::MemfdSecret,
        2 => Backing::Locked,
        _ => Backing::Unknown,
    }
}

/// A page-aligned region of secret memory, zeroed when dropped.
pub struct SecretRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value alone; access goes through `&self`
// / `&mut self` like any owned buffer.
unsafe impl Send for SecretRegion {}
// SAFETY: shared access only reads (`bytes`), as for a `Box<[u8]>`.
unsafe impl Sync for SecretRegion {}

impl std::fmt::Debug for SecretRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The address and size only: never the contents.
        write!(f, "SecretRegion({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl SecretRegion {
    /// Maps `len` bytes (rounded up to pages) of secret memory, zero-filled.
    pub fn new(len: usize) -> io::Result<Self> {
        let len = len.max(1).next_multiple_of(4096);
        match map_memfd_secret(len) {
            Ok(ptr) => {
                BACKING.store(1, Ordering::Release);
                Ok(Self { ptr, len })
            }
            Err(e) => {
                if BACKING.swap(2, Ordering::AcqRel) != 2 {
                    log::warn!(
                        "memfd_secret unavailable ({e}); keys use mlock'd, MADV_DONTDUMP memory instead"
                    );
                }
                map_locked_anonymous(len).map(|ptr| Self { ptr, len })
            }
        }
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (it never is: at least a page is mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The region's bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SecretRegion {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self.bytes_mut());
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped once here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn map_memfd_secret(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: memfd_secret takes a flags word and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as libc::c_int;
    let result = (|| {
        // SAFETY: `fd` is the memfd just created; ftruncate sizes it.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        map(len, libc::MAP_SHARED, fd)
    })();
    // SAFETY: the mapping (if any) keeps the memory; the fd is no longer needed.
    unsafe { libc::close(fd) };
    result
}

fn map_locked_anonymous(len: usize) -> io::Result<NonNull<u8>> {
    let ptr = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?;
    // SAFETY: `ptr`/`len` is the mapping just made.
    let locked = unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0
        // SAFETY: as above.
        && unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTDUMP) } == 0;
    if !locked {
        let err = io::Error::last_os_error();
        // SAFETY: unmapping the mapping just made.
        unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        return Err(err);
    }
    Ok(ptr)
}

fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh mapping at an address of the kernel's choosing; the result is checked.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_and_returns_bytes() {
        let mut region = SecretRegion::new(100).unwrap();
        assert_eq!(region.bytes().len(), 4096);
        assert!(region.bytes().iter().all(|&b| b == 0));
        region.bytes_mut()[..4].copy_from_slice(b"key!");
        assert_eq!(&region.bytes()[..4], b"key!");
        assert_ne!(backing(), Backing::Unknown);
    }

    #[test]
    fn secret_pages_cannot_be_read_through_proc_mem() {
        let mut region = SecretRegion::new(4096).unwrap();
        region.bytes_mut()[..8].copy_from_slice(b"secret!!");
        if backing() != Backing::MemfdSecret {
            return; // the fallback is readable by root, as docs/SECURITY.md says
        }
        use std::io::{Read, Seek, SeekFrom};
        let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
        mem.seek(SeekFrom::Start(region.as_ptr() as u64)).unwrap();
        let mut out = [0u8; 8];
        assert!(mem.read_exact(&mut out).is_err(), "memfd_secret pages were readable");
    }
}
