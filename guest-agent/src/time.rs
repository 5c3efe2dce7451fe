//! Time from the TSC, which `rdtsc` reads natively at CPL 3; the boot info gives its rate.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::boot_info::BootInfo;

/// The TSC's rate in kHz, from the boot info (0: unknown).
static TSC_KHZ: AtomicU32 = AtomicU32::new(0);

/// Records the TSC rate for [`elapsed_nanos`] (the runtime does it at start).
pub fn init(info: &BootInfo) {
    TSC_KHZ.store(info.tsc_khz, Ordering::Relaxed);
}

/// Nanoseconds in `ticks` TSC ticks, at the rate the boot info gave; `None` if it gave none.
pub fn elapsed_nanos(ticks: u64) -> Option<u64> {
    let khz = u64::from(TSC_KHZ.load(Ordering::Relaxed));
    (khz != 0).then(|| (u128::from(ticks) * 1_000_000 / u128::from(khz)) as u64)
}

/// The TSC now.
pub fn ticks() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter into EDX:EAX.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Nanoseconds in `ticks` TSC ticks, or `None` if the VMM did not give the TSC rate.
pub fn nanos(info: &BootInfo, ticks: u64) -> Option<u64> {
    let khz = u64::from(info.tsc_khz);
    (khz != 0).then(|| (u128::from(ticks) * 1_000_000 / u128::from(khz)) as u64)
}

/// Spins for about `micros` microseconds (or a fixed number of iterations if the TSC rate is
/// unknown).
pub fn spin_for(info: &BootInfo, micros: u64) {
    let start = ticks();
    let limit = u64::from(info.tsc_khz) * micros / 1000;
    let mut n: u64 = 0;
    while if limit == 0 { n < micros * 1000 } else { ticks() - start < limit } {
        n += 1;
        core::hint::spin_loop();
    }
}

/// Waits `micros` microseconds parked on the idle port (the host's CPU is free meanwhile),
/// waking early only to park again when a device of the partition uses a buffer. Without a
/// known TSC rate it spins, as [`spin_for`] does.
pub fn sleep_for(info: &BootInfo, micros: u64) {
    let start = ticks();
    if info.tsc_khz == 0 {
        return spin_for(info, micros);
    }
    let limit = u64::from(info.tsc_khz) * micros / 1000;
    loop {
        let gone = ticks() - start;
        if gone >= limit {
            return;
        }
        let left = (limit - gone) * 1000 / u64::from(info.tsc_khz);
        crate::idle::idle(left.clamp(1, u64::from(u32::MAX)) as u32);
    }
}
