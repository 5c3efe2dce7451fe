//! Waiting politely: firmware polls, but spins only as long as spinning pays off, then lets the
//! host run other work.
//!
//! Every port write is a VM exit (~25 us here), so a poll loop first spins; once nothing has
//! happened for the spin window it writes to [`IDLE_PORT`], and the VMM parks the vCPU until
//! one of the partition's devices uses a buffer (or the timeout passes). The host's device
//! thread then gets the CPU instead of competing with a guest that only waits for it.
//!
//! The window adapts across waits the way KVM's halt polling does: a wait that parked but
//! ended within [`MAX_WINDOW_NS`] would have been caught by spinning longer, so the window
//! doubles (from [`GROW_START_NS`]); a wait longer than that means spinning only burned a core
//! the host needed, so it halves. A busy ping-pong settles on spinning just long enough; an
//! idle or slow peer on parking almost at once.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::platform::IDLE_PORT;
use crate::port_io::outl;
use crate::time::{elapsed_nanos, ticks};

/// Longest a single park waits: a second, so that an idle guest costs its host nothing
/// between device events (the VMM wakes it for each, and for a stop), while a loop that also
/// watches a clock of its own sees it at least that often.
const IDLE_MICROS: u32 = 1_000_000;
/// Longest a patient park waits (the VMM's own limit): for waits that only a device event can
/// end, which wakes the vCPU whatever the limit.
const PATIENT_MICROS: u32 = 60_000_000;
/// The widest spin window.
pub const MAX_WINDOW_NS: u32 = 200_000;
/// Where a window that grows starts from.
pub const GROW_START_NS: u32 = 10_000;
/// Empty polls standing in for the window when the TSC rate is unknown (per nanosecond).
const POLLS_PER_US: u64 = 30;

/// The spin window now, in nanoseconds (one vCPU per partition, so one window).
static WINDOW_NS: AtomicU32 = AtomicU32::new(GROW_START_NS);

/// Parks the vCPU until a device of this partition uses a buffer, or `max_micros` pass.
pub fn idle(max_micros: u32) {
    outl(IDLE_PORT, max_micros);
}

/// The spin window now, in nanoseconds.
pub fn window_ns() -> u32 {
    WINDOW_NS.load(Ordering::Relaxed)
}

/// The next window after a wait of `waited_ns` that did or did not park.
pub fn adapt(window: u32, waited_ns: u64, parked: bool) -> u32 {
    if !parked {
        window // spinning caught it: as it is
    } else if waited_ns > u64::from(MAX_WINDOW_NS) {
        window / 2
    } else {
        (window.saturating_mul(2)).clamp(GROW_START_NS, MAX_WINDOW_NS)
    }
}

/// Spin-then-park for poll loops: call [`Backoff::snooze`] after each poll that found nothing
/// and [`Backoff::reset`] after one that found something.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// TSC at the first empty poll of this wait (0: not waiting).
    started: u64,
    /// Empty polls in this wait.
    polls: u64,
    parked: bool,
    /// Longest park, in microseconds.
    limit: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A fresh backoff whose parks last at most a second: for loops that also watch a clock.
    pub const fn new() -> Self {
        Self { started: 0, polls: 0, parked: false, limit: IDLE_MICROS }
    }

    /// A fresh backoff for a wait only a device event ends (a message, an answer, a used
    /// buffer): it parks for up to a minute, so an idle guest wakes its host only for events.
    pub const fn patient() -> Self {
        Self { limit: PATIENT_MICROS, ..Self::new() }
    }

    /// A poll found nothing: spin while the window lasts, then park.
    pub fn snooze(&mut self) {
        let now = ticks();
        if self.polls == 0 {
            self.started = now;
        }
        self.polls += 1;
        let window = u64::from(window_ns());
        let within = match elapsed_nanos(now.wrapping_sub(self.started)) {
            Some(ns) => ns < window,
            None => self.polls < window / 1000 * POLLS_PER_US,
        };
        if within {
            core::hint::spin_loop();
        } else {
            self.parked = true;
            idle(self.limit);
        }
    }

    /// A poll found work: the wait is over, and the window learns from it.
    pub fn reset(&mut self) {
        if self.polls > 0 {
            if let Some(waited) = elapsed_nanos(ticks().wrapping_sub(self.started)) {
                WINDOW_NS.store(adapt(window_ns(), waited, self.parked), Ordering::Relaxed);
            }
        }
        *self = Self { limit: self.limit, ..Self::new() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_for_short_parked_waits_and_shrinks_for_long_ones() {
        assert_eq!(adapt(20_000, 5_000, false), 20_000, "caught while spinning");
        assert_eq!(
            adapt(20_000, 50_000, true),
            40_000,
            "parked, but spinning would have caught it"
        );
        assert_eq!(adapt(150_000, 190_000, true), MAX_WINDOW_NS, "capped");
        assert_eq!(adapt(0, 50_000, true), GROW_START_NS, "grows again from the start");
        assert_eq!(adapt(40_000, 5_000_000, true), 20_000, "a long wait halves it");
        assert_eq!(adapt(1, 5_000_000, true), 0, "down to parking at once");
    }
}
