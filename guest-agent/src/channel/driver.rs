//! The guest driver and API of the secure-channel device.
//!
//! The device stamps node and partition on everything; a request names only the process it is
//! made for (guest software's own naming, like a port). Everything polls: no interrupts.
//!
//! ```ignore
//! let mut ch = SecureChannel::open(info)?;
//! let peer = Endpoint { node: 0, partition: 2, process: 7 };
//! let channel = ch.connect(1, peer, None)?;        // OPEN with a device-made key
//! ch.send(channel, 1, b"hello")?;
//! let mut buf = [0u8; 64];
//! if let Some(msg) = ch.recv(&mut buf)? { /* msg.header.source is verified by the CMM */ }
//! ```

use super::abi::{
    self, op, status, ChannelInfo, Config, ControlRequest, ControlResponse, Endpoint, RxHeader,
    Stats, TxHeader, CHANNEL_INFO_SIZE, CONTROL_RESPONSE_SIZE, RX_HEADER_SIZE, STATS_SIZE,
    TX_HEADER_SIZE,
};
use crate::boot_info::{BootInfo, DeviceKind};
use crate::idle::Backoff;
use crate::pages;
use crate::virtio::queue::{Buffer, Virtqueue};
use crate::virtio::transport::Transport;
use crate::virtio::{DriverError, F_EVENT_IDX};

/// Messages the driver can have in flight on the transmit queue.
pub const TX_SLOTS: usize = 32;
/// Receive buffers kept posted.
pub const RX_SLOTS: usize = 32;
const TX_QUEUE_SIZE: u16 = 128;
const RX_QUEUE_SIZE: u16 = 64;
const CONTROL_QUEUE_SIZE: u16 = 8;
/// Room for the longest control response this driver asks for (LIST of 64 entries).
const CONTROL_BUF: usize = CONTROL_RESPONSE_SIZE + 64 * CHANNEL_INFO_SIZE;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    /// The device (or the driver) failed.
    Driver(DriverError),
    /// The device refused the request with this status (one of `abi::status`).
    Status(u32),
    /// Every transmit slot is in flight: reap completions first.
    Busy,
    /// The message is larger than the device's `max_message`.
    TooBig,
}

impl From<DriverError> for ChannelError {
    fn from(e: DriverError) -> Self {
        Self::Driver(e)
    }
}

/// A received message: its verified header; the payload was copied into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The header the device wrote; `source` is verified by the CMM.
    pub header: RxHeader,
    /// Bytes of payload copied (the rest, if the caller's buffer was short, is lost).
    pub copied: usize,
}

/// What [`SecureChannel::recv_reply`]'s closure asks for: the first `len` bytes of the message's
/// payload, as the closure left them, go out as a message on `channel` from `process`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The channel to send on (for an echo, the one it came in on: `header.channel`).
    pub channel: u32,
    /// The sending process (for an echo, the receiving one: `header.process`).
    pub process: u32,
    /// Payload bytes to send, at most the received payload's length.
    pub len: usize,
}

/// A received message where the device wrote it: its header, and its payload in the receive
/// buffer.
type InPlace<'a> = (RxHeader, &'a mut [u8]);

/// A transmit slot: header, payload staging and status, all device-visible.
struct TxSlot {
    header: *mut [u8; TX_HEADER_SIZE],
    payload: *mut u8,
    status: *mut u32,
    /// Payload bytes of the message the slot holds.
    len: usize,
    /// The receive buffer whose payload the slot sends in place of its own staging
    /// ([`SecureChannel::recv_reply`]): lent to the transmit queue, and posted for receiving
    /// again only once the slot is free.
    lent: Option<u8>,
}

/// Transmit slots whose message the device answered NO_ROOM, oldest first, for
/// [`SecureChannel::reap_send_retrying`].
struct Refused {
    slots: [u8; TX_SLOTS],
    head: usize,
    len: usize,
    /// The oldest is offered again and not yet answered.
    retrying: bool,
}

