//! virtio-rng (device ID 4): fills every writable buffer the driver offers with host entropy,
//! so that guest software can create keys of its own (claim 2).

use std::io::{self, Write};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::mmio::DeviceDescription;
use super::shared::{Activation, DeviceShared, INT_USED_BUFFER};
use super::DEVICE_ID_RNG;
use crate::bus::lock;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 64;
/// Largest number of bytes served per request, so one request cannot stall the device thread.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What the transport tells the driver about this device.
pub fn description() -> DeviceDescription {
    DeviceDescription {
        device_id: DEVICE_ID_RNG,
        features: 0,
        queue_sizes: vec![QUEUE_SIZE],
        config: Vec::new(),
        inline_queues: 0,
    }
}

/// The backend of one partition's virtio-rng.
pub struct Rng {
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
}

impl Rng {
    /// A backend serving the device behind `shared`.
    pub fn new(shared: Arc<DeviceShared>, mem: GuestMemoryMmap) -> Self {
        Self { shared, mem }
    }

    /// Serves every buffer on the request queue. Called when the queue's ioeventfd fires.
    pub fn process(&mut self) {
        let mut activation = lock(&self.shared.activation);
        let Activation::Active { queues } = &mut *activation else {
            // A notification before DRIVER_OK (or after a failure) has nothing to act on.
            return;
        };
        let Some(queue) = queues.first_mut().filter(|q| q.ready()) else {
            return;
        };
        match drain(queue, &self.mem) {
            Ok((used, interrupt)) => {
                drop(activation);
                if used {
                    self.shared.used();
                }
                if interrupt {
                    self.shared.signal(INT_USED_BUFFER);
                }
            }
            Err(e) => {
                drop(activation);
                self.shared.fail(&format!("virtio-rng request queue: {e}"));
            }
        }
    }
}

/// Serves requests until the queue is empty with notifications re-enabled (so a request
/// added meanwhile is not missed); returns whether it used any buffer and whether the driver
/// wants an interrupt.
fn drain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(bool, bool), virtio_queue::Error> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) => fill(&mut writer).unwrap_or(0),
                Err(_) => 0,
            };
            queue.add_used(mem, head, written as u32)?;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok((used_any, used_any && queue.needs_notification(mem)?))
}

/// Writes up to [`MAX_REQUEST`] bytes of entropy into `out`; returns how many.
fn fill(out: &mut impl Write) -> io::Result<usize> {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < MAX_REQUEST {
        let want = buf.len().min(MAX_REQUEST - total);
        crate::entropy::fill(&mut buf[..want])?;
        let n = out.write(&buf[..want])?;
        total += n;
        if n < want {
            break;
        }
    }
    buf.fill(0);
    Ok(total)
}
