//! The secure-channel device (docs/DEVICE.md): three queues per partition (control, transmit,
//! receive) in front of the node's CMM.
//!
//! All partitions' devices and the CMM live in one [`ChannelNode`] on the device thread: a
//! message from one partition to another is copied from the sender's buffer straight into the
//! receiver's, and the host links (the CMM's router) are served on the same thread, so a
//! message from another node is opened in the link's receive buffer and copied once, into the
//! guest. The device stamps node and partition on every request: the guest names only its
//! process. The device speaks only to the CMM.

mod chain;
mod control;
mod inline;
mod pool;
mod receive;
mod remote;
mod transmit;
mod vsock;
mod vsock_host;
mod vsock_remote;
mod vsock_reset;

pub use inline::Attachment;

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use guest_agent::channel::abi::{self, RxHeader};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::mmio::DeviceDescription;
use super::shared::{Activation, ActiveQueue, DeviceShared, INT_USED_BUFFER};
use crate::bus::lock;
use crate::cmm::connection_table::ChannelId;
use crate::cmm::query::QueryPort;
use crate::cmm::Cmm;
use crate::link::FdChange;

/// Size of the control queue.
pub const CONTROL_QUEUE_SIZE: u16 = 64;
/// Size of the transmit and receive queues.
pub const DATA_QUEUE_SIZE: u16 = 256;
/// Verified messages held for a partition with no free receive buffer.
pub const MAX_PENDING: usize = 256;
/// Messages the device holds for one channel between partitions of this node before it
/// answers the sender NO_ROOM (a deaf receiver stalls its own senders, and only them).
pub const CHANNEL_WINDOW: usize = 64;
/// Chains of one queue handled in one pass before the node turns to other work.
const BUDGET: usize = 64;
/// How often the link timer runs (keepalives, rekeys, dead links).
const LINK_TICK: Duration = Duration::from_millis(250);

const QUEUES: usize = 3;

/// What the transport tells the driver about a partition's device.
pub fn description(config: abi::Config) -> DeviceDescription {
    DeviceDescription {
        device_id: abi::DEVICE_ID,
        features: 0,
        queue_sizes: vec![CONTROL_QUEUE_SIZE, DATA_QUEUE_SIZE, DATA_QUEUE_SIZE],
        config: config.to_bytes().to_vec(),
        inline_queues: 1 << CONTROL_QUEUE | 1 << TX_QUEUE,
    }
}

/// The control queue's index.
const CONTROL_QUEUE: u32 = 0;
/// The transmit queue's index.
const TX_QUEUE: u32 = 1;

/// A verified message waiting for a receive buffer.
struct Held {
    channel: ChannelId,
    header: RxHeader,
    payload: Vec<u8>,
}

/// One partition's secure-channel device, as the device thread holds it.
pub struct ChannelDevice {
    partition: u32,
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
    queue_evts: Vec<EventFd>,
    pending: VecDeque<Held>,
}

impl ChannelDevice {
    /// The device of `partition`, with its transport's shared state, RAM and queue eventfds.
    pub fn new(
        partition: u32,
        shared: Arc<DeviceShared>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self { partition, shared, mem, queue_evts, pending: VecDeque::new() }
    }
}

/// A chain the guest made that the device cannot use: the device needs a reset.
#[derive(Debug)]
struct Malformed(&'static str);

impl From<chain::OutOfRam> for Malformed {
    fn from(_: chain::OutOfRam) -> Self {
        Malformed("a buffer lies outside guest RAM")
    }
}

/// An OPEN waiting for another node's answer: where to write the response once it comes.
struct PendingOpen {
    channel: ChannelId,
    device: usize,
    /// The epoch of the control queue's rings the request came from.
    epoch: u64,
    head: u16,
    response: GuestAddress,
}

/// Queue `q` of an active device, if the driver has it enabled.
fn ready_queue(activation: &mut Activation, q: usize) -> Option<&mut ActiveQueue> {
    match activation {
        Activation::Active { queues } => queues.get_mut(q).filter(|queue| queue.ready()),
        _ => None,
    }
}

/// Takes up to `limit` chains from queue `q` of the device `shared` describes, with
/// notifications suppressed while it is being worked on; returns the epoch of the queue's
/// rings. The queue's lock is not held while they are handled (a message may go to another
/// queue of the same partition).
fn take_chains<'m>(
    shared: &DeviceShared,
    q: usize,
    mem: &'m GuestMemoryMmap,
    limit: usize,
    chains: &mut Vec<DescriptorChain<&'m GuestMemoryMmap>>,
) -> Result<u64, Malformed> {
    let mut activation = lock(&shared.activation);
    let Some(queue) = ready_queue(&mut activation, q) else {
        // Not in use: before DRIVER_OK, after a reset or a stop (a notify may race them).
        shared.spurious_notification();
        return Ok(0);
    };
    queue.disable_notification(mem).map_err(|_| Malformed("queue rings not in guest RAM"))?;
    while chains.len() < limit {
        match queue.iter(mem).map_err(|_| Malformed("avail index ran ahead of the queue"))?.next() {
            Some(chain) => chains.push(chain),
            None => break,
        }
    }
    Ok(queue.epoch)
}

