//! How many VM exits a vCPU really took, from KVM's binary statistics (`KVM_GET_STATS_FD`).
//!
//! The vCPU loop sees only the exits KVM hands to the VMM; queue notifications go to
//! ioeventfds and are handled inside KVM, yet each is an exit just as costly (docs/HOST.md).
//! KVM's own `exits` counter includes them, so the figure the benchmarks report is the whole
//! cost, not the part the VMM happens to see. It also includes the page faults KVM resolves
//! when the guest first touches a page (on the development machines' shadow-paging KVM, one
//! per 4 KiB page): a start-up cost, reported apart so that steady-state figures can leave it
//! out.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
/// `struct kvm_stats_header`: six u32s.
const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` before its name.
const DESC_FIXED: usize = 16;

/// The statistics file of one vCPU.
pub struct ExitStats {
    file: File,
    exits: u64,
    page_faults: Option<u64>,
}

/// What KVM counted for a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCounts {
    /// Every VM exit.
    pub exits: u64,
    /// Of those, page faults KVM resolved itself (`pf_taken`), when the kernel counts them.
    pub page_faults: Option<u64>,
}

impl ExitStats {
    /// Opens `vcpu`'s statistics; `None` where the kernel has none (before Linux 5.14).
    pub fn open(vcpu: &VcpuFd) -> Option<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new descriptor (or -1);
        // `vcpu` is a live vCPU descriptor for the duration of the call.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let offsets = find(&file, &["exits", "pf_taken"])?;
        Some(Self { exits: offsets[0]?, page_faults: offsets[1], file })
    }

    /// The counts so far.
    pub fn read(&self) -> Option<ExitCounts> {
        let exits = self.value(self.exits)?;
        let page_faults = self.page_faults.and_then(|at| self.value(at));
        Some(ExitCounts { exits, page_faults })
    }

    fn value(&self, offset: u64) -> Option<u64> {
        let mut value = [0u8; 8];
        self.file.read_exact_at(&mut value, offset).ok()?;
        Some(u64::from_ne_bytes(value))
    }
}

/// The file offsets of the values of the statistics called `names`, each where it exists.
fn find<const N: usize>(file: &File, names: &[&str; N]) -> Option<[Option<u64>; N]> {
    let mut header = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut header, 0).ok()?;
    let field = |i: usize| u32::from_ne_bytes([0, 1, 2, 3].map(|b| header[4 * i + b]));
    let (name_size, count, desc_offset, data_offset) = (field(1), field(2), field(4), field(5));
    let stride = DESC_FIXED + name_size as usize;
    let mut descriptors = vec![0u8; stride.checked_mul(count as usize)?];
    file.read_exact_at(&mut descriptors, u64::from(desc_offset)).ok()?;
    let mut found = [None; N];
    for desc in descriptors.chunks_exact(stride) {
        let raw_name = &desc[DESC_FIXED..];
        let end = raw_name.iter().position(|&b| b == 0).unwrap_or(raw_name.len());
        if let Some(i) = names.iter().position(|n| n.as_bytes() == &raw_name[..end]) {
            let offset = u32::from_ne_bytes([desc[8], desc[9], desc[10], desc[11]]);
            found[i] = Some(u64::from(data_offset) + u64::from(offset));
        }
    }
    Some(found)
}
