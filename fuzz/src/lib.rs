//! Shared pieces of keyhold's fuzz targets (docs/FUZZING.md): a reader that turns the fuzzer's
//! bytes into operations, the guest-side world of the device targets (two secure-channel
//! partitions and a virtio-rng behind their MMIO transports, in real guest memory; two
//! partitions' virtio-vsock devices, with the checks of what they write), the attacker's end
//! of a host link for the link target, and the encoders that build the seed corpora
//! (`cargo run --example make_corpus`).
//!
//! Every input format is a plain byte stream read front to back; a reader that runs dry reads
//! zeros, so every input is valid and the fuzzer never wastes work on rejected ones.

pub mod devices;
pub mod link;
pub mod vsock;

use keyhold_devices::cmm::audit::Audit;

/// One audit log per process and node, shared by every input: starting one costs a writer
/// thread and a queue of 8192 records, more than most inputs take to run. What it keeps
/// (recent records, rate limits) never changes how the code under test decides.
pub fn audit(node: u32) -> Audit {
    static AUDITS: std::sync::Mutex<Vec<(u32, Audit)>> = std::sync::Mutex::new(Vec::new());
    let mut audits = AUDITS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, audit)) = audits.iter().find(|(n, _)| *n == node) {
        return audit.clone();
    }
    let audit = Audit::to_log(node).expect("an audit log");
    audits.push((node, audit.clone()));
    audit
}

/// Whether `KEYHOLD_FUZZ_DEBUG` is set: the targets then say what an input did (run one
/// input with `-runs=1 FILE`).
pub fn debugging() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KEYHOLD_FUZZ_DEBUG").is_some())
}

/// Prints node `node`'s recent audit records.
pub fn print_audit(node: u32) {
    for line in audit(node).recent() {
        eprintln!("  audit: {line}");
    }
}

/// Reads the fuzzer's bytes as little-endian fields; past the end it reads zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Exactly `N` bytes, zero-padded at the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }
}

/// Builds inputs in the format [`Input`] reads (for the seed corpora).
#[derive(Default, Clone)]
pub struct Output {
    /// The bytes so far.
    pub bytes: Vec<u8>,
}

impl Output {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(v);
        self
    }
}
