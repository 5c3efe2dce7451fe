//! Message buffers reused from message to message, so that the data path allocates only while
//! the pool grows to its working size.

/// Buffers kept for reuse.
const KEEP: usize = 512;

/// A free list of message buffers.
#[derive(Debug, Default)]
pub(super) struct BufferPool {
    free: Vec<Vec<u8>>,
}

impl BufferPool {
    /// A zeroed buffer of `len` bytes, reused when one is free.
    pub(super) fn take(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.free.pop().unwrap_or_default();
        buffer.clear();
        buffer.resize(len, 0);
        buffer
    }

    /// Returns a buffer for reuse (or frees it if the pool is full).
    pub(super) fn give(&mut self, buffer: Vec<u8>) {
        if self.free.len() < KEEP {
            self.free.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_and_sized() {
        let mut pool = BufferPool::default();
        let mut a = pool.take(4);
        a.copy_from_slice(b"data");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(8);
        assert_eq!(b, vec![0; 8]);
        assert_eq!(b.as_ptr(), ptr, "the same allocation, reused");
    }
}
