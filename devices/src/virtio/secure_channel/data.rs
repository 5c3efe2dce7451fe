//! The data path: messages from the transmit queue through the CMM, and verified messages into
//! receive buffers (held, bounded, while the guest has none posted).

use super::*;

impl ChannelNode {
    /// Sends every message on the transmit queue, then delivers what they produced.
    pub(super) fn transmit(&mut self, index: usize) -> Result<(), Malformed> {
        let mut deliveries = std::mem::take(&mut self.deliveries);
        let result = self
            .run_queue(index, 1, |node, index, chain| node.send_one(index, chain, &mut deliveries));
        self.deliver_all(deliveries.drain(..));
        self.deliveries = deliveries;
        self.send_outbound();
        result
    }

    /// Sends the batch's frames for other nodes, one gathered write per node, and recycles
    /// their buffers. A link that breaks now takes its channels down with it (link loss).
    fn send_outbound(&mut self) {
        let mut outbound = std::mem::take(&mut self.outbound);
        if let Some((links, _)) = &self.links {
            outbound.sort_by_key(|(node, _)| *node);
            for run in outbound.chunk_by(|a, b| a.0 == b.0) {
                // A failure shuts the link down; link loss then closes its channels.
                let _ = links.send_all(run[0].0, run.iter().map(|(_, frame)| frame));
            }
        }
        for (_, frame) in outbound.drain(..) {
            if let Frame::Data(frame) = frame {
                self.buffers.give(frame.payload);
            }
        }
        self.outbound = outbound;
    }

    pub(super) fn send_one(
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
                Ok(Routed::Remote { node, frame }) => {
                    // Sent with the rest of the batch (see `transmit`); OK means sealed and
                    // handed, in order, to an up link.
                    if self.links.as_ref().is_some_and(|(links, _)| links.is_up(node)) {
                        self.outbound.push((node, Frame::Data(frame)));
                        status::OK
                    } else {
                        self.buffers.give(frame.payload);
                        status::UNREACHABLE
                    }
                }
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
    pub(super) fn read_message(
        &mut self,
        reader: &mut Reader<'_>,
    ) -> Result<(TxHeader, Vec<u8>), u32> {
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
        let mut payload = self.buffers.take(len);
        if reader.read_exact(&mut payload).is_err() {
            self.buffers.give(payload);
            return Err(status::BAD_REQUEST);
        }
        Ok((header, payload))
    }

    /// Puts verified messages into their partitions' receive queues, holding those for which
    /// the guest has posted no buffer yet. Each receiving device is flushed once, at the end,
    /// so a batch costs its guest one wake-up and at most one interrupt, not one per message.
    pub(super) fn deliver_all(&mut self, deliveries: impl IntoIterator<Item = Delivery>) {
        let mut touched: Vec<usize> = Vec::new();
        for delivery in deliveries {
            if let Some(index) = self.hold(delivery) {
                if !touched.contains(&index) {
                    touched.push(index);
                }
            }
        }
        for index in touched {
            self.flush_pending(index);
        }
    }

    /// Queues `delivery` on its device (flushing first if the queue is full, dropping it if
    /// the guest still has no room); returns the device.
    fn hold(&mut self, delivery: Delivery) -> Option<usize> {
        let index = self.device_of(delivery.partition)?;
        if self.devices[index].pending.len() >= MAX_PENDING {
            self.flush_pending(index);
        }
        let device = &mut self.devices[index];
        if device.pending.len() >= MAX_PENDING {
            self.cmm.dropped_no_room(&delivery);
            self.buffers.give(delivery.payload);
            return None;
        }
        device.pending.push_back(delivery);
        Some(index)
    }

    /// Moves held messages of device `index` into receive buffers while there are any.
    pub(super) fn flush_pending(&mut self, index: usize) {
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
                    self.buffers.give(delivery.payload);
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