/// Returns used chains `(head, written)` to queue `q` of the device `shared` describes, taken
/// from its rings of `epoch`; with `rearm` re-enables notifications and says whether more
/// chains are waiting. Chains taken before a reset or a stop of the queue are not returned
/// (the rings they came from are gone).
fn return_chains(
    shared: &DeviceShared,
    q: usize,
    mem: &GuestMemoryMmap,
    epoch: u64,
    used: &[(u16, u32)],
    rearm: bool,
) -> Result<bool, Malformed> {
    let mut activation = lock(&shared.activation);
    let Some(queue) = ready_queue(&mut activation, q).filter(|queue| queue.epoch == epoch) else {
        return Ok(false);
    };
    for &(head, written) in used {
        queue.add_used(mem, head, written).map_err(|_| Malformed("used ring not writable"))?;
    }
    let more = rearm
        && queue.enable_notification(mem).map_err(|_| Malformed("queue rings not in guest RAM"))?;
    let interrupt = !used.is_empty() && queue.needs_notification(mem).unwrap_or(true);
    drop(activation);
    if !used.is_empty() {
        shared.used();
    }
    if interrupt {
        shared.signal(INT_USED_BUFFER);
    }
    Ok(more)
}

/// The CMM and every partition's device, on the device thread.
pub struct ChannelNode {
    cmm: Cmm,
    devices: Vec<ChannelDevice>,
    queries: Option<QueryPort>,
    pending_opens: Vec<PendingOpen>,
    buffers: pool::BufferPool,
    timer: Option<TimerFd>,
    timer_running: bool,
    /// Devices that used receive buffers in the current pass (signalled once at its end).
    touched: Vec<usize>,
    /// Written by a vCPU thread that changed what the device thread must watch.
    poke: EventFd,
    /// The vsock devices and their connections.
    vsock: vsock::Vsock,
}

/// Event data of the link arrivals.
const ARRIVALS: u32 = u32::MAX;
/// Event data of the control API's questions.
const QUERIES: u32 = u32::MAX - 1;
/// Event data of the link timer.
const TIMER: u32 = u32::MAX - 2;
/// Event data of the pokes from vCPU threads.
const POKE: u32 = u32::MAX - 3;
/// Event data of link sockets: this bit, and the link's token.
const LINK: u32 = 1 << 30;
/// Event data of vsock queues: this bit, and the device's index times three plus the queue's.
const VSOCK: u32 = 1 << 29;

impl ChannelNode {
    /// The node's devices in front of `cmm`.
    pub fn new(mut cmm: Cmm, devices: Vec<ChannelDevice>) -> io::Result<Self> {
        for device in &devices {
            cmm.add_partition(device.partition);
        }
        let timer = cmm.arrivals_fd().and_then(|_| match crate::timer::nonblocking() {
            Ok(timer) => Some(timer),
            Err(e) => {
                log::error!("secure channel: no timer for the links: {e}");
                None
            }
        });
        Ok(Self {
            cmm,
            devices,
            queries: None,
            pending_opens: Vec::new(),
            buffers: pool::BufferPool::default(),
            timer,
            timer_running: false,
            touched: Vec::new(),
            poke: EventFd::new(libc::EFD_NONBLOCK)?,
            vsock: vsock::Vsock::default(),
        })
    }

    /// Answers the control API's questions from `port`.
    pub fn with_queries(mut self, port: QueryPort) -> Self {
        self.queries = Some(port);
        self
    }

    fn device_of(&self, partition: u32) -> Option<usize> {
        self.devices.iter().position(|d| d.partition == partition)
    }

    /// The operator resets the transport of `partition`'s vsock device: every connection ends
    /// and the driver is told (docs/VSOCK.md). Returns how many connections ended; `None` if
    /// the partition has no running vsock device.
    pub fn reset_vsock(&mut self, partition: u32) -> Option<usize> {
        let ended = self.vsock_transport_reset(partition);
        self.cmm.flush();
        ended
    }

