//! A Unix socket a node listens on and owns (the control API's, a partition's `vsock_uds`): it
//! is not taken from a node that still serves there, and only this node's own socket file is
//! ever removed.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A listening Unix socket bound and owned by this node; dropping it removes the socket file,
/// but only while the file at the path is still this socket.
pub struct ClaimedSocket {
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

impl ClaimedSocket {
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

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn in_use() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "a running node serves there; give each node its own api_socket and vsock_uds paths",
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

impl Drop for ClaimedSocket {
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