impl Refused {
    const fn new() -> Self {
        Self { slots: [0; TX_SLOTS], head: 0, len: 0, retrying: false }
    }

    fn oldest(&self) -> Option<usize> {
        (self.len > 0).then(|| usize::from(self.slots[self.head]))
    }

    fn push(&mut self, slot: usize) {
        // At most TX_SLOTS slots are taken, so the ring never overflows.
        self.slots[(self.head + self.len) % TX_SLOTS] = slot as u8;
        self.len += 1;
    }

    fn pop(&mut self) {
        self.head = (self.head + 1) % TX_SLOTS;
        self.len -= 1;
    }
}

/// The partition's secure-channel device.
pub struct SecureChannel {
    transport: Transport,
    config: Config,
    control: Virtqueue,
    tx: Virtqueue,
    rx: Virtqueue,
    control_req: *mut [u8; 64],
    control_resp: *mut [u8; CONTROL_BUF],
    tx_slots: [TxSlot; TX_SLOTS],
    tx_free: u32,
    refused: Refused,
    /// Slot of each in-flight transmit chain, by head descriptor.
    tx_slot_of: [u8; TX_QUEUE_SIZE as usize],
    rx_bufs: [*mut u8; RX_SLOTS],
    rx_slot_of: [u8; RX_QUEUE_SIZE as usize],
    rx_buf_len: u32,
    /// Lent receive buffers were posted again and the device not yet told.
    rx_unkicked: bool,
}

impl SecureChannel {
    /// Finds the partition's secure-channel device, brings it up, and posts receive buffers.
    pub fn open(info: &BootInfo) -> Result<Self, ChannelError> {
        let dev = info.find_device(DeviceKind::SecureChannel).ok_or(DriverError::NoDevice)?;
        let transport = Transport::probe(dev, abi::DEVICE_ID)?;
        let event_idx = transport.negotiate(F_EVENT_IDX)? & F_EVENT_IDX != 0;
        let config = Config {
            node: transport.config32(0),
            partition: transport.config32(4),
            max_message: transport.config32(8),
            max_channels: transport.config32(12),
            version: transport.config32(16),
        };
        let control = transport.setup_queue(abi::CONTROL_QUEUE, CONTROL_QUEUE_SIZE, event_idx)?;
        let tx = transport.setup_queue(abi::TX_QUEUE, TX_QUEUE_SIZE, event_idx)?;
        let rx = transport.setup_queue(abi::RX_QUEUE, RX_QUEUE_SIZE, event_idx)?;
        let oom = || ChannelError::Driver(DriverError::OutOfMemory);
        let control_req = pages::alloc(64).ok_or_else(oom)? as *mut [u8; 64];
        let control_resp =
            pages::alloc(CONTROL_BUF as u64).ok_or_else(oom)? as *mut [u8; CONTROL_BUF];
        let max = u64::from(config.max_message);
        let mut tx_slots: [TxSlot; TX_SLOTS] = core::array::from_fn(|_| TxSlot {
            header: core::ptr::null_mut(),
            payload: core::ptr::null_mut(),
            status: core::ptr::null_mut(),
            len: 0,
            lent: None,
        });
        for slot in &mut tx_slots {
            let meta = pages::alloc(64).ok_or_else(oom)?;
            slot.header = meta as *mut [u8; TX_HEADER_SIZE];
            slot.status = (meta + 32) as *mut u32;
            slot.payload = pages::alloc(max).ok_or_else(oom)? as *mut u8;
        }
        let rx_buf_len = RX_HEADER_SIZE as u32 + config.max_message;
        let mut rx_bufs = [core::ptr::null_mut(); RX_SLOTS];
        for buf in &mut rx_bufs {
            *buf = pages::alloc(u64::from(rx_buf_len)).ok_or_else(oom)? as *mut u8;
        }
        let mut channel = Self {
            transport,
            config,
            control,
            tx,
            rx,
            control_req,
            control_resp,
            tx_slots,
            tx_free: if TX_SLOTS == 32 { u32::MAX } else { (1u32 << TX_SLOTS) - 1 },
            refused: Refused::new(),
            tx_slot_of: [0; TX_QUEUE_SIZE as usize],
            rx_bufs,
            rx_slot_of: [0; RX_QUEUE_SIZE as usize],
            rx_buf_len,
            rx_unkicked: false,
        };
        for slot in 0..RX_SLOTS {
            channel.post_rx(slot)?;
        }
        channel.control.suppress_interrupts();
        channel.tx.suppress_interrupts();
        channel.rx.suppress_interrupts();
        channel.transport.driver_ok()?;
        channel.rx.kick();
        Ok(channel)
    }

