//! Walking a descriptor chain's buffers without allocating: a [`Cursor`] over its
//! device-readable or its device-writable descriptors, read or written as one stream, and
//! copied from one guest's chain straight into another's.
//!
//! Every buffer is checked against guest RAM before it is touched; one that lies outside is a
//! driver error (the device then needs a reset).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, DescriptorChainRwIter};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::memcopy;

/// A buffer the driver described lies outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OutOfRam;

/// A position in one half of a chain.
pub(super) struct Cursor<'m> {
    mem: &'m GuestMemoryMmap,
    descriptors: DescriptorChainRwIter<&'m GuestMemoryMmap>,
    /// What is left of the current buffer.
    segment: Option<(GuestAddress, usize)>,
}

impl<'m> Cursor<'m> {
    /// The chain's device-readable buffers.
    pub(super) fn readable(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
    ) -> Self {
        Self { mem, descriptors: chain.readable(), segment: None }
    }

    /// The chain's device-writable buffers.
    pub(super) fn writable(
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        mem: &'m GuestMemoryMmap,
    ) -> Self {
        Self { mem, descriptors: chain.writable(), segment: None }
    }

    /// The current buffer's rest, moving on to the next buffer when it is used up; `None` at
    /// the end of the chain's half.
    fn segment(&mut self) -> Result<Option<(GuestAddress, usize)>, OutOfRam> {
        while self.segment.is_none_or(|(_, len)| len == 0) {
            let Some(desc) = self.descriptors.next() else { return Ok(None) };
            self.segment = Some(checked(self.mem, &desc)?);
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
        for desc in self.descriptors.clone() {
            total = total.saturating_add(checked(self.mem, &desc)?.1);
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

/// A descriptor's buffer, if it lies within guest RAM.
fn checked(mem: &GuestMemoryMmap, desc: &Descriptor) -> Result<(GuestAddress, usize), OutOfRam> {
    let len = desc.len() as usize;
    if len > 0 && !mem.check_range(desc.addr(), len) {
        return Err(OutOfRam);
    }
    Ok((desc.addr(), len))
}
