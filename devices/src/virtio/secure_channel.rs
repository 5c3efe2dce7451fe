//! The secure-channel device (docs/DEVICE.md): three queues per partition (control, transmit,
//! receive) in front of the node's CMM.
//!
//! All partitions' devices and the CMM live in one [`ChannelNode`] on the device thread, so a
//! message from one partition to another needs no lock beyond the two devices' queue slots,
//! taken one at a time. The device stamps node and partition on every request: the guest names
//! only its process.

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
}

/// Event data of the link inbox (queue events use `device * QUEUES + queue`).
const INBOX: u32 = u32::MAX;
/// Event data of the control API's questions.
const QUERIES: u32 = u32::MAX - 1;

impl ChannelNode {
    /// The node's devices in front of `cmm`, and the host links if the node has any.
    pub fn new(cmm: Cmm, devices: Vec<ChannelDevice>, links: Option<(LinkHandle, Inbox)>) -> Self {
        Self { cmm, devices, links, queries: None, pending_opens: Vec::new() }
    }

    /// Answers the control API's questions from `port`.
    pub fn with_queries(mut self, port: QueryPort) -> Self {
        self.queries = Some(port);
        self
    }

    /// Answers every question waiting.
    fn answer_queries(&mut self) {
        let mut questions = Vec::new();
        if let Some(port) = &self.queries {
            let _ = port.wake.read();
            questions.extend(port.receiver.try_iter());
        }
        for (query, reply) in questions {
            let answer = match query {
                Query::Channels => Reply::Channels(self.cmm.list_all()),
                Query::Stats => Reply::Stats(self.cmm.all_stats()),
                Query::Revoke { partition, channel } => {
                    Reply::Revoked(self.revoke(partition, channel))
                }
            };
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(answer);
        }
    }

