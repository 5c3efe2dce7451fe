//! Writes the seed corpora: `cargo run --release --example make_corpus -- fuzz/corpus`
//! (`scripts/fuzz.sh corpus`). Deterministic: the same files every time.
//!
//! The seeds take each target deep at once: a channel opened and used between the two
//! partitions, a vsock connection made, used and ended (and every way one is refused), a
//! channel offered over the link and messages sealed with its key, a real rekey, every route of
//! the API, valid configuration files.

use std::path::Path;

use keyhold_devices::link::wire::kind;
use keyhold_devices::virtio::mmio::reg;
use keyhold_devices::virtio::vsock::packet::op as vsock_op;
use keyhold_fuzz::devices::{Ops, Profile};
use keyhold_fuzz::link::{self, frame};
use keyhold_fuzz::vsock::{Cid, Len, Packet};

const LISTEN: u32 = 1;
const OPEN: u32 = 2;
const CLOSE: u32 = 3;
const LIST: u32 = 4;
const STATS: u32 = 5;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("a seed");
}

fn mmio(dir: &Path) {
    let mut all = Ops::new(Profile::Mmio, false, 0);
    for offset in (0..0x100).step_by(4).chain([0x100, 0x104, 0x110]) {
        all.reg_read(0, offset, 4);
    }
    all.reg_read(2, 0x101, 2);
    write(dir, "mmio", "read-every-register", &all.finish());
    for (device, queues, name) in [(0, 3, "channel"), (1, 3, "channel-2"), (2, 1, "rng")] {
        let mut ops = Ops::new(Profile::Mmio, false, 0);
        ops.raw_init(device, queues);
        ops.notify(device, 0).reg_read(device, reg::STATUS as u16, 4);
        ops.reg_write(device, reg::INTERRUPT_ACK as u16, 3).reg_write(
            device,
            reg::STATUS as u16,
            0,
        );
        write(dir, "mmio", &format!("init-{name}"), &ops.finish());
    }
    let mut bad = Ops::new(Profile::Mmio, false, 0);
    bad.reg_write(0, reg::STATUS as u16, 1).reg_write(0, reg::STATUS as u16, 7);
    bad.reg_write(0, reg::STATUS as u16, 1).reg_write(0, reg::STATUS as u16, 0);
    write(dir, "mmio", "driver-ok-without-features", &bad.finish());
}

fn rng(dir: &Path) {
    let mut one = Ops::new(Profile::Rng, true, 3);
    one.chain(2, 0, &[(1, 0, 64)]).notify(2, 0);
    one.chain(2, 0, &[(1, 0x100, 16), (1, 0x200, 4096)]).notify(2, 0);
    write(dir, "rng_queue", "two-requests", &one.finish());
    let mut odd = Ops::new(Profile::Rng, false, 2);
    odd.chain(2, 0, &[(0, 0, 32)]).chain(2, 0, &[(3, 0x40, 48)]).notify(2, 0);
    odd.avail_idx(2, 0, 200).notify(2, 0).reinit(2).chain(2, 0, &[(1, 0, 8)]).notify(2, 0);
    write(dir, "rng_queue", "readable-indirect-and-bad-index", &odd.finish());
}

/// LISTEN in partition 1 and OPEN from partition 2: a channel on one node.
fn channel_open(ops: &mut Ops, guest_key: bool) {
    ops.control(0, LISTEN, 7, 0, (1, 2, 9)).notify(0, 0);
    // Flags (bit 8 up): the guest's own key.
    ops.control(1, OPEN | if guest_key { 0x100 } else { 0 }, 9, 0, (1, 1, 7)).notify(1, 0);
}

