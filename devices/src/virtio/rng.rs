//! virtio-rng (device ID 4): fills every writable buffer the driver offers with host entropy,
//! so that guest software can create keys of its own (claim 2).

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::mmio::DeviceDescription;
use super::shared::{Activation, DeviceShared, INT_USED_BUFFER};
use super::DEVICE_ID_RNG;
use crate::bus::lock;
use crate::token_bucket::TokenBucket;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 64;
/// Largest number of bytes served per request, so one request cannot stall the device thread.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Bytes of rate a request waits for once the partition's rate has run out (or its whole
/// burst, if smaller).
const GRANT: u64 = 4096;

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

/// How much entropy one partition may draw: a steady rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngLimit {
    /// Bytes a second.
    pub bytes_per_sec: u64,
    /// Bytes that may be drawn at once after a quiet spell.
    pub burst: u64,
}

impl Default for RngLimit {
    /// Far more than any guest needs for keys (a key is 32 bytes), far less than would let
    /// one partition keep the device thread busy (and the host's entropy source).
    fn default() -> Self {
        Self { bytes_per_sec: 1 << 20, burst: 256 << 10 }
    }
}

/// The backend of one partition's virtio-rng.
pub struct Rng {
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
    bucket: TokenBucket,
}

impl Rng {
    /// A backend serving the device behind `shared`, within `limit`.
    pub fn new(shared: Arc<DeviceShared>, mem: GuestMemoryMmap, limit: RngLimit) -> Self {
        let bucket =
            TokenBucket::new(limit.bytes_per_sec as f64, limit.burst as f64, Instant::now());
        Self { shared, mem, bucket }
    }

    /// Serves the buffers on the request queue while the partition's rate allows; called
    /// when the queue's ioeventfd fires. Returns how long to wait before calling again when
    /// requests are left for want of rate (the guest is not told: its requests just wait).
    pub fn process(&mut self) -> Option<Duration> {
        let mut activation = lock(&self.shared.activation);
        let queue = match &mut *activation {
            Activation::Active { queues } => queues.first_mut().filter(|q| q.ready()),
            _ => None,
        };
        let Some(queue) = queue else {
            // Before DRIVER_OK, after a reset or a stop: a notify may race them.
            drop(activation);
            self.shared.spurious_notification();
            return None;
        };
        let drained = drain(queue, &self.mem, &mut self.bucket);
        drop(activation);
        match drained {
            Ok(Drained { used, interrupt, throttled }) => {
                if used {
                    self.shared.used();
                }
                if interrupt {
                    self.shared.signal(INT_USED_BUFFER);
                }
                if throttled {
                    self.shared.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    return Some(self.bucket.time_until(GRANT, Instant::now()));
                }
                None
            }
            Err(e) => {
                self.shared.fail(&format!("virtio-rng request queue: {e}"));
                None
            }
        }
    }
}

/// What one pass over the request queue did.
struct Drained {
    /// Buffers were used.
    used: bool,
    /// The driver wants an interrupt for them.
    interrupt: bool,
    /// Requests are left because the rate ran out.
    throttled: bool,
}

/// Serves requests while `bucket` has bytes, until the queue is empty with notifications
/// re-enabled (so a request added meanwhile is not missed).
fn drain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    bucket: &mut TokenBucket,
) -> Result<Drained, virtio_queue::Error> {
    let mut used = false;
    let throttled = loop {
        queue.disable_notification(mem)?;
        let mut throttled = false;
        loop {
            // Look before taking: a request is left on the ring until there is rate for a
            // page of it (serving crumbs would cost a round trip each).
            if bucket.time_until(GRANT, Instant::now()) > Duration::ZERO {
                let waiting = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
                throttled = waiting.0 != queue.next_avail();
                break;
            }
            let Some(chain) = queue.iter(mem)?.next() else { break };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let wanted = writer.available_bytes().min(MAX_REQUEST) as u64;
                    let allowed = bucket.take_up_to(wanted, Instant::now()) as usize;
                    fill(&mut writer, allowed).unwrap_or(0)
                }
                Err(_) => 0,
            };
            queue.add_used(mem, head, written as u32)?;
            used = true;
        }
        if throttled || !queue.enable_notification(mem)? {
            break throttled;
        }
    };
    let interrupt = used && queue.needs_notification(mem)?;
    Ok(Drained { used, interrupt, throttled })
}

/// Writes up to `limit` bytes of entropy into `out`; returns how many.
fn fill(out: &mut impl Write, limit: usize) -> io::Result<usize> {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < limit {
        let want = buf.len().min(limit - total);
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
