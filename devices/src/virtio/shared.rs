//! State a virtio device shares between its transport (vCPU thread) and its backend (device
//! thread): the queues once the driver has set them up, and the interrupt line.

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
    /// DRIVER_OK was set with valid queues: the backend may use them.
    Active {
        /// The queues, in queue-index order.
        queues: Vec<Queue>,
    },
    /// The device hit an error it cannot recover from: the driver must reset it.
    NeedsReset,
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
    /// Bumped on every activation and reset, so work started before one (a pending OPEN)
    /// is not completed into a queue the guest has since replaced.
    pub generation: AtomicU64,
    /// Times the device failed, to bound how often that is logged.
    failures: AtomicU64,
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
            generation: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            waker,
            inline: OnceLock::new(),
        }
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
        if self.failures.fetch_add(1, Ordering::Relaxed) < MAX_FAILURE_WARNINGS {
            log::warn!("virtio device needs reset: {why}");
        } else {
            log::debug!("virtio device needs reset: {why}");
        }
        *crate::bus::lock(&self.activation) = Activation::NeedsReset;
        self.signal(INT_CONFIG_CHANGE);
    }
}