fn channel(dir: &Path) {
    let mut chat = Ops::new(Profile::Channel, true, 4);
    channel_open(&mut chat, false);
    chat.receive(0, 2, 256).notify_thread(0, 2);
    chat.send(1, 0, 100, 0x11).notify(1, 1);
    chat.receive(1, 1, 256).notify_thread(1, 2);
    chat.send(0, 0, 32, 0x22).notify(0, 1);
    chat.control(0, LIST, 7, 0, (0, 0, 0)).control(0, STATS, 7, 0, (0, 0, 0)).notify(0, 0);
    chat.control(1, CLOSE, 9, 0x80, (0, 0, 0)).notify(1, 0);
    chat.send(0, 0, 8, 0x33).notify(0, 1);
    write(dir, "channel_queue", "open-send-both-ways-close", &chat.finish());

    let mut held = Ops::new(Profile::Channel, false, 4);
    channel_open(&mut held, true);
    for i in 0..4 {
        held.send(1, 0, 1000 + i, i as u8).notify(1, 1);
    }
    held.receive(0, 1, 64).receive(0, 2, 2048).notify(0, 0).notify_thread(0, 2);
    write(dir, "channel_queue", "held-then-delivered", &held.finish());

    let mut big = Ops::new(Profile::Channel, false, 4);
    channel_open(&mut big, false);
    big.receive(0, 1, 65568).send(1, 0, 65535, 0x5a).notify(1, 1);
    big.send(1, 0, 40000, 0xa5).notify_thread(1, 1);
    write(dir, "channel_queue", "large-messages", &big.finish());

    let mut refused = Ops::new(Profile::Channel, false, 4);
    refused.control(0, 9, 1, 0, (0, 0, 0)).control(0, LISTEN, 1, 0, (1, 1, 1));
    refused.control(0, OPEN, 1, 0, (2, 1, 1)).control(0, CLOSE, 1, 5, (0, 0, 0)).notify(0, 0);
    refused.send(0, 3, 10, 0).notify(0, 1).notify(0, 3).notify(1, 0xf0);
    write(dir, "channel_queue", "refusals", &refused.finish());

    let mut stop = Ops::new(Profile::Channel, true, 4);
    channel_open(&mut stop, false);
    stop.reinit(0).send(1, 0, 10, 1).notify(1, 1).chain(1, 1, &[(0, 0, 24), (1, 0x10, 4)]);
    stop.notify(1, 1).avail_idx(1, 1, 9000).notify(1, 1);
    write(dir, "channel_queue", "reset-and-broken-queue", &stop.finish());
}

