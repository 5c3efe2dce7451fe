//! What the host offers: access to KVM and memory for guests.

use std::io;

use kvm_ioctls::{Cap, Kvm};
use thiserror::Error;

/// Why the host cannot run partitions.
#[derive(Debug, Error)]
pub enum HostError {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: load the kvm module (or run on a host with virtualisation) and try again")]
    KvmMissing,
    /// `/dev/kvm` exists but this user may not open it.
    #[error("permission denied opening /dev/kvm: run as root or add this user to the group owning /dev/kvm (usually 'kvm')")]
    KvmPermission,
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(io::Error),
    /// KVM lacks a capability keyhold needs.
    #[error("this KVM lacks {0}, which keyhold needs")]
    MissingCapability(&'static str),
}

/// Opens `/dev/kvm` and checks the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, HostError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => HostError::KvmMissing,
        libc::EACCES | libc::EPERM => HostError::KvmPermission,
        errno => HostError::KvmOpen(io::Error::from_raw_os_error(errno)),
    })?;
    for (cap, name) in
        [(Cap::UserMemory, "KVM_CAP_USER_MEMORY"), (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT")]
    {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Total physical memory of the host in bytes, the upper bound for one partition's RAM.
pub fn total_memory() -> u64 {
    // SAFETY: `sysinfo` only writes into the struct we pass, which is valid for writes.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the return value is checked.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}
