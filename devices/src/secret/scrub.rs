//! Wiping what key set-up leaves on the stack.
//!
//! Libraries build key state in locals and return or move it (a `ring` key schedule, an HKDF
//! output, a Noise chaining key inside `snow`). Where such state is then written into secret
//! memory, its stack copies are still there in frames that have returned, until something
//! happens to overwrite them. [`scrubbed`] runs the key set-up and then overwrites the stack it
//! may have used.
//!
//! Why that is sound: `scrubbed` calls the work through a function that is never inlined, so
//! all of the work's locals live in frames below `scrubbed`'s own frame. When it returns,
//! [`scrub_stack`], called from the same frame, zeroes [`SCRUB_BYTES`] below that same point,
//! which is more than any set-up here uses (a few KiB: `ring`'s AES and GHASH key set-up,
//! x25519, HKDF-SHA256). What crosses back through the return value must not be a secret: the
//! callers here return `()`, a status or a public value, and write secrets into secret memory.

/// Bytes of stack [`scrub_stack`] zeroes: more than key set-up uses.
pub const SCRUB_BYTES: usize = 32 * 1024;
/// Bytes of stack [`scrubbed_light`] zeroes: more than one cipher call uses (`ring`'s
/// ChaCha20 keeps its state rows on the stack while it runs).
pub const LIGHT_SCRUB_BYTES: usize = 4 * 1024;

/// Zeroes [`SCRUB_BYTES`] of the stack below the caller's frame.
pub fn scrub_stack() {
    scrub::<SCRUB_BYTES>();
}

#[inline(never)]
fn scrub<const BYTES: usize>() {
    let mut area = [0u8; BYTES];
    zeroize::Zeroize::zeroize(&mut area[..]);
    std::hint::black_box(&area);
}

/// Runs `work`, then zeroes the stack it may have used (see the module documentation).
#[inline(never)]
pub fn scrubbed<R>(work: impl FnOnce() -> R) -> R {
    let result = run(work);
    scrub::<SCRUB_BYTES>();
    result
}

/// As [`scrubbed`], for one cipher call on a key already set up: a smaller wipe, cheap enough
/// for every record of a link.
#[inline(never)]
pub fn scrubbed_light<R>(work: impl FnOnce() -> R) -> R {
    let result = run(work);
    scrub::<LIGHT_SCRUB_BYTES>();
    result
}

#[inline(never)]
fn run<R>(work: impl FnOnce() -> R) -> R {
    work()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leaves a marker in a stack frame 8 KiB below the caller's (deep enough that the test's
    /// own calls, unoptimised in debug builds, do not reach it) and returns where it was.
    #[inline(never)]
    fn leave_marker() -> usize {
        let mut padding = [1u8; 8192];
        std::hint::black_box(&mut padding);
        marker()
    }

    #[inline(never)]
    fn marker() -> usize {
        let mut local = [0x5au8; 256];
        std::hint::black_box(&mut local);
        local.as_ptr() as usize
    }

    /// Marker bytes still at `at`, read without calling anything that could use the stack.
    #[inline(always)]
    fn survivors(at: usize) -> usize {
        let mut found = 0;
        for i in 0..256 {
            // SAFETY: reading this thread's own stack below the live frames (mapped, and
            // dead to the compiler, hence volatile).
            if unsafe { std::ptr::read_volatile((at + i) as *const u8) } == 0x5a {
                found += 1;
            }
        }
        found
    }

    #[test]
    fn the_stack_below_the_caller_is_wiped() {
        // The control: without a scrub the marker is still there to be found.
        let at = run(leave_marker);
        assert!(survivors(at) > 200, "the test cannot see stale stack: it proves nothing");
        let at = scrubbed(leave_marker);
        assert_eq!(survivors(at), 0, "the marker survived the scrub");
    }
}
