//! Containment: one seccomp filter for each kind of thread, built with rust-vmm's
//! `seccompiler` (as Firecracker does), and the report of a system call a filter refuses.
//!
//! Every thread of `keyhold run` and `keyhold node` installs its own filter as the first thing
//! it does, before it reads anything a guest or a peer wrote; a vCPU thread before its first
//! `KVM_RUN`, the main thread once it has started every other thread. Each allows the
//! [`base`] every thread needs, and:
//!
//! - `p<ID>-vcpu` (`supervisor::spawn`): `KVM_RUN`, `KVM_GET_REGS`, `KVM_GET_SREGS` and
//!   `KVM_GET_STATS_FD` and no other ioctl; reading the stats file; sending on link sockets and
//!   shutting one down (a channel's queues served inline); secret memory; with `--dump-ram`,
//!   creating the dump file; with a `vsock_uds`, `recvfrom` (a program's socket read inline);
//! - `devices` (`DeviceThread::start`): epoll, eventfds, timerfds; link sockets (read, write,
//!   options, shutdown); secret memory; with a partition's `vsock_uds`, accepting and
//!   connecting Unix sockets (and making them: `AF_UNIX` only);
//! - `link-setup` (`LinkManager::start`, through a closure from here): `accept4`, `socket`
//!   (IPv4 and IPv6 only), `connect`, socket options, epoll; secret memory;
//! - `api` (`ApiServer::start`): `poll`, `accept4`, reading and writing its connections;
//! - `main` (`supervisor::run`): epoll, reading its eventfds, timer and signalfd, kicking vCPU
//!   threads (`tgkill` with the kick signal only), removing the API socket;
//! - `audit` (`Audit::start`, through a closure from here): rotating its log (renaming and
//!   removing files, creating the new one for appending, and nothing else);
//! - `starter` (`Starter::spawn`, only on a node with a control API): everything a vCPU
//!   thread may do (the vCPU threads it starts inherit its filter under their own), and
//!   building a partition: the KVM ioctls that create a VM, its memory slot, irqchip, vCPU,
//!   irqfds and ioeventfds and set the vCPU's registers; opening the firmware read-only;
//!   eventfds and timerfds for its devices; starting a thread.
//!
//! The lists were found by running the real workloads under `strace -f` (every end-to-end test,
//! debug and release builds: boots, crashes, timeouts, `--dump-ram`, nodes, links, rekeys, link
//! loss and relinks, the control API, SIGTERM, the demo) and reading the code paths they take;
//! [`base`] also names what the C library and Rust's runtime do on any thread (allocating,
//! ending the thread, a panic's abort).
//!
//! A system call outside a thread's list does not run: the filter traps it (`SECCOMP_RET_TRAP`)
//! and the SIGSYS handler here writes one line naming the thread and the call, with
//! async-signal-safe calls only, then ends the process with [`STATUS_BAD_SYSCALL`]:
//!
//! ```text
//! keyhold: thread p1-vcpu made system call openat (257), which its seccomp filter does not
//! allow; stopping
//! ```
//!
//! (one line; wrapped here).
//!
//! `--seccomp off` runs without filters (for debugging, with a warning line);
//! `--seccomp-selftest THREAD` (hidden) makes that thread call `openat` right after its filter
//! is installed, so the tests can see the containment work end to end.

use std::cell::Cell;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::Arc;

use libc::{c_int, c_void, siginfo_t};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// Exit status of a process one of whose threads made a system call its filter does not
/// allow: 128 + SIGSYS, as a shell reports a process killed by SIGSYS.
pub const STATUS_BAD_SYSCALL: u8 = 128 + libc::SIGSYS as u8;

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ThreadKind {
    /// A partition's vCPU: `KVM_RUN` and its exits, channels served inline.
    Vcpu,
    /// The device thread's event loop: queues, the CMM, the links.
    Devices,
    /// The link set-up thread: accepting, dialling, handshakes.
    LinkSetup,
    /// The control API.
    Api,
    /// The main thread once every other has started: the supervisor.
    Main,
    /// The audit writer: appends records, rotates its file.
    Audit,
    /// The starter: builds a stopped partition again (`keyhold ctl start`) and starts its
    /// vCPU thread.
    Starter,
    /// Membership from etcd: its lease, reads and watches.
    Membership,
}

/// Whether the threads run under their filters (`--seccomp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Every thread installs its filter (the default).
    #[default]
    On,
    /// No filter at all: for debugging only.
    Off,
}

/// Why the filters could not be prepared or installed.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in the lists).
    #[error("building the seccomp filters: {0}")]
    Build(String),
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// The kernel cannot run seccomp filters that trap.
    #[error(
        "this kernel cannot run seccomp filters ({0}); --seccomp off runs without them, \
         uncontained"
    )]
    Unsupported(std::io::Error),
}

