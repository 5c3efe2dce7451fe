//! The partition console: a 16550 UART (vm-superio) whose output goes to a line sink.
//!
//! Lines from several partitions share one output (stdout or a file), so the sink writes whole
//! lines only, each behind an optional prefix, and remembers the last line for crash reports.

use std::convert::Infallible;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};

use crate::bus::{lock, BusDevice, IoAction};

/// Longest line kept before it is written out anyway, so a guest that never sends a newline
/// cannot grow the buffer without bound.
const MAX_LINE: usize = 4096;

/// Output shared by the consoles of all partitions of a process.
pub type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

/// Wraps a writer so that several consoles can share it.
pub fn shared_output(out: Box<dyn Write + Send>) -> SharedOutput {
    Arc::new(Mutex::new(out))
}

/// The UART's interrupt line. Firmware runs with interrupts off and polls (docs/HOST.md), so
/// the console raises none; the line exists because the 16550 model requires one.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Collects console bytes into lines and writes each whole line to the shared output.
pub struct LineSink {
    prefix: String,
    out: SharedOutput,
    line: Vec<u8>,
    last_line: String,
}

impl LineSink {
    /// A sink that writes `prefix` before every line.
    pub fn new(prefix: String, out: SharedOutput) -> Self {
        Self { prefix, out, line: Vec::new(), last_line: String::new() }
    }

    /// The last non-empty line the guest printed (possibly unfinished).
    pub fn last_line(&self) -> String {
        if self.line.is_empty() {
            self.last_line.clone()
        } else {
            printable(&self.line)
        }
    }

    /// Writes out an unfinished line, as when the partition stops mid-line.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        self.emit_line()
    }

    fn emit_line(&mut self) -> io::Result<()> {
        let text = printable(&self.line);
        self.line.clear();
        if !text.trim().is_empty() {
            self.last_line.clone_from(&text);
        }
        let mut out = lock(&self.out);
        writeln!(out, "{}{}", self.prefix, text)?;
        out.flush()
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            match byte {
                b'\n' => self.emit_line()?,
                b'\r' => {}
                _ => {
                    self.line.push(byte);
                    if self.line.len() >= MAX_LINE {
                        self.emit_line()?;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Guest bytes as text safe for a terminal: invalid UTF-8 replaced, control characters escaped.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> =
                if c.is_control() && c != '\t' { c.escape_default().collect() } else { vec![c] };
            escaped
        })
        .collect()
}

/// The 16550 UART of one partition.
pub struct Console {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, LineSink>,
    write_failed: bool,
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: LineSink) -> Self {
        Self { uart: Serial::new(NoInterrupt, sink), write_failed: false }
    }

    /// The last line the guest printed.
    pub fn last_line(&self) -> String {
        self.uart.writer().last_line()
    }

    /// Writes out any unfinished line.
    pub fn finish(&mut self) {
        if let Err(e) = self.uart.writer_mut().finish() {
            log::warn!("console output failed: {e}");
        }
    }
}

impl BusDevice for Console {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) else {
            return IoAction::Continue;
        };
        // A failing console (a closed pipe, a full disk) must not stop the guest; say so once.
        if let Err(e) = self.uart.write(reg, value) {
            if !self.write_failed {
                self.write_failed = true;
                log::warn!("console output failed, further output may be lost: {e}");
            }
        }
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose contents the test can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console(prefix: &str) -> (Console, Capture) {
        let capture = Capture::default();
        let out = shared_output(Box::new(capture.clone()));
        (Console::new(LineSink::new(prefix.into(), out)), capture)
    }

    fn type_text(console: &mut Console, text: &[u8]) {
        for &b in text {
            console.write(0, &[b]);
        }
    }

    #[test]
    fn writes_prefixed_whole_lines_and_remembers_the_last() {
        let (mut console, capture) = console("[p1] ");
        type_text(&mut console, b"hello\r\nsecond");
        assert_eq!(&*capture.0.lock().unwrap(), b"[p1] hello\n");
        assert_eq!(console.last_line(), "second");
        console.finish();
        assert_eq!(&*capture.0.lock().unwrap(), b"[p1] hello\n[p1] second\n");
        assert_eq!(console.last_line(), "second");
    }

    #[test]
    fn escapes_control_bytes_and_bounds_lines() {
        let (mut console, capture) = console("");
        type_text(&mut console, b"a\x1b[2Jb\n");
        assert_eq!(&*capture.0.lock().unwrap(), b"a\\u{1b}[2Jb\n");
        type_text(&mut console, &[b'x'; MAX_LINE + 1]);
        let out = capture.0.lock().unwrap().clone();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
    }

    #[test]
    fn line_status_reports_transmitter_ready() {
        let (mut console, _) = console("");
        let mut lsr = [0u8; 1];
        console.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}
