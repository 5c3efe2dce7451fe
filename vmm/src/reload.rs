//! Reloading the cluster file while the node runs: SIGHUP and `keyhold ctl reload`. The file
//! is read and applied on the main thread (the supervisor's), the only thread whose seccomp
//! filter lets it open a file once the node runs; the API thread queues its request here and
//! waits for the answer.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhold_devices::bus::lock;
use vmm_sys_util::eventfd::EventFd;

/// Reads the cluster file again and applies it; the summary, or why not.
pub type ReloadFn = Box<dyn Fn() -> Result<String, String> + Send>;

/// Where one asker waits for the answer.
type Asker = SyncSender<Result<String, String>>;

/// Reload requests from the control API; clones share one queue.
#[derive(Clone)]
pub struct ReloadRequests {
    evt: Arc<EventFd>,
    waiting: Arc<Mutex<Vec<Asker>>>,
}

impl ReloadRequests {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?), waiting: Arc::default() })
    }

    /// Asks the main thread to reload and waits up to `limit` for its answer.
    pub fn ask(&self, limit: Duration) -> Result<String, String> {
        let (answer, wait) = mpsc::sync_channel(1);
        lock(&self.waiting).push(answer);
        self.evt.write(1).map_err(|e| format!("asking the main thread: {e}"))?;
        wait.recv_timeout(limit).map_err(|_| "the main thread did not answer".to_owned())?
    }

    /// The eventfd the main thread watches.
    pub(crate) fn fd(&self) -> &EventFd {
        &self.evt
    }

    /// Runs `reload` once for everything asked so far and gives each asker the answer.
    pub(crate) fn answer(&self, reload: impl FnOnce() -> Result<String, String>) {
        let _ = self.evt.read();
        let waiting = std::mem::take(&mut *lock(&self.waiting));
        if waiting.is_empty() {
            return;
        }
        let answer = reload();
        for asker in waiting {
            let _ = asker.try_send(answer.clone());
        }
    }
}
