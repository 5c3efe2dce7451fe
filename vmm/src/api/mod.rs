//! The control API: HTTP/1.1 with JSON bodies (and Prometheus metrics) on a Unix socket,
//! usable with `curl --unix-socket`, one connection at a time, each request bounded.
//! docs/API.md lists the routes. Nothing it returns ever holds a key.
//!
//! [`http`] reads requests and writes answers, [`routes`] decides them, [`metrics`] renders
//! the Prometheus exposition; this module owns the socket.

mod http;
mod metrics;
mod routes;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keyhold_devices::cmm::audit::Audit;
use keyhold_devices::cmm::query::QueryHandle;
use keyhold_devices::link::LinkBook;

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
    /// The audit log's recent records.
    pub audit: Audit,
    /// Where the operator's stops, starts and reloads go (`None`: the API only reads).
    pub requests: Option<Requests>,
}

/// The API's socket, bound and owned by this node; dropping it removes the socket file, but
/// only while the file at the path is still this socket.
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file it bound.
    file: (u64, u64),
    /// `PATH.lock`, locked for as long as the node runs: two nodes starting on one path at
    /// once cannot both take it.
    _lock: std::fs::File,
}

/// Who may use the socket: the node's user and group (the systemd unit's `Group=`).
const SOCKET_MODE: u32 = 0o660;

impl ApiSocket {
    /// Binds `path`. Refuses a path another node holds (its lock is taken, or a node answers
    /// there) and any file there that is not a socket; a socket that refuses connections is
    /// left over from a node that died, and is replaced.
    pub fn claim(path: &Path) -> std::io::Result<Self> {
        let lock = lock_beside(path)?;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(m) if !m.file_type().is_socket() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is there; keyhold leaves it alone",
                ));
            }
            Ok(_) => match UnixStream::connect(path) {
                // Only a refused connection proves nobody listens; any other error (no
                // permission, for one) says nothing about the node that may be there.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?
                }
                Err(e) => return Err(e),
                Ok(_) => return Err(in_use()),
            },
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        let file = file_id(path)?;
        Ok(Self { listener, path: path.to_owned(), file, _lock: lock })
    }
}

fn in_use() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "a running node serves its API there; give each node its own api_socket",
    )
}

/// Opens and locks `PATH.lock` (flock, released when the process ends however it ends).
fn lock_beside(path: &Path) -> std::io::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&name)?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock { in_use() } else { e });
    }
    Ok(file)
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // Another node may have replaced a socket it found dead: that one is not ours.
        if file_id(&self.path).is_ok_and(|id| id == self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The running API server; dropping it stops it, then removes its socket.
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _socket: ApiSocket,
}

impl ApiServer {
    /// Serves `state` on `socket`; the thread installs its seccomp filter from `containment`
    /// before it accepts anything.
    pub fn start(
        socket: ApiSocket,
        state: Arc<ApiState>,
        containment: &Containment,
    ) -> std::io::Result<Self> {
        let listener = socket.listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let containment = containment.clone();
        let thread = std::thread::Builder::new().name("api".into()).spawn(move || {
            containment.install(ThreadKind::Api);
            while !flag.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => serve(&state, stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => log::warn!("control API: {e}"),
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread), _socket: socket })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long one client may take to send its request, and to take the answer: the API serves
/// one connection at a time, so a slow client must not hold it (or the node's shutdown).
const CLIENT_TIME: Duration = Duration::from_secs(2);

/// One request, one response, then the connection closes.
fn serve(state: &ApiState, stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(CLIENT_TIME));
    let mut client = Deadline { stream, at: Instant::now() + CLIENT_TIME };
    let (response, head_only) = match http::read_request(&mut client) {
        Ok(request) => (routes::answer(state, &request), request.method == "HEAD"),
        Err(refusal) => (refusal, false),
    };
    let _ = if head_only {
        response.write_head(&mut client.stream)
    } else {
        response.write_to(&mut client.stream)
    };
}

/// A stream whose reads, together, end at `at`: each read may wait only for what is left.
struct Deadline {
    stream: UnixStream,
    at: Instant,
}

impl Read for Deadline {
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
