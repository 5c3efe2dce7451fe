//! Address-range dispatch of guest accesses (port I/O or MMIO) to devices.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// What the vCPU loop must do after a device handled a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Resume the guest.
    Continue,
    /// Stop the partition with this exit status (the guest asked to).
    Stop(u32),
}

/// A device on a bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Fills `data` with the bytes read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes the bytes written at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction;
}

/// A device shared with code outside the bus (the VMM reads the console's last line, say).
impl<T: BusDevice> BusDevice for Arc<Mutex<T>> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(self).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        lock(self).write(offset, data)
    }
}

/// Locks a device, recovering it from a poisoned lock: device state stays consistent between
/// accesses, and one failed access must not take the partition down.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors of bus set-up and dispatch.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A device was inserted over another one.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A device range was empty or wrapped around the address space.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The guest touched an address no device decodes.
    #[error("no device at {0:#x}")]
    Unmapped(u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: Box<dyn BusDevice>,
}

/// Devices by address range; ranges never overlap.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Box<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    /// Reads from the device that decodes `addr`.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (entry, offset) = self.resolve(addr, data.len())?;
        entry.device.read(offset, data);
        Ok(())
    }

    /// Writes to the device that decodes `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<IoAction, BusError> {
        let (entry, offset) = self.resolve(addr, data.len())?;
        Ok(entry.device.write(offset, data))
    }

    /// The device whose range holds the whole access `[addr, addr + size)`.
    fn resolve(&mut self, addr: u64, size: usize) -> Result<(&mut Entry, u64), BusError> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let entry = idx
            .checked_sub(1)
            .and_then(|i| self.entries.get_mut(i))
            .ok_or(BusError::Unmapped(addr))?;
        let offset = addr - entry.base;
        let fits = offset.checked_add(size as u64).is_some_and(|end| end <= entry.len);
        if !fits {
            return Err(BusError::Unmapped(addr));
        }
        Ok((entry, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes seen by a probe: offset and bytes.
    type Seen = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// Records the accesses it sees.
    struct Probe(Seen);

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
            self.0.lock().unwrap().push((offset, data.to_vec()));
            IoAction::Continue
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus::new();
        bus.insert(0x100, 8, Box::new(Probe(seen.clone()))).unwrap();
        bus.insert(0x10, 4, Box::new(Probe(seen.clone()))).unwrap();
        assert_eq!(bus.write(0x103, &[7]), Ok(IoAction::Continue));
        assert_eq!(bus.write(0x10, &[1, 2]), Ok(IoAction::Continue));
        let mut buf = [0u8; 2];
        bus.read(0x106, &mut buf).unwrap();
        assert_eq!(buf, [6, 6]);
        assert_eq!(*seen.lock().unwrap(), vec![(3, vec![7]), (0, vec![1, 2])]);
    }

    #[test]
    fn rejects_unmapped_and_straddling_accesses() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus::new();
        bus.insert(0x100, 8, Box::new(Probe(seen))).unwrap();
        assert_eq!(bus.write(0xff, &[0]), Err(BusError::Unmapped(0xff)));
        assert_eq!(bus.write(0x108, &[0]), Err(BusError::Unmapped(0x108)));
        assert_eq!(bus.write(0x107, &[0, 0]), Err(BusError::Unmapped(0x107)));
        assert_eq!(bus.write(u64::MAX, &[0, 0]), Err(BusError::Unmapped(u64::MAX)));
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus::new();
        bus.insert(0x100, 8, Box::new(Probe(seen.clone()))).unwrap();
        let overlap = bus.insert(0x104, 8, Box::new(Probe(seen.clone())));
        assert_eq!(overlap, Err(BusError::Overlap { base: 0x104, len: 8 }));
        let below = bus.insert(0xfc, 5, Box::new(Probe(seen.clone())));
        assert_eq!(below, Err(BusError::Overlap { base: 0xfc, len: 5 }));
        let empty = bus.insert(0x200, 0, Box::new(Probe(seen.clone())));
        assert_eq!(empty, Err(BusError::InvalidRange { base: 0x200, len: 0 }));
        let wraps = bus.insert(u64::MAX, 2, Box::new(Probe(seen)));
        assert_eq!(wraps, Err(BusError::InvalidRange { base: u64::MAX, len: 2 }));
    }
}
