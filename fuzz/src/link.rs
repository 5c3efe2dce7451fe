//! The link target's world: a victim node (node 2: a real `LinkManager`, its setup thread and
//! router, under a `Cmm` with partitions 1 and 2) and the attacker, node 1, a listed cluster
//! member that holds its own end of the TCP link. The attacker does the Noise IK handshake and
//! CONFIRM itself, so it holds the session: it can write raw bytes, records that decrypt
//! correctly with any plaintext, or well-formed frames: key offers whose keys it knows, and
//! DATA sealed with the right channel keys, which the victim's CMM verifies and delivers. It
//! also reads what the victim sends (its OFFERs, and the REKEY_REPLY of a real rekey).
//!
//! Everything is fresh for each input: victim, setup thread, socket, session.

use std::io::{ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use guest_agent::channel::abi::{Endpoint, RxHeader, TxHeader};
use keyhold_devices::cmm::connection_table::ChannelId;
use keyhold_devices::cmm::{
    Cmm, CmmConfig, Deliver, Delivered, KeyLifetime, KeySource, Opening, Payload,
};
use keyhold_devices::crypto::channel::{associated_data, ChannelCiphers};
use keyhold_devices::crypto::node_key::NodeKey;
use keyhold_devices::link::handshake::{self, Initiation, Transport};
use keyhold_devices::link::wire::{self, kind, Frame, MSG1_SIZE, MSG2_SIZE, VERSION};
use keyhold_devices::link::{Directory, FdChange, LinkManager, LinkSettings, Peer};

use crate::{Input, Output};

/// The victim's node ID.
pub const VICTIM: u32 = 2;
/// The attacker's node ID.
pub const ATTACKER: u32 = 1;

struct Keys {
    attacker: NodeKey,
    victim: Arc<NodeKey>,
    directory: Directory,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let attacker = NodeKey::generate().expect("a node key");
        let victim = Arc::new(NodeKey::generate().expect("a node key"));
        // Node 1 is never dialed (the lower ID dials); node 2's address is not used either.
        let unused: SocketAddr = "127.0.0.1:9".parse().expect("an address");
        let directory = Directory::new(vec![
            Peer { id: ATTACKER, address: unused, public_key: *attacker.public() },
            Peer { id: VICTIM, address: unused, public_key: *victim.public() },
        ]);
        Keys::ignore_sigpipe();
        Keys { attacker, victim, directory }
    })
}

