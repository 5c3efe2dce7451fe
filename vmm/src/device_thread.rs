//! The node's device thread: one event loop (event-manager) that runs every device backend of
//! every partition, woken by queue ioeventfds. vCPU threads never process queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
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

/// A running device thread.
pub struct DeviceThread {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts the thread with `backends` subscribed; it installs its seccomp filter from
    /// `containment` before it handles any event.
    pub fn start(backends: Vec<Backend>, containment: &Containment) -> std::io::Result<Self> {
        let mut manager =
            EventManager::<Backend>::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(Stopper {
            evt: stop_evt.try_clone()?,
            stop: stop.clone(),
        })));
        for backend in backends {
            manager.add_subscriber(backend);
        }
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
        Ok(Self { stop_evt, thread: Some(thread) })
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
