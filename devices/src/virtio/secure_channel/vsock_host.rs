//! CID 2, the host: vsock connections between a partition and programs on the node, through
//! Unix sockets, as Firecracker's hybrid vsock does (docs/VSOCK.md).
//!
//! A partition given `vsock_uds = PATH` has a listening socket at PATH. A host program connects
//! there and writes `CONNECT PORT\n`; the partition's driver gets a REQUEST from (2, a port the
//! node picks) to PORT, and once it accepts, the program reads `OK HOSTPORT\n` and the
//! connection carries bytes both ways. A guest that connects to (2, PORT) reaches the program
//! listening on `PATH_PORT`. The operator's policy decides both directions, as between
//! partitions (CID 2 in the rules). These connections are not channels: their far end is a
//! process on this node, behind the socket's file permissions, with nothing to key.
//!
//! Credit works as between partitions: the node offers the guest [`HOST_CREDIT`] bytes per
//! connection and tells it with CREDIT_UPDATE as the program takes them; it reads from the
//! program only as much as the guest has room for. Sockets are non-blocking and edge-triggered
//! in the device thread's epoll set; a connection that cannot write or read on now remembers so
//! and goes on when the socket or the guest's credit allows.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use guest_agent::channel::abi::Endpoint;

use super::chain::Cursor;
use super::vsock::Refused;
use super::vsock::StreamKey;
use super::vsock::MAX_HELD;
use super::*;
use crate::virtio::vsock::packet::{op, Header, TYPE_STREAM};
use crate::virtio::vsock::{MAX_CREDIT, MAX_PAYLOAD};

/// The host's CID.
pub const HOST_CID: u32 = 2;
/// Receive room the node offers a guest on each host connection.
pub const HOST_CREDIT: u32 = 256 * 1024;
/// Longest `CONNECT PORT\n` line a program may send.
const MAX_GREETING: usize = 64;
/// First port the node gives host programs' connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most host connections one partition may have, greetings included: each holds a descriptor.
const MAX_CONNS: usize = 64;
/// How long a program may take to send its `CONNECT PORT` line.
const GREETING_TIME: std::time::Duration = std::time::Duration::from_secs(5);
/// Event data of host sockets: this bit and a token (listeners: the device's index).
pub(super) const HOST: u32 = 1 << 28;
/// With [`HOST`]: a listening socket.
pub(super) const LISTENER: u32 = 1 << 27;
/// Event data of the greeting timer.
pub(super) const HOST_TICK: u32 = u32::MAX - 4;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A program connected; its `CONNECT PORT` line is being read.
    Greeting,
    /// The REQUEST went to the guest; its answer is awaited.
    Connecting,
    /// Bytes flow.
    Open,
    /// The guest shut it down: what it sent goes out, then the connection ends.
    Closing,
}

/// One host connection.
struct Conn {
    stream: UnixStream,
    device: usize,
    /// The partition's CID and port, and the host's port.
    cid: u32,
    guest_port: u32,
    host_port: u32,
    state: State,
    greeting: Vec<u8>,
    /// When the program connected (its greeting has [`GREETING_TIME`]).
    since: std::time::Instant,
    /// From the guest, not yet written to the program.
    to_host: Vec<u8>,
    /// Bytes written to the program (this end's `fwd_cnt`), and as last told the guest.
    fwd_cnt: u32,
    told_fwd_cnt: u32,
    /// The guest's offer, and the bytes sent it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    /// The program's socket had more to read when credit ran out.
    unread: bool,
    /// A CREDIT_REQUEST went to the guest and no packet came back since.
    asked: bool,
}

impl Conn {
    /// A header from the host's end of this connection.
    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: u64::from(HOST_CID),
            dst_cid: u64::from(self.cid),
            src_port: self.host_port,
            dst_port: self.guest_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: HOST_CREDIT,
            fwd_cnt: self.fwd_cnt,
            ..Header::default()
        }
    }

    /// What the guest has room for now.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The node's side of CID 2.
#[derive(Default)]
pub(super) struct HostSide {
    /// Per partition with `vsock_uds`: its listening socket and path.
    places: HashMap<u32, (UnixListener, PathBuf)>,
    conns: HashMap<u32, Conn>,
    /// `(CID, guest port, host port)` to the connection's token.
    by_key: HashMap<(u32, u32, u32), u32>,
    next_token: u32,
    next_port: u32,
    /// Guest REQUESTs to CID 2, for the device thread (it connects, and watches the socket).
    requests: Vec<(usize, Header)>,
    /// Ticks every [`GREETING_TIME`] while the node has listening sockets, to end the
    /// connections whose program never said `CONNECT PORT`.
    tick: Option<vmm_sys_util::timerfd::TimerFd>,
    /// Sockets of ended connections, shut down but kept open until the device thread has
    /// taken them out of its epoll set (so that their descriptor numbers are not reused while
    /// the event loop still maps them).
    retired: Vec<UnixStream>,
}

