//! Runs a set of partitions concurrently, one vCPU thread each, until all have stopped.
//!
//! The calling thread runs an event loop (event-manager) over one eventfd per partition, which
//! its vCPU thread signals when it stops, and a timerfd for `--timeout`. A stopped partition is
//! reported at once; the others run on.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;
use vmm_sys_util::timerfd::TimerFd;

use crate::host::ShutdownSignals;
use crate::kick;
use crate::partition::Partition;
use crate::requests::{Answer, Refusal, ReloadFn, Request, Requests};
use crate::seccomp::{Containment, ThreadKind};
use crate::starter::Starter;
use crate::stop::{StopReason, StopRequest, Stopped};

/// Why the supervisor could not run the partitions.
#[derive(Debug, Error)]
pub enum SupervisorError {
    /// Setting up the event loop, an eventfd, the timer or a thread failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn setup_error(what: &'static str) -> impl Fn(std::io::Error) -> SupervisorError {
    move |source| SupervisorError::Setup { what, source }
}

/// What the operator may ask of the supervisor while the partitions run.
pub struct Control {
    /// The operator's stops, starts and reloads, through the control API.
    pub requests: Requests,
    /// How to reload (SIGHUP too); `None` for a node without a cluster file.
    pub reload: Option<ReloadFn>,
    /// What starts a stopped partition again; `None` where nothing can.
    pub starter: Option<Starter>,
}

/// One partition as the supervisor sees it, running or stopped.
pub struct Running {
    id: u32,
    stopped_evt: EventFd,
    thread: Option<JoinHandle<Stopped>>,
    stop: Arc<StopRequest>,
    /// Wakes the vCPU if it is parked on the idle port.
    wake: Arc<keyhold_devices::idle::Wake>,
    /// Stopped by the operator, who may start it again: the node waits for that.
    held: bool,
}

/// The event-loop subscriber: collects stops in the order they happen.
struct Supervisor {
    running: Vec<Running>,
    timer: Option<TimerFd>,
    signals: Option<ShutdownSignals>,
    control: Control,
    /// A signal or the timeout stopped every partition: the node ends.
    ending: bool,
    stops: Vec<Stopped>,
    on_stop: Box<dyn FnMut(&Stopped) + Send>,
}

const TIMER_DATA: u32 = u32::MAX;
const SIGNAL_DATA: u32 = u32::MAX - 1;
const REQUEST_DATA: u32 = u32::MAX - 2;

impl Supervisor {
    /// Whether the node is done: no partition runs, and none that the operator stopped waits
    /// to be started again (unless a signal or the timeout ends the node).
    fn done(&self) -> bool {
        self.running.iter().all(|r| r.thread.is_none())
            && (self.ending || !self.running.iter().any(|r| r.held))
    }

    fn reap(&mut self, index: usize, ops: &mut EventOps) {
        let Some(running) = self.running.get_mut(index) else {
            return;
        };
        let Some(thread) = running.thread.take() else {
            return;
        };
        // The thread signalled just before returning, so this join does not wait long.
        let stopped = thread.join().unwrap_or_else(|_| Stopped {
            partition: running.id,
            reason: StopReason::VmmFailure("the vCPU thread panicked".into()),
            registers: None,
            last_line: String::new(),
        });
        if let Err(e) = ops.remove(Events::empty(&running.stopped_evt)) {
            log::warn!("partition {}: removing its stop event: {e:?}", running.id);
        }
        running.held = stopped.reason == StopReason::ByOperator;
        (self.on_stop)(&stopped);
        self.stops.push(stopped);
    }

    /// Re-reads and applies the cluster file, if the node has one.
    fn reload(&self) -> Result<String, String> {
        match &self.control.reload {
            Some(reload) => reload(),
            None => Err("this node has no cluster file to reload".into()),
        }
    }

