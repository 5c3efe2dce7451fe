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
use super::setup::{Setup, SetupShared, SetupTimes};
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
        let book = Arc::new(LinkBook::new(&directory, own_id));
        let directory = Arc::new(SharedDirectory::new(directory));
        let replays = Arc::new(ReplayGuard::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let router_wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (to_router, links) = mpsc::channel();
        let (ended, from_router) = mpsc::channel();
        let (to_setup, reloads) = mpsc::channel();
        let (to_close, closes) = mpsc::channel();
        let shared = SetupShared {
            own_id,
            key: key.clone(),
            directory: directory.clone(),
            replays: replays.clone(),
            audit: audit.clone(),
            book: book.clone(),
            stop: stop.clone(),
        };
        let setup = Setup::new(
            shared,
            settings.setup,
            settings.admission,
            listener,
            wake.try_clone()?,
            to_router,
            router_wake.try_clone()?,
            from_router,
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
        let arrivals =
            Arrivals { links, wake: router_wake, ended, setup_wake: wake.try_clone()?, closes };
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