impl Keys {
    fn ignore_sigpipe() {
        // SAFETY: setting SIGPIPE's disposition to SIG_IGN is async-signal-safe and affects
        // only writes to closed sockets, which then fail with EPIPE (as Rust programs expect).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    }
}

/// Operation codes of the link target.
pub mod op {
    /// Raw bytes onto the stream.
    pub const RAW: u8 = 0;
    /// A record whose header block is any plaintext, sealed correctly, and payload bytes.
    pub const SEALED: u8 = 1;
    /// A record of well-formed (or chosen malformed) frames.
    pub const FRAMES: u8 = 2;
    /// Writes what was built (or its first bytes) and lets the victim read it.
    pub const FLUSH: u8 = 3;
    /// The victim's partition listens.
    pub const LISTEN: u8 = 4;
    /// The victim's partition opens a channel (an OFFER to the attacker if remote).
    pub const OPEN: u8 = 5;
    /// The victim's partition sends a message.
    pub const SEND: u8 = 6;
    /// The victim closes (or the operator revokes) a channel.
    pub const CLOSE: u8 = 7;
    /// The victim's link timer.
    pub const TICK: u8 = 8;
    /// The attacker reads what the victim sent.
    pub const DRAIN: u8 = 9;
    /// The attacker moves a channel's sending key to the next epoch.
    pub const EPOCH: u8 = 10;
    /// How the victim's guests take delivered messages.
    pub const SINK: u8 = 11;
}

/// The victim's receive queues.
struct Sink {
    mode: u8,
    count: u64,
}

impl Deliver for Sink {
    fn deliver(&mut self, _: u32, header: &RxHeader, payload: &[u8], _: bool) -> Delivered {
        assert_eq!(payload.len(), header.len as usize, "a delivered payload has its length");
        self.count += 1;
        match self.mode.wrapping_add(self.count as u8) % 4 {
            0 | 1 => Delivered::Written,
            2 => Delivered::Held,
            _ => Delivered::Dropped,
        }
    }
}

struct Filled(u8);

impl Payload for Filled {
    fn read_into(&mut self, out: &mut [u8]) -> bool {
        out.fill(self.0);
        self.0 != 0xff
    }
}

impl KeySource for Filled {
    fn read_key(&mut self, out: &mut [u8; 32]) -> bool {
        out.fill(self.0);
        self.0 != 0xff
    }
}

/// A channel the attacker can send on: it knows the key.
struct Channel {
    local: Endpoint,
    remote: Endpoint,
    ciphers: Box<ChannelCiphers>,
    seq: u64,
    epoch: u32,
}

fn ciphers(
    key: &[u8; 32],
    salt: &[u8; 16],
    local: &Endpoint,
    remote: &Endpoint,
) -> Box<ChannelCiphers> {
    let mut slot = Box::new(MaybeUninit::<ChannelCiphers>::uninit());
    ChannelCiphers::init(&mut slot, key, salt, local, remote);
    // SAFETY: `ChannelCiphers::init` initialises both directions of the slot.
    unsafe { slot.assume_init() }
}

/// The attacker's end of the link.
struct Attacker {
    socket: TcpStream,
    slots: [Option<Transport>; 2],
    tx: usize,
    rx: usize,
    rekey: Option<Initiation>,
    out: Vec<u8>,
    written: u64,
    inbox: Vec<u8>,
    open_block: Option<(Vec<u8>, usize)>,
    channels: Vec<Channel>,
    offers: Vec<u32>,
    broken: bool,
}

impl Attacker {
    fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
        let mut sealed = vec![0u8; plain.len() + 16];
        let n = self.slots[self.tx].as_mut().and_then(|t| t.seal(plain, &mut sealed)).unwrap_or(0);
        sealed.truncate(n);
        sealed
    }

    fn switch_tx(&mut self) {
        self.tx = 1 - self.tx;
        if self.tx == self.rx {
            self.slots[1 - self.tx] = None;
        }
    }

    fn switch_rx(&mut self) {
        self.rx = 1 - self.rx;
        if self.tx == self.rx {
            self.slots[1 - self.tx] = None;
        }
    }