/// Device 0 is CID 3, device 1 CID 4; the policy lets CID 4 connect to port 5000 of CID 3,
/// anyone to port 7 of CID 3, and CID 3 from port 2000 to any port of CID 4.
fn vsock(dir: &Path) {
    use vsock_op::{CREDIT_REQUEST, CREDIT_UPDATE, REQUEST, RESPONSE, RST, RW, SHUTDOWN};
    let (rx, tx) = (0, 1);
    // From device `d`'s `port` to the other device's `to` (`len` payload bytes).
    let to_peer = |op, port, to, len| Packet::new(op, port, Cid::Other, to, len);

    // CID 4 connects to 3:5000; both send, one in pieces with its header cut in two and a
    // device-writable descriptor in the chain; credit asked for and given; shut down, reset.
    let mut full = Ops::set_up(true, 4);
    full.buffers(0, &[4096, 4096, 4096, 4096], 0).buffers(1, &[4096, 4096, 4096, 4096], 0);
    full.notify(0, rx).notify(1, rx);
    full.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    full.packet(0, &to_peer(RESPONSE, 5000, 1024, 0)).notify(0, tx);
    full.packet(1, &to_peer(RW, 1024, 5000, 100)).notify(1, tx);
    let split = Packet {
        pieces: 3,
        header_cut: Some(10),
        write_only: Some((4, 2)),
        ..to_peer(RW, 5000, 1024, 300)
    };
    full.packet(0, &split).notify_thread(0, tx);
    full.packet(1, &to_peer(CREDIT_REQUEST, 1024, 5000, 0)).notify(1, tx);
    let update = Packet { fwd_cnt: 300, ..to_peer(CREDIT_UPDATE, 5000, 1024, 0) };
    full.packet(0, &update).notify(0, tx);
    full.buffers(0, &[4096, 4096], 2).notify_thread(0, rx);
    full.packet(1, &Packet { flags: 3, ..to_peer(SHUTDOWN, 1024, 5000, 0) }).notify(1, tx);
    full.packet(0, &to_peer(RST, 5000, 1024, 0)).notify(0, tx);
    write(dir, "vsock_queue", "connect-use-shutdown-reset", &full.finish());

    // Forged sources: the other partition's CID, the host's, CID 4 with high bits set.
    let mut forged = Ops::set_up(false, 4);
    forged.buffers(0, &[256, 256], 0).buffers(1, &[256, 256, 256], 0);
    forged.packet(1, &Packet { src: Cid::Other, ..to_peer(REQUEST, 1024, 5000, 0) });
    forged.packet(1, &Packet { src: Cid::Host, ..to_peer(RW, 1024, 5000, 8) });
    forged.packet(1, &Packet { src: Cid::Raw(0x1_0000_0004), ..to_peer(REQUEST, 1, 7, 0) });
    forged.notify(1, tx).notify(0, rx).notify(1, rx);
    write(dir, "vsock_queue", "forged-source", &forged.finish());

    // Flows the policy forbids: CID 4 to 3:5001; CID 3 to CID 4 but not from port 2000; CID 4
    // to itself. Then the allowed one beside them: CID 3 from 2000, and anyone to 3:7 (CID 3
    // itself too).
    let mut policy = Ops::set_up(true, 3);
    policy.buffers(0, &[512; 4], 0).buffers(1, &[512; 4], 0);
    policy.packet(1, &to_peer(REQUEST, 1024, 5001, 0));
    policy.packet(1, &Packet::new(REQUEST, 1024, Cid::Own, 5000, 0)).notify(1, tx);
    policy.packet(0, &to_peer(REQUEST, 1024, 80, 0)).packet(0, &to_peer(REQUEST, 2000, 80, 0));
    policy.packet(0, &Packet::new(REQUEST, 1025, Cid::Own, 7, 0)).notify_thread(0, tx);
    policy.packet(0, &Packet::new(RESPONSE, 7, Cid::Own, 1025, 0));
    policy.packet(0, &Packet::new(RW, 1025, Cid::Own, 7, 64)).notify(0, tx);
    write(dir, "vsock_queue", "forbidden-and-allowed-flows", &policy.finish());

    // CIDs no partition has: the host's (no program listens), 9, 2^32 + 3; packets a device
    // does not carry: a seqpacket, operations 0 and 8, a len beyond the payload or above
    // 64 KiB, a chain that ends inside its header.
    let mut nobody = Ops::set_up(false, 5);
    nobody.buffers(1, &[1024; 4], 0).buffers(1, &[1024; 4], 0).notify(1, rx);
    nobody.packet(1, &Packet::new(REQUEST, 1024, Cid::Host, 22, 0));
    nobody.packet(1, &Packet::new(REQUEST, 1024, Cid::Raw(9), 5000, 0));
    nobody.packet(1, &Packet::new(RW, 1024, Cid::Raw(0x1_0000_0003), 5000, 4));
    nobody.packet(1, &Packet { seqpacket: true, ..to_peer(REQUEST, 1024, 5000, 0) });
    nobody.packet(1, &to_peer(0, 1024, 5000, 0)).packet(1, &to_peer(8, 1024, 5000, 0));
    nobody.packet(1, &Packet { len: Len::Off(5), ..to_peer(RW, 1024, 5000, 10) });
    nobody.packet(1, &Packet { len: Len::Raw(70_000), ..to_peer(RW, 1024, 5000, 10) });
    nobody.packet(1, &Packet { len: Len::Cut(30), ..to_peer(REQUEST, 1024, 5000, 0) });
    nobody.notify(1, tx);
    write(dir, "vsock_queue", "unknown-cids-and-bad-packets", &nobody.finish());

    // A receive buffer too small for a header: the device needs a reset (the driver's reset
    // ends the connection asked for meanwhile). Then a buffer of exactly a header, a 64 KiB
    // packet split over buffers of several descriptors each, and last a buffer of no bytes.
    let mut tiny = Ops::set_up(true, 4);
    tiny.buffers(0, &[43], 0).notify(0, rx).buffers(1, &[128; 4], 0).notify(1, rx);
    tiny.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    tiny.reg_read(0, reg::STATUS as u16, 4).reinit(0);
    tiny.buffers(0, &[44, 4096], 2).notify(0, rx);
    tiny.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    let plenty = Packet { buf_alloc: 1 << 24, ..to_peer(RESPONSE, 5000, 1024, 0) };
    tiny.packet(0, &plenty).notify(0, tx).buffers(0, &[65535, 200, 45], 3).notify(0, rx);
    tiny.packet(1, &to_peer(RW, 1024, 5000, 65535)).notify(1, tx);
    tiny.buffers(0, &[1000; 4], 0).notify_thread(0, rx);
    tiny.reinit(0).buffers(0, &[0], 0).notify(0, rx);
    tiny.packet(1, &to_peer(REQUEST, 1025, 5000, 0)).notify(1, tx);
    write(dir, "vsock_queue", "tiny-buffers-and-split-payload", &tiny.finish());

    // A sender past the credit its peer offered (100 bytes): the connection is reset.
    let mut greedy = Ops::set_up(false, 4);
    greedy.buffers(0, &[2048; 4], 0).buffers(1, &[2048; 4], 0).notify(0, rx).notify(1, rx);
    greedy.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    let small = Packet { buf_alloc: 100, ..to_peer(RESPONSE, 5000, 1024, 0) };
    greedy.packet(0, &small).notify(0, tx);
    greedy.packet(1, &to_peer(RW, 1024, 5000, 60)).packet(1, &to_peer(RW, 1024, 5000, 60));
    greedy.notify(1, tx).packet(1, &to_peer(RW, 1024, 5000, 1)).notify(1, tx);
    write(dir, "vsock_queue", "over-credit", &greedy.finish());

    // A partition stops in the middle of a connection (its peer gets an RST) and starts again
    // with a new device; the peer's data waits for buffers; the connection is made again.
    let mut stop = Ops::set_up(true, 4);
    stop.buffers(0, &[4096; 4], 0).buffers(1, &[4096; 4], 0).notify(0, rx).notify(1, rx);
    stop.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    stop.packet(0, &to_peer(RESPONSE, 5000, 1024, 0)).notify(0, tx);
    stop.packet(0, &to_peer(RW, 5000, 1024, 3000)).notify(0, tx).stop(1, false);
    stop.packet(0, &to_peer(RW, 5000, 1024, 10)).notify(0, tx).stop(1, true);
    stop.buffers(1, &[4096; 2], 0).notify(1, rx).buffers(0, &[4096; 4], 0).notify(0, rx);
    stop.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify_thread(1, tx);
    stop.packet(0, &to_peer(RESPONSE, 5000, 1024, 0)).notify(0, tx);
    stop.packet(1, &to_peer(RW, 1024, 5000, 20)).notify(1, tx);
    write(dir, "vsock_queue", "stop-and-start-again", &stop.finish());

    // The operator resets CID 3's transport in the middle of a connection: its driver gets an
    // RST and TRANSPORT_RESET in its event buffer (one of 16 bytes, one of 2), the peer an
    // RST; the connection is made again; a second reset finds the small event buffer.
    let mut reset = Ops::set_up(true, 4);
    reset.buffers(0, &[4096; 4], 0).buffers(1, &[4096; 4], 0).notify(0, rx).notify(1, rx);
    reset.buffers(0, &[16, 2], 8);
    reset.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    reset.packet(0, &to_peer(RESPONSE, 5000, 1024, 0)).notify(0, tx);
    reset.packet(1, &to_peer(RW, 1024, 5000, 500)).notify(1, tx).reset_vsock(0);
    reset.buffers(0, &[4096; 2], 0).notify(0, rx);
    reset.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    reset.packet(0, &to_peer(RESPONSE, 5000, 1024, 0)).notify(0, tx).reset_vsock(0);
    reset.reset_vsock(1).packet(0, &to_peer(RW, 5000, 1024, 20)).notify(0, tx);
    write(dir, "vsock_queue", "operator-resets-the-transport", &reset.finish());

    // Queues of two entries, a raw chain and a bad avail index on the transmit queue, an event
    // buffer, a notification of the event queue.
    let mut raw = Ops::set_up(false, 0);
    raw.buffers(0, &[64, 64], 8).notify(0, 2).notify_thread(0, 2);
    raw.chain(1, 1, &[(0, 0, 44), (1, 0x100, 16)]).notify(1, tx);
    raw.avail_idx(1, 1, 7).notify(1, tx).reinit(1);
    raw.packet(1, &to_peer(REQUEST, 1024, 5000, 0)).notify(1, tx);
    write(dir, "vsock_queue", "small-rings-and-raw-chains", &raw.finish());

    // Queues of three entries (no power of two: the transport refuses them) and of one.
    for (size, name) in [(0xfa, "queues-of-three"), (0xf8, "queues-of-one")] {
        let mut odd = Ops::set_up(false, size);
        let request = Packet { pieces: 0, ..to_peer(REQUEST, 1024, 5000, 0) };
        odd.buffers(0, &[256], 0).notify(0, rx).packet(1, &request).notify(1, tx);
        odd.notify_thread(1, tx).reinit(1).notify(1, tx);
        write(dir, "vsock_queue", name, &odd.finish());
    }
}

