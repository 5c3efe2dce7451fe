//! The link manager: starts the link-setup thread and builds the router the device thread
//! runs; stopping it stops the setup thread (the router says goodbye on its links when the
//! device thread stops).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::admission::Limits;
use super::directory::{Directory, DirectoryChanges, SharedDirectory};
use super::router::{Arrivals, Context, Router, RouterConfig};
use super::setup::{RouterPipes, Setup, SetupShared, SetupTimes};
use super::status::LinkBook;
use super::timestamp::ReplayGuard;
use crate::cmm::audit::{Audit, Record};
use crate::crypto::node_key::NodeKey;

/// Everything about links an operator may set (node.toml `[links]`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkSettings {
    /// Handshake deadline and dial backoff.
    pub setup: SetupTimes,
    /// Bounds on unauthenticated connections.
    pub admission: Limits,
    /// Keepalives, rekeys and backlogs of established links.
    pub router: RouterConfig,
}

/// The node's link machinery outside the device thread.
pub struct LinkManager {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
    book: Arc<LinkBook>,
    reloader: Reloader,
}

/// Applies a reloaded cluster file to the running links (clones share the links).
#[derive(Clone)]
pub struct Reloader {
    own_id: u32,
    directory: Arc<SharedDirectory>,
    book: Arc<LinkBook>,
    audit: Audit,
    setup: Sender<Arc<Directory>>,
    setup_wake: Arc<EventFd>,
    router: Sender<(u32, &'static str)>,
    router_wake: Arc<EventFd>,
}

/// Why a cluster file cannot be applied without a restart.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    /// This node is not in the new file.
    #[error("node {0} is not in the cluster file any more; stop it instead")]
    OwnNodeRemoved(u32),
    /// This node's key or address changed: its listener and key are set at start.
    #[error("node {0}'s own key or address changed; restart the node to apply that")]
    OwnNodeChanged(u32),
}

impl Reloader {
    /// Makes the links follow `new`: new nodes are linked (dialled or awaited), removed ones
    /// have their links ended (`removed_from_cluster`) and so their channels closed, nodes
    /// with a new key have their links ended (`key_changed`) and made again with it, moved
    /// ones are dialled at their new address; every other link stays as it is.
    pub fn reload(&self, new: Directory) -> Result<DirectoryChanges, ReloadError> {
        self.follow(new, "operator")
    }

    /// As [`Reloader::reload`], for a new directory from `source` (the audit's reason:
    /// `operator` for a cluster file, `etcd` for a membership change).
    pub fn follow(
        &self,
        new: Directory,
        source: &'static str,
    ) -> Result<DirectoryChanges, ReloadError> {
        let old = self.directory.get();
        match (old.by_id(self.own_id), new.by_id(self.own_id)) {
            (_, None) => return Err(ReloadError::OwnNodeRemoved(self.own_id)),
            (Some(o), Some(n)) if o != n => return Err(ReloadError::OwnNodeChanged(self.own_id)),
            _ => {}
        }
        let changes = DirectoryChanges::between(&old, &new, self.own_id);
        let new = Arc::new(new);
        self.directory.set(new.clone());
        self.book.follow(&new, self.own_id);
        let ends = changes.removed.iter().map(|&p| (p, "removed_from_cluster"));
        for (peer, reason) in ends.chain(changes.rekeyed.iter().map(|&p| (p, "key_changed"))) {
            let _ = self.router.send((peer, reason));
        }
        let _ = self.router_wake.write(1);
        if self.setup.send(new).is_ok() {
            let _ = self.setup_wake.write(1);
        }
        let count = [&changes.added, &changes.removed, &changes.rekeyed, &changes.moved]
            .iter()
            .map(|ids| ids.len() as u64)
            .sum();
        self.audit.record(Record {
            count: Some(count),
            by_node: true,
            ..Record::link("cluster_reloaded", source, None)
        });
        Ok(changes)
    }
}