    /// Reads what the victim sent and follows it: its offers, its part of a rekey.
    fn drain(&mut self) {
        let _ = self.socket.set_nonblocking(true);
        let mut buf = [0u8; 65536];
        loop {
            match self.socket.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = self.socket.set_nonblocking(false);
        while !self.broken {
            if self.open_block.is_none() {
                if self.inbox.len() < 2 {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([self.inbox[0], self.inbox[1]]));
                if self.inbox.len() < 2 + len {
                    return;
                }
                let mut plain = vec![0u8; len];
                let opened = self.slots[self.rx]
                    .as_mut()
                    .and_then(|t| t.open(&self.inbox[2..2 + len], &mut plain));
                let Some(n) = opened else {
                    self.broken = true;
                    return;
                };
                plain.truncate(n);
                let Ok(payload) = wire::check_block(&plain, VERSION) else {
                    self.broken = true;
                    return;
                };
                self.inbox.drain(..2 + len);
                self.open_block = Some((plain, payload));
            }
            let Some((plain, payload)) = self.open_block.take() else { return };
            if self.inbox.len() < payload {
                self.open_block = Some((plain, payload));
                return;
            }
            self.inbox.drain(..payload);
            let mut switch = false;
            for frame in wire::frames(&plain).flatten() {
                match frame {
                    Frame::Offer { id, source, destination, salt, key } => {
                        self.offers.push(id);
                        let ciphers = ciphers(key, &salt, &destination, &source);
                        self.channels.push(Channel {
                            local: destination,
                            remote: source,
                            ciphers,
                            seq: 0,
                            epoch: 0,
                        });
                    }
                    Frame::RekeyReply(msg2) => {
                        if let Some(next) = self.rekey.take().and_then(|i| i.finish(msg2).ok()) {
                            self.slots[1 - self.tx] = Some(next);
                            switch = true;
                        }
                    }
                    _ => {}
                }
            }
            if switch {
                self.switch_rx();
            }
        }
    }
}

/// One input's run.
pub fn run(data: &[u8]) {
    let keys = keys();
    let mut input = Input::new(data);
    let config = input.u8();
    let mut settings = LinkSettings::default();
    if config & 1 != 0 {
        settings.router.rekey_after_records = 4;
    }
    let lifetime = if config & 2 != 0 {
        KeyLifetime { messages: 2, secs: 600 }
    } else {
        KeyLifetime::default()
    };
    let audit = crate::audit(VICTIM);
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let (manager, router) = LinkManager::start(
        VICTIM,
        keys.victim.clone(),
        keys.directory.clone(),
        listen,
        audit.clone(),
        settings,
        || {},
    )
    .expect("the victim's link manager");
    let cmm_config = CmmConfig { capacity: 64, lifetime, ..CmmConfig::default() };
    let mut cmm = Cmm::new(VICTIM, cmm_config, audit, router).expect("the victim's CMM");
    cmm.add_partition(1);
    cmm.add_partition(2);
    let book = manager.book();

    // The handshake, as node 1 would make it.
    let mut socket = TcpStream::connect(manager.local_addr()).expect("a connection to the victim");
    socket.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
    let _ = socket.set_nodelay(true);
    let victim_peer = keys.directory.by_id(VICTIM).expect("the victim is listed").clone();
    let mut msg1 = [0u8; MSG1_SIZE];
    let initiation =
        handshake::initiate(&keys.attacker, &victim_peer, ATTACKER, VERSION, &mut msg1)
            .expect("message 1");
    let mut first = vec![0u8, MSG1_SIZE as u8];
    first.extend_from_slice(&msg1);
    socket.write_all(&first).expect("message 1 sent");
    let mut msg2 = [0u8; 2 + MSG2_SIZE];
    socket.read_exact(&mut msg2).expect("message 2 from the victim");
    let mut transport = initiation.finish(&msg2[2..]).expect("the session");
    let mut confirm = vec![0u8, 17];
    let mut sealed = [0u8; 17];
    transport.seal(&[kind::CONFIRM], &mut sealed).expect("CONFIRM sealed");
    confirm.extend_from_slice(&sealed);
    socket.write_all(&confirm).expect("CONFIRM sent");
    let until = Instant::now() + Duration::from_secs(5);
    while !cmm.has_links() {
        assert!(Instant::now() < until, "the victim never took the link");
        std::thread::sleep(Duration::from_micros(20));
        cmm.links_arrived();
    }
    let token = cmm
        .take_fd_changes()
        .into_iter()
        .find_map(|c| match c {
            FdChange::Watch { token, .. } => Some(token),
            FdChange::Forget(_) => None,
        })
        .expect("the link's token");
    let bytes_in = || book.status().iter().find(|s| s.peer == ATTACKER).map_or(0, |s| s.bytes_in);
    let base = bytes_in();

    let mut attacker = Attacker {
        socket,
        slots: [Some(transport), None],
        tx: 0,
        rx: 0,
        rekey: None,
        out: Vec::new(),
        written: 0,
        inbox: Vec::new(),
        open_block: None,
        channels: Vec::new(),
        offers: Vec::new(),
        broken: false,
    };
    let mut sink = Sink { mode: config >> 2, count: 0 };
    let mut victim_channels: Vec<(u32, u32, ChannelId)> = Vec::new();

    let flush = |attacker: &mut Attacker, cmm: &mut Cmm, sink: &mut Sink, upto: usize| {
        let n = if upto == 0 { attacker.out.len() } else { upto.min(attacker.out.len()) };
        let chunk: Vec<u8> = attacker.out.drain(..n).collect();
        if chunk.is_empty() || !cmm.has_links() {
            return;
        }
        if attacker.socket.write_all(&chunk).is_err() {
            return;
        }
        attacker.written += chunk.len() as u64;
        let until = Instant::now() + Duration::from_secs(2);
        // The victim reads until it has had every byte written (or the link ended).
        loop {
            cmm.link_readable(token, sink);
            let _ = cmm.take_answers();
            if !cmm.has_links() || bytes_in() - base >= attacker.written {
                break;
            }
            if Instant::now() > until {
                break;
            }
            std::thread::yield_now();
        }
    };

    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        let code = input.u8();
        match code & 0x0f {
            op::RAW => {
                let n = usize::from(input.u16() % 2048);
                let bytes = input.bytes(n);
                attacker.out.extend_from_slice(bytes);
            }
            op::SEALED => {
                let flags = input.u8();
                let n = usize::from(input.u16() % 4400);
                let mut plain = input.bytes(n).to_vec();
                plain.resize(n, 0);
                let payload = usize::from(input.u16());
                let fill = input.u8();
                let sealed = attacker.seal(&plain);
                let len = if flags & 1 != 0 { input.u16() } else { sealed.len() as u16 };
                attacker.out.extend_from_slice(&len.to_be_bytes());
                attacker.out.extend_from_slice(&sealed);
                attacker.out.resize(attacker.out.len() + payload, fill);
            }
            op::FRAMES => frames(&mut attacker, &mut input),
            op::FLUSH => {
                let upto = usize::from(input.u16());
                flush(&mut attacker, &mut cmm, &mut sink, upto);
            }
            op::LISTEN | op::OPEN => {
                let partition = u32::from(input.u8() % 4);
                let process = u32::from(input.u8());
                let remote = Endpoint {
                    node: u32::from(input.u8() % 4),
                    partition: u32::from(input.u8()),
                    process: u32::from(input.u8()),
                };
                let result = if code & 0x0f == op::LISTEN {
                    cmm.listen(partition, process, remote)
                } else {
                    let key_byte = input.u8();
                    let mut key = Filled(key_byte);
                    let key: Option<&mut dyn KeySource> =
                        (key_byte & 1 != 0).then_some(&mut key as &mut dyn KeySource);
                    cmm.open(partition, process, remote, key).map(|o| match o {
                        Opening::Done(id) | Opening::Pending(id) => id,
                    })
                };
                if let Ok(id) = result {
                    victim_channels.push((partition, process, id));
                }
                cmm.flush();
            }
            op::SEND => {
                let pick = usize::from(input.u8());
                let len = u32::from(input.u16());
                let fill = input.u8();
                let forged = input.u8();
                let (partition, process, id) = victim_channels
                    .get(pick % victim_channels.len().max(1))
                    .copied()
                    .unwrap_or((1, 0, ChannelId(0)));
                let source = Endpoint {
                    node: if forged & 1 != 0 { ATTACKER } else { VICTIM },
                    partition,
                    process: process ^ u32::from(forged >> 1),
                };
                let header = TxHeader { channel: id.0, source, len };
                let _ = cmm.send(partition, &header, &mut Filled(fill));
                cmm.flush();
            }
            op::CLOSE => {
                let pick = usize::from(input.u8());
                let revoke = input.u8() & 1 != 0;
                if let Some(&(partition, process, id)) =
                    victim_channels.get(pick % victim_channels.len().max(1))
                {
                    let _ = if revoke {
                        cmm.revoke(partition, id.0)
                    } else {
                        cmm.close(partition, process, id.0)
                    };
                    cmm.flush();
                }
            }
            op::TICK => cmm.tick(),
            op::DRAIN => attacker.drain(),
            op::EPOCH => {
                let pick = usize::from(input.u8());
                let n = attacker.channels.len();
                if let Some(channel) = attacker.channels.get_mut(pick % n.max(1)) {
                    channel.ciphers.tx.advance();
                    channel.epoch += 1;
                }
            }
            op::SINK => sink.mode = input.u8(),
            _ => {}
        }
    }
    flush(&mut attacker, &mut cmm, &mut sink, 0);
    if crate::debugging() {
        eprintln!(
            "link up {}, delivered {}, victim channels {victim_channels:?}, attacker channels {}, \
             offers {:?}",
            cmm.has_links(),
            sink.count,
            attacker.channels.len(),
            attacker.offers
        );
        crate::print_audit(VICTIM);
    }
    let _ = cmm.take_answers();
    let _ = cmm.take_fd_changes();
    // No TIME_WAIT on the attacker's side: millions of inputs would use up the ports.
    let _ = socket2_linger_zero(&attacker.socket);
    drop(cmm);
    drop(attacker);
    drop(manager);
}

