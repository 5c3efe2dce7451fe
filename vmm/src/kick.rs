//! Stopping a vCPU thread that is inside `KVM_RUN`.
//!
//! The supervisor sets the partition's stop flag and sends the vCPU thread [`kick_signal`].
//! The handler sets `immediate_exit` in that thread's `kvm_run` page, so `KVM_RUN` returns
//! `EINTR` whether the signal lands while the guest runs or just before the thread enters it;
//! the vCPU loop then sees the flag. This is the race-free scheme Firecracker uses.

use std::cell::Cell;
use std::ptr;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Installs the kick handler for the process. Call once, before any vCPU thread starts.
pub fn install_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Tells the kick handler which `kvm_run` page belongs to the calling thread.
///
/// The page must stay mapped for as long as the thread can receive the signal: the vCPU loop
/// registers it on entry and clears it (with [`forget_kvm_run`]) before the `VcpuFd` is dropped.
pub fn register_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

/// Undoes [`register_kvm_run`].
pub fn forget_kvm_run() {
    KVM_RUN.with(|cell| cell.set(ptr::null_mut()));
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Reading a const-initialised thread-local `Cell` neither allocates nor locks, so it is
    // async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null pointer was registered by this very thread and points at its
        // vCPU's `kvm_run` page, which stays mapped until the thread clears the pointer.
        // `immediate_exit` is a plain byte the kernel reads on the next `KVM_RUN`.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}
