//! What the host offers: access to KVM and memory for guests.

use std::io;

use kvm_ioctls::{Cap, Kvm};
use thiserror::Error;

/// Why the host cannot run partitions.
#[derive(Debug, Error)]
pub enum HostError {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: load the kvm module (or run on a host with virtualisation) and try again")]
    KvmMissing,
    /// `/dev/kvm` exists but this user may not open it.
    #[error("permission denied opening /dev/kvm: run as root or add this user to the group owning /dev/kvm (usually 'kvm')")]
    KvmPermission,
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(io::Error),
    /// KVM lacks a capability keyhold needs.
    #[error("this KVM lacks {0}, which keyhold needs")]
    MissingCapability(&'static str),
}

/// Opens `/dev/kvm` and checks the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, HostError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => HostError::KvmMissing,
        libc::EACCES | libc::EPERM => HostError::KvmPermission,
        errno => HostError::KvmOpen(io::Error::from_raw_os_error(errno)),
    })?;
    for (cap, name) in
        [(Cap::UserMemory, "KVM_CAP_USER_MEMORY"), (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT")]
    {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Total physical memory of the host in bytes, the upper bound for one partition's RAM.
pub fn total_memory() -> u64 {
    // SAFETY: `sysinfo` only writes into the struct we pass, which is valid for writes.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the return value is checked.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

/// The signals a node handles: SIGTERM (service managers, `kill`) and SIGINT (Ctrl-C) ask it
/// to stop; SIGHUP, which service managers send to ask for a reload and a closed terminal
/// sends to its session, must not kill it.
const SHUTDOWN_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn shutdown_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in SHUTDOWN_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it starts afterwards, so
/// that they arrive through [`ShutdownSignals`] instead of killing the process. Call first thing
/// in `main`, before any thread exists.
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = shutdown_sigset();
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not wanted.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// A signalfd for the blocked shutdown signals.
pub struct ShutdownSignals {
    fd: std::os::fd::OwnedFd,
}

impl ShutdownSignals {
    /// Opens the signalfd (the signals must be blocked already).
    pub fn open() -> io::Result<Self> {
        let set = shutdown_sigset();
        // SAFETY: -1 asks for a new fd; `set` is valid; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self { fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) } })
    }

    /// The next signal received, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: an all-zero signalfd_siginfo is valid; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is valid for writes of `size` bytes.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n as usize == size).then_some(info.ssi_signo as i32)
    }
}

impl std::os::fd::AsRawFd for ShutdownSignals {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Makes the process non-dumpable: no core dump, and no ptrace or /proc/PID/mem by other users.
/// Keys live in memfd_secret memory, but transient copies (a cipher's key schedule while a
/// message is sealed, the links' Noise states) pass through ordinary memory.
pub fn forbid_core_dumps() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and changes only this process's flag.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps glibc's malloc from ever shrinking a thread's heap in place. The first time it would,
/// it opens `/proc/sys/vm/overcommit_memory` to decide how, and that open, on a device or vCPU
/// thread whose seccomp filter allows no file, stops the process (it happened at the end of a
/// long vsock exchange, when the device thread freed its buffers). With the trim threshold at
/// its maximum no heap is trimmed: memory freed at the top of a heap stays with the process
/// for reuse, which the node's pooled buffers do anyway. musl (Firecracker's libc) has no such
/// call, hence nothing to do there.
pub fn keep_malloc_from_opening_files() -> io::Result<()> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets one of malloc's parameters; called before any other thread
        // exists, so no allocation races it.
        if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } != 1 {
            return Err(io::Error::other("mallopt(M_TRIM_THRESHOLD) refused"));
        }
    }
    Ok(())
}
