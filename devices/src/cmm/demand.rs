//! Links on demand (docs/OPERATOR.md, "Links on demand"): an offer to a node with no link
//! waits for one, the router is asked to make it, and a link that no channel has used for its
//! idle time is closed.
//!
//! An offer's key is held (in secret memory) until the offer is answered, so that an offer
//! whose link is lost before its answer, as when the peer closed the link for idleness at the
//! moment the offer left, is made again on the next link with a fresh salt: the peer may have
//! accepted the first and sealed messages under its keys, which must never be used twice.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use guest_agent::channel::abi::status;

use super::connection_table::{ChannelId, ChannelState};
use super::key_table::HeldKey;
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
    waiting: HashMap<u32, Vec<ChannelId>>,
    /// Keys of offers not answered yet, with the peer's static key when the OPEN was made:
    /// an offer is never made to a node that has since changed its key.
    held: HashMap<ChannelId, (HeldKey, Option<[u8; 32]>)>,
    /// When each linked node last had a channel.
    last_used: HashMap<u32, Instant>,
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
    pub(super) fn hold_offer_key(&mut self, router: &Router, id: ChannelId, node: u32) -> bool {
        if !self.demand.on() {
            return true;
        }
        match self.keys.hold_scratch() {
            Ok(held) => {
                self.demand.held.insert(id, (held, router.peer_key(node)));
                true
            }
            Err(_) => false,
        }
    }

    /// Offer `id` is answered or ended: its held key goes, and it waits no more.
    pub(super) fn release_offer_key(&mut self, id: ChannelId, node: u32) {
        if let Some((held, _)) = self.demand.held.remove(&id) {
            self.keys.release(held);
        }
        self.unwait(node, id);
    }

    /// Stages offer `id` on its node's link: `(key, source, destination)` with the held key,
    /// or the scratch key where none is held. False if the link could not take it.
    pub(super) fn stage_offer(&self, router: &mut Router, id: ChannelId) -> bool {
        let Some(entry) = self.table.get(id).filter(|e| e.state == ChannelState::Offering) else {
            return true; // ended meanwhile: nothing to send
        };
        let key = match self.demand.held.get(&id) {
            // A node whose key changed since the OPEN is not the node the guest opened to.
            Some((_, peer)) if *peer != router.peer_key(entry.remote.node) => None,
            Some((held, _)) => self.keys.held(*held),
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

    /// Offer `id` waits for a link to `node` (once, however often it is asked); the router is
    /// asked for one.
    pub(super) fn await_link(&mut self, router: &mut Router, node: u32, id: ChannelId) {
        let waiting = self.demand.waiting.entry(node).or_default();
        if !waiting.contains(&id) {
            waiting.push(id);
        }
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

    /// Links to `nodes` came up: the offers waiting for them go. One the link does not take
    /// (it broke as it came) is made again when its going down is handled; one for a node
    /// whose key changed since its OPEN fails UNREACHABLE.
    pub(super) fn links_up(&mut self, router: &mut Router, nodes: &[u32]) {
        let now = Instant::now();
        for &node in nodes {
            self.demand.last_used.insert(node, now);
            let ids = self.demand.waiting.remove(&node).unwrap_or_default();
            for id in ids {
                if !self.stage_offer(router, id) && router.is_up(node) {
                    self.fail_offer(id, status::UNREACHABLE);
                }
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
        let Some(&(held, _)) = self.demand.held.get(&id) else {
            return self.fail_offer(id, status::UNREACHABLE);
        };
        let mut salt = [0u8; SALT_SIZE];
        let entry = self.table.get(id).and_then(|e| Some((e.key?, e.local, e.remote)));
        let Some((slot, local, remote)) = entry else { return };
        if crate::entropy::fill(&mut salt).is_err() {
            return self.fail_offer(id, status::INTERNAL);
        }
        let Some(slot) = self.keys.rebuild_remote(slot, held, &salt, &local, &remote) else {
            if let Some(entry) = self.table.get_mut(id) {
                entry.key = None; // the old ciphers went with the rebuild
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
        let up: HashSet<u32> = router.up_nodes().collect();
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::TcpListener;
    use std::sync::Arc;

    use guest_agent::channel::abi::{Endpoint, RxHeader};

    use super::*;
    use crate::cmm::audit::Audit;
    use crate::cmm::{Cmm, CmmConfig, Deliver, Delivered, KeySource, Opening};
    use crate::crypto::node_key::NodeKey;
    use crate::link::router::{FdChange, RouterConfig};
    use crate::link::{Directory, LinkManager, LinkSettings, Peer};

    /// A node's CMM and links on demand, driven from the test thread as the device thread
    /// would drive them.
    struct Node {
        cmm: Cmm,
        tokens: HashSet<usize>,
        audit: Audit,
        _links: LinkManager,
    }

    struct Sink;

    impl Deliver for Sink {
        fn deliver(&mut self, _: u32, _: &RxHeader, _: &[u8], _: bool) -> Delivered {
            Delivered::Written
        }
    }

    struct GuestKey;

    impl KeySource for GuestKey {
        fn read_key(&mut self, out: &mut [u8; 32]) -> bool {
            out.fill(7);
            true
        }
    }

    impl Node {
        /// Takes new links; reads their sockets only if `read`.
        fn drive(&mut self, read: bool) {
            self.cmm.links_arrived();
            for change in self.cmm.take_fd_changes() {
                if let FdChange::Watch { token, .. } = change {
                    self.tokens.insert(token);
                }
            }
            if read {
                for &token in &self.tokens {
                    self.cmm.link_readable(token, &mut Sink);
                }
                self.cmm.tick();
            }
        }

        fn salt(&self, partition: u32) -> Option<[u8; 16]> {
            self.cmm.list_all().iter().find(|c| c.partition == partition).map(|c| c.salt)
        }

        fn audited(&self, event: &str) -> usize {
            let event = format!("\"event\":\"{event}\"");
            self.audit.recent().iter().filter(|r| r.contains(&event)).count()
        }
    }

    fn pair() -> (Node, Node) {
        let (a, b, _) = pair_with_peers();
        (a, b)
    }

    /// Nodes 1 and 2, and the directory they share.
    fn pair_with_peers() -> (Node, Node, Vec<Peer>) {
        let keys = [NodeKey::generate().unwrap(), NodeKey::generate().unwrap()];
        let addresses = [0, 1].map(|_| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap() // dropped: its port, for the node to bind again
        });
        let peers: Vec<Peer> = (0..2)
            .map(|i| Peer {
                id: i as u32 + 1,
                address: addresses[i],
                public_key: *keys[i].public(),
            })
            .collect();
        let settings = LinkSettings {
            router: RouterConfig {
                idle_after: Some(Duration::from_secs(60)),
                ..RouterConfig::default()
            },
            ..LinkSettings::default()
        };
        let directory = Directory::new(peers.clone());
        let mut nodes = keys.into_iter().zip(addresses).enumerate().map(|(i, (key, address))| {
            let id = i as u32 + 1;
            let audit = Audit::to_log(id).unwrap();
            let (links, router) = LinkManager::start(
                id,
                Arc::new(key),
                directory.clone(),
                address,
                audit.clone(),
                settings,
                || {},
            )
            .unwrap();
            let mut cmm = Cmm::new(id, CmmConfig::default(), audit.clone(), router).unwrap();
            cmm.add_partition(1);
            Node { cmm, tokens: HashSet::new(), audit, _links: links }
        });
        let a = nodes.next().unwrap();
        (a, nodes.next().unwrap(), peers)
    }

    /// Drives both nodes, reading their links, until `done` holds or `secs` pass; the answers
    /// node 1 got meanwhile.
    fn settle(a: &mut Node, b: &mut Node, secs: u64) -> Vec<(ChannelId, Result<ChannelId, u32>)> {
        let mut answers = Vec::new();
        let until = Instant::now() + Duration::from_secs(secs);
        while answers.is_empty() && Instant::now() < until {
            a.drive(true);
            b.drive(true);
            answers.extend(a.cmm.take_answers());
            std::thread::sleep(Duration::from_millis(1));
        }
        answers
    }

    fn ep(node: u32, process: u32) -> Endpoint {
        Endpoint { node, partition: 1, process }
    }

    #[test]
    fn an_offer_crossed_by_an_idle_close_is_made_again_on_the_next_link_with_a_new_salt() {
        let (mut a, mut b) = pair();
        b.cmm.listen(1, 10, ep(1, 20)).unwrap();
        assert!(!a.cmm.has_links(), "no channel yet, no link");
        let opening = a.cmm.open(1, 20, ep(2, 10), Some(&mut GuestKey)).unwrap();
        let Opening::Pending(id) = opening else { panic!("{opening:?}") };
        let first_salt = a.salt(1).unwrap();

        // The OPEN brought a link, and its offer went out on it; node 2 has the link but has
        // not read the offer when it closes the link for idleness.
        let until = Instant::now() + Duration::from_secs(10);
        while !(a.cmm.router.is_up(2) && b.cmm.router.is_up(1)) && Instant::now() < until {
            a.drive(false);
            b.drive(false);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(a.cmm.router.is_up(2) && b.cmm.router.is_up(1), "the OPEN brought no link");
        b.cmm.router.close_idle(1);
        b.cmm.flush();

        // Node 1 sees the link go before the offer's answer: it offers again on a new link.
        let mut answers = Vec::new();
        while answers.is_empty() && Instant::now() < until + Duration::from_secs(10) {
            a.drive(true);
            b.drive(true);
            answers.extend(a.cmm.take_answers());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(answers, [(id, Ok(id))], "the OPEN completes");
        let second_salt = a.salt(1).unwrap();
        assert_ne!(first_salt, second_salt, "the offer made again is keyed afresh");
        assert_eq!(b.salt(1), Some(second_salt), "node 2 took the second offer");
        assert_eq!(b.audited("offer_accepted"), 1);
        assert_eq!(a.audited("link_up"), 2, "a link, closed idle, and the next");
        assert!(a.cmm.core.demand.held.is_empty(), "the held key went with the answer");
        assert!(a.cmm.core.demand.waiting.values().all(Vec::is_empty), "nothing waits");
    }

    #[test]
    fn an_offer_waits_once_however_often_its_link_is_lost() {
        let (mut a, mut b) = pair();
        b.cmm.listen(1, 10, ep(1, 20)).unwrap();
        a.cmm.open(1, 20, ep(2, 10), Some(&mut GuestKey)).unwrap();
        assert!(matches!(settle(&mut a, &mut b, 10)[..], [(_, Ok(_))]));
        // The link ends inside a batch (its going down not yet handled), then an OPEN that
        // finds no link, then the going down: the offer waits once, and goes once.
        b.cmm.listen(1, 11, ep(1, 21)).unwrap();
        a.cmm.router.close_idle(2);
        let Ok(Opening::Pending(id)) = a.cmm.open(1, 21, ep(2, 11), Some(&mut GuestKey)) else {
            panic!("the OPEN waits for a link")
        };
        a.cmm.flush();
        let copies =
            a.cmm.core.demand.waiting.get(&2).map_or(0, |w| w.iter().filter(|w| **w == id).count());
        assert_eq!(copies, 1);
        assert_eq!(settle(&mut a, &mut b, 10), [(id, Ok(id))]);
        assert_eq!(b.audited("offer_rejected"), 0, "no offer came twice");
    }

    #[test]
    fn a_link_refused_as_it_arrives_does_not_stop_the_node_from_linking_again() {
        let (mut a, mut b, peers) = pair_with_peers();
        let reloader = a._links.reloader();
        b.cmm.listen(1, 10, ep(1, 20)).unwrap();
        a.cmm.open(1, 20, ep(2, 10), Some(&mut GuestKey)).unwrap();
        // Node 2 takes the link; before node 1's router takes it, node 2's key changes in the
        // directory, so node 1's router refuses the link; then the key is put back.
        let until = Instant::now() + Duration::from_secs(10);
        while !b.cmm.router.is_up(1) && Instant::now() < until {
            b.drive(false);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(b.cmm.router.is_up(1));
        let mut changed = peers.clone();
        changed[1].public_key = *NodeKey::generate().unwrap().public();
        reloader.reload(Directory::new(changed)).unwrap();
        a.drive(false);
        assert!(!a.cmm.router.is_up(2), "the link was refused");
        reloader.reload(Directory::new(peers)).unwrap();
        let first = settle(&mut a, &mut b, 10);
        assert!(matches!(first[..], [(_, Err(_))]), "the first OPEN fails: {first:?}");
        // The next OPEN is not left waiting for a dial nobody makes.
        b.cmm.listen(1, 11, ep(1, 21)).unwrap();
        a.cmm.open(1, 21, ep(2, 11), Some(&mut GuestKey)).unwrap();
        let second = settle(&mut a, &mut b, 10);
        assert!(matches!(second[..], [(_, Ok(_))]), "{second:?}");
        assert!(a.cmm.router.is_up(2));
    }
}
