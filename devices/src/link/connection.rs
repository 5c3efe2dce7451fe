//! One authenticated link's sending side: frames are sealed (Noise) by whoever sends them and
//! written at once if the socket takes them without waiting; what it does not take is queued
//! as ciphertext for the link's own writer thread, which may wait.
//!
//! So the device thread never waits on a peer, and an idle link costs no thread hand-over. A peer that reads too slowly shows as a queue
//! that grows: past its backlog the link is ended (`send_backlog`), like an inbox overrun on
//! the receiving side. A peer that reads nothing for [`super::manager::DEAD_AFTER`] ends it
//! through the socket's send timeout (`send_timeout`). Only ciphertext waits in the queue: an
//! OFFER's key is wiped from the encoding buffer as soon as it is sealed.

use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use snow::TransportState;

use super::wire::{self, Frame, MAX_MESSAGE};
use crate::bus::lock;

/// One authenticated link.
pub(super) struct Conn {
    /// Tells this link from an earlier or later one to the same peer.
    pub(super) id: u64,
    /// The Noise transport: sealing and opening both advance it.
    pub(super) transport: Mutex<TransportState>,
    /// Encoding buffers, reused; sealing and queueing happen under this lock, so the order in
    /// the queue (and on the wire) is the order of the Noise nonces.
    sealer: Mutex<Sealer>,
    /// Held by whoever writes to the socket; bytes are taken from `outgoing` only under it,
    /// so a direct write can never overtake bytes the writer thread has taken.
    wire: Mutex<()>,
    /// Sealed messages waiting for the writer thread.
    outgoing: Mutex<Vec<u8>>,
    /// Signalled when `outgoing` gains bytes.
    ready: Condvar,
    /// Most bytes `outgoing` may hold.
    backlog: usize,
    /// The socket, to shut down without waiting for anyone.
    socket: TcpStream,
    /// Why this side ended the link, when it did (the reader then only sees the socket close).
    ended: Mutex<Option<&'static str>>,
}

#[derive(Default)]
struct Sealer {
    /// The encoded frame (wiped after each frame: an offer carries a key).
    frame: Vec<u8>,
    /// Length-prefixed Noise messages sealed so far.
    sealed: Vec<u8>,
}

impl Conn {
    /// A link over `socket` (a clone of the stream its reader and writer use).
    pub(super) fn new(
        id: u64,
        transport: TransportState,
        socket: TcpStream,
        backlog: usize,
    ) -> Self {
        Self {
            id,
            transport: Mutex::new(transport),
            sealer: Mutex::default(),
            wire: Mutex::new(()),
            outgoing: Mutex::default(),
            ready: Condvar::new(),
            backlog,
            socket,
            ended: Mutex::new(None),
        }
    }

    /// Seals and queues `frame`; on failure returns why the link must end.
    pub(super) fn send(&self, frame: &Frame) -> Result<(), &'static str> {
        self.send_all([frame])
    }

    /// Seals `frames` in order and writes them, or what of them the socket does not take
    /// without waiting is queued for the writer thread; on failure returns why the link must
    /// end.
    pub(super) fn send_all<'f>(
        &self,
        frames: impl IntoIterator<Item = &'f Frame>,
    ) -> Result<(), &'static str> {
        let mut sealer = lock(&self.sealer);
        let Sealer { frame: bytes, sealed } = &mut *sealer;
        sealed.clear();
        for frame in frames {
            frame.encode(bytes);
            let result = wire::chunks(bytes, |plain| self.seal(plain, sealed));
            zeroize::Zeroize::zeroize(bytes);
            result.map_err(|_| "send_failed")?;
        }
        // The writer thread holds `wire` only while it writes: then it is busy, and this
        // sender queues behind it rather than wait.
        let wire = self.wire.try_lock().ok();
        let mut outgoing = lock(&self.outgoing);
        let mut rest: &[u8] = sealed;
        if wire.is_some() && outgoing.is_empty() {
            rest = &rest[self.write_now(rest)?..];
        }
        if rest.is_empty() {
            return Ok(());
        }
        if outgoing.len() + rest.len() > self.backlog {
            return Err("send_backlog");
        }
        outgoing.extend_from_slice(rest);
        self.ready.notify_one();
        Ok(())
    }

    /// Writes what the socket takes of `bytes` without waiting; returns how much that was.
    fn write_now(&self, bytes: &[u8]) -> Result<usize, &'static str> {
        // SAFETY: `bytes` is valid for reads of its length; the socket is open for as long as
        // `self` is. MSG_NOSIGNAL: a closed peer is an error here, not a SIGPIPE.
        let n = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err("send_failed"),
            },
        }
    }

    /// Appends one length-prefixed transport message carrying `plain` to `sealed`.
    fn seal(&self, plain: &[u8], sealed: &mut Vec<u8>) -> io::Result<()> {
        let start = sealed.len();
        sealed.resize(start + 2 + MAX_MESSAGE, 0);
        let n = lock(&self.transport)
            .write_message(plain, &mut sealed[start + 2..])
            .map_err(|e| io::Error::other(e.to_string()))?;
        // Noise messages are at most MAX_MESSAGE (65,535) bytes, so the length fits.
        sealed[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
        sealed.truncate(start + 2 + n);
        Ok(())
    }

    /// Bytes queued for the writer thread.
    pub(super) fn queued(&self) -> usize {
        lock(&self.outgoing).len()
    }

    /// Waits up to `wait` for something to be queued; then writes all that is queued to
    /// `stream` (`out` is its buffer), waiting as long as the socket's send timeout allows. On
    /// failure ends the link and returns false.
    pub(super) fn write_queued(
        &self,
        stream: &mut TcpStream,
        out: &mut Vec<u8>,
        wait: Duration,
    ) -> bool {
        {
            let outgoing = lock(&self.outgoing);
            if outgoing.is_empty() {
                let _unused = self.ready.wait_timeout(outgoing, wait);
            }
        }
        let _wire = lock(&self.wire);
        out.clear();
        std::mem::swap(&mut *lock(&self.outgoing), out);
        out.is_empty() || self.write(stream, out)
    }

    /// Writes `bytes` to `stream`; on failure ends the link and returns false.
    fn write(&self, stream: &mut TcpStream, bytes: &[u8]) -> bool {
        match stream.write_all(bytes) {
            Ok(()) => true,
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "send_timeout",
                    _ => "send_failed",
                };
                self.shut_down(reason);
                false
            }
        }
    }

    /// Ends the connection (both directions) for `reason`, waking its reader. The first
    /// reason given is the one that stands.
    pub(super) fn shut_down(&self, reason: &'static str) {
        lock(&self.ended).get_or_insert(reason);
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Records `reason` as why the link ended unless another came first; returns the one
    /// that stands.
    pub(super) fn ended(&self, reason: &'static str) -> &'static str {
        lock(&self.ended).get_or_insert(reason)
    }
}
