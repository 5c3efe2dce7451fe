//! A link's Noise sessions across rekeys.
//!
//! A rekey is a fresh IK handshake carried inside the link (REKEY, REKEY_REPLY), started by
//! the link's initiator. Each side switches its sending key right after the record that ends
//! its part (REKEY_REPLY for the responder, REKEY_DONE for the initiator) and its receiving key
//! right after the record in which the other side's part ended; TCP keeps records in order, so
//! no frame is lost or read under the wrong key. While the switch is under way the two
//! directions can be on different sessions; the old one is dropped (its keys zeroed) once both
//! have moved.

use std::time::Instant;

use super::handshake::{Initiation, Transport};

/// The sessions of one link.
pub(super) struct Sessions {
    slots: [Option<Transport>; 2],
    tx: usize,
    rx: usize,
    /// When the current session began (for the rekey and reject timers).
    pub(super) started: Instant,
    /// Records sealed and opened under the current session.
    pub(super) records: u64,
    /// The initiator's handshake in flight.
    pub(super) rekey: Option<(Initiation, Instant)>,
}

impl Sessions {
    /// A link's first session.
    pub(super) fn new(first: Transport, now: Instant) -> Self {
        Self { slots: [Some(first), None], tx: 0, rx: 0, started: now, records: 0, rekey: None }
    }

    /// The session sealing what this side sends.
    pub(super) fn tx(&mut self) -> Option<&mut Transport> {
        self.slots[self.tx].as_mut()
    }

    /// The session opening what this side receives.
    pub(super) fn rx(&mut self) -> Option<&mut Transport> {
        self.slots[self.rx].as_mut()
    }

    /// Whether a rekey is under way (either side's part).
    pub(super) fn switching(&self) -> bool {
        self.tx != self.rx || self.rekey.is_some()
    }

    /// Installs the new session; neither direction uses it yet.
    pub(super) fn install(&mut self, next: Transport) {
        self.slots[1 - self.tx] = Some(next);
    }

    /// Sends from now on under the new session.
    pub(super) fn switch_tx(&mut self, now: Instant) -> bool {
        self.tx = 1 - self.tx;
        self.settle(now)
    }

    /// Receives from now on under the new session.
    pub(super) fn switch_rx(&mut self, now: Instant) -> bool {
        self.rx = 1 - self.rx;
        self.settle(now)
    }

    /// Drops the old session once both directions left it; true if the rekey completed.
    fn settle(&mut self, now: Instant) -> bool {
        if self.tx != self.rx {
            return false;
        }
        self.slots[1 - self.tx] = None;
        self.started = now;
        self.records = 0;
        true
    }
}