fn socket2_linger_zero(socket: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `linger` is a valid `struct linger` for the duration of the call, and its size
    // is passed; the descriptor is the open socket `socket` owns.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn endpoint(input: &mut Input<'_>) -> Endpoint {
    Endpoint {
        node: u32::from(input.u8()),
        partition: u32::from(input.u8()),
        process: u32::from(input.u8()),
    }
}

/// A record of frames read from `input`.
fn frames(attacker: &mut Attacker, input: &mut Input<'_>) {
    let n = input.u8() % 8 + 1;
    let mut block = Vec::new();
    let mut payloads = Vec::new();
    let mut done = false;
    for _ in 0..n {
        let kind = input.u8();
        block.push(kind);
        match kind {
            kind::OFFER => {
                let id = input.u32();
                let source = endpoint(input);
                let destination = endpoint(input);
                let salt = [input.u8(); 16];
                let key = [input.u8(); 32];
                block.extend_from_slice(&id.to_le_bytes());
                block.extend_from_slice(&source.to_bytes());
                block.extend_from_slice(&destination.to_bytes());
                block.extend_from_slice(&salt);
                block.extend_from_slice(&key);
                let ciphers = ciphers(&key, &salt, &source, &destination);
                attacker.channels.push(Channel {
                    local: source,
                    remote: destination,
                    ciphers,
                    seq: 0,
                    epoch: 0,
                });
            }
            kind::OFFER_REPLY => {
                let pick = input.u8();
                let literal = input.u32();
                let result = input.u8();
                let id = if pick & 0x80 != 0 && !attacker.offers.is_empty() {
                    attacker.offers[usize::from(pick & 0x7f) % attacker.offers.len()]
                } else {
                    literal
                };
                block.extend_from_slice(&id.to_le_bytes());
                block.push(result);
            }
            kind::DATA => {
                let pick = usize::from(input.u8());
                let mode = input.u8();
                let len = input.u16();
                let fill = input.u8();
                let delta = input.u8();
                let mut payload = vec![fill; usize::from(len)];
                let count = attacker.channels.len();
                let (source, destination, epoch, seq, tag) =
                    match attacker.channels.get_mut(pick % count.max(1)) {
                        Some(channel) => {
                            let seq = if mode & 2 != 0 {
                                channel.seq.wrapping_add(u64::from(delta))
                            } else {
                                channel.seq
                            };
                            let epoch =
                                if mode & 4 != 0 { u32::from(delta) } else { channel.epoch };
                            let aad = associated_data(&channel.local, &channel.remote, epoch, seq);
                            let mut tag =
                                channel.ciphers.tx.seal(&aad, seq, &mut payload).unwrap_or([0; 16]);
                            if mode & 1 != 0 {
                                tag[0] ^= 1;
                            }
                            if mode & 8 == 0 {
                                channel.seq += 1;
                            }
                            (channel.local, channel.remote, epoch, seq, tag)
                        }
                        None => (endpoint(input), endpoint(input), 0, 0, [0u8; 16]),
                    };
                block.extend_from_slice(&source.to_bytes());
                block.extend_from_slice(&destination.to_bytes());
                block.extend_from_slice(&epoch.to_le_bytes());
                block.extend_from_slice(&seq.to_le_bytes());
                block.extend_from_slice(&u32::from(len).to_le_bytes());
                block.extend_from_slice(&tag);
                payloads.extend_from_slice(&payload);
            }
            kind::CLOSE => {
                block.extend_from_slice(&channel_ends(attacker, input));
                block.push(input.u8());
            }
            kind::CREDIT => {
                block.extend_from_slice(&channel_ends(attacker, input));
                block.extend_from_slice(&input.u64().to_le_bytes());
            }
            kind::REKEY => {
                if input.u8() & 1 != 0 {
                    let keys = keys();
                    let peer = keys.directory.by_id(VICTIM).expect("the victim is listed");
                    let mut msg1 = [0u8; MSG1_SIZE];
                    if let Ok(initiation) =
                        handshake::initiate(&keys.attacker, peer, ATTACKER, VERSION, &mut msg1)
                    {
                        attacker.rekey = Some(initiation);
                    }
                    block.extend_from_slice(&msg1);
                } else {
                    block.extend_from_slice(&input.array::<MSG1_SIZE>());
                }
            }
            kind::REKEY_REPLY => block.extend_from_slice(&input.array::<MSG2_SIZE>()),
            kind::REKEY_DONE => done = true,
            _ => {}
        }
    }
    let sealed = attacker.seal(&block);
    attacker.out.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
    attacker.out.extend_from_slice(&sealed);
    attacker.out.extend_from_slice(&payloads);
    // The initiator sends under the new session after its REKEY_DONE.
    if done && attacker.slots[1 - attacker.tx].is_some() && attacker.rx != attacker.tx {
        attacker.switch_tx();
    }
}

