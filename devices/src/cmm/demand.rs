//! Links on demand (docs/OPERATOR.md, "Links on demand"): an offer to a node with no link
//! waits for one, the router is asked to make it, and a link that no channel has used for its
//! idle time is closed.
//!
//! An offer's key is held (in secret memory) until the offer is answered, so that an offer
//! whose link is lost before its answer, as when the peer closed the link for idleness at the
//! moment the offer left, is made again on the next link with a fresh salt: the peer may have
//! accepted the first and sealed messages under its keys, which must never be used twice.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use guest_agent::channel::abi::status;

use super::connection_table::{ChannelId, ChannelState};
use super::manager::Core;
use crate::crypto::channel::SALT_SIZE;
use crate::link::router::Router;
use crate::link::wire::Frame;

/// How often unused links are looked for.
const IDLE_SCAN: Duration = Duration::from_secs(1);

/// The CMM's side of links on demand.
#[derive(Default)]
pub(super) struct Demand {
    /// How long a link may go unused; `None`: links are a full mesh, not on demand.
    pub(super) idle_after: Option<Duration>,
    /// Offers waiting for a link, per node.
    waiting: std::collections::HashMap<u32, Vec<ChannelId>>,
    /// Keys of offers not answered yet.
    held: std::collections::HashMap<ChannelId, super::key_table::HeldKey>,
    /// When each linked node last had a channel.
    last_used: std::collections::HashMap<u32, Instant>,
    last_scan: Option<Instant>,
}

impl Demand {
    pub(super) fn new(idle_after: Option<Duration>) -> Self {
        Self { idle_after, ..Self::default() }
    }

    /// Whether offers wait for links (rather than fail UNREACHABLE without one).
    pub(super) fn on(&self) -> bool {
        self.idle_after.is_some()
    }
}

impl Core {
    /// Keeps the scratch key of offer `id` until it is answered (links on demand only);
    /// false if secret memory is full.
    pub(super) fn hold_offer_key(&mut self, id: ChannelId) -> bool {
        if !self.demand.on() {
            return true;
        }
        match self.keys.hold_scratch() {
            Ok(held) => {
                self.demand.held.insert(id, held);
                true
            }
            Err(_) => false,
        }
    }

    /// Offer `id` is answered or ended: its held key goes.
    pub(super) fn release_offer_key(&mut self, id: ChannelId) {
        if let Some(held) = self.demand.held.remove(&id) {
            self.keys.release(held);
        }
    }

    /// Stages offer `id` on its node's link: `(key, source, destination)` with the held key,
    /// or the scratch key where none is held. False if the link could not take it.
    pub(super) fn stage_offer(&self, router: &mut Router, id: ChannelId) -> bool {
        let Some(entry) = self.table.get(id).filter(|e| e.state == ChannelState::Offering) else {
            return true; // ended meanwhile: nothing to send
        };
        let key = match self.demand.held.get(&id) {
            Some(held) => self.keys.held(*held),
            None => Some(self.keys.scratch()),
        };
        let Some(key) = key else { return false };
        let frame = Frame::Offer {
            id: id.0,
            source: entry.local,
            destination: entry.remote,
            salt: entry.salt,
            key,
        };
        router.stage(entry.remote.node, &frame).is_ok()
    }

    /// Offer `id` waits for a link to `node`; the router is asked for one.
    pub(super) fn await_link(&mut self, router: &mut Router, node: u32, id: ChannelId) {
        self.demand.waiting.entry(node).or_default().push(id);
        if router.is_up(node) {
            self.links_up(router, &[node]);
        } else {
            router.want(node);
        }
    }

    /// Offer `id` no longer waits (it timed out or was abandoned).
    pub(super) fn unwait(&mut self, node: u32, id: ChannelId) {
        if let Some(ids) = self.demand.waiting.get_mut(&node) {
            ids.retain(|w| *w != id);
        }
    }

    /// Links to `nodes` came up: the offers waiting for them go.
    pub(super) fn links_up(&mut self, router: &mut Router, nodes: &[u32]) {
        let now = Instant::now();
        for &node in nodes {
            self.demand.last_used.insert(node, now);
            let ids = self.demand.waiting.remove(&node).unwrap_or_default();
            let mut unsent = Vec::new();
            for id in ids {
                if !self.stage_offer(router, id) {
                    unsent.push(id);
                }
            }
            if !unsent.is_empty() {
                // The link broke as it came: its going down asks for another.
                self.demand.waiting.entry(node).or_default().extend(unsent);
            }
        }
    }

    /// No link could be had to `nodes`: the OPENs waiting for them fail UNREACHABLE.
    pub(super) fn links_unreachable(&mut self, nodes: &[u32]) {
        for node in nodes {
            for id in self.demand.waiting.remove(node).unwrap_or_default() {
                self.fail_offer(id, status::UNREACHABLE);
            }
        }
    }

    /// Fails the OPEN of offer `id` with `code`, if it is still an offer.
    pub(super) fn fail_offer(&mut self, id: ChannelId, code: u32) {
        let Some(entry) = self.table.get(id).filter(|e| e.state == ChannelState::Offering) else {
            return;
        };
        let partition = entry.local.partition;
        self.remove(id);
        let code = self.refuse(partition, code);
        self.answers.push((id, Err(code)));
    }

    /// The link to `node` went down before offer `id` was answered: with its key held, the
    /// offer is made again on the next link, keyed afresh; otherwise its OPEN fails.
    pub(super) fn offer_again(&mut self, router: &mut Router, node: u32, id: ChannelId) {
        let Some(&held) = self.demand.held.get(&id) else {
            return self.fail_offer(id, status::UNREACHABLE);
        };
        let mut salt = [0u8; SALT_SIZE];
        let rebuilt = crate::entropy::fill(&mut salt).ok().and_then(|()| {
            let entry = self.table.get(id)?;
            let (slot, local, remote) = (entry.key?, entry.local, entry.remote);
            self.keys.rebuild_remote(slot, held, &salt, &local, &remote)
        });
        let Some(slot) = rebuilt else {
            if let Some(entry) = self.table.get_mut(id) {
                entry.key = None; // the old ciphers are gone
            }
            return self.fail_offer(id, status::INTERNAL);
        };
        if let Some(entry) = self.table.get_mut(id) {
            entry.key = Some(slot);
            entry.salt = salt;
        }
        self.await_link(router, node, id);
    }

    /// Closes, with a GOODBYE, every link on demand that no channel (open, or being offered)
    /// has used for the idle time. Looked at once a second.
    pub(super) fn close_idle_links(&mut self, router: &mut Router, now: Instant) {
        let Some(idle_after) = self.demand.idle_after else { return };
        if self.demand.last_scan.is_some_and(|t| now.saturating_duration_since(t) < IDLE_SCAN) {
            return;
        }
        self.demand.last_scan = Some(now);
        let mut used: HashSet<u32> = self
            .table
            .all()
            .filter(|(_, e)| matches!(e.state, ChannelState::Open | ChannelState::Offering))
            .map(|(_, e)| e.remote.node)
            .collect();
        used.extend(self.demand.waiting.iter().filter(|(_, ids)| !ids.is_empty()).map(|(n, _)| n));
        let up: Vec<u32> = router.up_nodes().collect();
        self.demand.last_used.retain(|node, _| up.contains(node));
        for node in up {
            let since = *self.demand.last_used.entry(node).or_insert(now);
            if used.contains(&node) {
                self.demand.last_used.insert(node, now);
            } else if now.saturating_duration_since(since) >= idle_after {
                self.demand.last_used.remove(&node);
                router.close_idle(node);
            }
        }
    }
}