impl HostSide {
    /// The listening sockets of the partitions that have one.
    pub(super) fn new(places: Vec<(u32, UnixListener, PathBuf)>) -> Self {
        let tick = (!places.is_empty())
            .then(|| {
                let mut timer = crate::timer::nonblocking().ok()?;
                timer.reset(GREETING_TIME, Some(GREETING_TIME)).ok()?;
                Some(timer)
            })
            .flatten();
        if tick.is_none() && !places.is_empty() {
            log::error!("vsock: no timer: programs that never greet are ended only by others");
        }
        let places = places.into_iter().map(|(p, l, path)| (p, (l, path))).collect();
        Self { places, next_port: FIRST_HOST_PORT, tick, ..Self::default() }
    }

    /// A token no live connection has.
    fn token(&mut self) -> u32 {
        loop {
            self.next_token = (self.next_token + 1) % LISTENER;
            if !self.conns.contains_key(&self.next_token) {
                return self.next_token;
            }
        }
    }

    /// Host connections of device `index`, and guest requests for new ones.
    fn count(&self, index: usize) -> usize {
        self.conns.values().filter(|c| c.device == index).count()
            + self.requests.iter().filter(|(i, _)| *i == index).count()
    }
}

impl ChannelNode {
    /// The greeting timer went off: ends the connections whose program has not greeted.
    pub(super) fn host_tick(&mut self) {
        if let Some(tick) = &mut self.vsock.host.tick {
            let _ = tick.wait();
        }
        self.host_expire_greetings();
    }

    /// Watches each partition's listening socket, and the greeting timer (device thread, at
    /// start).
    pub(super) fn host_watch_listeners(&self, ops: &mut EventOps) {
        if let Some(tick) = &self.vsock.host.tick {
            if ops.add(Events::with_data(tick, HOST_TICK, EventSet::IN)).is_err() {
                log::error!("vsock: cannot watch the greeting timer");
            }
        }
        for (index, device) in self.vsock.devices.iter().enumerate() {
            if let Some((listener, path)) = self.vsock.host.places.get(&device.partition) {
                let data = HOST | LISTENER | index as u32;
                // Edge-triggered: a connection it cannot take now (no descriptor left) waits
                // for the next one instead of waking the thread again and again.
                let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
                if ops.add(Events::with_data(listener, data, set)).is_err() {
                    log::error!("vsock: cannot watch {}", path.display());
                }
            }
        }
    }

    /// An event of a host socket (device thread).
    pub(super) fn host_event(&mut self, data: u32, set: EventSet, ops: &mut EventOps) {
        if data & LISTENER != 0 {
            self.host_accept((data & !(HOST | LISTENER)) as usize, ops);
            return;
        }
        let token = data & !HOST;
        if set.intersects(EventSet::OUT) {
            self.host_write(token);
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.host_read(token);
        }
    }

