//! The vCPU loop of a partition: run the guest, route its exits, and say why it stopped.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use keyhold_devices::bus::{lock, Bus, BusError, IoAction};
use keyhold_devices::console::Console;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::exit_stats::{ExitCounts, ExitStats};
use crate::kick;
use crate::stop::{Registers, StopReason, StopRequest, Stopped};

/// Everything the vCPU thread of one partition owns.
pub struct Vcpu {
    /// The partition's ID.
    pub partition: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// The console, also on `pio`, kept here for its last line.
    pub console: Arc<Mutex<Console>>,
    /// Set by the supervisor to stop the partition from outside.
    pub stop: Arc<StopRequest>,
}

/// What one exit asks the loop to do.
enum Step {
    Continue,
    Stop(StopReason),
}

/// What a bus write means for the loop; `unhandled` if no device took it.
fn after_write(result: Result<IoAction, BusError>, unhandled: StopReason) -> Step {
    match result {
        Ok(IoAction::Continue) => Step::Continue,
        Ok(IoAction::Stop(status)) => Step::Stop(StopReason::Exited(status)),
        Err(_) => Step::Stop(unhandled),
    }
}

/// What a bus read means for the loop; `unhandled` if no device took it.
fn after_read(result: Result<(), BusError>, unhandled: StopReason) -> Step {
    match result {
        Ok(()) => Step::Continue,
        Err(_) => Step::Stop(unhandled),
    }
}

impl Vcpu {
    /// Runs the guest until it stops; `process_start` dates the start-up log lines.
    pub fn run(mut self, process_start: Instant) -> Stopped {
        kick::register_kvm_run(self.fd.get_kvm_run());
        // Every return from KVM_RUN is a VM exit: the scarce resource (docs/HOST.md). KVM counts
        // the ones it handles itself (queue notifications) too.
        let stats = ExitStats::open(&self.fd);
        log::info!(
            "partition {}: entering guest {:.2} ms after process start",
            self.partition,
            process_start.elapsed().as_secs_f64() * 1e3
        );
        let mut exits: u64 = 0;
        let reason = loop {
            if let Some(reason) = self.stop.pending() {
                break reason;
            }
            exits += 1;
            match self.step() {
                Step::Continue => {}
                Step::Stop(reason) => break reason,
            }
        };
        kick::forget_kvm_run();
        let total = match stats.and_then(|s| s.read()) {
            Some(ExitCounts { exits: all, page_faults: Some(faults) }) => format!(
                "{all} VM exits ({exits} handled by the VMM, {faults} page faults resolved by KVM)"
            ),
            Some(ExitCounts { exits: all, page_faults: None }) => {
                format!("{all} VM exits ({exits} handled by the VMM)")
            }
            None => format!("{exits} VM exits handled by the VMM (KVM's own count unavailable)"),
        };
        log::info!(
            "partition {}: stopped {:.2} ms after process start, after {total}",
            self.partition,
            process_start.elapsed().as_secs_f64() * 1e3
        );
        let registers = self.registers();
        let mut console = lock(&self.console);
        console.finish();
        Stopped { partition: self.partition, reason, registers, last_line: console.last_line() }
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn step(&mut self) -> Step {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let size = data.len();
                let unhandled = StopReason::UnhandledPort { port, write: true, size };
                after_write(self.pio.write(u64::from(port), data), unhandled)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let size = data.len();
                let unhandled = StopReason::UnhandledPort { port, write: false, size };
                after_read(self.pio.read(u64::from(port), data), unhandled)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let size = data.len();
                let unhandled = StopReason::UnhandledMmio { addr, write: true, size };
                after_write(self.mmio.write(addr, data), unhandled)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let size = data.len();
                let unhandled = StopReason::UnhandledMmio { addr, write: false, size };
                after_read(self.mmio.read(addr, data), unhandled)
            }
            Ok(VcpuExit::Shutdown) => Step::Stop(StopReason::TripleFault),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
                // `internal` member of the exit union.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Step::Stop(StopReason::EmulationFailure { suberror })
            }
            Ok(VcpuExit::Hlt) => Step::Stop(StopReason::Unexpected("hlt".into())),
            Ok(VcpuExit::FailEntry(reason, _)) => Step::Stop(StopReason::Unexpected(format!(
                "entry failed (hardware reason {reason:#x})"
            ))),
            Ok(other) => Step::Stop(StopReason::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear the request so the next KVM_RUN runs, then the loop checks
                // the stop flag (set before the kick was sent).
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Stop(StopReason::VmmFailure(format!("KVM_RUN failed: {e}"))),
        }
    }

    fn registers(&self) -> Option<Registers> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        Some(Registers { rip: regs.rip, rsp: regs.rsp, cr2: sregs.cr2 })
    }
}
