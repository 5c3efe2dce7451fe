//! Why a partition stopped, the report an operator reads, and the exit status it maps to.
//!
//! Exit statuses of `keyhold run` (also in its `--help`):
//!
//! | status | meaning |
//! | --- | --- |
//! | 0-119 | the firmware wrote this status to the exit port |
//! | 120 | the firmware wrote a status above 119 (the report gives it) |
//! | 121 | triple fault: the guest took an exception it could not handle |
//! | 122 | KVM's instruction emulator failed on a guest instruction |
//! | 123 | the guest touched a port or MMIO address with no device |
//! | 124 | the partition ran past `--timeout` |
//! | 125 | the VMM failed while running the partition, or KVM exited unexpectedly |
//! | 130, 143 | the node was asked to stop (SIGINT, SIGTERM), as shells report it; 143 also for a partition stopped with `keyhold ctl stop` |
//! | 2 | bad input: arguments, firmware file, memory size, /dev/kvm access |
//! | 1 | the host refused a resource before boot |

use std::fmt;
use std::sync::atomic::{AtomicI32, Ordering};

/// Why the supervisor stops a partition from outside; shared with its vCPU thread.
#[derive(Debug, Default)]
pub struct StopRequest(AtomicI32);

/// [`StopRequest`]'s value for a timeout (signals use their own numbers).
const TIMEOUT: i32 = -1;
/// [`StopRequest`]'s value for an operator's stop through the control API.
const OPERATOR: i32 = -2;

impl StopRequest {
    /// Asks for a stop at the time limit.
    pub fn time_out(&self) {
        let _ = self.0.compare_exchange(0, TIMEOUT, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Asks for a stop because the node got `signal`.
    pub fn signalled(&self, signal: i32) {
        let _ = self.0.compare_exchange(0, signal, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Asks for a stop on the operator's word (`keyhold ctl stop`).
    pub fn by_operator(&self) {
        let _ = self.0.compare_exchange(0, OPERATOR, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The stop asked for, if any.
    pub fn pending(&self) -> Option<StopReason> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            TIMEOUT => Some(StopReason::TimedOut),
            OPERATOR => Some(StopReason::ByOperator),
            signal => Some(StopReason::Signalled(signal)),
        }
    }
}

/// Highest firmware status passed through unchanged.
pub const MAX_FIRMWARE_STATUS: u32 = 119;
/// Exit status for a firmware status above [`MAX_FIRMWARE_STATUS`].
pub const STATUS_OUT_OF_RANGE: u8 = 120;
/// Exit status for a triple fault.
pub const STATUS_TRIPLE_FAULT: u8 = 121;
/// Exit status for an emulation failure.
pub const STATUS_EMULATION_FAILURE: u8 = 122;
/// Exit status for an access to an address with no device.
pub const STATUS_UNHANDLED_ACCESS: u8 = 123;
/// Exit status for a timeout (as `timeout(1)` uses).
pub const STATUS_TIMEOUT: u8 = 124;
/// Exit status for a VMM failure or an unexpected KVM exit.
pub const STATUS_VMM_FAILURE: u8 = 125;
/// Exit status of a partition the operator stopped (as SIGTERM would report it: the stop
/// came from outside, and a node whose partitions were all stopped so did not succeed at its
/// work).
pub const STATUS_BY_OPERATOR: u8 = 143;

/// Why a partition stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The firmware wrote this status to the exit port.
    Exited(u32),
    /// `KVM_EXIT_SHUTDOWN`: an exception with no handler (a triple fault).
    TripleFault,
    /// `KVM_EXIT_INTERNAL_ERROR`: KVM could not emulate an instruction.
    EmulationFailure {
        /// KVM's suberror code (1: emulation failure).
        suberror: u32,
    },
    /// An `in`/`out` to a port no device decodes.
    UnhandledPort {
        /// The port.
        port: u16,
        /// `out` (true) or `in`.
        write: bool,
        /// Access width in bytes.
        size: usize,
    },
    /// A load or store to guest-physical memory that is neither RAM nor a device.
    UnhandledMmio {
        /// The guest-physical address.
        addr: u64,
        /// Store (true) or load.
        write: bool,
        /// Access width in bytes.
        size: usize,
    },
    /// The partition ran past its time limit.
    TimedOut,
    /// The node was asked to stop by this signal.
    Signalled(i32),
    /// The operator stopped this partition through the control API.
    ByOperator,
    /// KVM reported an exit the VMM does not expect from firmware.
    Unexpected(String),
    /// A KVM call failed.
    VmmFailure(String),
}

/// Guest registers at the stop, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registers {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Last page-fault address.
    pub cr2: u64,
}

/// A stopped partition.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// The partition's ID.
    pub partition: u32,
    /// Why it stopped.
    pub reason: StopReason,
    /// Its registers, if KVM would give them.
    pub registers: Option<Registers>,
    /// The last line it printed.
    pub last_line: String,
}

impl StopReason {
    /// The process exit status this reason maps to.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Exited(status) => u8::try_from(*status)
                .ok()
                .filter(|s| u32::from(*s) <= MAX_FIRMWARE_STATUS)
                .unwrap_or(STATUS_OUT_OF_RANGE),
            Self::TripleFault => STATUS_TRIPLE_FAULT,
            Self::EmulationFailure { .. } => STATUS_EMULATION_FAILURE,
            Self::UnhandledPort { .. } | Self::UnhandledMmio { .. } => STATUS_UNHANDLED_ACCESS,
            Self::TimedOut => STATUS_TIMEOUT,
            Self::Signalled(signal) => u8::try_from(128 + signal).unwrap_or(STATUS_VMM_FAILURE),
            Self::ByOperator => STATUS_BY_OPERATOR,
            Self::Unexpected(_) | Self::VmmFailure(_) => STATUS_VMM_FAILURE,
        }
    }

    /// Whether the partition crashed (as opposed to exiting through the exit port, or being
    /// stopped on the operator's word).
    pub fn is_crash(&self) -> bool {
        !matches!(self, Self::Exited(_) | Self::Signalled(_) | Self::ByOperator)
    }

    /// Whether CR2 tells the operator something: only after a fault.
    fn shows_cr2(&self) -> bool {
        matches!(self, Self::TripleFault | Self::EmulationFailure { .. })
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |write: bool| if write { "write" } else { "read" };
        match self {
            Self::Exited(status) => write!(f, "exited with status {status}"),
            Self::TripleFault => f.write_str(
                "triple fault (KVM shutdown exit: the guest took an exception it has no handler for)",
            ),
            Self::EmulationFailure { suberror } => write!(
                f,
                "KVM could not emulate a guest instruction (internal-error exit, suberror {suberror}; \
                 as when an SSE instruction touches MMIO or code runs at CPL 0)"
            ),
            Self::UnhandledPort { port, write, size } => {
                write!(f, "{}-byte {} of I/O port {port:#x}, where no device is", size, dir(*write))
            }
            Self::UnhandledMmio { addr, write, size } => write!(
                f,
                "{}-byte {} of guest-physical {addr:#x}, which is neither RAM nor a device",
                size,
                dir(*write)
            ),
            Self::TimedOut => f.write_str("still running at the --timeout limit"),
            Self::Signalled(libc::SIGTERM) => f.write_str("the node was asked to stop (SIGTERM)"),
            Self::Signalled(libc::SIGINT) => f.write_str("the node was asked to stop (SIGINT)"),
            Self::Signalled(signal) => write!(f, "the node was asked to stop (signal {signal})"),
            Self::ByOperator => f.write_str("stopped by the operator (keyhold ctl stop)"),
            Self::Unexpected(exit) => write!(f, "unexpected KVM exit: {exit}"),
            Self::VmmFailure(what) => write!(f, "VMM failure: {what}"),
        }
    }
}

