//! Checks the runtime's `memcpy`, `memmove`, `memset` and `memcmp` (guest-agent `rt`) at
//! lengths up to a few hundred bytes and at every relative offset within a cache line, against
//! byte-wise loops: prints `memfns: ok` and exits 0, or names the first wrong case and exits 1.
#![no_std]
#![no_main]

use core::hint::black_box;

use guest_agent::{println, BootInfo};

const AREA: usize = 2048;
const LENGTHS: [usize; 14] = [0, 1, 7, 8, 9, 63, 64, 65, 71, 72, 127, 200, 513, 700];

/// A pattern no two nearby bytes share, so a copy from the wrong place shows.
fn pattern(i: usize) -> u8 {
    (i * 7 + i / 251) as u8
}

fn fill(area: &mut [u8; AREA]) {
    for (i, b) in area.iter_mut().enumerate() {
        *b = black_box(pattern(i));
    }
}

/// The whole area equals what a byte-wise copy of `len` bytes from `from` to `to` of the
/// pattern would leave.
fn copied_right(area: &[u8; AREA], from: usize, to: usize, len: usize) -> bool {
    (0..AREA).all(|i| {
        let want = if (to..to + len).contains(&i) { pattern(from + i - to) } else { pattern(i) };
        black_box(area[i]) == want
    })
}

/// What went wrong: the function, the length, and where from and to.
type Wrong = (&'static str, usize, usize, usize);
/// `memcpy`'s and `memmove`'s signature.
type CopyFn = unsafe extern "C" fn(*mut u8, *const u8, usize) -> *mut u8;

/// Runs `copy` of `len` bytes from `src` to `dst` over a freshly patterned area and checks all
/// of it.
///
/// # Safety
///
/// `src + len` and `dst + len` lie within the area, and the ranges satisfy `copy`'s contract.
unsafe fn check_copy(
    area: &mut [u8; AREA],
    copy: (&'static str, CopyFn),
    src: usize,
    dst: usize,
    len: usize,
) -> Result<(), Wrong> {
    fill(area);
    let base = area.as_mut_ptr();
    // SAFETY: the caller's contract.
    // black_box: the function under test is called, never inlined as a known-size copy.
    unsafe { black_box(copy.1)(base.add(dst), base.add(src), black_box(len)) };
    if copied_right(area, src, dst, len) {
        Ok(())
    } else {
        Err((copy.0, len, src, dst))
    }
}

fn check_copies(area: &mut [u8; AREA]) -> Result<(), Wrong> {
    let memcpy: CopyFn = guest_agent::rt::memcpy;
    let memmove: CopyFn = guest_agent::rt::memmove;
    for len in LENGTHS {
        for from in 0..64 {
            for shift in 0..64 {
                // memcpy: the target after the source, apart.
                let to = (from + len + shift).min(AREA - len);
                if to >= from + len {
                    // SAFETY: both ranges lie in `area` and do not overlap (checked above).
                    unsafe { check_copy(area, ("memcpy", memcpy), from, to, len)? };
                }
                // memmove, both ways, overlapping where the lengths allow.
                for (src, dst) in [(from, from + shift), (from + shift, from)] {
                    if dst + len <= AREA && src + len <= AREA {
                        // SAFETY: both ranges lie in `area`; memmove allows overlap.
                        unsafe { check_copy(area, ("memmove", memmove), src, dst, len)? };
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_set(area: &mut [u8; AREA]) -> Result<(), Wrong> {
    for len in LENGTHS {
        for at in 0..64 {
            // Two values: a byte of the pattern next to the range can equal one, not both.
            for value in [0xA5u8, 0x5A] {
                fill(area);
                // SAFETY: `at + len <= 64 + 700 < AREA`.
                unsafe {
                    black_box(guest_agent::rt::memset as unsafe extern "C" fn(_, _, _) -> _)(
                        area.as_mut_ptr().add(at),
                        i32::from(value),
                        black_box(len),
                    )
                };
                let right = (0..AREA).all(|i| {
                    let want = if (at..at + len).contains(&i) { value } else { pattern(i) };
                    black_box(area[i]) == want
                });
                if !right {
                    return Err(("memset", len, at, at));
                }
            }
        }
    }
    Ok(())
}

/// `memcmp` of two equal ranges at every relative offset within a cache line, then of the same
/// ranges with one byte of the second raised or lowered (at each of the first 40 places, every
/// third place after, the middle and the end): zero for equal, and otherwise the sign of the
/// first differing byte's difference.
fn check_compare(area: &mut [u8; AREA]) -> Result<(), Wrong> {
    type CompareFn = unsafe extern "C" fn(*const u8, *const u8, usize) -> i32;
    let memcmp = black_box(guest_agent::rt::memcmp as CompareFn);
    for len in LENGTHS {
        for a in 0..64 {
            // `b - a` runs through every residue modulo 64 as `a` does (5 is odd).
            let b = AREA / 2 + a + (a * 5) % 64;
            fill(area);
            area.copy_within(a..a + len, b);
            // SAFETY: `a + len` and `b + len` lie within the area (`a`, `(a * 5) % 64` < 64 and
            // `len` ≤ 700 < AREA / 2 - 128).
            let compare = |base: *const u8| unsafe { memcmp(base.add(a), base.add(b), len) };
            if compare(area.as_ptr()) != 0 {
                return Err(("memcmp of equal bytes", len, a, b));
            }
            // Every byte of the first step and into the second, then every third byte (all
            // words of every later step, at moving places within them).
            let places = [len / 2, len.wrapping_sub(1)].into_iter().chain(0..40);
            let places = places.chain((40..len).step_by(3));
            for at in places.filter(|&at| at < len) {
                for delta in [1u8, 255] {
                    let original = area[b + at];
                    area[b + at] = original.wrapping_add(delta);
                    let want = i32::from(area[a + at]) - i32::from(area[b + at]);
                    let got = compare(area.as_ptr());
                    area[b + at] = original;
                    if got.signum() != want.signum() {
                        return Err(("memcmp", len, a + at, b + at));
                    }
                }
            }
        }
    }
    Ok(())
}

fn main(_: &'static BootInfo) -> u32 {
    let mut area = [0u8; AREA];
    let checks = check_copies(&mut area)
        .and_then(|()| check_set(&mut area))
        .and_then(|()| check_compare(&mut area));
    match checks {
        Ok(()) => {
            println!("memfns: ok");
            0
        }
        Err((what, len, from, to)) => {
            println!("memfns: {what} of {len} bytes from {from} to {to} is wrong");
            1
        }
    }
}

guest_agent::entry!(main);
