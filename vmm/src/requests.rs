//! What the operator asks of the main thread (the supervisor) through the control API while
//! the node runs: stop a partition, start a stopped one again, re-read the cluster file.
//!
//! The main thread owns the partitions' vCPU threads and is the only thread whose seccomp
//! filter lets it open a file once the node runs; the API thread queues each request here and
//! waits for the answer. SIGHUP reloads the same way, on the main thread.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhold_devices::bus::lock;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Reads the cluster file again and applies it; the summary, or why not.
pub type ReloadFn = Box<dyn Fn() -> Result<String, String> + Send>;

/// One thing the operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Stop the running partition with this ID (its channels close, the node runs on).
    Stop(u32),
    /// Start the stopped partition with this ID again, from its configuration.
    Start(u32),
    /// Re-read the cluster file and apply it to the links.
    Reload,
}

/// Why a request was not carried out.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Refusal {
    /// No partition has that ID.
    #[error("no partition {0}")]
    Unknown(u32),
    /// The request does not fit the state it found (a running partition to start, a stopped
    /// one to stop, a node without a cluster file to reload).
    #[error("{0}")]
    Conflict(String),
    /// It was tried and failed.
    #[error("{0}")]
    Failed(String),
}

/// The main thread's answer: what it did, or why not.
pub type Answer = Result<String, Refusal>;

/// Where one asker waits for its answer.
type Asker = (Request, SyncSender<Answer>);

/// The operator's requests; clones share one queue.
#[derive(Clone)]
pub struct Requests {
    evt: Arc<EventFd>,
    waiting: Arc<Mutex<Vec<Asker>>>,
}

impl Requests {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?), waiting: Arc::default() })
    }

    /// Asks the main thread and waits up to `limit` for its answer.
    pub fn ask(&self, request: Request, limit: Duration) -> Answer {
        let (answer, wait) = mpsc::sync_channel(1);
        lock(&self.waiting).push((request, answer));
        let no_answer = |what: String| Refusal::Failed(format!("{what} (asking the main thread)"));
        self.evt.write(1).map_err(|e| no_answer(e.to_string()))?;
        wait.recv_timeout(limit).map_err(|_| no_answer("no answer in time".into()))?
    }

    /// The eventfd the main thread watches.
    pub(crate) fn fd(&self) -> &EventFd {
        &self.evt
    }

    /// Answers everything asked so far, in order, with `carry_out`.
    pub(crate) fn answer(&self, mut carry_out: impl FnMut(Request) -> Answer) {
        let _ = self.evt.read();
        let waiting = std::mem::take(&mut *lock(&self.waiting));
        for (request, asker) in waiting {
            // An asker that gave up waiting has dropped its end; nothing to tell it.
            let _ = asker.try_send(carry_out(request));
        }
    }
}
