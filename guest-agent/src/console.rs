//! The partition console: a 16550 UART at [`CONSOLE_PORT`].
//!
//! Writes go straight to the transmit register without polling the line-status register: the
//! VMM's UART is always ready, and every port access is a VM exit, so polling would double the
//! cost of each byte.

use core::fmt;

use crate::platform::CONSOLE_PORT;
use crate::port_io::outb;

/// A `core::fmt::Write` sink for the console.
#[derive(Debug, Default, Clone, Copy)]
pub struct Console;

impl Console {
    /// Writes raw bytes to the console.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            outb(CONSOLE_PORT, b);
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints to the partition console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        // The console never fails a write.
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

/// Prints a line to the partition console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}
