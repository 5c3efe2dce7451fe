//! virtio-vsock (virtio 1.2 section 5.10): a stream-socket personality over keyhold's
//! channels, so that a guest with a stock vsock driver gets keyed, identity-checked channels.
//!
//! Each partition given one has a CID; a connection from (CID a, port p) to (CID b, port q) is
//! a channel between endpoints (node, partition of a, process p) and (node, partition of b,
//! process q) in the CMM's connection table, opened only if the operator's [`policy`] allows
//! the flow, keyed by the CMM, and checked by it on every message, exactly as for the native
//! device. The device stamps nothing the guest could choose: a packet whose `src_cid` is not
//! the partition's own is refused and audited. The packets themselves are switched between the
//! partitions' devices by the node (`secure_channel::vsock`); this module holds what a device
//! is and the wire format ([`packet`]).
//!
//! Credit (`buf_alloc`, `fwd_cnt`) is end to end, between the two drivers, as the
//! specification has it; the device passes it on, enforces it (a sender that exceeds what its
//! peer offered has its connection reset and audited, nothing is dropped), and caps what a
//! receiver may offer at [`MAX_CREDIT`], which bounds what the node holds for one connection
//! while its receiver has no buffer posted.

pub mod packet;
pub mod policy;

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::DeviceDescription;
use super::shared::DeviceShared;
use crate::cmm::connection_table::ChannelId;
use packet::Header;

/// virtio device ID of a socket device.
pub const DEVICE_ID: u32 = 19;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The event queue's index (the device posts no events: see docs/VSOCK.md).
pub const EVENT_QUEUE: usize = 2;
/// Size of the receive and transmit queues.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the event queue.
pub const EVENT_QUEUE_SIZE: u16 = 16;
/// Largest payload one packet may carry.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Most credit (`buf_alloc`) a receiver may offer its peer through this device.
pub const MAX_CREDIT: u32 = 1 << 20;
/// Lowest CID a partition may have: 0 and 1 are reserved, 2 is the host.
pub const MIN_GUEST_CID: u32 = 3;

/// What the transport tells the driver: the CID in the configuration space; receive and
/// transmit notifications served on the notifying vCPU's thread.
pub fn description(cid: u32) -> DeviceDescription {
    DeviceDescription {
        device_id: DEVICE_ID,
        features: 0,
        queue_sizes: vec![QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE],
        config: u64::from(cid).to_le_bytes().to_vec(),
        inline_queues: 1 << RX_QUEUE | 1 << TX_QUEUE,
    }
}

/// A packet on its way into a partition's receive queue; an RW's payload may take several
/// receive buffers.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// Its header (`len` is set per buffer).
    pub(crate) header: Header,
    /// The payload (empty but for RW).
    pub(crate) payload: Vec<u8>,
    /// How much of the payload has been delivered.
    pub(crate) sent: usize,
    /// The receiving channel, for the CMM's counters (RW only).
    pub(crate) channel: Option<ChannelId>,
}

/// One partition's vsock device, as the node holds it.
pub struct VsockDevice {
    pub(crate) partition: u32,
    pub(crate) cid: u32,
    pub(crate) shared: Arc<DeviceShared>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue_evts: Vec<EventFd>,
    /// Packets waiting for receive buffers, in order.
    pub(crate) outbox: VecDeque<Outgoing>,
    /// Its partition stopped: connections to it are refused until a new device replaces it.
    pub(crate) stopped: bool,
    /// The driver's resets the node has acted on (its connections ended with each).
    pub(crate) resets_seen: u64,
}

impl VsockDevice {
    /// The device of `partition` with CID `cid`, with its transport's shared state, RAM and
    /// queue eventfds.
    pub fn new(
        partition: u32,
        cid: u32,
        shared: Arc<DeviceShared>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self {
            partition,
            cid,
            shared,
            mem,
            queue_evts,
            outbox: VecDeque::new(),
            stopped: false,
            resets_seen: 0,
        }
    }
}