    /// Asks every running partition to stop (`ask` sets the reason) and kicks its vCPU; the
    /// node ends once they have.
    fn stop_all(&mut self, ask: impl Fn(&StopRequest)) {
        self.ending = true;
        self.stop_where(|_| true, ask);
    }

    fn index_of(&self, id: u32) -> Result<usize, Refusal> {
        self.running.iter().position(|r| r.id == id).ok_or(Refusal::Unknown(id))
    }

    /// Carries out one of the operator's requests.
    fn carry_out(&mut self, request: Request, ops: &mut EventOps) -> Answer {
        match request {
            Request::Reload => self.reload().map_err(Refusal::Conflict),
            Request::Stop(id) => {
                if self.running[self.index_of(id)?].thread.is_none() {
                    return Err(Refusal::Conflict(format!("partition {id} has stopped already")));
                }
                log::info!("stopping partition {id} on the operator's word");
                self.stop_where(|p| p == id, StopRequest::by_operator);
                Ok(format!("stopping partition {id}"))
            }
            Request::Start(id) => {
                let index = self.index_of(id)?;
                if self.running[index].thread.is_some() {
                    return Err(Refusal::Conflict(format!("partition {id} is running")));
                }
                if self.ending {
                    return Err(Refusal::Conflict("the node is stopping".into()));
                }
                let Some(starter) = &self.control.starter else {
                    return Err(Refusal::Conflict("this node cannot start partitions".into()));
                };
                let running = starter.start(id).map_err(Refusal::Failed)?;
                watch(ops, index, &running);
                self.running[index] = running;
                log::info!("partition {id} started again on the operator's word");
                Ok(format!("started partition {id}"))
            }
        }
    }

    /// Asks the running partitions `which` selects to stop, and kicks their vCPUs.
    fn stop_where(&mut self, which: impl Fn(u32) -> bool, ask: impl Fn(&StopRequest)) {
        for running in self.running.iter().filter(|r| r.thread.is_some() && which(r.id)) {
            ask(&running.stop);
            // A vCPU parked on the idle port sleeps through the kick's signal.
            running.wake.wake();
            if let Some(thread) = &running.thread {
                if let Err(e) = thread.kill(kick::kick_signal()) {
                    log::warn!("partition {}: kicking its vCPU: {e}", running.id);
                }
            }
        }
    }
}

impl MutEventSubscriber for Supervisor {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, running) in self.running.iter().enumerate() {
            watch(ops, index, running);
        }
        if let Some(timer) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(timer, TIMER_DATA, EventSet::IN)) {
                log::error!("watching the timeout timer: {e:?}");
            }
        }
        if let Some(signals) = &self.signals {
            if let Err(e) = ops.add(Events::with_data(signals, SIGNAL_DATA, EventSet::IN)) {
                log::error!("watching for SIGTERM and SIGINT: {e:?}");
            }
        }
        let requests = Events::with_data(self.control.requests.fd(), REQUEST_DATA, EventSet::IN);
        if let Err(e) = ops.add(requests) {
            log::error!("watching for the operator's requests: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TIMER_DATA => {
                if let Some(mut timer) = self.timer.take() {
                    let _ = timer.wait();
                    let _ = ops.remove(Events::empty(&timer));
                }
                self.stop_all(StopRequest::time_out);
            }
            SIGNAL_DATA => {
                let signal = self.signals.as_ref().and_then(ShutdownSignals::read);
                if signal == Some(libc::SIGHUP) {
                    match self.reload() {
                        Ok(summary) => log::info!("SIGHUP: reloaded the cluster file: {summary}"),
                        Err(e) => log::warn!("SIGHUP: the cluster file was not reloaded: {e}"),
                    }
                } else if let Some(signal) = signal {
                    log::info!("signal {signal}: stopping every partition");
                    self.stop_all(|stop| stop.signalled(signal));
                }
            }
            REQUEST_DATA => {
                let requests = self.control.requests.clone();
                requests.answer(|request| self.carry_out(request, ops));
            }
            index => self.reap(index as usize, ops),
        }
    }
}

