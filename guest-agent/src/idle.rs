//! Waiting politely: firmware polls, but after a short spin it lets the host run other work.
//!
//! Every port write is a VM exit (~25 us here), so a poll loop first spins; once nothing has
//! happened for a while it writes to [`IDLE_PORT`], and the VMM parks the vCPU until one of the
//! partition's devices uses a buffer (or the timeout passes). The host's device thread then gets
//! the CPU instead of competing with a guest that only waits for it.

use crate::platform::IDLE_PORT;
use crate::port_io::outl;

/// Empty polls spun before yielding.
const SPINS: u32 = 8192;
/// Longest a single yield waits (the VMM caps it at 10 ms).
const IDLE_MICROS: u32 = 10_000;

/// Parks the vCPU until a device of this partition uses a buffer, or `max_micros` pass.
pub fn idle(max_micros: u32) {
    outl(IDLE_PORT, max_micros);
}

/// Spin-then-yield for poll loops: call [`Backoff::snooze`] after each poll that found nothing
/// and [`Backoff::reset`] after one that found something.
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    empty: u32,
}

impl Backoff {
    /// A fresh backoff.
    pub const fn new() -> Self {
        Self { empty: 0 }
    }

    /// A poll found nothing: spin, or after a while yield the CPU to the host.
    pub fn snooze(&mut self) {
        if self.empty < SPINS {
            self.empty += 1;
            core::hint::spin_loop();
        } else {
            idle(IDLE_MICROS);
        }
    }

    /// A poll found work.
    pub fn reset(&mut self) {
        self.empty = 0;
    }
}
