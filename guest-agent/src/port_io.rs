//! Port I/O: how a partition reaches the console and the exit port.
//!
//! The VMM enters firmware at CPL 3 with RFLAGS.IOPL = 3, so `in` and `out` are allowed and each
//! one exits to the VMM (about 25 us on the development machines: use them sparingly).

/// Writes one byte to an I/O port.
pub(crate) fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory and no stack; with IOPL 3 it cannot fault. What the port
    // does with the byte is the VMM's business.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value,
            options(nomem, nostack, preserves_flags));
    }
}

/// Writes a 32-bit value to an I/O port.
pub(crate) fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value,
            options(nomem, nostack, preserves_flags));
    }
}