impl LinkManager {
    /// Listens on `listen` and starts linking with the other nodes of `directory`; returns
    /// the manager and the router for the device thread.
    ///
    /// `thread_start` runs first on the link-setup thread, before it touches any socket or
    /// peer input: the VMM installs the thread's seccomp filter there (this crate knows
    /// nothing of filters; pass `|| {}` for none).
    pub fn start(
        own_id: u32,
        key: Arc<NodeKey>,
        directory: Directory,
        listen: SocketAddr,
        audit: Audit,
        settings: LinkSettings,
        thread_start: impl FnOnce() + Send + 'static,
    ) -> io::Result<(Self, Router)> {
        let listener = TcpListener::bind(listen)?;
        let local_addr = listener.local_addr()?;
        let on_demand = settings.router.idle_after.is_some();
        let book = Arc::new(if on_demand {
            LinkBook::on_demand(&directory, own_id)
        } else {
            LinkBook::new(&directory, own_id)
        });
        let directory = Arc::new(SharedDirectory::new(directory));
        let replays = Arc::new(ReplayGuard::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let router_wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (to_router, links) = mpsc::channel();
        let (ended, from_router) = mpsc::channel();
        let (to_setup, reloads) = mpsc::channel();
        let (to_close, closes) = mpsc::channel();
        let (wants, wanted) = mpsc::channel();
        let (unreachable, unreachables) = mpsc::channel();
        let shared = SetupShared {
            own_id,
            key: key.clone(),
            directory: directory.clone(),
            replays: replays.clone(),
            audit: audit.clone(),
            book: book.clone(),
            stop: stop.clone(),
            on_demand,
        };
        let pipes = RouterPipes {
            to_router,
            router_wake: router_wake.try_clone()?,
            ended: from_router,
            wants: wanted,
            unreachable,
        };
        let setup = Setup::new(
            shared,
            settings.setup,
            settings.admission,
            listener,
            wake.try_clone()?,
            pipes,
            reloads,
        )?;
        let thread = std::thread::Builder::new().name("link-setup".into()).spawn(move || {
            thread_start();
            setup.run()
        })?;
        let reloader = Reloader {
            own_id,
            directory: directory.clone(),
            book: book.clone(),
            audit: audit.clone(),
            setup: to_setup,
            setup_wake: Arc::new(wake.try_clone()?),
            router: to_close,
            router_wake: Arc::new(router_wake.try_clone()?),
        };
        let arrivals = Arrivals {
            links,
            wake: router_wake,
            ended,
            setup_wake: wake.try_clone()?,
            closes,
            wants,
            unreachable: unreachables,
        };
        let config = settings.router;
        let context =
            Context { own_id, key, directory, replays, audit, book: book.clone(), config };
        let router = Router::new(context, arrivals);
        Ok((Self { stop, wake, thread: Some(thread), local_addr, book, reloader }, router))
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The links as the operator sees them.
    pub fn book(&self) -> Arc<LinkBook> {
        self.book.clone()
    }

    /// What applies a reloaded cluster file to these links.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }
}

impl Drop for LinkManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::link::directory::Peer;
    use crate::link::router::FdChange;

    /// A node's links driven from the test thread, as the device thread would.
    struct Node {
        router: Router,
        tokens: HashSet<usize>,
        audit: Audit,
        _manager: LinkManager,
    }

    impl Node {
        fn drive(&mut self) {
            self.router.accept_arrivals();
            for change in self.router.take_fd_changes() {
                match change {
                    FdChange::Watch { token, .. } => self.tokens.insert(token),
                    FdChange::Forget(_) => false,
                };
            }
            for &token in &self.tokens {
                self.router.readable(token, &mut |_, _, _| {});
            }
            self.router.tick();
            let _ = self.router.take_downs();
        }

        fn links_up(&self) -> usize {
            let up = "\"event\":\"link_up\"";
            self.audit.recent().iter().filter(|r| r.contains(up)).count()
        }
    }

    fn on_demand_pair() -> (Node, Node) {
        let keys = [NodeKey::generate().unwrap(), NodeKey::generate().unwrap()];
        let listeners = [0, 1].map(|_| TcpListener::bind("127.0.0.1:0").unwrap());
        let peers: Vec<Peer> = (0..2)
            .map(|i| Peer {
                id: i as u32 + 1,
                address: listeners[i].local_addr().unwrap(),
                public_key: *keys[i].public(),
            })
            .collect();
        let settings = LinkSettings {
            router: RouterConfig {
                keepalive: Duration::from_millis(500),
                dead_after: Duration::from_secs(2),
                idle_after: Some(Duration::from_secs(60)),
                ..Default::default()
            },
            ..Default::default()
        };
        let [k1, k2] = keys;
        let [l1, l2] = listeners;
        let make = |id: u32, key: NodeKey, listener: TcpListener| {
            let address = listener.local_addr().unwrap();
            drop(listener); // its port, for the manager to bind again
            let audit = Audit::to_log(id).unwrap();
            let directory = Directory::new(peers.clone());
            let (manager, router) = LinkManager::start(
                id,
                Arc::new(key),
                directory,
                address,
                audit.clone(),
                settings,
                || {},
            )
            .unwrap();
            Node { router, tokens: HashSet::new(), audit, _manager: manager }
        };
        (make(1, k1, l1), make(2, k2, l2))
    }

    #[test]
    fn links_on_demand_that_cross_settle_on_one_link() {
        for _ in 0..3 {
            let (mut a, mut b) = on_demand_pair();
            // Both nodes need the link at once: both dial.
            a.router.want(2);
            b.router.want(1);
            let until = Instant::now() + Duration::from_secs(10);
            while !(a.router.is_up(2) && b.router.is_up(1)) && Instant::now() < until {
                a.drive();
                b.drive();
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(a.router.is_up(2) && b.router.is_up(1), "no link in 10 s");
            // Had each kept a different link, each would see its link closed by the other:
            // the one they keep outlives the dead-peer timeout, with no new link made.
            let settled = (a.links_up(), b.links_up());
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                a.drive();
                b.drive();
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(a.router.is_up(2) && b.router.is_up(1), "the link did not last");
            assert_eq!((a.links_up(), b.links_up()), settled, "links kept being made");
            assert!(
                a.router.take_unreachable().is_empty() && b.router.take_unreachable().is_empty()
            );
        }
    }
}