/// The compiled filters of one process.
struct Filters {
    vcpu: BpfProgram,
    devices: BpfProgram,
    link_setup: BpfProgram,
    api: BpfProgram,
    main: BpfProgram,
    audit: BpfProgram,
    starter: BpfProgram,
    membership: BpfProgram,
}

/// The containment of one process: the filters each thread installs (none with
/// `--seccomp off`). Cheap to clone; every thread start takes one.
#[derive(Clone)]
pub struct Containment {
    filters: Option<Arc<Filters>>,
    selftest: Option<ThreadKind>,
}

impl std::fmt::Debug for Containment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containment")
            .field("filters", &self.filters.is_some())
            .field("selftest", &self.selftest)
            .finish()
    }
}

/// What the filters must allow beyond the steady state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// `--dump-ram`: vCPU threads create their dump file when the partition stops.
    pub dump_ram: bool,
    /// A partition has `vsock_uds`: the device thread accepts programs' connections on it and
    /// connects to the programs' sockets (Unix sockets only).
    pub host_vsock: bool,
}

impl Containment {
    /// No filters: what `--seccomp off` and code without a VMM (tests) use.
    pub fn off() -> Self {
        Self { filters: None, selftest: None }
    }

    /// Compiles every filter and installs the SIGSYS handler (or, with [`Switch::Off`], warns
    /// that the threads run unfiltered). Call before any thread that is to be contained starts.
    pub fn prepare(
        switch: Switch,
        needs: Needs,
        selftest: Option<ThreadKind>,
    ) -> Result<Self, SeccompError> {
        if switch == Switch::Off {
            eprintln!(
                "keyhold: warning: --seccomp off: every thread runs without its seccomp filter \
                 (for debugging only; docs/SECURITY.md, Containment)"
            );
            return Ok(Self { filters: None, selftest });
        }
        filters_available().map_err(SeccompError::Unsupported)?;
        let filters = Filters {
            vcpu: compile(vcpu(needs))?,
            devices: compile(devices(needs))?,
            link_setup: compile(link_setup())?,
            api: compile(api())?,
            main: compile(main_thread())?,
            audit: compile(audit())?,
            starter: compile(starter(needs))?,
            membership: compile(membership())?,
        };
        install_sigsys_handler().map_err(SeccompError::Handler)?;
        Ok(Self { filters: Some(Arc::new(filters)), selftest })
    }

    /// Installs the filter of `kind` on the calling thread, for the rest of its life. A thread
    /// that cannot install its filter must not go on unfiltered: the process stops, with one
    /// line on stderr and status 1 (which [`Containment::prepare`]'s check of the kernel makes
    /// unlikely).
    pub fn install(&self, kind: ThreadKind) {
        if let Some(filters) = &self.filters {
            remember_thread_name(kind);
            let program = match kind {
                ThreadKind::Vcpu => &filters.vcpu,
                ThreadKind::Devices => &filters.devices,
                ThreadKind::LinkSetup => &filters.link_setup,
                ThreadKind::Api => &filters.api,
                ThreadKind::Main => &filters.main,
                ThreadKind::Audit => &filters.audit,
                ThreadKind::Starter => &filters.starter,
                ThreadKind::Membership => &filters.membership,
            };
            if let Err(e) = seccompiler::apply_filter(program) {
                let name = std::thread::current().name().unwrap_or("?").to_owned();
                eprintln!(
                    "keyhold: thread {name}: installing its seccomp filter failed: {e}; stopping \
                     (--seccomp off runs without filters)"
                );
                std::process::exit(1);
            }
        }
        if self.selftest == Some(kind) {
            selftest();
        }
    }

    /// A closure that installs the filter of `kind` on the thread that runs it, for thread
    /// starts outside this crate (the link set-up thread).
    pub fn for_thread(&self, kind: ThreadKind) -> impl FnOnce() + Send + 'static {
        let containment = self.clone();
        move || containment.install(kind)
    }
}