    /// Partition `partition` stopped (or crashed): its channels close, their peers learn why,
    /// and its device lets go of the guest's rings and what it held for it. Returns how many
    /// channels it held.
    pub fn partition_stopped(&mut self, partition: u32) -> usize {
        // Its vsock connections to other nodes say RST while their channels are still open.
        self.remote_partition_stopping(partition);
        let closed = self.cmm.partition_stopped(partition);
        if let Some(index) = self.device_of(partition) {
            self.pending_opens.retain(|p| p.device != index);
            let device = &mut self.devices[index];
            for held in device.pending.drain(..) {
                self.buffers.give(held.payload);
            }
            *lock(&device.shared.activation) = Activation::Inactive;
        }
        self.vsock_partition_stopped(partition);
        closed
    }

    /// Handles a notification of queue `queue` of device `index`.
    fn notified(&mut self, index: usize, queue: usize) {
        let partition = self.devices[index].partition;
        self.cmm.stats(partition).notifications += 1;
        let outcome = match queue {
            0 => self.run_queue(index, 0, Self::control),
            1 => self.run_queue(index, 1, |node, index, chain, mem, _| {
                node.send_one(index, chain, mem).map(Some)
            }),
            _ => {
                // The receive queue: new buffers for what is held (below).
                if self.queue_epoch(index, queue).is_none() {
                    self.devices[index].shared.spurious_notification();
                }
                Ok(())
            }
        };
        if let Err(Malformed(why)) = outcome {
            self.devices[index].shared.fail(why);
            return;
        }
        self.flush_pending(index);
        // The credit its guest's new buffers earned the senders on other nodes.
        self.cmm.flush();
    }

    /// Handles up to a budget of chains of queue `q` of device `index`: `handle` gets each
    /// chain and returns the bytes it wrote to it (`None`: it keeps the chain, to complete it
    /// later). What the batch staged for other nodes goes out at its end. Chains beyond the
    /// budget wait for the next pass (the queue's eventfd is written, so the device thread
    /// comes back to them after what else is waiting): a guest that keeps adding requests
    /// cannot keep the node from other partitions or the links.
    fn run_queue<F>(&mut self, index: usize, q: usize, mut handle: F) -> Result<(), Malformed>
    where
        F: for<'m> FnMut(
            &mut Self,
            usize,
            DescriptorChain<&'m GuestMemoryMmap>,
            &'m GuestMemoryMmap,
            u64,
        ) -> Result<Option<u32>, Malformed>,
    {
        let mem = self.devices[index].mem.clone();
        let mut chains = Vec::with_capacity(BUDGET);
        let epoch = take_chains(&self.devices[index].shared, q, &mem, BUDGET, &mut chains)?;
        let mut used = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            if let Some(written) = handle(self, index, chain, &mem, epoch)? {
                used.push((head, written));
            }
        }
        self.cmm.flush();
        self.signal_touched();
        if return_chains(&self.devices[index].shared, q, &mem, epoch, &used, true)? {
            let device = &self.devices[index];
            device.shared.counters.deferred.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(evt) = device.queue_evts.get(q) {
                let _ = evt.write(1);
            }
        }
        Ok(())
    }

    /// The epoch of the rings of queue `q` of device `index`, if it is in use.
    fn queue_epoch(&self, index: usize, q: usize) -> Option<u64> {
        let mut activation = lock(&self.devices[index].shared.activation);
        ready_queue(&mut activation, q).map(|queue| queue.epoch)
    }

    /// Applies the links' epoll changes.
    fn apply_fd_changes(&mut self, ops: &mut EventOps) {
        for change in self.cmm.take_fd_changes() {
            match change {
                FdChange::Watch { fd, token, writable } => {
                    let events = if writable { EventSet::IN | EventSet::OUT } else { EventSet::IN };
                    let event = Events::with_data_raw(fd, LINK | token as u32, events);
                    if ops.modify(event).is_err() && ops.add(event).is_err() {
                        log::error!("secure channel: cannot watch link socket {fd}");
                    }
                }
                FdChange::Forget(socket) => {
                    let fd = socket.as_raw_fd();
                    if let Err(e) = ops.remove(Events::with_data_raw(fd, 0, EventSet::IN)) {
                        log::error!("secure channel: cannot forget link socket {fd}: {e:?}");
                    }
                    drop(socket);
                }
            }
        }
        self.run_timer(ops);
    }

    /// Runs the link timer while links are up or offers wait, and stops it otherwise.
    fn run_timer(&mut self, ops: &mut EventOps) {
        let Some(timer) = &mut self.timer else { return };
        let wanted = self.cmm.needs_timer();
        if wanted == self.timer_running {
            return;
        }
        let result = if wanted { timer.reset(LINK_TICK, Some(LINK_TICK)) } else { timer.clear() };
        if let Err(e) = result {
            log::error!("secure channel: link timer: {e}");
            return;
        }
        if !self.timer_running {
            let fd = timer.as_raw_fd();
            if ops.add(Events::with_data_raw(fd, TIMER, EventSet::IN)).is_err() {
                let _ = ops.modify(Events::with_data_raw(fd, TIMER, EventSet::IN));
            }
        }
        self.timer_running = wanted;
    }

    /// Watches the queue eventfds of device `index`.
    fn watch_queues(&self, index: usize, ops: &mut EventOps) {
        let Some(device) = self.devices.get(index) else { return };
        for (queue, evt) in device.queue_evts.iter().enumerate() {
            let data = (index * QUEUES + queue) as u32;
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!(
                    "secure channel: watching partition {}'s queue {queue}: {e:?}",
                    device.partition
                );
            }
        }
    }

    /// Watches the queue eventfds of vsock device `index`.
    fn watch_vsock_queues(&self, index: usize, ops: &mut EventOps) {
        let Some(device) = self.vsock.devices.get(index) else { return };
        for (queue, evt) in device.queue_evts.iter().enumerate() {
            let data = VSOCK | (index * QUEUES + queue) as u32;
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!(
                    "vsock: watching partition {}'s queue {queue}: {e:?}",
                    device.partition
                );
            }
        }
    }

    /// Signals every device that used receive buffers in this pass, once.
    fn signal_touched(&mut self) {
        for index in std::mem::take(&mut self.touched) {
            let shared = &self.devices[index].shared;
            let mem = &self.devices[index].mem;
            let interrupt = {
                let mut activation = lock(&shared.activation);
                match &mut *activation {
                    Activation::Active { queues } => {
                        queues.get_mut(2).is_some_and(|q| q.needs_notification(mem).unwrap_or(true))
                    }
                    _ => false,
                }
            };
            shared.used();
            if interrupt {
                shared.signal(INT_USED_BUFFER);
            }
        }
    }
}

