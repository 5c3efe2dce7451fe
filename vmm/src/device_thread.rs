//! The node's device thread: one event loop (event-manager) that runs every device backend of
//! every partition, woken by queue ioeventfds. A partition started again while the node runs
//! gets its new backends through [`DeviceHandle`], which runs the change on the device thread
//! itself (event-manager's remote endpoint), between two events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};
use keyhold_devices::bus::lock;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Containment, ThreadKind};

/// A backend as the device thread holds it.
pub type Backend = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Ends the loop when its eventfd is written.
struct Stopper {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("device thread: watching its stop event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }
}

/// Which subscribers are whose partition's, so that a restart replaces them.
type Owners = Arc<Mutex<HashMap<u32, Vec<SubscriberId>>>>;

/// A running device thread.
pub struct DeviceThread {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
    handle: DeviceHandle,
}

/// Changes the device thread's backends from another thread.
#[derive(Clone)]
pub struct DeviceHandle {
    remote: RemoteEndpoint<Backend>,
    owners: Owners,
    node: SubscriberId,
}

impl DeviceThread {
    /// Starts the thread with each partition's backends and the node's shared backend (the
    /// CMM and the secure-channel devices); it installs its seccomp filter from `containment`
    /// before it handles any event.
    pub fn start(
        partitions: Vec<(u32, Vec<Backend>)>,
        node: Backend,
        containment: &Containment,
    ) -> std::io::Result<Self> {
        let mut manager =
            EventManager::<Backend>::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(Stopper {
            evt: stop_evt.try_clone()?,
            stop: stop.clone(),
        })));
        let mut owners = HashMap::new();
        for (partition, backends) in partitions {
            let ids = backends.into_iter().map(|b| manager.add_subscriber(b)).collect();
            owners.insert(partition, ids);
        }
        let node = manager.add_subscriber(node);
        let handle = DeviceHandle {
            remote: manager.remote_endpoint(),
            owners: Arc::new(owners.into()),
            node,
        };
        let containment = containment.clone();
        let thread = std::thread::Builder::new().name("devices".into()).spawn(move || {
            containment.install(ThreadKind::Devices);
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    log::error!("device thread: {e:?}");
                    break;
                }
            }
        })?;
        Ok(Self { stop_evt, thread: Some(thread), handle })
    }

    /// A handle that changes the backends while the thread runs.
    pub fn handle(&self) -> DeviceHandle {
        self.handle.clone()
    }
}

impl DeviceHandle {
    /// Replaces the backends of `partition` (those of its last run go, with the guest RAM they
    /// held) by `backends`; returns once the device thread has made the change.
    pub fn replace(&self, partition: u32, backends: Vec<Backend>) -> std::io::Result<()> {
        let owners = self.owners.clone();
        self.call(move |ops| {
            let old = lock(&owners).remove(&partition).unwrap_or_default();
            for id in old {
                // Gone already only if it was never there: nothing to undo.
                let _ = ops.remove_subscriber(id);
            }
            let ids = backends.into_iter().map(|b| ops.add_subscriber(b)).collect();
            lock(&owners).insert(partition, ids);
            Ok(())
        })
    }

    /// Runs `change` on the device thread with the event operations of the node's shared
    /// backend (to watch a new secure-channel device's queues); returns once it has run.
    pub fn change_node<F>(&self, change: F) -> std::io::Result<()>
    where
        F: FnOnce(&mut EventOps) + Send + 'static,
    {
        let node = self.node;
        self.call(move |ops| {
            change(&mut ops.event_ops(node)?);
            Ok(())
        })
    }

    fn call<F>(&self, f: F) -> std::io::Result<()>
    where
        F: FnOnce(&mut dyn SubscriberOps<Subscriber = Backend>) -> Result<(), event_manager::Error>
            + Send
            + 'static,
    {
        self.remote
            .call_blocking(f)
            .map_err(|e| std::io::Error::other(format!("the device thread: {e:?}")))
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_evt.write(1) {
            log::error!("stopping the device thread: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