/// Whether the kernel runs seccomp filters whose refusals trap (SIGSYS): Linux 4.14 and later
/// with `CONFIG_SECCOMP_FILTER`.
fn filters_available() -> std::io::Result<()> {
    let action: u32 = libc::SECCOMP_RET_TRAP;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 it is pointed at, which lives for
    // the call.
    let ret = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0, &action as *const u32)
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The self-test: a system call no filter allows (opening the root directory), made just
/// after the filter went in. With the filters on the process stops with the report; with
/// them off the directory is opened and closed, and nothing happens.
fn selftest() {
    // SAFETY: openat with a NUL-terminated path and no other memory; the result is checked and
    // a descriptor it returns is closed at once.
    let fd = unsafe {
        libc::openat(
            libc::AT_FDCWD,
            c"/".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` was just opened here and nothing else knows it.
        unsafe { libc::close(fd) };
    }
}

// ----- the lists -----

/// A filter's rules: each allowed system call with the argument conditions under which it is
/// allowed (any of them), or with none (allowed whatever its arguments).
#[derive(Default)]
struct Rules {
    calls: BTreeMap<i64, Option<Vec<Vec<Condition>>>>,
}

/// Argument `index` (32 bits) compared as `op` with `value`.
#[derive(Clone)]
struct Condition {
    index: u8,
    op: SeccompCmpOp,
    value: u64,
}

/// Argument `index` equals `value`.
fn arg_is(index: u8, value: u64) -> Condition {
    Condition { index, op: SeccompCmpOp::Eq, value }
}

/// Argument `index` has none of the bits of `mask`.
fn arg_lacks(index: u8, mask: u64) -> Condition {
    Condition { index, op: SeccompCmpOp::MaskedEq(mask), value: 0 }
}

impl Rules {
    /// Allows `calls`, whatever their arguments.
    fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &call in calls {
            self.calls.insert(call, None);
        }
        self
    }

    /// Allows `call` when all of `conditions` hold (or under any earlier rule for it).
    fn allow_if(&mut self, call: libc::c_long, conditions: &[Condition]) -> &mut Self {
        match self.calls.entry(call) {
            Entry::Occupied(mut entry) => {
                if let Some(rules) = entry.get_mut() {
                    rules.push(conditions.to_vec());
                }
            }
            Entry::Vacant(entry) => {
                entry.insert(Some(vec![conditions.to_vec()]));
            }
        }
        self
    }

    /// Allows `call` when argument `index` is one of `values`.
    fn allow_if_arg_in(&mut self, call: libc::c_long, index: u8, values: &[u64]) -> &mut Self {
        for &value in values {
            self.allow_if(call, &[arg_is(index, value)]);
        }
        self
    }
}

/// What every thread needs, whatever it does: the C library's allocator and Rust's runtime
/// (memory, locks, clocks, a thread's end), writing a log line to stderr, closing what it
/// owns, and a panic's abort.
fn base() -> Rules {
    let mut rules = Rules::default();
    rules
        // Memory: malloc's arenas grow with mmap/mprotect and shrink with madvise/munmap, Vec
        // growth remaps; never executable memory.
        .allow(&[libc::SYS_brk, libc::SYS_munmap, libc::SYS_mremap, libc::SYS_madvise])
        .allow_if(libc::SYS_mmap, &[arg_lacks(2, libc::PROT_EXEC as u64)])
        .allow_if(libc::SYS_mprotect, &[arg_lacks(2, libc::PROT_EXEC as u64)])
        // Locks, condition variables, channels, joins; malloc counts CPUs for its arenas.
        .allow(&[libc::SYS_futex, libc::SYS_sched_yield, libc::SYS_sched_getaffinity])
        // Clocks (the vDSO falls back to these on some clock sources) and sleeps.
        .allow(&[
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_gettimeofday,
            libc::SYS_time,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
        ])
        // Log lines and reports on stderr (and this module's own report), closing descriptors
        // the thread owns; Rust's debug builds check a descriptor is open before closing it.
        .allow(&[libc::SYS_write, libc::SYS_writev, libc::SYS_close])
        .allow_if(libc::SYS_fcntl, &[arg_is(1, libc::F_GETFD as u64)])
        // The keys of Rust's hash maps, per thread; keys and nonces.
        .allow(&[libc::SYS_getrandom])
        // A thread's end: its signal stack goes, signals are blocked, its stack is released.
        .allow(&[
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
        ])
        // A panic's abort (release builds): raise SIGABRT at this thread, its default action
        // restored if need be; Rust's SIGSEGV/SIGBUS handler restores the default action of a
        // fault that is not a stack overflow, so that the fault ends the process.
        .allow(&[libc::SYS_getpid, libc::SYS_gettid])
        .allow_if(libc::SYS_tgkill, &[arg_is(2, libc::SIGABRT as u64)])
        .allow_if_arg_in(
            libc::SYS_rt_sigaction,
            0,
            &[libc::SIGABRT as u64, libc::SIGSEGV as u64, libc::SIGBUS as u64],
        );
    rules
}

/// Secret memory (`memfd_secret`, or locked anonymous memory where the kernel lacks it): the
/// key table, link buffers and handshake state grow on the threads that use them.
fn secret_memory(rules: &mut Rules) {
    rules.allow(&[libc::SYS_memfd_secret, libc::SYS_ftruncate, libc::SYS_mlock]);
}

/// Reading and writing sockets and eventfds the thread was handed, and their options.
fn sockets(rules: &mut Rules) {
    rules
        .allow(&[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ])
        // Non-blocking mode: std sets it with FIONBIO, socket2 with F_GETFL/F_SETFL.
        .allow_if(libc::SYS_ioctl, &[arg_is(1, libc::FIONBIO)])
        .allow_if_arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFL as u64, libc::F_SETFL as u64]);
}

/// An event loop over epoll.
fn event_loop(rules: &mut Rules) {
    rules.allow(&[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_ctl]);
}

/// The KVM ioctls a vCPU thread makes.
mod kvm {
    use kvm_bindings::{
        kvm_fpu, kvm_ioeventfd, kvm_irqfd, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

    // Building a VM (the starter).
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
}

/// A vCPU thread: the guest runs through `KVM_RUN`; its exits are port and MMIO accesses
/// (the console, the idle port's wait, the virtio transports), and the secure channel's
/// control and transmit queues served inline, which seal, send on link sockets and grow the
/// key table; at the stop, the registers for the report and KVM's exit counts.
fn vcpu(needs: Needs) -> Rules {
    let mut rules = base();
    rules.allow_if_arg_in(
        libc::SYS_ioctl,
        1,
        &[kvm::KVM_RUN(), kvm::KVM_GET_REGS(), kvm::KVM_GET_SREGS(), kvm::KVM_GET_STATS_FD()],
    );
    // KVM's statistics file (read at the stop); an eventfd or socket read.
    rules.allow(&[libc::SYS_pread64, libc::SYS_read]);
    // A message sent inline: the link's socket is written and, if that fails, shut down (the
    // device thread closes it); the link's sealing may rekey (snow, in secret memory).
    rules.allow(&[libc::SYS_sendto, libc::SYS_sendmsg, libc::SYS_shutdown]);
    secret_memory(&mut rules);
    if needs.host_vsock {
        // A vsock packet for a program on the node, served inline, may read from its socket.
        rules.allow(&[libc::SYS_recvfrom]);
    }
    if needs.dump_ram {
        // `--dump-ram`: the RAM file is created as the partition stops (File::create).
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
        rules.allow_if(libc::SYS_openat, &[arg_is(2, flags as u64)]);
    }
    rules
}

/// The device thread: one epoll loop over queue eventfds, the link timer, link sockets and
/// the set-up thread's hand-overs; links are adopted (socket options), read, written, shut
/// down and closed here; the key table and link buffers grow in secret memory.
fn devices(needs: Needs) -> Rules {
    let mut rules = base();
    if needs.host_vsock {
        // CID 2: programs on the node, through Unix sockets only.
        rules
            .allow(&[libc::SYS_accept4, libc::SYS_connect])
            .allow_if(libc::SYS_socket, &[arg_is(0, libc::AF_UNIX as u64)]);
    }
    event_loop(&mut rules);
    sockets(&mut rules);
    secret_memory(&mut rules);
    rules.allow(&[
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_eventfd2,
    ]);
    rules
}

/// The link set-up thread: accepts and dials (TCP over IPv4 or IPv6 only), runs handshakes
/// in secret memory, hands links to the device thread through an eventfd.
fn link_setup() -> Rules {
    let mut rules = base();
    event_loop(&mut rules);
    sockets(&mut rules);
    secret_memory(&mut rules);
    rules.allow(&[libc::SYS_accept4, libc::SYS_connect]).allow_if_arg_in(
        libc::SYS_socket,
        0,
        &[libc::AF_INET as u64, libc::AF_INET6 as u64],
    );
    rules
}

/// The membership threads (etcd, docs/OPERATOR.md): HTTP to etcd's endpoints over TCP (a
/// connect with a timeout polls), a name in an endpoint looked up as the C library does
/// (its files read-only, the resolver over UDP), and a thread started for each watch, which
/// installs this same filter.
fn membership() -> Rules {
    let mut rules = base();
    sockets(&mut rules);
    let read_only = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    rules
        .allow(&[
            libc::SYS_connect,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
        ])
        .allow_if(libc::SYS_openat, &[arg_is(2, read_only)])
        .allow_if_arg_in(
            libc::SYS_socket,
            0,
            &[libc::AF_INET as u64, libc::AF_INET6 as u64, libc::AF_UNIX as u64],
        );
    thread_start(&mut rules);
    rules
}

/// Starting a thread that installs its own filter: `clone3`, the new thread's robust futex
/// list, restartable sequences and name, and its filter (`no_new_privs` first).
fn thread_start(rules: &mut Rules) {
    rules
        .allow(&[libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq, libc::SYS_seccomp])
        .allow_if_arg_in(
            libc::SYS_prctl,
            0,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        );
}

/// The control API: accepts on its Unix socket, one bounded request and answer at a time, and
/// asks the device thread through a channel and an eventfd.
fn api() -> Rules {
    let mut rules = base();
    sockets(&mut rules);
    // Waiting for a client (or the stop eventfd) on the Unix socket and the metrics address.
    rules.allow(&[libc::SYS_accept4, libc::SYS_poll, libc::SYS_ppoll]);
    rules
}

/// The main thread once every other thread has started: the supervisor's epoll loop over the
/// vCPUs' stop eventfds, the timeout timer and the shutdown signalfd; stop reports on stderr;
/// kicking vCPUs; joining every thread; reading the cluster file again on a reload (opened
/// read-only, as `fs::read_to_string` opens it); removing the API socket at the end, once
/// its metadata shows it is still the socket this node made.
fn main_thread() -> Rules {
    let mut rules = base();
    event_loop(&mut rules);
    let read_only = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    rules
        .allow(&[
            libc::SYS_read,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
        ])
        .allow_if(libc::SYS_openat, &[arg_is(2, read_only)])
        .allow_if(libc::SYS_tgkill, &[arg_is(2, crate::kick::kick_signal() as u64)]);
    rules
}

/// The starter: what a vCPU thread may do (the vCPU threads it starts inherit this filter,
/// and the kernel runs both), and building a partition as the boot does: the KVM ioctls of a
/// new VM, guest RAM (anonymous memory, as any allocation), the firmware opened read-only and
/// read, the host's memory size (`sysinfo`), eventfds and a timerfd for the devices; then a
/// thread start (`clone3`, the new thread's robust futex list, restartable sequences and
/// name) and that thread's own filter (`prctl` for no-new-privileges, `seccomp`).
fn starter(needs: Needs) -> Rules {
    let mut rules = vcpu(needs);
    rules.allow_if_arg_in(
        libc::SYS_ioctl,
        1,
        &[
            kvm::KVM_CREATE_VM(),
            kvm::KVM_CHECK_EXTENSION(),
            kvm::KVM_GET_VCPU_MMAP_SIZE(),
            kvm::KVM_CREATE_VCPU(),
            kvm::KVM_SET_USER_MEMORY_REGION(),
            kvm::KVM_CREATE_IRQCHIP(),
            kvm::KVM_IRQFD(),
            kvm::KVM_IOEVENTFD(),
            kvm::KVM_SET_REGS(),
            kvm::KVM_SET_SREGS(),
            kvm::KVM_SET_FPU(),
            kvm::KVM_GET_TSC_KHZ(),
        ],
    );
    let read_only = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    rules
        .allow_if(libc::SYS_openat, &[arg_is(2, read_only)])
        .allow(&[
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_lseek,
            libc::SYS_sysinfo,
            libc::SYS_eventfd2,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
        ])
        // The new vCPU thread's stop eventfd is cloned (dup) for the supervisor; the devices'
        // timerfds are made non-blocking.
        .allow_if_arg_in(
            libc::SYS_fcntl,
            1,
            &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFL as u64, libc::F_SETFL as u64],
        );
    thread_start(&mut rules);
    rules
}

/// The audit writer: writes records to its file (or stderr) and, past the file's size limit,
/// renames the old files, removes the oldest and creates the new one, which it opens only
/// for appending (as `OpenOptions::new().create(true).append(true)` does).
fn audit() -> Rules {
    let mut rules = base();
    let append = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC;
    rules
        .allow(&[
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
        ])
        .allow_if(libc::SYS_openat, &[arg_is(2, append as u64)]);
    rules
}

/// Compiles `rules` into a program that allows them and traps everything else.
fn compile(rules: Rules) -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let mut map = BTreeMap::new();
    for (call, conditions) in rules.calls {
        let mut chain = Vec::new();
        for all in conditions.unwrap_or_default() {
            let conditions = all
                .into_iter()
                .map(|c| SeccompCondition::new(c.index, SeccompCmpArgLen::Dword, c.op, c.value))
                .collect::<Result<Vec<_>, _>>()
                .map_err(build)?;
            chain.push(SeccompRule::new(conditions).map_err(build)?);
        }
        map.insert(call, chain);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter =
        SeccompFilter::new(map, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

// ----- the report -----

thread_local! {
    /// The calling thread's name, NUL-padded, for the SIGSYS handler (which may not allocate or
    /// lock, so reads only this).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Records the calling thread's name for the report (the kind's name if it has none).
fn remember_thread_name(kind: ThreadKind) {
    let current = std::thread::current();
    let fallback = match kind {
        ThreadKind::Vcpu => "vcpu",
        ThreadKind::Devices => "devices",
        ThreadKind::LinkSetup => "link-setup",
        ThreadKind::Api => "api",
        ThreadKind::Main => "main",
        ThreadKind::Audit => "audit",
        ThreadKind::Starter => "starter",
        ThreadKind::Membership => "membership",
    };
    let name = current.name().unwrap_or(fallback).as_bytes();
    let mut padded = [0u8; 16];
    let n = name.len().min(padded.len() - 1);
    padded[..n].copy_from_slice(&name[..n]);
    THREAD_NAME.with(|cell| cell.set(padded));
}

/// `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: c_int = 1;

/// The start of `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in the union).
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

/// Makes [`on_sigsys`] the process's SIGSYS handler, every other signal blocked while it runs.
fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigfillset initialises the mask it is given, which is valid for writes.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    // SAFETY: `action` is a valid, initialised sigaction whose handler has the SA_SIGINFO
    // signature; the previous action is not wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The SIGSYS handler: one line on stderr, then the process ends with
/// [`STATUS_BAD_SYSCALL`]. It runs under the trapping thread's filter, so it uses only
/// `write` and `exit_group`, which every filter allows; it neither allocates nor locks.
extern "C" fn on_sigsys(_: c_int, info: *mut siginfo_t, _: *mut c_void) {
    let (code, syscall) = if info.is_null() {
        (0, -1)
    } else {
        // SAFETY: the kernel passes a valid siginfo; for SIGSYS its union holds `_sigsys`,
        // whose layout `SigsysInfo` repeats, and the whole struct lies within `siginfo_t`.
        let sys = unsafe { &*(info as *const SigsysInfo) };
        (sys.code, sys.syscall)
    };
    let name = THREAD_NAME.with(Cell::get);
    let mut line = Line::default();
    report(&mut line, &name, code, syscall);
    let mut rest = line.bytes();
    while !rest.is_empty() {
        // SAFETY: writes `rest`, valid for reads of its length, to stderr.
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            break;
        }
        rest = rest.get(n as usize..).unwrap_or_default();
    }
    // SAFETY: _exit ends the process at once, without running anything that could lock.
    unsafe { libc::_exit(c_int::from(STATUS_BAD_SYSCALL)) };
}

/// Writes the report of a trapped system call (or of a SIGSYS from elsewhere) into `line`.
fn report(line: &mut Line, thread: &[u8; 16], code: c_int, syscall: c_int) {
    line.push(b"keyhold: thread ");
    let len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    line.push(if len == 0 { b"?" } else { thread.get(..len).unwrap_or_default() });
    if code != SYS_SECCOMP {
        line.push(b" received a SIGSYS that no seccomp filter sent; stopping\n");
        return;
    }
    line.push(b" made system call ");
    match syscall_name(syscall) {
        Some(name) => {
            line.push(name.as_bytes());
            line.push(b" (");
            line.number(syscall);
            line.push(b")");
        }
        None => line.number(syscall),
    }
    line.push(b", which its seccomp filter does not allow; stopping\n");
}

/// A line built without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self { buf: [0; 192], len: 0 }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, n: c_int) {
        if n < 0 {
            self.push(b"-");
        }
        let mut n = n.unsigned_abs();
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push(digits.get(i..).unwrap_or_default());
    }

    fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// The name of system call `nr` on this architecture, if it has one here.
fn syscall_name(nr: c_int) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let name = *SYSCALL_NAMES.get(usize::try_from(nr).ok()?)?;
        (!name.is_empty()).then_some(name)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = nr;
        None
    }
}