/// A frame's `source` and `destination`: one of the attacker's channels, or any endpoints.
fn channel_ends(attacker: &Attacker, input: &mut Input<'_>) -> [u8; 24] {
    let pick = input.u8();
    let count = attacker.channels.len();
    let (source, destination) = match attacker.channels.get(usize::from(pick) % count.max(1)) {
        Some(channel) if pick & 0x80 != 0 => (channel.local, channel.remote),
        _ => (endpoint(input), endpoint(input)),
    };
    let mut ends = [0u8; 24];
    ends[..12].copy_from_slice(&source.to_bytes());
    ends[12..].copy_from_slice(&destination.to_bytes());
    ends
}

/// Builds link-target inputs (for the seed corpus).
pub struct Ops {
    out: Output,
}

impl Ops {
    /// An input with configuration byte `config`.
    pub fn new(config: u8) -> Self {
        let mut out = Output::default();
        out.u8(config);
        Self { out }
    }

    /// The bytes.
    pub fn finish(self) -> Vec<u8> {
        self.out.bytes
    }

    /// The victim's `partition` listens with `process` for `remote`.
    pub fn listen(&mut self, partition: u8, process: u8, remote: (u8, u8, u8)) -> &mut Self {
        self.out.u8(op::LISTEN).u8(partition).u8(process).u8(remote.0).u8(remote.1).u8(remote.2);
        self
    }