    fn revoke(&mut self, partition: u32, channel: u32) -> Result<(), u32> {
        if let Some(closing) = self.cmm.revoke(partition, channel)? {
            if let Some((links, _)) = &self.links {
                let frame =
                    Frame::Close { source: closing.source, destination: closing.destination };
                let _ = links.send(closing.node, &frame);
            }
        }
        Ok(())
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

    /// One control request: read it, act on it, write the response (or keep the chain until
    /// another node answers an OPEN).
    fn control(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Option<u32>, Malformed> {
        let partition = self.devices[index].partition;
        let mem = self.devices[index].mem.clone();
        let head_index = chain.head_index();
        let response_at = chain.clone().writable().next().map(|d| (d.addr(), d.len() as usize));
        let (mut reader, mut writer) = split(chain, &mem, "control chain outside guest RAM")?;
        let mut raw = [0u8; CONTROL_REQUEST_SIZE];
        let mut request =
            reader.read_exact(&mut raw).ok().and_then(|()| ControlRequest::from_bytes(&raw));
        raw.zeroize();
        let room = writer.available_bytes();
        let answer = match &request {
            Some(request)
                if request.op == op::OPEN && request.flags & !abi::FLAG_GUEST_KEY == 0 =>
            {
                match response_at.filter(|(_, len)| *len >= CONTROL_RESPONSE_SIZE) {
                    Some((response, _)) => {
                        self.open(index, partition, request, head_index, response)
                    }
                    None => {
                        Answer::Now(self.refused(partition, status::BUFFER_TOO_SMALL), Vec::new())
                    }
                }
            }
            Some(request) => {
                self.execute(partition, request, room.saturating_sub(CONTROL_RESPONSE_SIZE))
            }
            None => Answer::Now(self.refused(partition, status::BAD_REQUEST), Vec::new()),
        };
        // A guest-supplied key was copied into the key table; no other copy may stay behind.
        if let Some(request) = &mut request {
            request.key.zeroize();
        }
        let Answer::Now(head, body) = answer else { return Ok(None) };
        if room < CONTROL_RESPONSE_SIZE {
            return Ok(Some(0));
        }
        writer
            .write_all(&head.to_bytes())
            .map_err(|_| Malformed("control response not writable"))?;
        writer.write_all(&body).map_err(|_| Malformed("control response not writable"))?;
        Ok(Some((CONTROL_RESPONSE_SIZE + body.len()) as u32))
    }

    /// OPEN: on this node it completes at once; to another node the offer goes over the link
    /// and the request waits for the answer.
    fn open(
        &mut self,
        index: usize,
        partition: u32,
        req: &ControlRequest,
        head: u16,
        response: GuestAddress,
    ) -> Answer {
        let key = (req.flags & abi::FLAG_GUEST_KEY != 0).then_some(req.key);
        let (channel, offer) = match self.cmm.open(partition, req.process, req.remote, key) {
            Ok(Opening::Done(id)) => return Answer::Now(opened(Ok(id)), Vec::new()),
            Err(code) => return Answer::Now(opened(Err(code)), Vec::new()),
            Ok(Opening::Remote { channel, offer }) => (channel, offer),
        };
        let node = offer.destination.node;
        let sent = match &self.links {
            Some((links, _)) => links.send(node, &Frame::Offer { id: channel.0, offer }).is_ok(),
            None => false,
        };
        if !sent {
            return Answer::Now(opened(Err(self.cmm.offer_failed(channel))), Vec::new());
        }
        let generation = self.devices[index].shared.generation.load(Ordering::Acquire);
        self.pending_opens.push(PendingOpen { channel, device: index, generation, head, response });
        Answer::Later
    }

    /// Writes the answer to a pending OPEN and hands its chain back to the guest.
    fn complete_open(&mut self, pending: PendingOpen, response: ControlResponse) {
        let device = &self.devices[pending.device];
        if device.shared.generation.load(Ordering::Acquire) != pending.generation {
            // The guest reset the device meanwhile: the chain is gone with its queue.
            return;
        }
        let (shared, mem) = (device.shared.clone(), device.mem.clone());
        if mem.write_slice(&response.to_bytes(), pending.response).is_err() {
            shared.fail("control response not writable");
            return;
        }
        let mut activation = lock(&shared.activation);
        let Activation::Active { queues } = &mut *activation else { return };
        let Some(queue) = queues.get_mut(0) else { return };
        if queue.add_used(&mem, pending.head, CONTROL_RESPONSE_SIZE as u32).is_err() {
            drop(activation);
            shared.fail("used ring not writable");
            return;
        }
        let interrupt = queue.needs_notification(&mem).unwrap_or(true);
        drop(activation);
        shared.used();
        if interrupt {
            shared.signal(INT_USED_BUFFER);
        }
    }

    /// Answers the pending OPEN of `channel`, if there is one.
    fn answer_open(&mut self, channel: ChannelId, result: Result<ChannelId, u32>) {
        if let Some(at) = self.pending_opens.iter().position(|p| p.channel == channel) {
            let pending = self.pending_opens.swap_remove(at);
            self.complete_open(pending, opened(result));
        }
    }

    /// Handles everything the host links queued.
    fn drain_inbox(&mut self) {
        let mut items = Vec::new();
        if let Some((_, inbox)) = &self.links {
            let _ = inbox.wake.read();
            items.extend(inbox.receiver.try_iter());
        }
        for item in items {
            match item {
                Inbound::Frame { node, frame } => self.frame_from_link(node, frame),
                Inbound::LinkDown(node) => {
                    for channel in self.cmm.link_down(node) {
                        self.answer_open(channel, Err(status::UNREACHABLE));
                    }
                }
            }
        }
    }

    /// A frame from `node`, authenticated by its link.
    fn frame_from_link(&mut self, node: u32, frame: Frame) {
        match frame {
            Frame::Offer { id, offer } => {
                let result = match self.cmm.receive_offer(&offer, node) {
                    Ok(_) => OfferResult::Accepted,
                    Err(rejection) => OfferResult::Rejected(rejection),
                };
                if let Some((links, _)) = &self.links {
                    let _ = links.send(node, &Frame::OfferReply { id, result });
                }
            }
            Frame::OfferReply { id, result } => {
                let answer = match result {
                    OfferResult::Accepted => Ok(()),
                    OfferResult::Rejected(r) => Err(r),
                };
                let channel = ChannelId(id);
                let outcome = self.cmm.offer_answered(channel, answer, node);
                self.answer_open(channel, outcome);
            }
            Frame::Data(frame) => {
                if let Ok(delivery) = self.cmm.receive_data(frame, node) {
                    self.deliver(delivery);
                }
            }
            Frame::Close { source, destination } => {
                self.cmm.receive_close(&source, &destination, node)
            }
            Frame::Keepalive | Frame::Goodbye => {}
        }
    }

    fn refused(&mut self, partition: u32, code: u32) -> ControlResponse {
        ControlResponse { status: self.cmm.refuse(partition, code), ..Default::default() }
    }

    /// Carries out a decoded request; `room` is the space after the response head.
    fn execute(&mut self, partition: u32, req: &ControlRequest, room: usize) -> Answer {
        let (head, body) = self.execute_now(partition, req, room);
        Answer::Now(head, body)
    }

    fn execute_now(
        &mut self,
        partition: u32,
        req: &ControlRequest,
        room: usize,
    ) -> (ControlResponse, Vec<u8>) {
        match req.op {
            op::LISTEN if req.flags == 0 => {
                (opened(self.cmm.listen(partition, req.process, req.remote)), Vec::new())
            }
            op::CLOSE if req.flags == 0 => {
                let status = match self.cmm.close(partition, req.process, req.channel) {
                    Ok(Some(closing)) => {
                        if let Some((links, _)) = &self.links {
                            let frame = Frame::Close {
                                source: closing.source,
                                destination: closing.destination,
                            };
                            // An unreachable peer learns of the close when its link goes down.
                            let _ = links.send(closing.node, &frame);
                        }
                        status::OK
                    }
                    Ok(None) => status::OK,
                    Err(code) => code,
                };
                (ControlResponse { status, ..Default::default() }, Vec::new())
            }
            op::LIST => {
                let entries = self.cmm.list(partition);
                if entries.len() * CHANNEL_INFO_SIZE > room {
                    let head = ControlResponse {
                        status: status::BUFFER_TOO_SMALL,
                        channel: 0,
                        count: entries.len() as u32,
                    };
                    return (head, Vec::new());
                }
                let body = entries.iter().flat_map(|e| e.to_bytes()).collect();
                (
                    ControlResponse { status: status::OK, channel: 0, count: entries.len() as u32 },
                    body,
                )
            }
            op::STATS => {
                let body = self.cmm.stats(partition).to_bytes();
                if body.len() > room {
                    return (self.refused(partition, status::BUFFER_TOO_SMALL), Vec::new());
                }
                (ControlResponse { status: status::OK, ..Default::default() }, body.to_vec())
            }
            op::LISTEN | op::OPEN | op::CLOSE => {
                (self.refused(partition, status::BAD_REQUEST), Vec::new())
            }
            _ => (self.refused(partition, status::UNKNOWN_OP), Vec::new()),
        }
    }

    /// Sends every message on the transmit queue, then delivers what they produced.
    fn transmit(&mut self, index: usize) -> Result<(), Malformed> {
        let mut deliveries = Vec::new();
        self.run_queue(index, 1, |node, index, chain| {
            node.send_one(index, chain, &mut deliveries)
        })?;
        for delivery in deliveries {
            self.deliver(delivery);
        }
        Ok(())
    }

    fn send_one(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<Option<u32>, Malformed> {
        let partition = self.devices[index].partition;
        let mem = self.devices[index].mem.clone();
        let (mut reader, mut writer) = split(chain, &mem, "transmit chain outside guest RAM")?;
        let code = match self.read_message(&mut reader) {
            Ok((header, payload)) => match self.cmm.send(partition, &header, payload) {
                Ok(Routed::Local(delivery)) => {
                    deliveries.push(delivery);
                    status::OK
                }
                Ok(Routed::Remote { node, frame }) => match &self.links {
                    Some((links, _)) if links.send(node, &Frame::Data(frame)).is_ok() => status::OK,
                    _ => status::UNREACHABLE,
                },
                Err(code) => code,
            },
            Err(code) => self.cmm.refuse(partition, code),
        };
        if writer.available_bytes() < 4 {
            return Ok(Some(0));
        }
        writer
            .write_all(&code.to_le_bytes())
            .map_err(|_| Malformed("transmit status not writable"))?;
        Ok(Some(4))
    }

    /// Reads a transmit header and its payload, within the device's limits.
    fn read_message(&self, reader: &mut Reader<'_>) -> Result<(TxHeader, Vec<u8>), u32> {
        let mut raw = [0u8; TX_HEADER_SIZE];
        reader.read_exact(&mut raw).map_err(|_| status::BAD_REQUEST)?;
        let header = TxHeader::from_bytes(&raw).ok_or(status::BAD_REQUEST)?;
        let len = header.len as usize;
        if len > self.cmm.limits().max_message as usize {
            return Err(status::TOO_BIG);
        }
        if reader.available_bytes() < len {
            return Err(status::BAD_REQUEST);
        }
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).map_err(|_| status::BAD_REQUEST)?;
        Ok((header, payload))
    }

    /// Puts a verified message into its partition's receive queue, or holds it until the
    /// guest posts a buffer.
    fn deliver(&mut self, delivery: Delivery) {
        let Some(index) = self.device_of(delivery.partition) else {
            return;
        };
        let device = &mut self.devices[index];
        if device.pending.len() >= MAX_PENDING {
            self.cmm.dropped_no_room(&delivery);
            return;
        }
        device.pending.push_back(delivery);
        self.flush_pending(index);
    }

    /// Moves held messages of device `index` into receive buffers while there are any.
    fn flush_pending(&mut self, index: usize) {
        if self.devices[index].pending.is_empty() {
            return;
        }
        let shared = self.devices[index].shared.clone();
        let mem = self.devices[index].mem.clone();
        let mut activation = lock(&shared.activation);
        let Activation::Active { queues } = &mut *activation else {
            return;
        };
        let Some(queue) = queues.get_mut(2).filter(|q| q.ready()) else {
            return;
        };
        let mut used_any = false;
        let mut failure = None;
        while !self.devices[index].pending.is_empty() {
            match next_chain(queue, &mem) {
                Ok(Some(chain)) => {
                    let Some(delivery) = self.devices[index].pending.pop_front() else {
                        break;
                    };
                    let head = chain.head_index();
                    let written = write_delivery(chain, &mem, &delivery);
                    match written {
                        Some(_) => self.cmm.delivered(&delivery),
                        None => self.cmm.dropped_no_room(&delivery),
                    }
                    if queue.add_used(&mem, head, written.unwrap_or(0)).is_err() {
                        failure = Some("used ring not writable");
                        break;
                    }
                    used_any = true;
                }
                Ok(None) => break,
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            }
        }
        let interrupt = used_any && queue.needs_notification(&mem).unwrap_or(true);
        drop(activation);
        if used_any {
            shared.used();
        }
        if let Some(why) = failure {
            shared.fail(why);
        } else if interrupt {
            shared.signal(INT_USED_BUFFER);
        }
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

/// The response to LISTEN or OPEN.
fn opened(result: Result<ChannelId, u32>) -> ControlResponse {
    match result {
        Ok(id) => ControlResponse { status: status::OK, channel: id.0, count: 0 },
        Err(code) => ControlResponse { status: code, ..Default::default() },
    }
}

/// The next receive buffer, re-enabling notifications when there is none so the guest's next
/// post wakes the device.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, &'static str> {
    loop {
        if let Some(chain) =
            queue.iter(mem).map_err(|_| "avail index ran ahead of the queue")?.next()
        {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem).map_err(|_| "queue rings not in guest RAM")? {
            return Ok(None);
        }
    }
}

/// Writes header and payload into a receive buffer; `None` if it is too small (the message is
/// dropped and the buffer returned empty).
fn write_delivery(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    delivery: &Delivery,
) -> Option<u32> {
    let mut writer = chain.writer(mem).ok()?;
    let total = RX_HEADER_SIZE + delivery.payload.len();
    if writer.available_bytes() < total {
        return None;
    }
    writer.write_all(&delivery.header.to_bytes()).ok()?;
    writer.write_all(&delivery.payload).ok()?;
    Some(total as u32)
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