impl MutEventSubscriber for ChannelNode {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.cmm.arrivals_fd() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, ARRIVALS, EventSet::IN)) {
                log::error!("secure channel: watching the link arrivals: {e:?}");
            }
        }
        if let Some(port) = &self.queries {
            if let Err(e) = ops.add(Events::with_data(&port.wake, QUERIES, EventSet::IN)) {
                log::error!("secure channel: watching the control API: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.poke, POKE, EventSet::IN)) {
            log::error!("secure channel: watching the vCPU threads' pokes: {e:?}");
        }
        for index in 0..self.devices.len() {
            self.watch_queues(index, ops);
        }
        for index in 0..self.vsock.devices.len() {
            self.watch_vsock_queues(index, ops);
        }
        self.host_watch_listeners(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ARRIVALS => self.cmm.links_arrived(),
            QUERIES => self.answer_queries(),
            POKE => {
                let _ = self.poke.read();
            }
            vsock_host::HOST_TICK => self.host_tick(),
            TIMER => {
                if let Some(timer) = &mut self.timer {
                    let _ = timer.wait();
                }
                self.cmm.tick();
                self.remote_tidy();
            }
            data if data & vsock_host::HOST != 0 && data & (LINK | VSOCK) == 0 => {
                self.host_event(data, events.event_set(), ops);
            }
            data if data & VSOCK != 0 && data & LINK == 0 => {
                let data = (data & !VSOCK) as usize;
                let (index, queue) = (data / QUEUES, data % QUEUES);
                if let Some(evt) =
                    self.vsock.devices.get(index).and_then(|d| d.queue_evts.get(queue))
                {
                    let _ = evt.read();
                    self.vsock_notified(index, queue);
                }
            }
            data if data & LINK != 0 => {
                let token = (data & !LINK) as usize;
                let set = events.event_set();
                if set.intersects(EventSet::OUT) {
                    self.cmm.link_writable(token);
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.link_readable(token);
                }
            }
            data => {
                let (index, queue) = (data as usize / QUEUES, data as usize % QUEUES);
                let Some(device) = self.devices.get(index) else { return };
                if let Some(evt) =
                    device.queue_evts.get(queue).filter(|e| e.as_raw_fd() == events.fd())
                {
                    let _ = evt.read();
                }
                self.notified(index, queue);
            }
        }
        self.complete_answers();
        self.signal_touched();
        self.host_connect(ops);
        self.host_retire(ops);
        self.vsock_flush();
        self.apply_fd_changes(ops);
    }
}

impl Drop for ChannelNode {
    fn drop(&mut self) {
        // The device thread is stopping: peers hear a goodbye rather than wait for a timeout.
        self.cmm.shut_down();
    }
}