/// Boots every partition and returns how each stopped, in the order they stopped.
/// `on_stop` runs on the calling thread as each one stops.
///
/// Each vCPU thread installs its seccomp filter from `containment` before it enters its
/// guest; the calling thread runs `on_started` once every vCPU thread has started, then
/// installs the main thread's filter for the rest of its life (the caller then only stops
/// the other threads and returns).
pub fn run(
    partitions: Vec<Partition>,
    timeout: Option<Duration>,
    process_start: Instant,
    containment: &Containment,
    control: Control,
    on_started: impl FnOnce(),
    on_stop: impl FnMut(&Stopped) + Send + 'static,
) -> Result<Vec<Stopped>, SupervisorError> {
    kick::install_handler().map_err(setup_error("installing the vCPU kick signal handler"))?;
    let mut event_manager =
        EventManager::<Arc<Mutex<Supervisor>>>::new().map_err(|e| SupervisorError::Setup {
            what: "creating the event loop",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    let timer = timeout
        .map(|limit| -> Result<TimerFd, SupervisorError> {
            let mut timer =
                TimerFd::new().map_err(|e| setup_error("creating the timeout timer")(e.into()))?;
            timer
                .reset(limit, None)
                .map_err(|e| setup_error("arming the timeout timer")(e.into()))?;
            Ok(timer)
        })
        .transpose()?;

    // SIGTERM and SIGINT are blocked (main did that); without a signalfd they would be lost.
    let signals = ShutdownSignals::open().ok();
    let mut running = Vec::with_capacity(partitions.len());
    for partition in partitions {
        running.push(spawn(partition, process_start, containment)?);
    }
    on_started();
    containment.install(ThreadKind::Main);
    let supervisor = Arc::new(Mutex::new(Supervisor {
        running,
        timer,
        signals,
        control,
        ending: false,
        stops: Vec::new(),
        on_stop: Box::new(on_stop),
    }));
    event_manager.add_subscriber(supervisor.clone());
    while !lock(&supervisor).done() {
        event_manager.run().map_err(|e| SupervisorError::Setup {
            what: "waiting for partitions",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    }
    let mut supervisor = lock(&supervisor);
    // The starter goes before the device thread it holds a handle to.
    drop(supervisor.control.starter.take());
    Ok(std::mem::take(&mut supervisor.stops))
}

fn lock(supervisor: &Mutex<Supervisor>) -> std::sync::MutexGuard<'_, Supervisor> {
    supervisor.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Watches the stop eventfd of the partition at `index`.
fn watch(ops: &mut EventOps, index: usize, running: &Running) {
    let events = Events::with_data(&running.stopped_evt, index as u32, EventSet::IN);
    if let Err(e) = ops.add(events) {
        log::error!("partition {}: watching its stop event: {e:?}", running.id);
    }
}

/// Starts the vCPU thread of one partition; it installs its seccomp filter first.
pub(crate) fn spawn(
    partition: Partition,
    process_start: Instant,
    containment: &Containment,
) -> Result<Running, SupervisorError> {
    let id = partition.id();
    let stopped_evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(setup_error("creating a stop eventfd"))?;
    let signal = stopped_evt.try_clone().map_err(setup_error("cloning a stop eventfd"))?;
    let stop = partition.stop_request();
    let wake = partition.wake();
    let containment = containment.clone();
    let thread = std::thread::Builder::new()
        .name(format!("p{id}-vcpu"))
        .spawn(move || {
            containment.install(ThreadKind::Vcpu);
            let stopped = partition.run(process_start);
            if let Err(e) = signal.write(1) {
                log::error!("partition {id}: signalling its stop: {e}");
            }
            stopped
        })
        .map_err(setup_error("starting a vCPU thread"))?;
    Ok(Running { id, stopped_evt, thread: Some(thread), stop, wake, held: false })
}
