//! The receive queue: verified messages go into the guest's posted buffers, straight from the
//! sender's buffer (this node) or from the link's receive buffer where the CMM opened them
//! (another node). With no buffer posted, a message is held (in order) and moved in when the
//! guest posts one. A sender on this node is told NO_ROOM before the device would hold more
//! than [`CHANNEL_WINDOW`] messages of its channel or [`MAX_PENDING`] in all, so nothing from
//! this node is dropped. A sender on another node is held to the credit this node grants
//! (`cmm::credit`): at most a window of messages per channel, held whatever else is held. Only
//! a peer of link version 2, which knows no credit, can be dropped past [`MAX_PENDING`].

use guest_agent::channel::abi::RX_HEADER_SIZE;

use super::chain::Cursor;
use super::*;
use crate::cmm::{Deliver, Delivered};

/// The next posted receive buffer of a device whose lock is held; when there is none,
/// notifications are re-enabled so that the guest's next post wakes the device.
pub(super) fn next_buffer<'m>(
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

/// Where a message's payload comes from.
enum Source<'a, 'c, 'm> {
    /// Host memory: a link's receive buffer, or a held copy.
    Bytes(&'a [u8]),
    /// The sender's guest memory.
    Guest(&'c mut Cursor<'m>),
}

impl Source<'_, '_, '_> {
    fn write_into(&mut self, writer: &mut Cursor<'_>, len: usize) -> Result<bool, chain::OutOfRam> {
        match self {
            Source::Bytes(bytes) => writer.write(&bytes[..len]),
            Source::Guest(cursor) => cursor.copy_to(writer, len),
        }
    }

    fn copy(&mut self, buffer: &mut [u8]) -> bool {
        match self {
            Source::Bytes(bytes) => {
                crate::memcopy::copy(buffer, &bytes[..buffer.len()]);
                true
            }
            Source::Guest(cursor) => cursor.read(buffer).unwrap_or(false),
        }
    }
}

/// Every partition's receive queue, as the CMM delivers into them.
pub(super) struct Receivers<'a> {
    devices: &'a mut [ChannelDevice],
    buffers: &'a mut pool::BufferPool,
    touched: &'a mut Vec<usize>,
    /// The vsock devices, for messages on their connections' channels.
    vsock: &'a mut vsock::Vsock,
    node: u32,
}

impl Receivers<'_> {
    /// Delivers a message to device `index`: into a posted buffer if the guest has one and
    /// nothing is held before it, else held (if `bounded`, only while fewer than
    /// [`MAX_PENDING`] are; an unbounded one's sender is bounded by its credit).
    fn deliver_to(
        &mut self,
        index: usize,
        channel: ChannelId,
        header: &RxHeader,
        mut source: Source<'_, '_, '_>,
        bounded: bool,
    ) -> Delivered {
        let device = &mut self.devices[index];
        let len = header.len as usize;
        if device.pending.is_empty() {
            match write_now(device, header, &mut source) {
                Ok(Some(written)) => {
                    if !self.touched.contains(&index) {
                        self.touched.push(index);
                    }
                    return if written { Delivered::Written } else { Delivered::Dropped };
                }
                Ok(None) => {}
                Err(why) => {
                    device.shared.fail(why);
                    return Delivered::Dropped;
                }
            }
        }
        if bounded && device.pending.len() >= MAX_PENDING {
            return Delivered::Dropped;
        }
        let mut payload = self.buffers.take(len);
        if !source.copy(&mut payload) {
            self.buffers.give(payload);
            return Delivered::Dropped;
        }
        device.pending.push_back(Held { channel, header: *header, payload });
        Delivered::Held
    }
}

