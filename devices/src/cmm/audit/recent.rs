//! The records kept in memory for the control API: link and channel events in one ring,
//! refusals in another, so that a flood of refused requests cannot push a `link_down` out of
//! what an operator sees.

use std::collections::VecDeque;

use super::entry::Entry;

/// Records kept of each kind.
pub const RECENT: usize = 256;

/// Refusals of requests, messages and frames: what an outsider can cause over and over.
const REFUSALS: &[&str] = &[
    "request_refused",
    "send_refused",
    "message_rejected",
    "offer_rejected",
    "close_rejected",
    "reply_rejected",
    "frame_rejected",
];

/// The two rings, each oldest first, with a sequence number to merge them in order.
#[derive(Debug, Default)]
pub(super) struct Recent {
    events: VecDeque<(u64, Entry)>,
    refusals: VecDeque<(u64, Entry)>,
    next: u64,
}

impl Recent {
    pub(super) fn push(&mut self, entry: Entry) {
        let ring =
            if REFUSALS.contains(&entry.event) { &mut self.refusals } else { &mut self.events };
        if ring.len() == RECENT {
            ring.pop_front();
        }
        ring.push_back((self.next, entry));
        self.next += 1;
    }

    /// Both rings merged, oldest first.
    pub(super) fn all(&self) -> Vec<Entry> {
        let mut all: Vec<&(u64, Entry)> = self.events.iter().chain(&self.refusals).collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, e)| *e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmm::audit::Record;

    #[test]
    fn a_flood_of_refusals_does_not_push_out_link_events() {
        let mut recent = Recent::default();
        recent.push(Entry::now(&Record::link("link_down", "keepalive_timeout", Some(2))));
        for _ in 0..10_000 {
            recent.push(Entry::now(&Record::link("request_refused", "no_channel", None)));
        }
        let all = recent.all();
        assert_eq!(all.len(), RECENT + 1);
        assert_eq!(all[0].event, "link_down", "still there, and first");
        assert!(all[1..].iter().all(|e| e.event == "request_refused"));
    }
}