impl Stopped {
    /// The exit status of this partition.
    pub fn exit_status(&self) -> u8 {
        self.reason.exit_status()
    }

    /// The paragraph printed for a partition that did not exit cleanly; `None` for status 0.
    pub fn report(&self) -> Option<String> {
        if self.reason == StopReason::Exited(0) {
            return None;
        }
        let mut text = format!("partition {} stopped: {}", self.partition, self.reason);
        if !self.reason.is_crash() {
            return Some(text);
        }
        match self.registers {
            Some(r) if self.reason.shows_cr2() => {
                text += &format!("; rip={:#x} rsp={:#x} cr2={:#x}", r.rip, r.rsp, r.cr2)
            }
            Some(r) => text += &format!("; rip={:#x} rsp={:#x}", r.rip, r.rsp),
            None => text += "; registers unavailable",
        }
        if self.last_line.is_empty() {
            text += "; the console printed nothing";
        } else {
            text += &format!("; last console line: {:?}", self.last_line);
        }
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(reason: StopReason) -> Stopped {
        Stopped {
            partition: 3,
            reason,
            registers: Some(Registers { rip: 0x10_0042, rsp: 0xffff8, cr2: 0x80_0000_0000 }),
            last_line: "about to read".into(),
        }
    }

    #[test]
    fn firmware_statuses_pass_through_below_120() {
        assert_eq!(StopReason::Exited(0).exit_status(), 0);
        assert_eq!(StopReason::Exited(101).exit_status(), 101);
        assert_eq!(StopReason::Exited(119).exit_status(), 119);
        assert_eq!(StopReason::Exited(120).exit_status(), STATUS_OUT_OF_RANGE);
        assert_eq!(StopReason::Exited(u32::MAX).exit_status(), STATUS_OUT_OF_RANGE);
    }

    #[test]
    fn every_crash_has_its_own_status() {
        let statuses = [
            StopReason::TripleFault,
            StopReason::EmulationFailure { suberror: 1 },
            StopReason::UnhandledPort { port: 0x80, write: true, size: 1 },
            StopReason::TimedOut,
            StopReason::VmmFailure("x".into()),
        ]
        .map(|r| r.exit_status());
        let mut unique = statuses.to_vec();
        unique.dedup();
        assert_eq!(unique.len(), statuses.len());
        assert!(statuses.iter().all(|&s| s > 119));
    }

    #[test]
    fn crash_reports_name_partition_reason_registers_and_console() {
        let report = stopped(StopReason::TripleFault).report().unwrap();
        assert!(report.starts_with("partition 3 stopped: triple fault"), "{report}");
        assert!(report.contains("rip=0x100042 rsp=0xffff8 cr2=0x8000000000"), "{report}");
        assert!(report.ends_with("last console line: \"about to read\""), "{report}");

        let report = stopped(StopReason::TimedOut).report().unwrap();
        assert!(report.contains("rip=0x100042") && !report.contains("cr2"), "{report}");
    }

    #[test]
    fn clean_exits_report_nothing_and_failures_report_briefly() {
        assert_eq!(stopped(StopReason::Exited(0)).report(), None);
        let report = stopped(StopReason::Exited(7)).report().unwrap();
        assert_eq!(report, "partition 3 stopped: exited with status 7");
        let report = stopped(StopReason::Exited(4000)).report().unwrap();
        assert!(report.contains("status 4000"), "{report}");
    }
}
