//! Driver for virtio-rng: host entropy, for keys the guest makes itself (claim 2).

use super::queue::{Buffer, Virtqueue};
use super::transport::Transport;
use super::{DriverError, F_EVENT_IDX};
use crate::boot_info::{BootInfo, DeviceKind};

/// The virtio device ID of virtio-rng.
pub const DEVICE_ID: u32 = 4;

/// A ready virtio-rng device.
pub struct Rng {
    transport: Transport,
    queue: Virtqueue,
}

impl Rng {
    /// Finds the partition's virtio-rng and brings it up.
    pub fn open(info: &BootInfo) -> Result<Self, DriverError> {
        let dev = info.find_device(DeviceKind::VirtioRng).ok_or(DriverError::NoDevice)?;
        let transport = Transport::probe(dev, DEVICE_ID)?;
        let features = transport.negotiate(F_EVENT_IDX)?;
        let queue = transport.setup_queue(0, 8, features & F_EVENT_IDX != 0)?;
        transport.driver_ok()?;
        Ok(Self { transport, queue })
    }

    /// Fills `buf` with entropy from the host.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<(), DriverError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            self.queue.add(&[Buffer::writable(rest)])?;
            self.queue.kick();
            let mut backoff = crate::idle::Backoff::patient();
            let written = loop {
                if let Some((_, len)) = self.queue.poll()? {
                    break len as usize;
                }
                self.transport.check()?;
                backoff.snooze();
            };
            if written == 0 || written > rest.len() {
                return Err(DriverError::BadUsedEntry);
            }
            done += written;
        }
        Ok(())
    }
}