fn link_seeds(dir: &Path) {
    // The victim (node 2) listens in partition 1 for 1:1:3; the attacker offers that channel
    // and sends sealed messages, then closes it.
    let mut offer = link::Ops::new(0);
    offer.listen(1, 5, (1, 1, 3));
    offer.frames(&[frame::offer(7, (1, 1, 3), (2, 1, 5), 0x33, 0x44)]).flush(0);
    offer.frames(&[frame::data(0, 0, 100, 0x61, 0), frame::data(0, 0, 0, 0, 0)]).flush(0);
    offer.frames(&[frame::data(0, 0, 4000, 0x62, 0), frame::bare(kind::KEEPALIVE)]).flush(0);
    offer.frames(&[frame::data(0, 1, 10, 0, 0), frame::data(0, 2, 10, 0, 3)]).flush(0);
    offer.frames(&[frame::close(0, 0)]).flush(0);
    write(dir, "link", "offer-data-close", &offer.finish());

    // The victim opens a channel to node 1: the attacker reads the offer, accepts it, and
    // both send.
    let mut open = link::Ops::new(2);
    open.open(1, 4, (1, 2, 6), 0).drain();
    open.frames(&[frame::offer_reply(0x80, 0, 0)]).flush(0);
    open.send(0, 64, 0x71).send(0, 64, 0x72).send(0, 64, 0x73).drain();
    open.frames(&[frame::data(0, 0, 64, 0x10, 0)]).flush(0);
    open.epoch(0).frames(&[frame::data(0, 0, 64, 0x11, 0)]).flush(0);
    open.close(0, true).drain();
    write(dir, "link", "open-reply-send", &open.finish());

    // A real rekey in the middle of traffic.
    let mut rekey = link::Ops::new(0);
    rekey.listen(2, 1, (1, 2, 1));
    rekey.frames(&[frame::offer(1, (1, 2, 1), (2, 2, 1), 1, 2)]).flush(0);
    rekey.frames(&[frame::rekey(true)]).flush(0).drain();
    rekey.frames(&[frame::data(0, 0, 10, 1, 0), frame::bare(kind::REKEY_DONE)]).flush(0);
    rekey.frames(&[frame::data(0, 0, 10, 2, 0)]).flush(0).tick();
    write(dir, "link", "rekey", &rekey.finish());

    // Records split across reads, then broken ones.
    let mut split = link::Ops::new(1);
    split.frames(&[frame::bare(kind::KEEPALIVE)]).flush(3).flush(0);
    split.sealed(&[kind::DATA], 0, 0).sealed(&[99], 10, 0).flush(0);
    write(dir, "link", "split-and-malformed", &split.finish());
    let mut raw = link::Ops::new(0);
    raw.raw(&[0, 40]).raw(&[7; 40]).flush(0);
    write(dir, "link", "garbage-record", &raw.finish());
    let mut junk = link::Ops::new(0);
    junk.frames(&[frame::rekey(false)]).flush(0);
    junk.frames(&[frame::offer_reply(0, 9, 7), frame::bare(kind::CONFIRM)]).flush(0);
    write(dir, "link", "junk-frames", &junk.finish());
}

