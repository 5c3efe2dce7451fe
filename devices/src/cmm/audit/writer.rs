//! The audit writer: a thread of its own that takes records from a bounded queue and appends
//! them to the log file, rotating it by size, so that no thread that decides anything (the
//! device thread, a vCPU, the link set-up thread) ever waits on the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::entry::Entry;
use super::Shared;
use crate::bus::lock;

/// How often the writer reports suppressed and dropped records.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Where the records go, and how big the file may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFile {
    /// The log: JSON lines, appended.
    pub path: PathBuf,
    /// Size at which it is renamed to `PATH.1` (older ones to `.2`, ...) and begun anew.
    pub max_bytes: u64,
    /// Rotated files kept; the oldest beyond this is deleted.
    pub keep: u32,
}

/// Defaults of [`AuditFile`]: 64 MiB a file, four old files.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// See [`DEFAULT_MAX_BYTES`].
pub const DEFAULT_KEEP: u32 = 4;

/// What goes to the writer.
pub(super) enum Message {
    /// A record to write.
    Record(Entry),
    /// Answer on this once everything before it is on disk.
    Flush(SyncSender<()>),
}

/// The writer's end.
pub(super) struct Writer {
    node: u32,
    out: Output,
    shared: Arc<Mutex<Shared>>,
}

enum Output {
    Log,
    File { file: BufWriter<File>, config: AuditFile, size: u64 },
}

impl Writer {
    /// A writer for `node` to `file` (the process log if `None`).
    pub(super) fn open(
        node: u32,
        file: Option<AuditFile>,
        shared: Arc<Mutex<Shared>>,
    ) -> io::Result<Self> {
        let out = match file {
            None => Output::Log,
            Some(config) => {
                let file = append(&config.path)?;
                let size = file.metadata()?.len();
                Output::File { file: BufWriter::new(file), config, size }
            }
        };
        Ok(Self { node, out, shared })
    }

    /// Writes what arrives until every sender is gone.
    pub(super) fn run(mut self, queue: Receiver<Message>) {
        let mut next_report = Instant::now() + REPORT_EVERY;
        loop {
            let wait = next_report.saturating_duration_since(Instant::now());
            match queue.recv_timeout(wait) {
                Ok(first) => {
                    self.handle(first);
                    // Whatever else is waiting goes with it, then all of it to the file (not
                    // when a buffer fills: a reader of the log sees records as they happen).
                    while let Ok(more) = queue.try_recv() {
                        self.handle(more);
                    }
                    self.flush();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_report {
                self.report();
                self.flush();
                next_report = Instant::now() + REPORT_EVERY;
            }
        }
        self.report();
        self.flush();
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Record(entry) => self.write(&entry),
            Message::Flush(done) => {
                self.report();
                self.flush();
                let _ = done.send(());
            }
        }
    }

    /// Writes the suppressed and dropped counts since the last report.
    fn report(&mut self) {
        let entries = lock(&self.shared).take_reports(self.node, Instant::now());
        for entry in entries {
            self.write(&entry);
        }
    }

    fn write(&mut self, entry: &Entry) {
        let line = entry.line(self.node);
        match &mut self.out {
            Output::Log => log::info!(target: "audit", "{line}"),
            Output::File { file, config, size } => {
                let len = line.len() as u64 + 1;
                if config.max_bytes > 0 && *size > 0 && *size + len > config.max_bytes {
                    match rotate(config) {
                        Ok(fresh) => {
                            let _ = file.flush();
                            *file = BufWriter::new(fresh);
                            *size = 0;
                        }
                        Err(e) => log::error!("audit log rotation failed: {e}"),
                    }
                }
                match writeln!(file, "{line}") {
                    Ok(()) => *size += len,
                    Err(e) => log::error!("audit log write failed: {e}; record: {line}"),
                }
            }
        }
    }

    fn flush(&mut self) {
        if let Output::File { file, .. } = &mut self.out {
            if let Err(e) = file.flush() {
                log::error!("audit log write failed: {e}");
            }
        }
    }
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `PATH.N-1` becomes `PATH.N`, ..., `PATH` becomes `PATH.1`; returns the new `PATH`.
fn rotate(config: &AuditFile) -> io::Result<File> {
    let numbered = |n: u32| {
        let mut name = config.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if config.keep == 0 {
        std::fs::remove_file(&config.path)?;
    } else {
        for n in (1..config.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(&config.path, numbered(1))?;
    }
    append(&config.path)
}
