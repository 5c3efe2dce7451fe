//! State a virtio device shares between its transport (vCPU thread) and its backend (device
//! thread): the queues once the driver has set them up, and the interrupt line.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::idle::Wake;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_BUFFER: u32 = 1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Where the device is in its life cycle.
#[derive(Debug)]
pub enum Activation {
    /// Not (yet) set up by the driver, or reset.
    Inactive,
    /// DRIVER_OK was set with valid queues: the backend may use those that are ready.
    Active {
        /// The queues, in queue-index order.
        queues: Vec<ActiveQueue>,
    },
    /// The device hit an error it cannot recover from: the driver must reset it.
    NeedsReset,
}

/// A queue as the backend uses it, with the epoch of its rings: the driver may stop a queue
/// and set it up anew while the device runs (virtio 1.2, 4.2.2.2), and a chain taken from the
/// old rings must not be returned into the new ones.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue.
    pub queue: Queue,
    /// Changes whenever the queue's rings change (activation, stop, restart, reset).
    pub epoch: u64,
}

impl Deref for ActiveQueue {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.queue
    }
}

impl DerefMut for ActiveQueue {
    fn deref_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }
}

/// Counters of what a driver did that the device ignored or refused.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Notifications of a queue that was not in use (before DRIVER_OK, after a reset or a
    /// stop, or a queue that does not exist): ignored, as a notify may race a reset.
    pub spurious_notifications: AtomicU64,
    /// Queue configuration values the device refused (a size that is not a power of two or
    /// above the maximum, a misaligned ring).
    pub refused_queue_configs: AtomicU64,
    /// Queues the driver stopped after DRIVER_OK.
    pub queue_stops: AtomicU64,
    /// Times the device needed a reset.
    pub needs_reset: AtomicU64,
    /// Times the device held requests back because the partition used up its rate
    /// (virtio-rng).
    pub throttled: AtomicU64,
    /// Passes that left requests for a later pass because the partition used up its budget
    /// of one pass (secure channel).
    pub deferred: AtomicU64,
}

/// The shared part of one virtio device.
#[derive(Debug)]
pub struct DeviceShared {
    /// Queue state; the backend holds the lock while it processes a batch.
    pub activation: Mutex<Activation>,
    /// ISR bits not yet acknowledged by the driver.
    pub interrupt_status: AtomicU32,
    /// Signals the guest's interrupt line (an irqfd).
    pub irq: EventFd,
    /// Source of queue epochs (see [`ActiveQueue::epoch`]).
    epochs: AtomicU64,
    /// Times the driver reset the device (wrote 0 to its status) after setting it up.
    resets: AtomicU64,
    /// What the driver did that the device ignored or refused.
    pub counters: DeviceCounters,
    /// Wakes the partition's vCPU if it idles on the idle port.
    waker: Arc<Wake>,
    /// Serves a queue's notification on the notifying vCPU's thread (see
    /// `DeviceDescription::inline_queue`); returns whether it took the notification.
    inline: OnceLock<InlineNotify>,
}

/// A handler for a queue notification, run on the vCPU thread that made it.
pub struct InlineNotify(pub Box<dyn Fn(u32) -> bool + Send + Sync>);

impl std::fmt::Debug for InlineNotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InlineNotify")
    }
}

/// Failures of one device logged as warnings; later ones are logged at debug level.
const MAX_FAILURE_WARNINGS: u64 = 10;

impl DeviceShared {
    /// A device with its interrupt line, waking its partition's idle vCPU through `waker`.
    pub fn new(irq: EventFd, waker: Arc<Wake>) -> Self {
        Self {
            activation: Mutex::new(Activation::Inactive),
            interrupt_status: AtomicU32::new(0),
            irq,
            epochs: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            counters: DeviceCounters::default(),
            waker,
            inline: OnceLock::new(),
        }
    }

    /// A queue epoch never handed out before.
    pub fn new_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Counts a reset by the driver of a device it had set up.
    pub fn driver_reset(&self) {
        self.resets.fetch_add(1, Ordering::AcqRel);
    }

    /// Resets by the driver so far (a backend that keeps state for the driver compares it).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Acquire)
    }

    /// Counts a notification that found no queue in use.
    pub fn spurious_notification(&self) {
        self.counters.spurious_notifications.fetch_add(1, Ordering::Relaxed);
    }

    /// Where the device is in its life cycle: `inactive`, `active` or `needs_reset`.
    pub fn state_name(&self) -> &'static str {
        match *crate::bus::lock(&self.activation) {
            Activation::Inactive => "inactive",
            Activation::Active { .. } => "active",
            Activation::NeedsReset => "needs_reset",
        }
    }

    /// Whether the device is waiting for the driver to reset it.
    pub fn needs_reset(&self) -> bool {
        matches!(*crate::bus::lock(&self.activation), Activation::NeedsReset)
    }

    /// Installs the handler of inline notifications (once).
    pub fn set_inline_notify(&self, handler: InlineNotify) {
        let _ = self.inline.set(handler);
    }

    /// A notification of `queue` reached the transport: its handler takes it if there is one.
    pub fn notify_inline(&self, queue: u32) -> bool {
        self.inline.get().is_some_and(|handler| (handler.0)(queue))
    }

    /// The device used buffers: a guest idling for them may go on.
    pub fn used(&self) {
        self.waker.wake();
    }

    /// Raises `bits` in the interrupt status and signals the line.
    pub fn signal(&self, bits: u32) {
        self.interrupt_status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio interrupt: {e}");
        }
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver.
    pub fn fail(&self, why: &str) {
        // A hostile driver can fail the device in a loop (resetting each time): the first few
        // failures are warnings, the rest only debug lines, so it cannot flood the log.
        if self.counters.needs_reset.fetch_add(1, Ordering::Relaxed) < MAX_FAILURE_WARNINGS {
            log::warn!("virtio device needs reset: {why}");
        } else {
            log::debug!("virtio device needs reset: {why}");
        }
        *crate::bus::lock(&self.activation) = Activation::NeedsReset;
        self.signal(INT_CONFIG_CHANGE);
    }
}
