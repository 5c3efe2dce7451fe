//! Walking a descriptor chain's buffers without allocating: a [`Cursor`] over its
//! device-readable or its device-writable descriptors, read or written as one stream, and
//! copied from one guest's chain straight into another's.
//!
//! Every buffer is checked against guest RAM before it is touched; one that lies outside is a
//! driver error (the device then needs a reset).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::memcopy;

/// A buffer the driver described lies outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OutOfRam;

/// A position in one half of a chain.
pub(super) struct Cursor<'m> {
    mem: &'m GuestMemoryMmap,
    /// The half's buffers, as the driver described them (each is checked when reached).
    buffers: Buffers,
    /// The next of `buffers` to move on to.
    next: usize,
    /// What is left of the current buffer.
    segment: Option<(GuestAddress, usize)>,
}

/// Buffers a half of a chain holds without allocating; a longer half spills to the heap.
const INLINE: usize = 4;

/// One half's buffers (address and length), in chain order, empty ones included. The chain is
/// walked once, where walking each half (and again to count what is left) read every
/// descriptor from guest memory two or three times (descriptor walks were 6-8 % of the
/// transmit work at 64 B: docs/PERFORMANCE.md). A chain is at most the queue's size, or an
/// indirect table's 65,535 entries (virtio-queue follows one whatever was negotiated), so a
/// spill holds at most about 1 MiB, for as long as its message is handled.
#[derive(Default)]
struct Buffers {
    inline: [(GuestAddress, usize); INLINE],
    len: usize,
    spill: Vec<(GuestAddress, usize)>,
}

impl Buffers {
    fn push(&mut self, desc: &Descriptor) {
        let buffer = (desc.addr(), desc.len() as usize);
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = buffer,
            None => self.spill.push(buffer),
        }
        self.len += 1;
    }

    fn get(&self, i: usize) -> Option<(GuestAddress, usize)> {
        match i.checked_sub(INLINE) {
            None => (i < self.len).then(|| self.inline[i]),
            Some(j) => self.spill.get(j).copied(),
        }
    }
}

impl<'m> Cursor<'m> {
    fn new(mem: &'m GuestMemoryMmap, buffers: Buffers) -> Self {
        Self { mem, buffers, next: 0, segment: None }
    }

    /// The chain's device-readable and device-writable buffers, in one walk of the chain.
    pub(super) fn halves(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
    ) -> (Self, Self) {
        let (mut readable, mut writable) = (Buffers::default(), Buffers::default());
        for desc in chain {
            if desc.is_write_only() { &mut writable } else { &mut readable }.push(&desc);
        }
        (Self::new(mem, readable), Self::new(mem, writable))
    }

    /// The chain's device-readable buffers (one walk of the whole chain, keeping those).
    pub(super) fn readable(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
    ) -> Self {
        Self::half(chain, mem, false)
    }

    /// The chain's device-writable buffers (one walk of the whole chain, keeping those).
    pub(super) fn writable(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
    ) -> Self {
        Self::half(chain, mem, true)
    }

    fn half(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
        writable: bool,
    ) -> Self {
        let mut buffers = Buffers::default();
        for desc in chain.filter(|desc| desc.is_write_only() == writable) {
            buffers.push(&desc);
        }
        Self::new(mem, buffers)
    }

    /// This half's first non-empty buffer as the driver described it (not checked against
    /// RAM), if any: empty buffers count for nothing here either.
    pub(super) fn first_buffer(&self) -> Option<(GuestAddress, usize)> {
        (0..self.buffers.len).filter_map(|i| self.buffers.get(i)).find(|&(_, len)| len > 0)
    }

    /// The current buffer's rest, moving on to the next buffer when it is used up; `None` at
    /// the end of the chain's half.
    fn segment(&mut self) -> Result<Option<(GuestAddress, usize)>, OutOfRam> {
        while self.segment.is_none_or(|(_, len)| len == 0) {
            let Some(buffer) = self.buffers.get(self.next) else { return Ok(None) };
            self.segment = Some(checked(self.mem, buffer)?);
            self.next += 1;
        }
        Ok(self.segment)
    }

    fn advance(&mut self, n: usize) {
        if let Some((addr, len)) = &mut self.segment {
            *addr = addr.unchecked_add(n as u64);
            *len -= n;
        }
    }

    /// Bytes left in this half of the chain (checking every buffer on the way).
    pub(super) fn remaining(&self) -> Result<usize, OutOfRam> {
        let mut total = self.segment.map_or(0, |(_, len)| len);
        for buffer in (self.next..self.buffers.len).filter_map(|i| self.buffers.get(i)) {
            total = total.saturating_add(checked(self.mem, buffer)?.1);
        }
        Ok(total)
    }

    /// Fills `out` from the chain; false if the chain ends first.
    pub(super) fn read(&mut self, out: &mut [u8]) -> Result<bool, OutOfRam> {
        let mut done = 0;
        while done < out.len() {
            let Some((addr, len)) = self.segment()? else { return Ok(false) };
            let n = len.min(out.len() - done);
            for slice in self.mem.get_slices(addr, n) {
                let slice = slice.map_err(|_| OutOfRam)?;
                done += memcopy::from_guest(&mut out[done..], &slice);
            }
            self.advance(n);
        }
        Ok(true)
    }

    /// Writes `data` into the chain; false if it ends first.
    pub(super) fn write(&mut self, data: &[u8]) -> Result<bool, OutOfRam> {
        let mut done = 0;
        while done < data.len() {
            let Some((addr, len)) = self.segment()? else { return Ok(false) };
            let n = len.min(data.len() - done);
            for slice in self.mem.get_slices(addr, n) {
                let slice = slice.map_err(|_| OutOfRam)?;
                done += memcopy::to_guest(&slice, &data[done..]);
            }
            self.advance(n);
        }
        Ok(true)
    }

