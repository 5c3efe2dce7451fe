//! The link manager: starts the link-setup thread and builds the router the device thread
//! runs; stopping it stops the setup thread (the router says goodbye on its links when the
//! device thread stops).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::admission::Limits;
use super::directory::Directory;
use super::router::{Arrivals, Context, Router, RouterConfig};
use super::setup::{Setup, SetupShared, SetupTimes};
use super::status::LinkBook;
use super::timestamp::ReplayGuard;
use crate::cmm::audit::Audit;
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
        let replays = Arc::new(ReplayGuard::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let router_wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (to_router, links) = mpsc::channel();
        let (ended, from_router) = mpsc::channel();
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
        )?;
        let thread = std::thread::Builder::new().name("link-setup".into()).spawn(move || {
            thread_start();
            setup.run()
        })?;
        let arrivals = Arrivals { links, wake: router_wake, ended, setup_wake: wake.try_clone()? };
        let config = settings.router;
        let context =
            Context { own_id, key, directory, replays, audit, book: book.clone(), config };
        let router = Router::new(context, arrivals);
        Ok((Self { stop, wake, thread: Some(thread), local_addr, book }, router))
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The links as the operator sees them.
    pub fn book(&self) -> Arc<LinkBook> {
        self.book.clone()
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