    /// Takes the connections waiting on device `index`'s listening socket.
    fn host_accept(&mut self, index: usize, ops: &mut EventOps) {
        let Some(device) = self.vsock.devices.get(index) else { return };
        let (partition, cid) = (device.partition, device.cid);
        self.host_expire_greetings();
        loop {
            let Some((listener, _)) = self.vsock.host.places.get(&partition) else { return };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => return log::warn!("vsock: accepting a host connection: {e}"),
            };
            if self.vsock.host.count(index) >= MAX_CONNS {
                // Closed at once: the program sees its connection end.
                continue;
            }
            let host_port = self.vsock.host.next_port;
            self.vsock.host.next_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            let conn = Conn {
                stream,
                device: index,
                cid,
                guest_port: 0,
                host_port,
                state: State::Greeting,
                greeting: Vec::new(),
                since: std::time::Instant::now(),
                to_host: Vec::new(),
                fwd_cnt: 0,
                told_fwd_cnt: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                unread: false,
                asked: false,
            };
            self.host_adopt(conn, ops);
        }
    }

    /// Ends the connections whose program has not said `CONNECT PORT` in time.
    fn host_expire_greetings(&mut self) {
        let late: Vec<u32> = (self.vsock.host.conns.iter())
            .filter(|(_, c)| c.state == State::Greeting && c.since.elapsed() > GREETING_TIME)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.host_drop(token);
        }
    }

    /// Watches a new connection's socket and keeps it.
    fn host_adopt(&mut self, conn: Conn, ops: &mut EventOps) -> Option<u32> {
        if conn.stream.set_nonblocking(true).is_err() {
            return None;
        }
        let token = self.vsock.host.token();
        let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        if ops.add(Events::with_data(&conn.stream, HOST | token, set)).is_err() {
            log::error!("vsock: cannot watch a host connection");
            return None;
        }
        if conn.state != State::Greeting {
            self.vsock.host.by_key.insert((conn.cid, conn.guest_port, conn.host_port), token);
        }
        self.vsock.host.conns.insert(token, conn);
        Some(token)
    }

    /// The program's socket is readable: its greeting, or bytes for the guest.
    fn host_read(&mut self, token: u32) {
        let Some(conn) = self.vsock.host.conns.get_mut(&token) else { return };
        match conn.state {
            State::Greeting => self.host_greeting(token),
            State::Open | State::Closing => {
                conn.unread = true;
                self.host_pump(token);
            }
            State::Connecting => conn.unread = true,
        }
    }

    /// Reads `CONNECT PORT\n` and sends the guest the REQUEST, if the policy allows.
    fn host_greeting(&mut self, token: u32) {
        let Some(conn) = self.vsock.host.conns.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        // One byte at a time: nothing after the line may be taken before the guest accepts.
        while !conn.greeting.ends_with(b"\n") && conn.greeting.len() < MAX_GREETING {
            match conn.stream.read(&mut byte) {
                Ok(1) => conn.greeting.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                _ => return self.host_drop(token),
            }
        }
        let port = std::str::from_utf8(&conn.greeting)
            .ok()
            .and_then(|line| line.trim_end().strip_prefix("CONNECT "))
            .and_then(|port| port.trim().parse::<u32>().ok());
        let Some(port) = port else { return self.host_drop(token) };
        let (from, to) = ((HOST_CID, conn.host_port), (conn.cid, port));
        if !self.vsock.policy.allows(from, to) {
            let partition = self.vsock.devices[conn.device].partition;
            let node = self.cmm.node();
            let source = Endpoint { node, partition: HOST_CID, process: conn.host_port };
            let destination = Endpoint { node, partition, process: port };
            self.cmm.refuse_vsock(partition, "policy", false, &source, &destination);
            return self.host_drop(token);
        }
        if self.vsock.devices[conn.device].stopped {
            return self.host_drop(token);
        }
        conn.guest_port = port;
        conn.state = State::Connecting;
        let (device, key) = (conn.device, (conn.cid, port, conn.host_port));
        let request = conn.header(op::REQUEST);
        self.vsock.host.by_key.insert(key, token);
        self.vsock.post(device, request, Vec::new(), None);
    }

    /// Reads from the program as much as the guest has room for, and sends it on.
    fn host_pump(&mut self, token: u32) {
        loop {
            let Some(header) = self.vsock.host.conns.get(&token).map(|c| c.header(op::RW)) else {
                return;
            };
            // What the guest has room for, and what the node may hold for the connection.
            let held = self.vsock.held(&header);
            let Some(conn) = self.vsock.host.conns.get_mut(&token) else { return };
            let room = (conn.credit().min(MAX_PAYLOAD) as usize).min(MAX_HELD.saturating_sub(held));
            if !conn.unread {
                return;
            }
            if room == 0 {
                // Out of credit: ask once, as a driver would; any packet from the guest answers.
                if !conn.asked && conn.state == State::Open {
                    conn.asked = true;
                    let request = conn.header(op::CREDIT_REQUEST);
                    let device = conn.device;
                    self.vsock.post(device, request, Vec::new(), None);
                }
                return;
            }
            let mut payload = self.buffers.take(room);
            match conn.stream.read(&mut payload) {
                Ok(0) => {
                    // The program is done sending: the guest reads what came, then answers RST.
                    conn.unread = false;
                    let shutdown = Header { flags: 3, ..conn.header(op::SHUTDOWN) };
                    let device = conn.device;
                    self.buffers.give(payload);
                    return self.vsock.post(device, shutdown, Vec::new(), None);
                }
                Ok(n) => {
                    // Exactly what came: a few bytes must not hold a 64 KiB buffer.
                    let data = payload[..n].to_vec();
                    self.buffers.give(payload);
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    let header = Header { len: n as u32, ..conn.header(op::RW) };
                    conn.told_fwd_cnt = conn.fwd_cnt;
                    let device = conn.device;
                    self.vsock.post(device, header, data, None);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.unread = false;
                    return self.buffers.give(payload);
                }
                Err(_) => {
                    self.buffers.give(payload);
                    return self.host_reset(token);
                }
            }
        }
    }

    /// Writes what the guest sent to the program; tells the guest of the room that makes.
    fn host_write(&mut self, token: u32) {
        let Some(conn) = self.vsock.host.conns.get_mut(&token) else { return };
        let mut written = 0;
        while written < conn.to_host.len() {
            match conn.stream.write(&conn.to_host[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return self.host_reset(token),
            }
        }
        conn.to_host.drain(..written);
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(written as u32);
        if conn.state == State::Closing && conn.to_host.is_empty() {
            let rst = conn.header(op::RST);
            let device = conn.device;
            self.vsock.post(device, rst, Vec::new(), None);
            return self.host_drop(token);
        }
        if conn.fwd_cnt.wrapping_sub(conn.told_fwd_cnt) >= HOST_CREDIT / 4 {
            conn.told_fwd_cnt = conn.fwd_cnt;
            let update = conn.header(op::CREDIT_UPDATE);
            let device = conn.device;
            self.vsock.post(device, update, Vec::new(), None);
        }
    }

    /// A packet a partition sent to CID 2 (its source already checked).
    pub(super) fn vsock_to_host(&mut self, index: usize, header: &Header, reader: &mut Cursor<'_>) {
        let cid = self.vsock.devices[index].cid;
        if header.op == op::REQUEST {
            return self.host_request(index, header);
        }
        let key = (cid, header.src_port, header.dst_port);
        let Some(&token) = self.vsock.host.by_key.get(&key) else {
            return self.vsock.answer(index, header);
        };
        let Some(conn) = self.vsock.host.conns.get_mut(&token) else { return };
        conn.peer_buf_alloc = header.buf_alloc.min(MAX_CREDIT);
        conn.peer_fwd_cnt = header.fwd_cnt;
        conn.asked = false;
        self.host_packet(index, token, header, reader);
        // Every packet carries the guest's credit: what waited for room may go now.
        self.host_pump(token);
    }

    /// What a guest's packet on host connection `token` asks for.
    fn host_packet(&mut self, index: usize, token: u32, header: &Header, reader: &mut Cursor<'_>) {
        let Some(conn) = self.vsock.host.conns.get_mut(&token) else { return };
        match (header.op, conn.state) {
            (op::RESPONSE, State::Connecting) => {
                conn.state = State::Open;
                let ok = format!("OK {}\n", conn.host_port);
                // The program reads this before anything it may have sent is answered; a
                // socket that cannot take a few bytes now is not worth waiting for.
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    return self.host_reset(token);
                }
                conn.unread = true;
            }
            (op::RW, State::Open) => {
                if conn.to_host.len() + header.len as usize > HOST_CREDIT as usize {
                    let partition = self.vsock.devices[index].partition;
                    self.vsock_refuse(partition, Refused::OverCredit, Some(header));
                    return self.host_reset(token);
                }
                let start = conn.to_host.len();
                conn.to_host.resize(start + header.len as usize, 0);
                if !reader.read(&mut conn.to_host[start..]).unwrap_or(false) {
                    return self.host_reset(token);
                }
                self.host_write(token);
            }
            (op::CREDIT_UPDATE, State::Open | State::Closing) => {}
            (op::CREDIT_REQUEST, _) => {
                let update = conn.header(op::CREDIT_UPDATE);
                conn.told_fwd_cnt = conn.fwd_cnt;
                self.vsock.post(index, update, Vec::new(), None);
            }
            (op::SHUTDOWN, State::Open | State::Closing) => {
                conn.state = State::Closing;
                self.host_write(token);
            }
            (op::RST, _) => self.host_drop(token),
            _ => {
                let partition = self.vsock.devices[index].partition;
                self.vsock_refuse(partition, Refused::BadPacket, Some(header));
                self.host_reset(token);
            }
        }
    }

    /// A guest's REQUEST to a program on the node: allowed by the policy, then connected on
    /// the device thread (it watches the new socket).
    fn host_request(&mut self, index: usize, header: &Header) {
        let device = &self.vsock.devices[index];
        let (partition, cid) = (device.partition, device.cid);
        let (from, to) = ((cid, header.src_port), (HOST_CID, header.dst_port));
        let key = (cid, header.src_port, header.dst_port);
        let asked = self.vsock.host.requests.iter().any(|(i, r)| {
            *i == index && (r.src_port, r.dst_port) == (header.src_port, header.dst_port)
        });
        let known = asked
            || self.vsock.host.by_key.contains_key(&key)
            || self.vsock.host.count(index) >= MAX_CONNS;
        if known || !self.vsock.policy.allows(from, to) {
            let why = if known { Refused::BadPacket } else { Refused::Policy };
            self.vsock_refuse(partition, why, Some(header));
            return self.vsock.answer(index, header);
        }
        if !self.vsock.host.places.contains_key(&partition) {
            self.vsock_refuse(partition, Refused::NoSuchCid, Some(header));
            return self.vsock.answer(index, header);
        }
        self.vsock.host.requests.push((index, *header));
        // Served at the end of this pass on the device thread, or after this poke from a vCPU's.
        let _ = self.poke.write(1);
    }

    /// Connects the guests' requests to the programs listening at `PATH_PORT` (device thread).
    pub(super) fn host_connect(&mut self, ops: &mut EventOps) {
        for (index, request) in std::mem::take(&mut self.vsock.host.requests) {
            let Some(device) = self.vsock.devices.get(index) else { continue };
            let Some((_, path)) = self.vsock.host.places.get(&device.partition) else { continue };
            let mut name = path.clone().into_os_string();
            name.push(format!("_{}", request.dst_port));
            let conn = connect_now(&PathBuf::from(name)).map(|stream| Conn {
                stream,
                device: index,
                cid: device.cid,
                guest_port: request.src_port,
                host_port: request.dst_port,
                state: State::Open,
                greeting: Vec::new(),
                since: std::time::Instant::now(),
                to_host: Vec::new(),
                fwd_cnt: 0,
                told_fwd_cnt: 0,
                peer_buf_alloc: request.buf_alloc.min(MAX_CREDIT),
                peer_fwd_cnt: request.fwd_cnt,
                tx_cnt: 0,
                unread: true,
                asked: false,
            });
            let adopted = conn.and_then(|conn| {
                let response = conn.header(op::RESPONSE);
                self.host_adopt(conn, ops).map(|token| (token, response))
            });
            match adopted {
                Some((token, response)) => {
                    self.vsock.post(index, response, Vec::new(), None);
                    self.host_pump(token);
                }
                None => self.vsock.answer(index, &request),
            }
        }
    }

    /// Ends a connection from the node's side: an RST to the guest (once it was asked), the
    /// socket closed.
    fn host_reset(&mut self, token: u32) {
        if let Some(conn) = self.vsock.host.conns.get(&token) {
            if conn.state != State::Greeting {
                let rst = conn.header(op::RST);
                self.vsock.post(conn.device, rst, Vec::new(), None);
            }
        }
        self.host_drop(token);
    }

    /// Forgets a connection: the program sees its end at once; the device thread closes the
    /// socket once it has stopped watching it.
    fn host_drop(&mut self, token: u32) {
        if let Some(conn) = self.vsock.host.conns.remove(&token) {
            let key = (conn.cid, conn.guest_port, conn.host_port);
            if self.vsock.host.by_key.get(&key) == Some(&token) {
                self.vsock.host.by_key.remove(&key);
            }
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            self.vsock.host.retired.push(conn.stream);
            let _ = self.poke.write(1);
        }
    }

    /// Stops watching the sockets of ended connections, and closes them (device thread).
    pub(super) fn host_retire(&mut self, ops: &mut EventOps) {
        for stream in std::mem::take(&mut self.vsock.host.retired) {
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
        }
    }

    /// Partition `partition`'s host connections end with it.
    /// Device `index`'s connections with programs on the node, as its guest sees them.
    pub(super) fn host_keys_of(&self, index: usize) -> Vec<StreamKey> {
        let conns = self.vsock.host.conns.values().filter(|c| c.device == index);
        conns.map(|c| (c.cid, c.guest_port, HOST_CID, c.host_port)).collect()
    }

    pub(super) fn host_partition_stopped(&mut self, index: usize) {
        let tokens: Vec<u32> = self
            .vsock
            .host
            .conns
            .iter()
            .filter(|(_, c)| c.device == index)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            self.host_drop(token);
        }
        self.vsock.host.requests.retain(|(i, _)| *i != index);
    }
}

/// Connects to a program's listening socket without waiting: one whose backlog is full is as
/// good as absent.
fn connect_now(path: &std::path::Path) -> Option<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    // socket2 makes it close-on-exec.
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).ok()?;
    socket.set_nonblocking(true).ok()?;
    socket.connect(&SockAddr::unix(path).ok()?).ok()?;
    Some(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}
