//! The secure-channel device (docs/DEVICE.md): three queues per partition (control, transmit,
//! receive) in front of the node's CMM.
//!
//! All partitions' devices and the CMM live in one [`ChannelNode`] on the device thread, so a
//! message from one partition to another needs no lock beyond the two devices' queue slots,
//! taken one at a time. The device stamps node and partition on every request: the guest names
//! only its process.

mod control;
mod data;
mod pool;
mod remote;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use guest_agent::channel::abi::{
    self, op, status, ControlRequest, ControlResponse, TxHeader, CHANNEL_INFO_SIZE,
    CONTROL_REQUEST_SIZE, CONTROL_RESPONSE_SIZE, RX_HEADER_SIZE, TX_HEADER_SIZE,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use zeroize::Zeroize;

use super::mmio::DeviceDescription;
use super::shared::{Activation, DeviceShared, INT_USED_BUFFER};
use crate::bus::lock;
use crate::cmm::connection_table::ChannelId;
use crate::cmm::frames::OfferResult;
use crate::cmm::query::{Query, QueryPort, Reply};
use crate::cmm::{Cmm, Delivery, Opening, Routed};
use crate::link::wire::Frame;
use crate::link::{Inbound, Inbox, LinkHandle};

/// Size of the control queue.
pub const CONTROL_QUEUE_SIZE: u16 = 64;
/// Size of the transmit and receive queues.
pub const DATA_QUEUE_SIZE: u16 = 256;
/// Verified messages held for a partition with no free receive buffer.
pub const MAX_PENDING: usize = 256;

const QUEUES: usize = 3;

/// What the transport tells the driver about a partition's device.
pub fn description(config: abi::Config) -> DeviceDescription {
    DeviceDescription {
        device_id: abi::DEVICE_ID,
        features: 0,
        queue_sizes: vec![CONTROL_QUEUE_SIZE, DATA_QUEUE_SIZE, DATA_QUEUE_SIZE],
        config: config.to_bytes().to_vec(),
    }
}

/// One partition's secure-channel device, as the device thread holds it.
pub struct ChannelDevice {
    partition: u32,
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
    queue_evts: Vec<EventFd>,
    pending: VecDeque<Delivery>,
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

/// A chain the guest made that the device cannot parse: the device needs a reset.
struct Malformed(&'static str);

/// An OPEN waiting for another node's answer: where to write the response once it comes.
struct PendingOpen {
    channel: ChannelId,
    device: usize,
    generation: u64,
    head: u16,
    response: GuestAddress,
}

/// What a control request gets.
enum Answer {
    /// A response head and body, written now.
    Now(ControlResponse, Vec<u8>),
    /// Nothing yet: the chain stays with the device until the offer is answered.
    Later,
}

/// The CMM and every partition's device, on the device thread.
pub struct ChannelNode {
    cmm: Cmm,
    devices: Vec<ChannelDevice>,
    links: Option<(LinkHandle, Inbox)>,
    queries: Option<QueryPort>,
    pending_opens: Vec<PendingOpen>,
    buffers: pool::BufferPool,
    /// Reused by every transmit batch for the deliveries it makes.
    deliveries: Vec<Delivery>,
    /// Reused by every transmit batch for the frames it sends to other nodes.
    outbound: Vec<(u32, Frame)>,
}

/// Event data of the link inbox (queue events use `device * QUEUES + queue`).
const INBOX: u32 = u32::MAX;
/// Event data of the control API's questions.
const QUERIES: u32 = u32::MAX - 1;

impl ChannelNode {
    /// The node's devices in front of `cmm`, and the host links if the node has any.
    pub fn new(
        mut cmm: Cmm,
        devices: Vec<ChannelDevice>,
        links: Option<(LinkHandle, Inbox)>,
    ) -> Self {
        for device in &devices {
            cmm.add_partition(device.partition);
        }
        Self {
            cmm,
            devices,
            links,
            queries: None,
            pending_opens: Vec::new(),
            buffers: pool::BufferPool::default(),
            deliveries: Vec::new(),
            outbound: Vec::new(),
        }
    }

    /// Answers the control API's questions from `port`.
    pub fn with_queries(mut self, port: QueryPort) -> Self {
        self.queries = Some(port);
        self
    }

    fn device_of(&self, partition: u32) -> Option<usize> {
        self.devices.iter().position(|d| d.partition == partition)
    }

    /// Handles a notification of queue `queue` of device `index`.
    fn notified(&mut self, index: usize, queue: usize) {
        let partition = self.devices[index].partition;
        self.cmm.stats(partition).notifications += 1;
        let outcome = match queue {
            0 => self.run_queue(index, 0, Self::control),
            1 => self.transmit(index),
            _ => Ok(()),
        };
        if let Err(Malformed(why)) = outcome {
            self.devices[index].shared.fail(why);
            return;
        }
        self.flush_pending(index);
    }

    /// Runs `handle` on every chain of queue `q` of device `index`; each returns the bytes it
    /// wrote. Notifications are re-enabled before the queue is left, so nothing is missed.
    fn run_queue(
        &mut self,
        index: usize,
        q: usize,
        mut handle: impl FnMut(
            &mut Self,
            usize,
            DescriptorChain<&GuestMemoryMmap>,
        ) -> Result<Option<u32>, Malformed>,
    ) -> Result<(), Malformed> {
        let device = &self.devices[index];
        let (shared, mem) = (device.shared.clone(), device.mem.clone());
        let mut activation = lock(&shared.activation);
        let queue = match &mut *activation {
            Activation::Active { queues } => match queues.get_mut(q) {
                Some(queue) if queue.ready() => queue,
                _ => return Ok(()),
            },
            Activation::Inactive => return Err(Malformed("queue notified before DRIVER_OK")),
            Activation::NeedsReset => return Ok(()),
        };
        let mut used_any = false;
        loop {
            queue
                .disable_notification(&mem)
                .map_err(|_| Malformed("queue rings not in guest RAM"))?;
            loop {
                let chain = queue
                    .iter(&mem)
                    .map_err(|_| Malformed("avail index ran ahead of the queue"))?
                    .next();
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                // `None`: the handler keeps the chain and completes it later.
                if let Some(written) = handle(self, index, chain)? {
                    queue
                        .add_used(&mem, head, written)
                        .map_err(|_| Malformed("used ring not writable"))?;
                    used_any = true;
                }
            }
            if !queue
                .enable_notification(&mem)
                .map_err(|_| Malformed("queue rings not in guest RAM"))?
            {
                break;
            }
        }
        let interrupt = used_any && queue.needs_notification(&mem).unwrap_or(true);
        drop(activation);
        if used_any {
            shared.used();
        }
        if interrupt {
            shared.signal(INT_USED_BUFFER);
        }
        Ok(())
    }
}

/// The device-readable and device-writable parts of a chain; `Malformed(what)` if any of its
/// buffers lies outside guest RAM.
fn split<'m>(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    what: &'static str,
) -> Result<(Reader<'m>, Writer<'m>), Malformed> {
    let reader = chain.clone().reader(mem).map_err(|_| Malformed(what))?;
    let writer = chain.writer(mem).map_err(|_| Malformed(what))?;
    Ok((reader, writer))
}

impl MutEventSubscriber for ChannelNode {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some((_, inbox)) = &self.links {
            if let Err(e) = ops.add(Events::with_data(&inbox.wake, INBOX, EventSet::IN)) {
                log::error!("secure channel: watching the link inbox: {e:?}");
            }
        }
        if let Some(port) = &self.queries {
            if let Err(e) = ops.add(Events::with_data(&port.wake, QUERIES, EventSet::IN)) {
                log::error!("secure channel: watching the control API: {e:?}");
            }
        }
        for (index, device) in self.devices.iter().enumerate() {
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
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        match events.data() {
            INBOX => return self.drain_inbox(),
            QUERIES => return self.answer_queries(),
            _ => {}
        }
        let data = events.data() as usize;
        let (index, queue) = (data / QUEUES, data % QUEUES);
        let Some(device) = self.devices.get(index) else {
            return;
        };
        if let Some(evt) = device.queue_evts.get(queue).filter(|e| e.as_raw_fd() == events.fd()) {
            let _ = evt.read();
        }
        self.notified(index, queue);
    }
}