    /// The victim opens a channel (`key`: odd for a guest key).
    pub fn open(&mut self, partition: u8, process: u8, remote: (u8, u8, u8), key: u8) -> &mut Self {
        self.out
            .u8(op::OPEN)
            .u8(partition)
            .u8(process)
            .u8(remote.0)
            .u8(remote.1)
            .u8(remote.2)
            .u8(key);
        self
    }

    /// The victim sends `len` bytes on its `pick`-th channel.
    pub fn send(&mut self, pick: u8, len: u16, fill: u8) -> &mut Self {
        self.out.u8(op::SEND).u8(pick).u16(len).u8(fill).u8(0);
        self
    }

    /// The victim closes its `pick`-th channel.
    pub fn close(&mut self, pick: u8, revoke: bool) -> &mut Self {
        self.out.u8(op::CLOSE).u8(pick).u8(u8::from(revoke));
        self
    }

    /// A record of frames, each given as its encoded operation bytes.
    pub fn frames(&mut self, frames: &[Vec<u8>]) -> &mut Self {
        self.out.u8(op::FRAMES).u8(frames.len() as u8 - 1);
        for f in frames {
            self.out.raw(f);
        }
        self
    }

    /// A sealed record with plaintext `plain` and `payload` bytes of `fill` after it.
    pub fn sealed(&mut self, plain: &[u8], payload: u16, fill: u8) -> &mut Self {
        self.out.u8(op::SEALED).u8(0).u16(plain.len() as u16).raw(plain).u16(payload).u8(fill);
        self
    }