    /// The device's configuration: this node and partition, and the limits.
    pub fn config(&self) -> Config {
        self.config
    }

    /// This process's endpoint as others see it.
    pub fn endpoint(&self, process: u32) -> Endpoint {
        Endpoint { node: self.config.node, partition: self.config.partition, process }
    }

    fn post_rx(&mut self, slot: usize) -> Result<(), ChannelError> {
        let buf = Buffer { addr: self.rx_bufs[slot] as u64, len: self.rx_buf_len, writable: true };
        let head = self.rx.add(&[buf])?;
        self.rx_slot_of[usize::from(head)] = slot as u8;
        Ok(())
    }

    /// Stops the receive queue (virtio 1.2, 4.2.2.2): the device no longer writes into its
    /// buffers; messages that arrive meanwhile wait in the device, up to its limit, until
    /// [`Self::restart_receive`].
    pub fn stop_receive(&mut self) -> Result<(), ChannelError> {
        Ok(self.transport.stop_queue(abi::RX_QUEUE)?)
    }

    /// Replaces the receive queue with a new one while the device runs: stops it (if it is
    /// not already), sets it up on fresh rings, posts every receive buffer again and enables
    /// it. Buffers the device had not returned are simply posted again; those lent to a send
    /// ([`Self::recv_reply`]) are posted when the send is reaped, as always. Messages the
    /// device had already written into buffers and the caller had not taken go with the old
    /// rings: stop the queue and take them first.
    pub fn restart_receive(&mut self) -> Result<(), ChannelError> {
        self.transport.stop_queue(abi::RX_QUEUE)?;
        let event_idx = self.rx.event_idx();
        self.rx = self.transport.setup_queue(abi::RX_QUEUE, RX_QUEUE_SIZE, event_idx)?;
        for slot in 0..RX_SLOTS {
            if !self.tx_slots.iter().any(|tx| tx.lent == Some(slot as u8)) {
                self.post_rx(slot)?;
            }
        }
        self.rx.suppress_interrupts();
        self.transport.check()?;
        self.rx.kick();
        Ok(())
    }

    /// Sends one control request and waits for its response head; the rest of the response
    /// (LIST records, STATS) is left in the response buffer.
    fn control(&mut self, request: ControlRequest) -> Result<ControlResponse, ChannelError> {
        self.control_with_key(request.to_bytes(), None)
    }

    /// Sends the encoded request `bytes`, with `key` (if any) copied straight into the
    /// device-visible request buffer, which is wiped once the device has answered: the key
    /// is never held in a request value on the stack.
    fn control_with_key(
        &mut self,
        bytes: [u8; 64],
        key: Option<&[u8; 32]>,
    ) -> Result<ControlResponse, ChannelError> {
        // SAFETY: the request and response buffers are this driver's own pages, not in flight
        // (the control queue is used synchronously).
        let (req, resp) = unsafe { (&mut *self.control_req, &mut *self.control_resp) };
        *req = bytes;
        if let Some(key) = key {
            req[32..64].copy_from_slice(key);
        }
        self.control.add(&[Buffer::readable(req), Buffer::writable(resp)])?;
        self.control.kick();
        let mut backoff = Backoff::patient();
        let written = loop {
            if let Some((_, len)) = self.control.poll()? {
                break len as usize;
            }
            backoff.snooze();
        };
        for byte in req.iter_mut() {
            // SAFETY: a plain byte of our own buffer; volatile so the wipe is not elided.
            unsafe { core::ptr::write_volatile(byte, 0) };
        }
        if written < CONTROL_RESPONSE_SIZE {
            self.transport.check()?;
            return Err(ChannelError::Driver(DriverError::BadUsedEntry));
        }
        let head = ControlResponse::from_bytes(&resp[..CONTROL_RESPONSE_SIZE]);
        if head.status != status::OK {
            return Err(ChannelError::Status(head.status));
        }
        Ok(head)
    }

