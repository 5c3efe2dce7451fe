//! Copying payloads at the speed of the memory, whatever the two buffers' alignment.
//!
//! glibc's `memcpy` (2.36 measured) moves 4 KiB and more (on hosts with AVX2) with `rep movsb`.
//! On the AMD EPYC hosts this project runs on, that instruction drops from 30-40 GB/s to about
//! 2 GB/s when the destination lies 1 to 31 bytes past the source modulo 4 KiB (a page). The
//! data path met that case all the time: a 64 KiB payload goes from a guest's page-aligned
//! buffer to its place in a link record (in a buffer that malloc maps, so 16 bytes into a page,
//! or just past the previous payload's 16-byte tag), and back out of the receive buffer into a
//! guest's buffer. Those two copies took twice as long as sealing and opening the same bytes
//! (`perf record` of two-node 64 KiB ping/echo). A loop of 16-byte vector moves runs at 20-45
//! GB/s at every offset (docs/PERFORMANCE.md, "Copies"; `cargo bench -p keyhold-devices
//! --bench memcopy`), so payload copies go through [`copy`] and its guest-memory forms.
//!
//! The kernel copies socket data with `rep movsb` too; [`PageAligned`] gives it a receive
//! buffer that starts on a page.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// From this size `memcpy` may use `rep movsb` (glibc's threshold is 2 KiB per 16 bytes of
/// vector register: 4 KiB with AVX2, 2 KiB without); below it, it moves vectors and is fast.
pub const LARGE: usize = 2048;

/// Copies `src` into the start of `dst`; `dst` must be at least as long (the caller's
/// invariant: it sized `dst` from `src`).
pub fn copy(dst: &mut [u8], src: &[u8]) {
    let n = src.len().min(dst.len());
    debug_assert_eq!(n, src.len(), "destination shorter than source");
    // SAFETY: both pointers are valid for `n` bytes (the slices are at least that long), and a
    // `&mut` slice cannot overlap a shared one.
    unsafe { copy_raw(dst.as_mut_ptr(), src.as_ptr(), n) }
}

/// Moves `buf[from..]` to the start of `buf` (as `slice::copy_within`; nothing if `from` lies
/// past the end): with [`copy`] when the two ranges lie apart, with `copy_within` when they
/// overlap.
pub fn move_to_front(buf: &mut [u8], from: usize) {
    let from = from.min(buf.len());
    let rest = buf.len() - from;
    if rest <= from {
        let (front, back) = buf.split_at_mut(from);
        copy(&mut front[..rest], back);
    } else {
        buf.copy_within(from.., 0);
    }
}

/// Copies guest memory into the start of `dst`, as much as both hold; returns how much.
pub fn from_guest<B: BitmapSlice>(dst: &mut [u8], src: &VolatileSlice<'_, B>) -> usize {
    let n = src.len().min(dst.len());
    let guard = src.ptr_guard();
    // SAFETY: the guard keeps the guest mapping valid for its `src.len()` bytes and `dst` is
    // valid for `n`; host buffers are never guest memory, so the two do not overlap. The guest
    // may write these bytes meanwhile, as it may during vm-memory's own copies (which use
    // `copy_nonoverlapping` the same way): each byte is read once, and any value is a valid
    // `u8`.
    unsafe { copy_raw(dst.as_mut_ptr(), guard.as_ptr(), n) }
    n
}

/// Copies the start of `src` into guest memory, as much as both hold, marking what it wrote
/// dirty; returns how much.
pub fn to_guest<B: BitmapSlice>(dst: &VolatileSlice<'_, B>, src: &[u8]) -> usize {
    let n = src.len().min(dst.len());
    let guard = dst.ptr_guard_mut();
    // SAFETY: as in `from_guest`, with the roles swapped: each byte is written once.
    unsafe { copy_raw(guard.as_ptr(), src.as_ptr(), n) }
    dst.bitmap().mark_dirty(0, n);
    n
}

/// Copies one guest's memory into another's (or within one guest), marking the target dirty.
pub fn guest_to_guest<A: BitmapSlice, B: BitmapSlice>(
    dst: &VolatileSlice<'_, B>,
    src: &VolatileSlice<'_, A>,
) {
    let n = src.len().min(dst.len());
    let (to, from) = (dst.ptr_guard_mut(), src.ptr_guard());
    let (to_addr, from_addr) = (to.as_ptr() as usize, from.as_ptr() as usize);
    if to_addr < from_addr.saturating_add(n) && from_addr < to_addr.saturating_add(n) {
        // A guest may describe overlapping buffers; what it receives is then its own business,
        // but the copy must still be a defined one.
        // SAFETY: both ranges lie in guest mappings the guards keep valid for `n` bytes;
        // `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(from.as_ptr(), to.as_ptr(), n) }
    } else {
        // SAFETY: both ranges are valid for `n` bytes (above) and do not overlap.
        unsafe { copy_raw(to.as_ptr(), from.as_ptr(), n) }
    }
    dst.bitmap().mark_dirty(0, n);
}

/// A zeroed byte buffer that starts on a page, for the kernel to copy socket data into.
///
/// A `Vec<u8>` that malloc maps (128 KiB and more, as the link's buffers are) starts 16 bytes
/// into a page, and the kernel's `rep movsb` from the pages of its socket buffers into such a
/// buffer meets the slow case above: a two-node unbatched 64 KiB round trip measured 405-442 us
/// with the receive buffer 16 bytes into a page and 343-359 us with it at the start of one (or
/// 64, 96 or 112 bytes into one).
pub struct PageAligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageAligned {
    /// `len` zeroed bytes.
    pub fn new(len: usize) -> Self {
        let bytes = vec![0; len + PAGE];
        let start = bytes.as_ptr().align_offset(PAGE).min(PAGE);
        Self { bytes, start, len }
    }
}