    /// Raw bytes on the stream.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.u8(op::RAW).u16(bytes.len() as u16).raw(bytes);
        self
    }

    /// Writes the first `upto` bytes built (0: all) and lets the victim read them.
    pub fn flush(&mut self, upto: u16) -> &mut Self {
        self.out.u8(op::FLUSH).u16(upto);
        self
    }

    /// The attacker reads the victim's records.
    pub fn drain(&mut self) -> &mut Self {
        self.out.u8(op::DRAIN);
        self
    }

    /// The victim's timer.
    pub fn tick(&mut self) -> &mut Self {
        self.out.u8(op::TICK);
        self
    }

    /// Moves the attacker's `pick`-th channel to its next epoch.
    pub fn epoch(&mut self, pick: u8) -> &mut Self {
        self.out.u8(op::EPOCH).u8(pick);
        self
    }
}

/// Frame encoders for [`Ops::frames`].
pub mod frame {
    use crate::Output;
    use keyhold_devices::link::wire::kind;

    fn ep(out: &mut Output, e: (u8, u8, u8)) {
        out.u8(e.0).u8(e.1).u8(e.2);
    }

    /// KEEPALIVE, GOODBYE, CONFIRM, REKEY_DONE or any other bare type byte.
    pub fn bare(kind: u8) -> Vec<u8> {
        vec![kind]
    }

    /// OFFER with `id`, endpoints, a salt and a key of repeated bytes.
    pub fn offer(
        id: u32,
        source: (u8, u8, u8),
        destination: (u8, u8, u8),
        salt: u8,
        key: u8,
    ) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(kind::OFFER).u32(id);
        ep(&mut out, source);
        ep(&mut out, destination);
        out.u8(salt).u8(key);
        out.bytes
    }

    /// OFFER_REPLY to the victim's `pick`-th offer (top bit set) or to `id`.
    pub fn offer_reply(pick: u8, id: u32, result: u8) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(kind::OFFER_REPLY).u8(pick).u32(id).u8(result);
        out.bytes
    }

    /// DATA of `len` bytes of `fill` on the attacker's `pick`-th channel, sealed correctly
    /// (`mode` 0) or spoiled (bit 0: tag, bit 1: seq + `delta`, bit 2: epoch `delta`).
    pub fn data(pick: u8, mode: u8, len: u16, fill: u8, delta: u8) -> Vec<u8> {
        let mut out = Output::default();
        out.u8(kind::DATA).u8(pick).u8(mode).u16(len).u8(fill).u8(delta);
        out.bytes
    }

    /// CLOSE of the attacker's `pick`-th channel (top bit set), with `reason`.
    pub fn close(pick: u8, reason: u8) -> Vec<u8> {
        vec![kind::CLOSE, pick | 0x80, reason]
    }

    /// REKEY: a real one (`real`) or 113 junk bytes.
    pub fn rekey(real: bool) -> Vec<u8> {
        let mut out = vec![kind::REKEY, u8::from(real)];
        if !real {
            out.extend_from_slice(&[0x42; 113]);
        }
        out
    }
}
