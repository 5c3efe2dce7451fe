//! Volatile access to device registers. From CPL 3 every access is a VM exit (~25 us here):
//! drivers touch registers only to set devices up and to notify.

/// Reads a 32-bit register.
///
/// # Safety
/// `addr` must be a device register the VMM listed in the boot info (or identity-mapped RAM).
pub unsafe fn read32(addr: u64) -> u32 {
    // SAFETY: per the caller's contract the address is mapped and 4-byte aligned.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit register.
///
/// # Safety
/// As for [`read32`].
pub unsafe fn write32(addr: u64, value: u32) {
    // SAFETY: per the caller's contract the address is mapped and 4-byte aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}