impl std::ops::Deref for PageAligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for PageAligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// A page.
const PAGE: usize = 4096;

/// Copies `len` bytes: from [`LARGE`] up with 16-byte vector moves (SSE2, part of every
/// x86-64), the tail and short copies with `memcpy`. The loop runs also where `memcpy` would
/// be fast: taking `memcpy` there measured slower on the data path (two-node 64 KiB ping/echo
/// 362-422 MB/s against 417-456 MB/s, alternating), though it wins in a tight loop over hot
/// buffers.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges must
/// not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn copy_raw(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};

    const BLOCK: usize = 64;
    let mut at = 0;
    if len >= LARGE {
        while at + BLOCK <= len {
            // SAFETY: `at + BLOCK <= len`, so all four 16-byte loads and stores lie within the
            // ranges the caller vouched for; the unaligned forms need no alignment.
            unsafe {
                let s = src.add(at).cast::<__m128i>();
                let d = dst.add(at).cast::<__m128i>();
                let (a, b, c, e) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_storeu_si128(d, a);
                _mm_storeu_si128(d.add(1), b);
                _mm_storeu_si128(d.add(2), c);
                _mm_storeu_si128(d.add(3), e);
            }
            at += BLOCK;
        }
    }
    // SAFETY: `at <= len`, so the rest lies within both ranges, which do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), len - at) }
}

/// Elsewhere `memcpy` is trusted as it is.
///
/// # Safety
///
/// As for the x86-64 version.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_raw(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract is `copy_nonoverlapping`'s.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around the block and threshold sizes, with the target at every offset
    /// past the source within a line (modulo a page), copies exactly its bytes and nothing
    /// past them.
    #[test]
    fn copies_every_length_at_every_offset() {
        const MAX: usize = LARGE * 3 + 17;
        let pattern = |i: usize| (i * 7 + i / 251 + 3) as u8;
        let whole_pages = MAX.div_ceil(PAGE) * PAGE;
        let mut buffer = PageAligned::new(whole_pages + MAX + 64);
        let (src, rest) = buffer.split_at_mut(whole_pages);
        for (i, b) in src.iter_mut().enumerate() {
            *b = pattern(i);
        }
        for len in [0, 1, 63, 64, 65, LARGE - 1, LARGE, LARGE + 1, LARGE + 63, MAX] {
            for shift in 0..64 {
                rest.fill(0xAA);
                // `rest` starts whole pages after `src`, so the target lies `shift` past it.
                let target = &mut rest[shift..shift + len];
                copy(target, &src[..len]);
                assert!((0..len).all(|i| rest[shift + i] == pattern(i)), "len {len} shift {shift}");
                assert!(rest[..shift].iter().all(|&b| b == 0xAA), "wrote before, len {len}");
                assert!(rest[shift + len..].iter().all(|&b| b == 0xAA), "wrote past, len {len}");
            }
        }
    }

    #[test]
    fn moving_to_the_front_works_apart_and_overlapping() {
        for (len, from) in
            [(10, 0), (10, 10), (LARGE * 3, LARGE * 2), (LARGE * 3, 5), (LARGE * 3, LARGE + 1)]
        {
            let original: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
            let mut buf = original.clone();
            move_to_front(&mut buf, from);
            assert_eq!(&buf[..len - from], &original[from..], "len {len} from {from}");
            assert_eq!(&buf[len - from..], &original[len - from..], "len {len} from {from}");
        }
    }

    #[test]
    fn a_page_aligned_buffer_starts_on_a_page_and_is_as_long_as_asked() {
        for len in [0, 1, 4096, 100_000] {
            let buffer = PageAligned::new(len);
            assert_eq!(buffer.len(), len);
            assert_eq!(buffer.as_ptr() as usize % PAGE, 0);
            assert!(buffer.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn guest_forms_copy_both_ways_and_between_overlapping_buffers() {
        let mut guest = vec![0u8; 3 * LARGE];
        let data: Vec<u8> = (0..LARGE + 9).map(|i| i as u8).collect();
        let slice = VolatileSlice::from(&mut guest[..]);
        assert_eq!(to_guest(&slice.subslice(3, data.len()).unwrap(), &data), data.len());
        let mut back = vec![0u8; data.len() + 5];
        assert_eq!(from_guest(&mut back, &slice.subslice(3, data.len()).unwrap()), data.len());
        assert_eq!(&back[..data.len()], &data[..]);

        // Apart: the vector loop, from one place in guest memory to another.
        let far = slice.subslice(2 * LARGE - 7, LARGE).unwrap();
        guest_to_guest(&far, &slice.subslice(3, LARGE).unwrap());

        // Moving the bytes 16 forward within one guest overlaps source and target.
        let (src, dst) = (slice.subslice(3, data.len()).unwrap(), slice.subslice(19, data.len()));
        guest_to_guest(&dst.unwrap(), &src);
        assert_eq!(&guest[19..19 + data.len()], &data[..]);
        assert_eq!(&guest[2 * LARGE - 7..3 * LARGE - 7], &data[..LARGE]);
    }
}