/// x86-64 system call names by number (`asm/unistd_64.h`, to Linux 6.10's `mseal`).
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const SYSCALL_NAMES: [&str; 463] = [
    "read", "write", "open", "close", "stat", "fstat", "lstat", "poll", "lseek", "mmap",
    "mprotect", "munmap", "brk", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "ioctl",
    "pread64", "pwrite64", "readv", "writev", "access", "pipe", "select", "sched_yield", "mremap",
    "msync", "mincore", "madvise", "shmget", "shmat", "shmctl", "dup", "dup2", "pause",
    "nanosleep", "getitimer", "alarm", "setitimer", "getpid", "sendfile", "socket", "connect",
    "accept", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "bind", "listen",
    "getsockname", "getpeername", "socketpair", "setsockopt", "getsockopt", "clone", "fork",
    "vfork", "execve", "exit", "wait4", "kill", "uname", "semget", "semop", "semctl", "shmdt",
    "msgget", "msgsnd", "msgrcv", "msgctl", "fcntl", "flock", "fsync", "fdatasync", "truncate",
    "ftruncate", "getdents", "getcwd", "chdir", "fchdir", "rename", "mkdir", "rmdir", "creat",
    "link", "unlink", "symlink", "readlink", "chmod", "fchmod", "chown", "fchown", "lchown",
    "umask", "gettimeofday", "getrlimit", "getrusage", "sysinfo", "times", "ptrace", "getuid",
    "syslog", "getgid", "setuid", "setgid", "geteuid", "getegid", "setpgid", "getppid", "getpgrp",
    "setsid", "setreuid", "setregid", "getgroups", "setgroups", "setresuid", "getresuid",
    "setresgid", "getresgid", "getpgid", "setfsuid", "setfsgid", "getsid", "capget", "capset",
    "rt_sigpending", "rt_sigtimedwait", "rt_sigqueueinfo", "rt_sigsuspend", "sigaltstack", "utime",
    "mknod", "uselib", "personality", "ustat", "statfs", "fstatfs", "sysfs", "getpriority",
    "setpriority", "sched_setparam", "sched_getparam", "sched_setscheduler", "sched_getscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "mlock",
    "munlock", "mlockall", "munlockall", "vhangup", "modify_ldt", "pivot_root", "_sysctl", "prctl",
    "arch_prctl", "adjtimex", "setrlimit", "chroot", "sync", "acct", "settimeofday", "mount",
    "umount2", "swapon", "swapoff", "reboot", "sethostname", "setdomainname", "iopl", "ioperm",
    "create_module", "init_module", "delete_module", "get_kernel_syms", "query_module", "quotactl",
    "nfsservctl", "getpmsg", "putpmsg", "afs_syscall", "tuxcall", "security", "gettid",
    "readahead", "setxattr", "lsetxattr", "fsetxattr", "getxattr", "lgetxattr", "fgetxattr",
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr",
    "tkill", "time", "futex", "sched_setaffinity", "sched_getaffinity", "set_thread_area",
    "io_setup", "io_destroy", "io_getevents", "io_submit", "io_cancel", "get_thread_area",
    "lookup_dcookie", "epoll_create", "epoll_ctl_old", "epoll_wait_old", "remap_file_pages",
    "getdents64", "set_tid_address", "restart_syscall", "semtimedop", "fadvise64", "timer_create",
    "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete", "clock_settime",
    "clock_gettime", "clock_getres", "clock_nanosleep", "exit_group", "epoll_wait", "epoll_ctl",
    "tgkill", "utimes", "vserver", "mbind", "set_mempolicy", "get_mempolicy", "mq_open",
    "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr", "kexec_load",
    "waitid", "add_key", "request_key", "keyctl", "ioprio_set", "ioprio_get", "inotify_init",
    "inotify_add_watch", "inotify_rm_watch", "migrate_pages", "openat", "mkdirat", "mknodat",
    "fchownat", "futimesat", "newfstatat", "unlinkat", "renameat", "linkat", "symlinkat",
    "readlinkat", "fchmodat", "faccessat", "pselect6", "ppoll", "unshare", "set_robust_list",
    "get_robust_list", "splice", "tee", "sync_file_range", "vmsplice", "move_pages", "utimensat",
    "epoll_pwait", "signalfd", "timerfd_create", "eventfd", "fallocate", "timerfd_settime",
    "timerfd_gettime", "accept4", "signalfd4", "eventfd2", "epoll_create1", "dup3", "pipe2",
    "inotify_init1", "preadv", "pwritev", "rt_tgsigqueueinfo", "perf_event_open", "recvmmsg",
    "fanotify_init", "fanotify_mark", "prlimit64", "name_to_handle_at", "open_by_handle_at",
    "clock_adjtime", "syncfs", "sendmmsg", "setns", "getcpu", "process_vm_readv",
    "process_vm_writev", "kcmp", "finit_module", "sched_setattr", "sched_getattr", "renameat2",
    "seccomp", "getrandom", "memfd_create", "kexec_file_load", "bpf", "execveat", "userfaultfd",
    "membarrier", "mlock2", "copy_file_range", "preadv2", "pwritev2", "pkey_mprotect",
    "pkey_alloc", "pkey_free", "statx", "io_pgetevents", "rseq", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "pidfd_send_signal", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "pidfd_open", "clone3", "close_range", "openat2", "pidfd_getfd", "faccessat2",
    "process_madvise", "epoll_pwait2", "mount_setattr", "quotactl_fd", "landlock_create_ruleset",
    "landlock_add_rule", "landlock_restrict_self", "memfd_secret", "process_mrelease",
    "futex_waitv", "set_mempolicy_home_node", "cachestat", "fchmodat2", "map_shadow_stack",
    "futex_wake", "futex_wait", "futex_requeue", "statmount", "listmount", "lsm_get_self_attr",
    "lsm_set_self_attr", "lsm_list_modules", "mseal",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_runs_trapping_filters() {
        filters_available().unwrap();
    }

    #[test]
    fn every_filter_compiles() {
        for needs in [Needs::default(), Needs { dump_ram: true, host_vsock: true }] {
            compile(vcpu(needs)).unwrap();
            compile(devices(needs)).unwrap();
            compile(starter(needs)).unwrap();
        }
        for rules in [link_setup(), api(), main_thread()] {
            compile(rules).unwrap();
        }
    }

    #[test]
    fn the_kvm_ioctls_are_the_kernels() {
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(kvm::KVM_GET_STATS_FD(), 0xaece);
        assert_eq!(kvm::KVM_CREATE_VM(), 0xae01);
        assert_eq!(kvm::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(kvm::KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(kvm::KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(kvm::KVM_SET_REGS(), 0x4090_ae82);
        assert_eq!(kvm::KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(kvm::KVM_SET_FPU(), 0x41a0_ae8d);
    }

    #[test]
    fn syscall_names_match_their_numbers() {
        for (nr, name) in [
            (libc::SYS_read, "read"),
            (libc::SYS_ioctl, "ioctl"),
            (libc::SYS_openat, "openat"),
            (libc::SYS_execve, "execve"),
            (libc::SYS_ptrace, "ptrace"),
            (libc::SYS_memfd_secret, "memfd_secret"),
            (libc::SYS_fchmodat2, "fchmodat2"),
            (libc::SYS_mseal, "mseal"),
        ] {
            assert_eq!(syscall_name(nr as c_int), Some(name));
        }
        assert_eq!(syscall_name(400), None, "a gap in the table");
        assert_eq!(syscall_name(100_000), None);
        assert_eq!(syscall_name(-1), None);
    }

    fn line(thread: &str, code: c_int, syscall: c_int) -> String {
        let mut name = [0u8; 16];
        name[..thread.len()].copy_from_slice(thread.as_bytes());
        let mut line = Line::default();
        report(&mut line, &name, code, syscall);
        String::from_utf8(line.bytes().to_vec()).unwrap()
    }

    #[test]
    fn the_report_names_thread_and_call() {
        assert_eq!(
            line("p12-vcpu", SYS_SECCOMP, 257),
            "keyhold: thread p12-vcpu made system call openat (257), which its seccomp filter \
             does not allow; stopping\n"
        );
        assert_eq!(
            line("devices", SYS_SECCOMP, 1_073_741_824),
            "keyhold: thread devices made system call 1073741824, which its seccomp filter does \
             not allow; stopping\n"
        );
        assert_eq!(
            line("", 0, 0),
            "keyhold: thread ? received a SIGSYS that no seccomp filter sent; stopping\n"
        );
        let long = line("a-very-long-nam", SYS_SECCOMP, i32::MIN);
        assert!(long.ends_with(
            "system call -2147483648, which its seccomp filter does not allow; stopping\n"
        ));
    }

    /// A child process installs the main thread's filter and makes a call it denies: the
    /// handler reports it on stderr and the child ends with `STATUS_BAD_SYSCALL`.
    #[test]
    fn a_denied_call_is_reported_and_ends_the_process() {
        let program = compile(main_thread()).unwrap();
        install_sigsys_handler().unwrap();
        remember_thread_name(ThreadKind::Main);
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes system calls (no allocation, no lock) until it ends.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain descriptor calls in the child.
            unsafe { libc::dup2(pipe[1], libc::STDERR_FILENO) };
            if seccompiler::apply_filter(&program).is_ok() {
                // Allowed: a write, a clock.
                // SAFETY: an empty write.
                unsafe { libc::write(pipe[1], [].as_ptr(), 0) };
                selftest();
            }
            // SAFETY: ends the child (reached only if the filter did not stop it).
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copy of the write end; the child holds its own.
        unsafe { libc::close(pipe[1]) };
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut out = vec![0u8; 512];
        // SAFETY: reads into `out`, valid for its length.
        let n = unsafe { libc::read(pipe[0], out.as_mut_ptr().cast(), out.len()) };
        // SAFETY: closing the read end.
        unsafe { libc::close(pipe[0]) };
        let text = String::from_utf8_lossy(&out[..n.max(0) as usize]).into_owned();
        assert!(libc::WIFEXITED(status), "status {status:#x}, stderr {text:?}");
        assert_eq!(libc::WEXITSTATUS(status), i32::from(STATUS_BAD_SYSCALL), "{text:?}");
        let name = std::thread::current().name().unwrap_or("main").to_owned();
        let name = &name[..name.len().min(15)];
        assert_eq!(
            text,
            format!(
                "keyhold: thread {name} made system call openat (257), which its seccomp filter \
                 does not allow; stopping\n"
            )
        );
    }
}
