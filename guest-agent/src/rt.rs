//! The bare-metal runtime: entry, panic handler and the libc symbols `core` needs.
//!
//! Firmware is built for the host target with `#![no_std] #![no_main]` and linked without any C
//! runtime (see `firmware-fixtures/guest`), so this module provides what a C library otherwise
//! would. The VMM enters at `_start` in 64-bit mode at CPL 3 with `RDI` = boot-info address and
//! `RSP` aligned as if `_start` had been called.

use core::panic::PanicInfo;

use crate::boot_info::BootInfo;
use crate::exit::exit;
use crate::platform::{BAD_BOOT_INFO_EXIT_STATUS, PANIC_EXIT_STATUS};

/// Defines the firmware entry point `_start`, which validates the boot-info block, calls
/// `$main(&BootInfo) -> u32` and exits with the status it returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Firmware entry point, placed first in the image by the linker script.
        #[no_mangle]
        #[link_section = ".text.entry"]
        pub extern "C" fn _start(boot_info: *const $crate::boot_info::BootInfo) -> ! {
            $crate::rt::start(boot_info, $main)
        }
    };
}

/// Runs `main` on the boot-info block at `boot_info` and exits with its status.
pub fn start(boot_info: *const BootInfo, main: fn(&'static BootInfo) -> u32) -> ! {
    // SAFETY: the VMM passes the guest-physical address of a boot-info block in guest RAM, and
    // guest RAM is identity-mapped, so the pointer is valid and aligned for reads for the whole
    // run; nothing writes the block after boot. Its contents are checked before use below.
    let info: &'static BootInfo = unsafe { &*boot_info };
    if let Err(e) = info.validate() {
        crate::println!("guest-agent: bad boot-info block: {e:?}");
        exit(BAD_BOOT_INFO_EXIT_STATUS);
    }
    crate::pages::init(info);
    crate::time::init(info);
    exit(main(info))
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::println!("panic: {info}");
    exit(PANIC_EXIT_STATUS)
}

// The memory functions below are written with `rep movsq`/`rep movsb`/`rep stosb` and volatile
// reads so that the compiler cannot recognise them as the very functions they define and call
// themselves.

/// # Safety
/// As C's `memcpy`: `dst` and `src` valid for `n` bytes and not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract, stricter than `copy_forward`'s.
    unsafe { copy_forward(dst, src, n) };
    dst
}

/// Copies `n` bytes from `src` to `dst`, lowest address first.
///
/// Long copies go eight bytes at a time: on AMD EPYC processors `rep movsb` runs at a
/// twentieth of its speed when `dst` lies 1 to 31 bytes past `src` modulo 4 KiB (a guest meets
/// that whenever its buffers sit so: a payload taken from a receive buffer, 32 bytes past its
/// start, into a buffer 48 bytes into a page, say), while `rep movsq` keeps about half its
/// speed there (docs/PERFORMANCE.md, "Copies"). No SSE: this may run at CPL 0.
///
/// # Safety
///
/// `dst` and `src` valid for `n` bytes, and not overlapping unless `dst` is below `src` (a
/// forward copy, eight bytes or one at a time, reads each byte before it is overwritten then).
/// `memmove` calls this rather than `memcpy`, which the compiler may assume does not overlap.
unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    let (words, rest) = if n >= 64 { (n / 8, n % 8) } else { (0, n) };
    // SAFETY: the caller guarantees both ranges (`8 * words + rest == n`); the direction flag
    // is clear (System V ABI), so both instructions copy forwards, and the first leaves rdi and
    // rsi where the second goes on.
    unsafe {
        core::arch::asm!("rep movsq", "mov rcx, {rest}", "rep movsb", rest = in(reg) rest,
            inout("rcx") words => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
}

/// # Safety
/// As C's `memmove`: `dst` and `src` valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap: dst is below src, or past its end. A forward copy is safe.
        // SAFETY: the caller guarantees both ranges, and dst is not inside src past its start.
        unsafe { copy_forward(dst, src, n) };
        return dst;
    }
    // dst overlaps the tail of src: copy backwards, from the last byte down.
    // SAFETY: the caller guarantees both ranges; `std` is undone by `cld` before returning, as
    // the ABI requires the direction flag clear at calls and returns.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// As C's `memset`: `dst` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; the direction flag is clear.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") value as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memcmp`: `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller guarantees both ranges.
    let mut i = unsafe { equal_prefix(a, b, n) };
    while i < n {
        // SAFETY: `i < n` and the caller guarantees both ranges.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// How many leading bytes of `a` and `b` are surely equal, in steps of 32 bytes: four
/// eight-byte words per step, with one `black_box` per step (it keeps the compiler from turning
/// the loop back into a call to memcmp, and costs a store and a load) rather than one per word.
///
/// # Safety
/// `a` and `b` valid for `n` bytes.
unsafe fn equal_prefix(a: *const u8, b: *const u8, n: usize) -> usize {
    let mut i = 0;
    while i + 32 <= n {
        let word = |p: *const u8, k: usize| {
            // SAFETY: `i + 32 <= n`, `k < 4`, and the caller guarantees both ranges.
            unsafe { p.add(i + 8 * k).cast::<u64>().read_unaligned() }
        };
        let differ = (word(a, 0) ^ word(b, 0))
            | (word(a, 1) ^ word(b, 1))
            | (word(a, 2) ^ word(b, 2))
            | (word(a, 3) ^ word(b, 3));
        if core::hint::black_box(differ) != 0 {
            break;
        }
        i += 32;
    }
    i
}

/// # Safety
/// As C's `bcmp`: `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`.
    unsafe { memcmp(a, b, n) }
}

/// Never called (firmware aborts on panic), but the precompiled `core` refers to it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