    fn request(op: u32, process: u32) -> ControlRequest {
        ControlRequest { op, process, ..Default::default() }
    }

    /// LISTEN: `process` accepts a channel from `remote`; returns the channel ID.
    pub fn listen(&mut self, process: u32, remote: Endpoint) -> Result<u32, ChannelError> {
        let req = ControlRequest { remote, ..Self::request(op::LISTEN, process) };
        Ok(self.control(req)?.channel)
    }

    /// OPEN: `process` opens a channel to `remote` (which must be listening), with `key` or a
    /// key the device makes; returns the channel ID once the remote CMM accepted the offer.
    pub fn connect(
        &mut self,
        process: u32,
        remote: Endpoint,
        key: Option<&[u8; 32]>,
    ) -> Result<u32, ChannelError> {
        let flags = if key.is_some() { abi::FLAG_GUEST_KEY } else { 0 };
        let req = ControlRequest { remote, flags, ..Self::request(op::OPEN, process) };
        Ok(self.control_with_key(req.to_bytes(), key)?.channel)
    }

    /// [`Self::connect`], retrying every 10 ms for up to `attempts` tries while the peer is not
    /// listening yet or its node is not linked yet (partitions and nodes start concurrently).
    pub fn connect_patiently(
        &mut self,
        info: &BootInfo,
        process: u32,
        remote: Endpoint,
        key: Option<&[u8; 32]>,
        attempts: u32,
    ) -> Result<u32, ChannelError> {
        let mut last = ChannelError::Status(status::NO_LISTENER);
        for _ in 0..attempts {
            match self.connect(process, remote, key) {
                Ok(channel) => return Ok(channel),
                Err(e @ ChannelError::Status(status::NO_LISTENER | status::UNREACHABLE)) => {
                    last = e;
                    // Parked, not spinning: the peer (or the link) needs the CPU more.
                    crate::time::sleep_for(info, 10_000);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// CLOSE: ends the channel (its keys are erased; the peer learns of it).
    pub fn close(&mut self, process: u32, channel: u32) -> Result<(), ChannelError> {
        self.control(ControlRequest { channel, ..Self::request(op::CLOSE, process) }).map(|_| ())
    }

    /// LIST: this partition's channels into `out`; returns how many there are.
    pub fn list(&mut self, out: &mut [ChannelInfo]) -> Result<usize, ChannelError> {
        let head = self.control(Self::request(op::LIST, 0))?;
        // SAFETY: the response buffer is ours again once its request completed.
        let resp = unsafe { &*self.control_resp };
        let count = head.count as usize;
        for (i, slot) in out.iter_mut().enumerate().take(count) {
            let at = CONTROL_RESPONSE_SIZE + i * CHANNEL_INFO_SIZE;
            *slot = ChannelInfo::from_bytes(&resp[at..at + CHANNEL_INFO_SIZE]);
        }
        Ok(count)
    }

    /// Sends a control request exactly as encoded in `bytes` (tests use it to send malformed
    /// requests); returns the status the device answered.
    pub fn control_raw(&mut self, bytes: [u8; 64]) -> Result<u32, ChannelError> {
        match self.control_with_key(bytes, None) {
            Ok(head) => Ok(head.status),
            Err(ChannelError::Status(code)) => Ok(code),
            Err(e) => Err(e),
        }
    }

    /// Sends a transmit chain with the header exactly as encoded in `header` and `payload`
    /// (tests use it to send malformed headers); returns the device's status.
    pub fn send_raw(
        &mut self,
        header: [u8; TX_HEADER_SIZE],
        payload: &[u8],
    ) -> Result<u32, ChannelError> {
        if self.tx_free == 0 {
            return Err(ChannelError::Busy);
        }
        if payload.len() > self.config.max_message as usize {
            return Err(ChannelError::TooBig);
        }
        let slot_index = self.tx_free.trailing_zeros() as usize;
        self.post_slot(slot_index, header, payload)?;
        self.flush();
        self.wait_send()
    }

    /// STATS: the device's counters for this partition.
    pub fn stats(&mut self) -> Result<Stats, ChannelError> {
        self.control(Self::request(op::STATS, 0))?;
        // SAFETY: as in `list`.
        let resp = unsafe { &*self.control_resp };
        Ok(Stats::from_bytes(&resp[CONTROL_RESPONSE_SIZE..CONTROL_RESPONSE_SIZE + STATS_SIZE]))
    }

    /// Queues `data` on `channel` as `source` without notifying the device (see [`Self::flush`]).
    /// `source` is normally [`Self::endpoint`] of the sending process; the device checks it.
    pub fn post_send_as(
        &mut self,
        channel: u32,
        source: Endpoint,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        if data.len() > self.config.max_message as usize {
            return Err(ChannelError::TooBig);
        }
        if self.tx_free == 0 {
            return Err(ChannelError::Busy);
        }
        let slot_index = self.tx_free.trailing_zeros() as usize;
        let header = TxHeader { channel, source, len: data.len() as u32 };
        self.post_slot(slot_index, header.to_bytes(), data)
    }

    /// Fills free transmit slot `slot_index` with `header` and `data` and offers it.
    fn post_slot(
        &mut self,
        slot_index: usize,
        header: [u8; TX_HEADER_SIZE],
        data: &[u8],
    ) -> Result<(), ChannelError> {
        let slot = &mut self.tx_slots[slot_index];
        // SAFETY: the slot is free, so the device is not reading or writing its pages, which
        // hold TX_HEADER_SIZE + 4 bytes of metadata and max_message bytes of payload (the
        // callers bound `data` by max_message).
        unsafe {
            *slot.header = header;
            core::ptr::copy_nonoverlapping(data.as_ptr(), slot.payload, data.len());
        }
        slot.len = data.len();
        slot.lent = None;
        self.offer_slot(slot_index)?;
        self.tx_free &= !(1 << slot_index);
        Ok(())
    }

    /// Offers the message transmit slot `slot_index` holds to the device.
    fn offer_slot(&mut self, slot_index: usize) -> Result<(), ChannelError> {
        let slot = &self.tx_slots[slot_index];
        let payload = match slot.lent {
            // SAFETY: within the receive buffer's rx_buf_len bytes, past its header.
            Some(rx) => unsafe { self.rx_bufs[usize::from(rx)].add(RX_HEADER_SIZE) },
            None => slot.payload,
        };
        // SAFETY: the slot's header and the first `len` bytes of its payload (its own staging,
        // or a lent receive buffer's payload: `len` is at most max_message, the size of
        // either) were written, and the device reads them only once they are offered, below.
        let (hdr, payload) =
            unsafe { (&*slot.header, core::slice::from_raw_parts(payload, slot.len)) };
        let status_buf = Buffer { addr: slot.status as u64, len: 4, writable: true };
        let head = if payload.is_empty() {
            self.tx.add(&[Buffer::readable(hdr), status_buf])?
        } else {
            self.tx.add(&[Buffer::readable(hdr), Buffer::readable(payload), status_buf])?
        };
        self.tx_slot_of[usize::from(head)] = slot_index as u8;
        Ok(())
    }

    /// Queues `data` from `process` on `channel` (see [`Self::post_send_as`]).
    pub fn post_send(
        &mut self,
        channel: u32,
        process: u32,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        self.post_send_as(channel, self.endpoint(process), data)
    }

    /// Notifies the device of queued sends (one VM exit, if the device wants one at all).
    pub fn flush(&mut self) {
        self.tx.kick();
    }

    /// Takes one completed send: its status (one of `abi::status`), or `None` if none is done.
    pub fn reap_send(&mut self) -> Result<Option<u32>, ChannelError> {
        let Some((slot_index, code)) = self.reap_slot()? else {
            self.kick_rx();
            return Ok(None);
        };
        self.free_slot(slot_index)?;
        Ok(Some(code))
    }

    /// Frees transmit slot `slot_index`, and posts the receive buffer it had on loan (if any)
    /// for receiving again. The device hears of such buffers at the next receive or when
    /// nothing more is reaped ([`Self::kick_rx`]): a batch of them costs it one notification,
    /// not one each.
    fn free_slot(&mut self, slot_index: usize) -> Result<(), ChannelError> {
        self.tx_free |= 1 << slot_index;
        let Some(rx) = self.tx_slots[slot_index].lent.take() else { return Ok(()) };
        self.post_rx(usize::from(rx))?;
        self.rx_unkicked = true;
        Ok(())
    }

    /// Tells the device of receive buffers [`Self::free_slot`] posted, if it wants to know.
    fn kick_rx(&mut self) {
        if core::mem::take(&mut self.rx_unkicked) {
            self.rx.kick();
        }
    }

    /// As [`Self::reap_send`], but a send the device answered NO_ROOM (its receiver had no
    /// room: nothing was sent) is kept in its slot and offered again, and its status comes
    /// later. Refused sends go again one at a time, oldest first, once nothing else is in
    /// flight, each until the device takes it: the device refuses a channel's messages in one
    /// pass from the first it has no room for on, and room comes back between passes, so
    /// this keeps each channel's messages in the order they were posted, provided the caller
    /// posts nothing new meanwhile (and does not mix in [`Self::send`], which reaps too). For
    /// senders that keep several messages in flight ([`Self::post_send`]) and must lose none.
    pub fn reap_send_retrying(&mut self) -> Result<Option<u32>, ChannelError> {
        // Refused sends are set aside and the next completion taken at once: `None` only
        // when none is waiting, so a caller that then parks is woken by the next one.
        loop {
            let reaped = self.reap_slot();
            if reaped.is_err() && self.refused.retrying {
                // The retried send came back broken: it is lost, and its slot (and any buffer
                // it had on loan) is freed, if a short status had not freed it already (a
                // second free changes nothing).
                self.refused.retrying = false;
                if let Some(slot_index) = self.refused.oldest() {
                    self.refused.pop();
                    // The broken completion is the error reported; this one would add nothing.
                    let _ = self.free_slot(slot_index);
                }
            }
            let Some((slot_index, code)) = reaped? else { break };
            // With a retry in flight nothing else is, so this is its answer.
            let was_retry = core::mem::take(&mut self.refused.retrying);
            if code == status::NO_ROOM {
                if !was_retry {
                    self.refused.push(slot_index);
                }
                continue;
            }
            if was_retry {
                self.refused.pop();
            }
            self.free_slot(slot_index)?;
            self.retry_oldest()?;
            return Ok(Some(code));
        }
        self.retry_oldest()?;
        self.kick_rx();
        Ok(None)
    }

    /// Offers the oldest refused send again if nothing else is in flight.
    fn retry_oldest(&mut self) -> Result<(), ChannelError> {
        let Some(slot_index) = self.refused.oldest() else { return Ok(()) };
        let taken = TX_SLOTS - self.tx_free.count_ones() as usize;
        if self.refused.retrying || taken > self.refused.len {
            return Ok(());
        }
        if let Err(e) = self.offer_slot(slot_index) {
            // The message is lost with its slot: free it rather than leak it.
            self.refused.pop();
            return self.free_slot(slot_index).and(Err(e));
        }
        self.refused.retrying = true;
        self.tx.kick();
        Ok(())
    }

    /// The slot and status of the next completed send, the slot still taken.
    fn reap_slot(&mut self) -> Result<Option<(usize, u32)>, ChannelError> {
        let Some((head, len)) = self.tx.poll()? else {
            return Ok(None);
        };
        let slot_index = usize::from(self.tx_slot_of[usize::from(head)]);
        if len < 4 {
            self.free_slot(slot_index)?;
            return Err(ChannelError::Driver(DriverError::BadUsedEntry));
        }
        // SAFETY: the device is done with the slot (it returned the chain).
        Ok(Some((slot_index, unsafe {
            core::ptr::read_volatile(self.tx_slots[slot_index].status)
        })))
    }

    /// Sends one message and waits for the device's verdict; while the receiver (a partition
    /// of this node) has no room, waits and sends it again, so a deaf receiver stalls its
    /// sender and loses nothing.
    pub fn send(&mut self, channel: u32, process: u32, data: &[u8]) -> Result<(), ChannelError> {
        self.send_as(channel, self.endpoint(process), data)
    }

    /// As [`Self::send`], with an explicit source endpoint (the device refuses a false one).
    pub fn send_as(
        &mut self,
        channel: u32,
        source: Endpoint,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        let mut backoff = Backoff::new();
        loop {
            match self.try_send_as(channel, source, data) {
                Err(ChannelError::Status(status::NO_ROOM)) => backoff.snooze(),
                done => return done,
            }
        }
    }

    /// Sends one message once and waits for the device's verdict: `NO_ROOM` if the receiver
    /// has no room for it now (nothing was sent).
    pub fn try_send(
        &mut self,
        channel: u32,
        process: u32,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        self.try_send_as(channel, self.endpoint(process), data)
    }

    fn try_send_as(
        &mut self,
        channel: u32,
        source: Endpoint,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        self.post_send_as(channel, source, data)?;
        self.flush();
        match self.wait_send()? {
            status::OK => Ok(()),
            code => Err(ChannelError::Status(code)),
        }
    }

    /// Waits for the next completed send and returns its status.
    fn wait_send(&mut self) -> Result<u32, ChannelError> {
        let mut backoff = Backoff::patient();
        loop {
            if let Some(code) = self.reap_send()? {
                // A buffer lent by `recv_reply` may have come back with this completion: the
                // caller may wait for nothing else, so the device hears of it now.
                self.kick_rx();
                return Ok(code);
            }
            backoff.snooze();
        }
    }

    /// Waits for the next received message (see [`Self::recv`]).
    pub fn recv_wait(&mut self, out: &mut [u8]) -> Result<Received, ChannelError> {
        let mut backoff = Backoff::patient();
        loop {
            if let Some(message) = self.recv(out)? {
                return Ok(message);
            }
            backoff.snooze();
        }
    }

    /// Takes one received message, copying its payload into `out`, and re-posts the buffer
    /// (the device is notified only if it asked to be). `None` if nothing has arrived.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<Received>, ChannelError> {
        self.recv_with(|header, payload| {
            let copied = payload.len().min(out.len());
            out[..copied].copy_from_slice(&payload[..copied]);
            Received { header, copied }
        })
    }

    /// Takes one received message and hands its header and payload to `f` where the device
    /// wrote them, in the receive buffer, with no copy; then re-posts the buffer. For large
    /// messages this saves [`Self::recv`]'s copy. `None` if nothing has arrived (or the device
    /// dropped a message too large for its buffer: `f` is not called then). If posting the
    /// buffer again fails, the error comes back after `f` ran, and what `f` returned is lost.
    pub fn recv_with<R>(
        &mut self,
        f: impl FnOnce(RxHeader, &[u8]) -> R,
    ) -> Result<Option<R>, ChannelError> {
        let Some((slot, message)) = self.take_rx()? else { return Ok(None) };
        let result = message.map(|(header, payload)| f(header, payload));
        self.repost_rx(slot)?;
        Ok(result)
    }

    /// Takes one received message and hands `f` its header and payload, in the receive buffer,
    /// to read and to rewrite in place; if `f` returns a [`Reply`], that much of the payload
    /// goes out as a message from where it lies, with no copy at all: an echo, a relay or an
    /// answer no longer than its question costs the guest no pass over the bytes. The buffer
    /// is then lent to the send, and posted for receiving again once the send is reaped
    /// ([`Self::reap_send`] or [`Self::reap_send_retrying`]), so up to [`TX_SLOTS`] of the
    /// [`RX_SLOTS`] receive buffers can be out at once. The reply counts as a posted send:
    /// reap it (and post nothing new meanwhile, if you use [`Self::reap_send_retrying`])
    /// before [`Self::send`] or [`Self::try_send`], which reap too and would take its
    /// completion for their own. Returns the message's header, or `None` if nothing has
    /// arrived (as [`Self::recv_with`]). Needs a free transmit slot: `Busy`, with nothing
    /// taken, if none is free; `TooBig` (the message is gone) if the reply is longer than the
    /// payload.
    pub fn recv_reply(
        &mut self,
        f: impl FnOnce(RxHeader, &mut [u8]) -> Option<Reply>,
    ) -> Result<Option<RxHeader>, ChannelError> {
        if self.tx_free == 0 {
            return Err(ChannelError::Busy);
        }
        let Some((slot, message)) = self.take_rx()? else { return Ok(None) };
        let Some((header, payload)) = message else {
            self.repost_rx(slot)?;
            return Ok(None);
        };
        let received = payload.len();
        let reply = f(header, payload);
        if let Some(reply) = reply.filter(|r| r.len <= received) {
            self.lend_rx(slot, reply)?;
            return Ok(Some(header));
        }
        self.repost_rx(slot)?;
        match reply {
            Some(_) => Err(ChannelError::TooBig),
            None => Ok(Some(header)),
        }
    }

    /// Posts receive buffer `slot` again at once, telling the device if it wants to know.
    fn repost_rx(&mut self, slot: usize) -> Result<(), ChannelError> {
        self.post_rx(slot)?;
        self.rx.kick();
        Ok(())
    }

    /// Offers the first `reply.len` payload bytes of receive buffer `rx` as a message from a
    /// free transmit slot, which holds the buffer until it is freed.
    fn lend_rx(&mut self, rx: usize, reply: Reply) -> Result<(), ChannelError> {
        let slot_index = self.tx_free.trailing_zeros() as usize;
        let header = TxHeader {
            channel: reply.channel,
            source: self.endpoint(reply.process),
            len: reply.len as u32,
        };
        let slot = &mut self.tx_slots[slot_index];
        // SAFETY: the slot is free, so the device does not read its header.
        unsafe { *slot.header = header.to_bytes() };
        slot.len = reply.len;
        slot.lent = Some(rx as u8);
        self.tx_free &= !(1 << slot_index);
        if let Err(e) = self.offer_slot(slot_index) {
            return self.free_slot(slot_index).and(Err(e));
        }
        Ok(())
    }

    /// The receive buffer of the next used receive chain, and the message in it: its header
    /// and payload, or `None` if the device wrote less than a header (it dropped a message too
    /// large for the buffer). The buffer stays the caller's until posted again.
    fn take_rx(&mut self) -> Result<Option<(usize, Option<InPlace<'_>>)>, ChannelError> {
        self.kick_rx();
        let Some((head, len)) = self.rx.poll()? else {
            return Ok(None);
        };
        let slot = usize::from(self.rx_slot_of[usize::from(head)]);
        let len = len as usize;
        if len < RX_HEADER_SIZE {
            return Ok(Some((slot, None)));
        }
        // SAFETY: the device returned the buffer, so it no longer writes it until it is posted
        // again; `len` bytes of it are written and no more than rx_buf_len were offered. The
        // slice borrows `self` mutably, so it ends before the buffer can be posted again.
        let buf = unsafe {
            core::slice::from_raw_parts_mut(self.rx_bufs[slot], len.min(self.rx_buf_len as usize))
        };
        let (header, payload) = buf.split_at_mut(RX_HEADER_SIZE);
        Ok(Some((slot, Some((RxHeader::from_bytes(header), payload)))))
    }
}
