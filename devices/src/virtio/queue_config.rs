//! One queue's configuration as the driver writes it through the transport's registers
//! (virtio 1.2, 4.2.2): size, ring addresses and QueueReady, with every value the device
//! refused remembered until the driver writes a good one in its place.
//!
//! The transport keeps this copy; the backend gets a fresh [`Queue`] made from it when the
//! driver sets DRIVER_OK, or when it re-enables a queue it stopped.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// A register whose last value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Field {
    /// QueueNum: not a power of two, zero, or above QueueNumMax.
    Size = 1,
    /// QueueDesc: not 16-byte aligned.
    Descriptors = 2,
    /// QueueDriver: not 2-byte aligned.
    Driver = 4,
    /// QueueDevice: not 4-byte aligned.
    Device = 8,
}

/// Half of a 64-bit address register pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Bits 0..32.
    Low,
    /// Bits 32..64.
    High,
}

/// The driver's configuration of one queue.
#[derive(Debug)]
pub struct QueueConfig {
    queue: Queue,
    /// [`Field`] bits whose last written value was refused.
    refused: u8,
}

impl QueueConfig {
    /// A queue of at most `max` entries (a power of two up to 32768; anything else is
    /// clamped to 256, which the device descriptions never need).
    pub fn new(max: u16) -> Self {
        let queue = Queue::new(max).unwrap_or_else(|_| Queue::new(256).expect("a valid size"));
        Self { queue, refused: 0 }
    }

    /// QueueNumMax.
    pub fn max_size(&self) -> u16 {
        self.queue.max_size()
    }

    /// QueueReady as the driver last wrote it.
    pub fn ready(&self) -> bool {
        self.queue.ready()
    }

    /// Writes QueueReady.
    pub fn set_ready(&mut self, ready: bool) {
        self.queue.set_ready(ready);
    }

    /// Writes QueueNum; false if refused.
    pub fn set_size(&mut self, value: u32) -> bool {
        let ok = u16::try_from(value).is_ok_and(|size| self.queue.try_set_size(size).is_ok());
        self.mark(Field::Size, ok)
    }

    /// Writes half of a ring address; false if the address is refused (misaligned).
    pub fn set_address(&mut self, field: Field, half: Half, value: u32) -> bool {
        let current = match field {
            Field::Descriptors => self.queue.desc_table(),
            Field::Driver => self.queue.avail_ring(),
            Field::Device | Field::Size => self.queue.used_ring(),
        };
        let address = match half {
            Half::Low => (current & !0xffff_ffff) | u64::from(value),
            Half::High => (current & 0xffff_ffff) | (u64::from(value) << 32),
        };
        let address = vm_memory::GuestAddress(address);
        let ok = match field {
            Field::Descriptors => self.queue.try_set_desc_table_address(address).is_ok(),
            Field::Driver => self.queue.try_set_avail_ring_address(address).is_ok(),
            Field::Device => self.queue.try_set_used_ring_address(address).is_ok(),
            Field::Size => false,
        };
        self.mark(field, ok)
    }

    fn mark(&mut self, field: Field, ok: bool) -> bool {
        if ok {
            self.refused &= !(field as u8);
        } else {
            self.refused |= field as u8;
        }
        ok
    }

    /// A queue for the backend, starting at the rings' beginning; an error says why the
    /// configuration cannot be used.
    pub fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, &'static str> {
        if self.refused != 0 {
            return Err("the driver wrote a queue size or ring address the device refused");
        }
        if !self.queue.is_valid(mem) {
            return Err("a ready queue has rings outside guest RAM");
        }
        self.queue.set_event_idx(event_idx);
        Queue::try_from(self.queue.state()).map_err(|_| "the queue's state is inconsistent")
    }

    /// Back to the reset state (virtio 1.2, 4.2.2.1: QueueReady 0, size QueueNumMax).
    pub fn reset(&mut self) {
        self.queue.reset();
        self.refused = 0;
    }

    /// The configured descriptor table address (for tests).
    pub fn desc_table(&self) -> u64 {
        self.queue.desc_table()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn configured() -> QueueConfig {
        let mut q = QueueConfig::new(16);
        assert!(q.set_size(16));
        for (field, at) in
            [(Field::Descriptors, 0x1000), (Field::Driver, 0x2000), (Field::Device, 0x3000)]
        {
            assert!(q.set_address(field, Half::Low, at));
            assert!(q.set_address(field, Half::High, 0));
        }
        q.set_ready(true);
        q
    }

    #[test]
    fn refused_values_block_activation_until_replaced() {
        let mut q = configured();
        assert!(q.activate(&mem(), false).is_ok());
        assert!(!q.set_size(12), "not a power of two");
        assert!(!q.set_size(32), "above QueueNumMax");
        assert!(!q.set_size(0x1_0010), "wider than 16 bits");
        assert!(q.activate(&mem(), false).is_err());
        assert!(q.set_size(8));
        assert!(q.activate(&mem(), false).is_ok(), "a good size replaces the refused one");
        assert!(!q.set_address(Field::Device, Half::Low, 0x3002), "used ring 4-byte aligned");
        assert!(q.activate(&mem(), false).is_err());
        q.reset();
        assert!(!q.ready() && q.refused == 0);
    }

    #[test]
    fn halves_make_one_address() {
        let mut q = QueueConfig::new(16);
        assert!(q.set_address(Field::Descriptors, Half::High, 1));
        assert!(q.set_address(Field::Descriptors, Half::Low, 0x40));
        assert_eq!(q.desc_table(), 0x1_0000_0040);
        assert!(!q.set_address(Field::Descriptors, Half::Low, 0x48), "16-byte aligned");
        assert_eq!(q.desc_table(), 0x1_0000_0040, "a refused value changes nothing");
    }

    #[test]
    fn rings_outside_ram_are_not_activated() {
        let mut q = configured();
        assert!(q.set_address(Field::Driver, Half::High, 1));
        assert!(q.activate(&mem(), true).is_err());
    }

    #[test]
    fn activation_starts_the_rings_from_the_beginning_with_event_idx_as_negotiated() {
        let queue = configured().activate(&mem(), true).unwrap();
        assert!(queue.ready() && queue.event_idx_enabled());
        assert_eq!((queue.next_avail(), queue.next_used()), (0, 0));
    }
}
