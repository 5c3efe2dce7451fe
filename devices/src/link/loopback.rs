//! Two nodes' routers linked to each other over loopback TCP, authenticated and confirmed as
//! the setup thread would: for benchmarks and tests that drive CMMs and their links from one
//! thread, without a device thread.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::directory::{Directory, Peer, SharedDirectory};
use super::handshake;
use super::router::{Arrivals, Context, FdChange, Router, RouterConfig};
use super::setup::Established;
use super::status::LinkBook;
use super::timestamp::ReplayGuard;
use super::wire::{MSG1_SIZE, MSG2_SIZE, VERSION};
use crate::cmm::audit::Audit;
use crate::crypto::node_key::NodeKey;

/// One end of the link: its node's router, the link's token, its audit log and link book.
pub struct End {
    /// The router (give it to a CMM, or drive it directly).
    pub router: Router,
    /// The link's token (what the device thread would get with its socket's events).
    pub token: usize,
    /// The node's audit log.
    pub audit: Audit,
    /// The node's link book.
    pub book: Arc<LinkBook>,
    /// The node: 1 or 2.
    pub node: u32,
}

impl End {
    /// Reads what arrived until `want` frames came (or five seconds passed, or the link went
    /// down); returns each frame's type and payload.
    pub fn pump(&mut self, want: usize) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < until && self.router.is_up(3 - self.node) {
            self.router.readable(self.token, &mut |_, frame, payload| {
                got.push((frame.kind(), payload.to_vec()))
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    /// Whether the node audited `event` for `reason`.
    pub fn audited(&self, event: &str, reason: &str) -> bool {
        let wanted = format!("\"event\":\"{event}\",\"reason\":\"{reason}\"");
        self.audit.recent().iter().any(|r| r.contains(&wanted))
    }
}

fn end(
    id: u32,
    key: NodeKey,
    directory: &Directory,
    config: RouterConfig,
) -> io::Result<(End, Sender<Established>)> {
    let audit = Audit::to_log(id)?;
    let book = Arc::new(LinkBook::new(directory, id));
    let (to_router, links) = mpsc::channel();
    let (ended, _) = mpsc::channel();
    let (_, closes) = mpsc::channel();
    let arrivals = Arrivals {
        links,
        wake: EventFd::new(libc::EFD_NONBLOCK)?,
        ended,
        setup_wake: EventFd::new(libc::EFD_NONBLOCK)?,
        closes,
        wants: mpsc::channel().0,
        unreachable: mpsc::channel().1,
    };
    let context = Context {
        own_id: id,
        key: Arc::new(key),
        directory: Arc::new(SharedDirectory::new(directory.clone())),
        replays: Arc::new(ReplayGuard::default()),
        audit: audit.clone(),
        book: book.clone(),
        config,
    };
    let router = Router::new(context, arrivals);
    Ok((End { router, token: 0, audit, book, node: id }, to_router))
}

fn key() -> io::Result<NodeKey> {
    NodeKey::generate().map_err(|e| io::Error::other(e.to_string()))
}

fn handshake_error(e: handshake::HandshakeError) -> io::Error {
    io::Error::other(e.reason())
}

/// Nodes 1 and 2, each with a router holding their one link; node 1 initiated it.
pub fn linked(config: RouterConfig) -> io::Result<(End, End)> {
    let (k1, k2) = (key()?, key()?);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let p1 = Peer { id: 1, address: listener.local_addr()?, public_key: *k1.public() };
    let p2 = Peer { id: 2, address, public_key: *k2.public() };
    let directory = Directory::new(vec![p1.clone(), p2.clone()]);
    let mut socket1 = TcpStream::connect(address)?;
    let (mut socket2, from) = listener.accept()?;
    let mut msg1 = [0u8; MSG1_SIZE];
    let initiation =
        handshake::initiate(&k1, &p2, 1, VERSION, &mut msg1).map_err(handshake_error)?;
    socket1.write_all(&msg1)?;
    socket2.read_exact(&mut msg1)?;
    let response = handshake::respond(&k2, &directory, &ReplayGuard::default(), &msg1, None)
        .map_err(handshake_error)?;
    socket2.write_all(&response.msg2)?;
    let mut msg2 = [0u8; MSG2_SIZE];
    socket1.read_exact(&mut msg2)?;
    let transport1 = initiation.finish(&msg2).map_err(handshake_error)?;
    let (mut a, to_a) = end(1, k1, &directory, config)?;
    let (mut b, to_b) = end(2, k2, &directory, config)?;
    let gone = |_| io::Error::other("router gone");
    to_a.send(Established {
        peer: p2,
        socket: socket1,
        transport: transport1,
        initiator: true,
        remote: address,
        version: VERSION,
    })
    .map_err(gone)?;
    to_b.send(Established {
        peer: p1,
        socket: socket2,
        transport: response.transport,
        initiator: false,
        remote: from,
        version: VERSION,
    })
    .map_err(gone)?;
    for end in [&mut a, &mut b] {
        end.router.accept_arrivals();
        match end.router.take_fd_changes().pop() {
            Some(FdChange::Watch { token, .. }) => end.token = token,
            _ => return Err(io::Error::other("the link did not come up")),
        }
    }
    Ok((a, b))
}