fn wire(dir: &Path) {
    // docs/PROTOCOL.md, section 11.
    let vectors: [(&str, &str); 5] = [
        ("keepalive", "01"),
        ("confirm", "03"),
        ("offer-reply", "050700000001"),
        ("close", "0701000000020000000300000004000000050000000600000001"),
        ("data", "06010000000200000003000000040000000500000006000000010000000800000000000000070000009775d28b1da712be3950690499a8a154"),
    ];
    for (name, hex) in vectors {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        write(dir, "wire", name, &bytes);
    }
    let mut offer = vec![kind::OFFER];
    offer.extend_from_slice(&[1; 76]);
    offer.push(kind::REKEY_DONE);
    write(dir, "wire", "offer-rekey-done", &offer);
    let mut rekey = vec![kind::REKEY];
    rekey.extend_from_slice(&[2; 113]);
    rekey.push(kind::REKEY_REPLY);
    rekey.extend_from_slice(&[3; 49]);
    write(dir, "wire", "rekey-reply", &rekey);
}

fn abi(dir: &Path) {
    let mut open = vec![0u8; 64 + 24 + 32 + 16 + 56 + 72];
    open[0] = 2;
    open[4] = 1;
    open[16] = 1;
    open[20] = 2;
    open[64 + 16] = 100;
    let mut seed = open.clone();
    seed.extend_from_slice(b"1:2:3");
    write(dir, "abi", "open-and-endpoint", &seed);
    open[28] = 1;
    open[64 + 20] = 1;
    open.extend_from_slice(b"4294967295:0:7");
    write(dir, "abi", "reserved-set", &open);
}

