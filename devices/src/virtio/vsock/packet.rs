//! The virtio-vsock packet header (virtio 1.2 section 5.10.6): 44 bytes, little-endian, at the
//! start of every buffer chain of the transmit and receive queues.

/// Size of an encoded [`Header`].
pub const HEADER_SIZE: usize = 44;

/// `type`: a stream socket (the only type this device carries).
pub const TYPE_STREAM: u16 = 1;

/// The operations (`op`).
pub mod op {
    /// Ask for a connection.
    pub const REQUEST: u16 = 1;
    /// Accept a connection.
    pub const RESPONSE: u16 = 2;
    /// Refuse or end a connection at once.
    pub const RST: u16 = 3;
    /// The sender will send (`flags` bit 1) or receive (bit 0) no more.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's credit (`buf_alloc`, `fwd_cnt`), unasked.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// One packet's header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context ID.
    pub src_cid: u64,
    /// Receiver's context ID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header (RW only).
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// SHUTDOWN's direction bits.
    pub flags: u32,
    /// The sender's receive buffer space for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header.
    pub fn from_bytes(raw: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at =
            |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.kind.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    /// The device's own answer to this packet's sender (addresses swapped, no payload, no
    /// credit of its own): an RST for a packet it refuses.
    pub fn answer(&self, op: u16) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_spec_layout() {
        let header = Header {
            src_cid: 3,
            dst_cid: 4,
            src_port: 1024,
            dst_port: 5000,
            len: 7,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 9,
        };
        let raw = header.to_bytes();
        assert_eq!(raw[0], 3);
        assert_eq!(raw[8], 4);
        assert_eq!(&raw[16..20], &1024u32.to_le_bytes());
        assert_eq!(&raw[28..32], &[1, 0, 5, 0], "type then op, 16 bits each");
        assert_eq!(&raw[36..40], &65536u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&raw), header);
    }

    #[test]
    fn an_answer_goes_back_to_the_sender() {
        let request =
            Header { src_cid: 3, dst_cid: 9, src_port: 1, dst_port: 2, ..Header::default() };
        let rst = request.answer(op::RST);
        assert_eq!((rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port), (9, 2, 3, 1));
        assert_eq!((rst.op, rst.len, rst.buf_alloc), (op::RST, 0, 0));
    }
}