    /// Copies `len` bytes from this cursor into `to` (another guest's chain, or this one's),
    /// guest memory to guest memory; false if either ends first.
    pub(super) fn copy_to(&mut self, to: &mut Cursor<'_>, len: usize) -> Result<bool, OutOfRam> {
        let mut left = len;
        while left > 0 {
            let (Some((from, a)), Some((into, b))) = (self.segment()?, to.segment()?) else {
                return Ok(false);
            };
            let n = a.min(b).min(left);
            let source = self.mem.get_slice(from, n).map_err(|_| OutOfRam)?;
            let target = to.mem.get_slice(into, n).map_err(|_| OutOfRam)?;
            memcopy::guest_to_guest(&target, &source);
            self.advance(n);
            to.advance(n);
            left -= n;
        }
        Ok(true)
    }
}

/// A buffer, if it lies within guest RAM.
fn checked(
    mem: &GuestMemoryMmap,
    (addr, len): (GuestAddress, usize),
) -> Result<(GuestAddress, usize), OutOfRam> {
    if len > 0 && !mem.check_range(addr, len) {
        return Err(OutOfRam);
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const TABLE: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const DATA: u64 = 0x4000;
    const RAM: usize = 0x10000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A queue whose one available chain is `buffers` (address, length, device-writable), in
    /// order, in 64 KiB of guest RAM.
    fn queue_with(mem: &GuestMemoryMmap, buffers: &[(u64, u32, bool)]) -> Queue {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let more = i + 1 < buffers.len();
            let flags = if more { NEXT } else { 0 } | if writable { WRITE } else { 0 };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            mem.write_slice(&raw, GuestAddress(TABLE + 16 * i as u64)).unwrap();
        }
        // The avail ring: flags, idx = 1, ring[0] = head 0.
        mem.write_slice(&[0, 0, 1, 0, 0, 0], GuestAddress(AVAIL)).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.set_size(16);
        queue.set_desc_table_address(Some(TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    #[test]
    fn one_walk_splits_a_long_interleaved_chain_into_its_halves_in_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let pattern: Vec<u8> = (0..=255u8).cycle().take(0x1000).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        // Six readable buffers (more than a half holds inline) with two writable ones among
        // them, and an empty buffer in each half (the writable half's first: the first buffer
        // that counts is the next).
        let at = |i: u64| DATA + 0x100 * i;
        let buffers = [
            (at(0), 10, false),
            (at(1), 7, false),
            (at(7), 0, true),
            (at(8), 5, true),
            (at(2), 0, false),
            (at(3), 30, false),
            (at(4), 1, false),
            (at(9), 9, true),
            (at(5), 20, false),
        ];
        let mut queue = queue_with(&mem, &buffers);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let (mut reader, mut writer) = Cursor::halves(chain, &mem);

        assert_eq!(reader.remaining(), Ok(68));
        assert_eq!(writer.remaining(), Ok(14));
        assert_eq!(writer.first_buffer(), Some((GuestAddress(at(8)), 5)));
        let chain = || queue_with(&mem, &buffers).iter(&mem).unwrap().next().unwrap();
        assert_eq!(Cursor::readable(chain(), &mem).remaining(), Ok(68), "one half alone");
        assert_eq!(Cursor::writable(chain(), &mem).first_buffer(), writer.first_buffer());
        let mut read = vec![0u8; 68];
        assert_eq!(reader.read(&mut read[..12]), Ok(true));
        assert_eq!(reader.remaining(), Ok(56), "counts from inside a buffer");
        assert_eq!(reader.read(&mut read[12..]), Ok(true));
        let expected: Vec<u8> = buffers
            .iter()
            .filter(|b| !b.2)
            .flat_map(|&(addr, len, _)| {
                let from = (addr - DATA) as usize;
                pattern[from..from + len as usize].to_vec()
            })
            .collect();
        assert_eq!(read, expected, "the readable buffers, in chain order");
        assert_eq!(reader.read(&mut [0u8; 1]), Ok(false), "and nothing beyond");

        assert_eq!(writer.write(&[0xaa; 14]), Ok(true));
        assert_eq!(writer.write(&[0xbb; 1]), Ok(false), "the writable half is full");
        let mut first = [0u8; 6];
        mem.read_slice(&mut first, GuestAddress(at(8))).unwrap();
        assert_eq!(
            first,
            [0xaa, 0xaa, 0xaa, 0xaa, 0xaa, pattern[0x805]],
            "5 bytes, then untouched"
        );
        let mut second = [0u8; 10];
        mem.read_slice(&mut second, GuestAddress(at(9))).unwrap();
        assert_eq!(&second[..9], &[0xaa; 9]);
        assert_eq!(second[9], pattern[0x909]);
    }

    #[test]
    fn a_buffer_outside_ram_is_an_error_when_reached_or_counted() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let buffers = [(DATA, 4, false), (RAM as u64 - 2, 4, false), (DATA, 4, true)];
        let mut queue = queue_with(&mem, &buffers);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let (mut reader, mut writer) = Cursor::halves(chain, &mem);
        assert_eq!(reader.remaining(), Err(OutOfRam));
        assert_eq!(reader.read(&mut [0u8; 4]), Ok(true), "the first buffer is in RAM");
        assert_eq!(reader.read(&mut [0u8; 1]), Err(OutOfRam));
        assert_eq!(writer.write(&[1; 4]), Ok(true), "the other half is unaffected");
    }
}