/// Writes the message into the device's next posted buffer: `Some(true)` if written,
/// `Some(false)` if the buffer was too small (it is returned empty), `None` if no buffer is
/// posted.
fn write_now(
    device: &ChannelDevice,
    header: &RxHeader,
    source: &mut Source<'_, '_, '_>,
) -> Result<Option<bool>, &'static str> {
    let mem = &device.mem;
    let mut activation = lock(&device.shared.activation);
    let Activation::Active { queues } = &mut *activation else { return Ok(None) };
    let Some(queue) = queues.get_mut(2).filter(|q| q.ready()) else { return Ok(None) };
    let Some(chain) = next_buffer(queue, mem)? else { return Ok(None) };
    let head = chain.head_index();
    let mut writer = Cursor::writable(chain, mem);
    let total = RX_HEADER_SIZE + header.len as usize;
    let fits = writer.remaining().map_err(|_| "receive buffer outside guest RAM")? >= total;
    let written = fits
        && writer.write(&header.to_bytes()).map_err(|_| "receive buffer outside guest RAM")?
        && source
            .write_into(&mut writer, header.len as usize)
            .map_err(|_| "buffer outside guest RAM")?;
    queue
        .add_used(mem, head, if written { total as u32 } else { 0 })
        .map_err(|_| "used ring not writable")?;
    Ok(Some(written))
}

impl Deliver for Receivers<'_> {
    fn deliver(
        &mut self,
        partition: u32,
        header: &RxHeader,
        payload: &[u8],
        metered: bool,
    ) -> Delivered {
        if let Some(delivered) =
            self.vsock.deliver_remote(self.node, partition, header, payload, self.buffers)
        {
            return delivered;
        }
        let Some(index) = self.devices.iter().position(|d| d.partition == partition) else {
            return Delivered::Dropped;
        };
        let channel = ChannelId(header.channel);
        self.deliver_to(index, channel, header, Source::Bytes(payload), !metered)
    }
}

impl ChannelNode {
    /// The receive queues, for the CMM to deliver into.
    pub(super) fn receivers(&mut self) -> (&mut Cmm, Receivers<'_>) {
        let node = self.cmm.node();
        let receivers = Receivers {
            devices: &mut self.devices,
            buffers: &mut self.buffers,
            touched: &mut self.touched,
            vsock: &mut self.vsock,
            node,
        };
        (&mut self.cmm, receivers)
    }

    /// Delivers a message from a partition of this node, copying its payload from the
    /// sender's buffer (`reader`) into the receiver's.
    pub(super) fn deliver_local(
        &mut self,
        partition: u32,
        channel: ChannelId,
        header: &RxHeader,
        reader: &mut Cursor<'_>,
    ) -> Result<(), Malformed> {
        let Some(index) = self.device_of(partition) else {
            self.cmm.dropped_no_room(partition, channel);
            return Ok(());
        };
        let (cmm, mut receivers) = self.receivers();
        match receivers.deliver_to(index, channel, header, Source::Guest(reader), true) {
            Delivered::Written => cmm.delivered(partition, channel, header.len as usize),
            Delivered::Dropped => cmm.dropped_no_room(partition, channel),
            Delivered::Held => {}
        }
        Ok(())
    }

    /// Moves held messages of device `index` into receive buffers while there are any.
    pub(super) fn flush_pending(&mut self, index: usize) {
        while let Some(held) = self.devices[index].pending.pop_front() {
            let outcome =
                write_now(&self.devices[index], &held.header, &mut Source::Bytes(&held.payload));
            let partition = self.devices[index].partition;
            match outcome {
                Ok(Some(true)) => self.cmm.delivered(partition, held.channel, held.payload.len()),
                Ok(Some(false)) => self.cmm.dropped_no_room(partition, held.channel),
                Ok(None) => {
                    self.devices[index].pending.push_front(held);
                    break;
                }
                Err(why) => {
                    self.devices[index].shared.fail(why);
                    self.buffers.give(held.payload);
                    break;
                }
            }
            if !self.touched.contains(&index) {
                self.touched.push(index);
            }
            self.buffers.give(held.payload);
        }
    }
}
