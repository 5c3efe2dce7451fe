//! The control API: HTTP/1.1 with JSON bodies (and Prometheus metrics) on a Unix socket,
//! usable with `curl --unix-socket`, one connection at a time, each request bounded.
//! docs/API.md lists the routes. Nothing it returns ever holds a key.
//!
//! [`http`] reads requests and writes answers, [`routes`] decides them, [`metrics`] renders
//! the Prometheus exposition; this module owns the socket.

mod http;
mod metrics;
mod routes;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keyhold_devices::cmm::audit::Audit;
use keyhold_devices::cmm::query::QueryHandle;
use keyhold_devices::link::LinkBook;
use vmm_sys_util::eventfd::EventFd;

use crate::claimed_socket::ClaimedSocket;
use crate::partition_devices::DeviceView;
use crate::requests::Requests;
use crate::seccomp::{Containment, ThreadKind};

/// A partition as the API shows it.
#[derive(Debug, Clone)]
pub struct PartitionState {
    /// Its ID.
    pub id: u32,
    /// Its firmware.
    pub firmware: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// `None` while running; the stop report once stopped.
    pub stopped: Option<(u8, String)>,
    /// Its devices.
    pub devices: Vec<DeviceView>,
}

/// What the API reads.
pub struct ApiState {
    /// This node.
    pub node: u32,
    /// The partitions, updated as they stop.
    pub partitions: Mutex<Vec<PartitionState>>,
    /// Questions for the CMM.
    pub queries: QueryHandle,
    /// The host links, if any.
    pub links: Option<Arc<LinkBook>>,
    /// Where the node stands with etcd, if its members come from there.
    pub membership: Option<Arc<Mutex<crate::membership::MembershipStatus>>>,
    /// The audit log's recent records.
    pub audit: Audit,
    /// Where the operator's stops, starts and reloads go (`None`: the API only reads).
    pub requests: Option<Requests>,
}

/// The running API server; dropping it stops it, then removes its socket.
pub struct ApiServer {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    _socket: Option<ClaimedSocket>,
}

/// What a connection may ask: everything on the control socket, only the metrics on TCP
/// (whoever reaches that address may read counters, never act).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every route (the Unix socket, guarded by its file mode).
    Control,
    /// `GET /metrics` only (the TCP address).
    MetricsOnly,
}

impl ApiServer {
    /// Serves `state` on the control `socket` and, if given, `GET /metrics` on `metrics`
    /// (TCP); `None` if there is neither. The thread installs its seccomp filter from
    /// `containment` before it accepts anything, and sleeps in `poll` until a client comes.
    pub fn start(
        socket: Option<ClaimedSocket>,
        metrics: Option<TcpListener>,
        state: Arc<ApiState>,
        containment: &Containment,
    ) -> std::io::Result<Option<Self>> {
        if socket.is_none() && metrics.is_none() {
            return Ok(None);
        }
        let control = socket.as_ref().map(|s| s.listener().try_clone()).transpose()?;
        // Non-blocking, so that a client gone between poll and accept cannot hang the thread
        // (the streams accepted are blocking, with timeouts).
        if let Some(listener) = &control {
            listener.set_nonblocking(true)?;
        }
        if let Some(listener) = &metrics {
            listener.set_nonblocking(true)?;
        }
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let listeners = Listeners { stop: stop.clone(), control, metrics };
        let containment = containment.clone();
        let thread = std::thread::Builder::new().name("api".into()).spawn(move || {
            containment.install(ThreadKind::Api);
            listeners.serve(&state);
        })?;
        Ok(Some(Self { stop, thread: Some(thread), _socket: socket }))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("stopping the control API: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the API thread waits on.
struct Listeners {
    stop: Arc<EventFd>,
    control: Option<UnixListener>,
    metrics: Option<TcpListener>,
}

impl Listeners {
    /// Answers one client at a time until the stop eventfd is written.
    fn serve(&self, state: &ApiState) {
        let fd = |l: Option<std::os::fd::RawFd>| libc::pollfd {
            fd: l.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let mut fds = [
                fd(Some(self.stop.as_raw_fd())),
                fd(self.control.as_ref().map(AsRawFd::as_raw_fd)),
                fd(self.metrics.as_ref().map(AsRawFd::as_raw_fd)),
            ];
            // SAFETY: `fds` is a valid array of pollfd for its whole length; poll only writes
            // their `revents`. A negative fd is ignored by the kernel.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("control API: poll: {e}");
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents != 0 {
                if let Some(Ok((stream, _))) = self.control.as_ref().map(UnixListener::accept) {
                    serve(state, stream, Scope::Control);
                }
            }
            if fds[2].revents != 0 {
                if let Some(Ok((stream, _))) = self.metrics.as_ref().map(TcpListener::accept) {
                    serve(state, stream, Scope::MetricsOnly);
                }
            }
        }
    }
}

/// How long one client may take to send its request, and to take the answer: the API serves
/// one connection at a time, so a slow client must not hold it (or the node's shutdown).
const CLIENT_TIME: Duration = Duration::from_secs(2);

/// A connection to the API: a Unix or a TCP stream.
trait Client: Read + Write {
    fn set_read_timeout(&self, limit: Option<Duration>) -> std::io::Result<()>;
    fn set_write_timeout(&self, limit: Option<Duration>) -> std::io::Result<()>;
}

impl Client for UnixStream {
    fn set_read_timeout(&self, limit: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, limit)
    }
    fn set_write_timeout(&self, limit: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, limit)
    }
}

impl Client for TcpStream {
    fn set_read_timeout(&self, limit: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, limit)
    }
    fn set_write_timeout(&self, limit: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_write_timeout(self, limit)
    }
}

/// One request, one response, then the connection closes.
fn serve<S: Client>(state: &ApiState, stream: S, scope: Scope) {
    let _ = stream.set_write_timeout(Some(CLIENT_TIME));
    let mut client = Deadline { stream, at: Instant::now() + CLIENT_TIME };
    let (response, head_only) = match http::read_request(&mut client) {
        Ok(request) => (routes::answer(state, &request, scope), request.method == "HEAD"),
        Err(refusal) => (refusal, false),
    };
    let _ = if head_only {
        response.write_head(&mut client.stream)
    } else {
        response.write_to(&mut client.stream)
    };
}

/// A stream whose reads, together, end at `at`: each read may wait only for what is left.
struct Deadline<S> {
    stream: S,
    at: Instant,
}

impl<S: Client> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// `keyhold ctl`'s side of the API.
pub use http::request;