fn api(dir: &Path) {
    let requests = [
        ("node", "GET /v1/node HTTP/1.1\r\nHost: keyhold\r\n\r\n"),
        ("partitions", "GET /v1/partitions HTTP/1.1\r\n\r\n"),
        ("channels", "GET /v1/channels HTTP/1.1\r\n\r\n"),
        ("stats", "GET /v1/stats HTTP/1.0\r\n\r\n"),
        ("links", "GET /v1/links HTTP/1.1\r\n\r\n"),
        ("audit", "GET /v1/audit/ HTTP/1.1\r\n\r\n"),
        ("revoke", "POST /v1/channels/1/0x10001/revoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        ("revoke-decimal", "POST /v1/channels/2/65537/revoke HTTP/1.1\r\n\r\n"),
        ("revoke-bad", "POST /v1/channels/x/0xzz/revoke HTTP/1.1\r\n\r\n"),
        ("method", "DELETE /v1/node HTTP/1.1\r\n\r\n"),
        ("metrics", "GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n\r\n"),
        ("query", "GET /v1/links?peer=2&x HTTP/1.1\r\n\r\n"),
        ("stop", "POST /v1/partitions/1/stop HTTP/1.1\r\n\r\n"),
        ("head", "HEAD /v1/node HTTP/1.1\r\n\r\n"),
        ("reload", "POST /v1/reload HTTP/1.1\r\n\r\n"),
        ("membership", "GET /v1/membership HTTP/1.1\r\n\r\n"),
        ("vsock-reset", "POST /v1/partitions/1/vsock/reset HTTP/1.1\r\n\r\n"),
        ("stop-stopped", "POST /v1/partitions/2/stop HTTP/1.1\r\n\r\n"),
        ("no-route", "GET /v2/%00 HTTP/1.1\r\n\r\n"),
        ("not-http", "GET /v1/node\r\n\r\n"),
        ("incomplete", "GET /v1/node HTTP/1.1\r\n"),
    ];
    for (name, text) in requests {
        write(dir, "api", name, text.as_bytes());
    }
}

fn configs(dir: &Path) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["one-node.toml", "hostile.toml"] {
        let text = std::fs::read(examples.join(name)).expect("an example config");
        write(dir, "node_config", name, &text);
    }
    let full = "[node]\nid = 1\naudit_log = \"audit.jsonl\"\ncluster = \"cluster.toml\"\n\
        private_key_file = \"node1.key\"\nlisten = \"0.0.0.0:7000\"\napi_socket = \"n.sock\"\n\n\
        [links]\nhandshake_timeout_secs = 5\nkeepalive_secs = 1\ndead_after_secs = 3.5\n\
        rekey_after_secs = 120\nrekey_after_messages = 16\nsend_backlog_mib = 64\n\
        max_unauthenticated = 256\nmax_unauthenticated_per_address = 8\n\
        handshakes_per_second = 500\nhandshakes_per_second_per_address = 20\n\n\
        [channels]\ncapacity = 65536\nper_partition = 64\nkey_lifetime_messages = 1024\n\
        key_lifetime_secs = 600\n\n[[partition]]\nid = 1\nfirmware = \"echo.elf\"\n\
        memory_mib = 64\nargs = \"peer=1:2:1\"\n\n[[partition]]\nid = 2\nfirmware = \"ping.elf\"\n";
    write(dir, "node_config", "cluster-node", full.as_bytes());
    let bad = "[node]\nid = 1\nlisten = \"nowhere\"\n[[partition]]\nid = 1\nfirmware = \"a\"\n\
        [[partition]]\nid = 1\nfirmware = \"b\"\n";
    write(dir, "node_config", "bad", bad.as_bytes());
    let key_a = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    let key_b = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
    let cluster = format!(
        "[[node]]\nid = 1\naddress = \"127.0.0.1:7001\"\npublic_key = \"{key_a}\"\n\n\
         [[node]]\nid = 2\naddress = \"[::1]:7002\"\npublic_key = \"{key_b}\"\n"
    );
    write(dir, "cluster_config", "two-nodes", cluster.as_bytes());
    let dup = format!(
        "[[node]]\nid = 1\naddress = \"10.0.0.1:1\"\npublic_key = \"{key_a}\"\n\
         [[node]]\nid = 1\naddress = \"localhost:1\"\npublic_key = \"short\"\n"
    );
    write(dir, "cluster_config", "duplicates", dup.as_bytes());
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    mmio(dir);
    rng(dir);
    channel(dir);
    vsock(dir);
    link_seeds(dir);
    wire(dir);
    abi(dir);
    api(dir);
    configs(dir);
}
