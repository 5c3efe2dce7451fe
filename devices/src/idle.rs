//! The idle port: how a polling guest gives its CPU back.
//!
//! Firmware polls its used rings (it takes no interrupts: docs/HOST.md), so an idle guest would
//! spin its vCPU thread at 100% and starve the device thread that is to fill those rings. After
//! a short spin it writes the longest it is willing to wait, in microseconds, to [`IDLE_PORT`];
//! the vCPU thread then sleeps until a device of the partition uses a buffer, or that long.
//!
//! [`IDLE_PORT`]: guest_agent::platform::IDLE_PORT

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::bus::{lock, BusDevice, IoAction};

/// Longest sleep a guest may ask for at once. A stop request does not wait for it: the
/// supervisor wakes a sleeping vCPU (`Wake::wake`) as it kicks it.
pub const MAX_IDLE: Duration = Duration::from_secs(60);

/// Wakes a partition's idle vCPU when one of its devices used a buffer.
#[derive(Debug, Default)]
pub struct Wake {
    state: Mutex<WakeState>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct WakeState {
    /// Something happened since the last wait.
    pending: bool,
    /// The vCPU thread sleeps in [`Wake::wait`].
    sleeping: bool,
}

impl Wake {
    /// Something happened the guest may be waiting for. Every used buffer calls this, on the
    /// device thread and on vCPU threads: it makes a system call (the condvar's futex wake)
    /// only when the vCPU actually sleeps, which a spinning guest's does not.
    pub fn wake(&self) {
        let sleeping = {
            let mut state = lock(&self.state);
            state.pending = true;
            state.sleeping
        };
        if sleeping {
            self.ready.notify_one();
        }
    }

    /// Sleeps until [`Wake::wake`] (even one since the last wait: nothing is missed) or for
    /// `limit`. `sleeping` is set and read under the same lock as `pending`, so a wake either
    /// sees the sleeper or is seen by it before it sleeps.
    pub fn wait(&self, limit: Duration) {
        let mut state = lock(&self.state);
        if !state.pending {
            state.sleeping = true;
            state = match self.ready.wait_timeout_while(state, limit, |s| !s.pending) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
            state.sleeping = false;
        }
        state.pending = false;
    }
}

/// The idle port of one partition.
pub struct IdlePort {
    wake: std::sync::Arc<Wake>,
}

impl IdlePort {
    /// The port, woken through `wake`.
    pub fn new(wake: std::sync::Arc<Wake>) -> Self {
        Self { wake }
    }
}

impl BusDevice for IdlePort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> IoAction {
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let micros = u64::from(u32::from_le_bytes(raw));
        self.wake.wait(Duration::from_micros(micros).min(MAX_IDLE));
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_wake_before_the_wait_is_not_missed_and_waits_are_bounded() {
        let wake = Arc::new(Wake::default());
        wake.wake();
        let start = Instant::now();
        wake.wait(Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(1), "the earlier wake counts");
        let start = Instant::now();
        IdlePort::new(wake.clone()).write(0, &20_000u32.to_le_bytes());
        assert!(start.elapsed() >= Duration::from_millis(20), "as long as asked");
        assert!(Duration::from_micros(u64::from(u32::MAX)) > MAX_IDLE, "and capped");
        let w = wake.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.wake();
        });
        let start = Instant::now();
        wake.wait(Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(1), "woken");
        waker.join().unwrap();
    }
}
