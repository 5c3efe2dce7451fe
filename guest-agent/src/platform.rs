//! Fixed platform facts shared by the VMM and its guests.

/// I/O port base of the 16550 UART that serves as the partition console.
pub const CONSOLE_PORT: u16 = 0x3f8;
/// Number of consecutive ports the UART decodes.
pub const CONSOLE_PORT_COUNT: u16 = 8;

/// I/O port the firmware writes its 32-bit exit status to; the partition then stops.
///
/// The same port QEMU's `isa-debug-exit` uses, so tooling that knows one knows the other; unlike
/// QEMU the status is taken as written, not shifted.
pub const EXIT_PORT: u16 = 0xf4;

/// I/O port a polling guest writes the longest it will wait (in microseconds, 32 bits) to: its
/// vCPU sleeps until one of its devices uses a buffer, the partition is stopped, or that long
/// (at most 60 s).
pub const IDLE_PORT: u16 = 0xf8;

/// Exit status the guest runtime reports when the firmware panics (as `std` does for a panic).
pub const PANIC_EXIT_STATUS: u32 = 101;

/// Exit status the guest runtime reports when the boot-info block fails validation.
pub const BAD_BOOT_INFO_EXIT_STATUS: u32 = 102;
