//! Tries what a compromised process would: sending as another partition, node or process,
//! sending on a channel never opened, opening to an endpoint that never listened, and
//! malformed requests. Every attempt must fail with the right status; a real message must still
//! get through afterwards. Arguments: `peer=N:P:Q` (an echo partition listening for us),
//! `process=N` (1). Exits 0 when every check holds.
#![no_std]
#![no_main]

use guest_agent::channel::abi::{op, status, ControlRequest, Endpoint, TxHeader};
use guest_agent::channel::{ChannelError, SecureChannel};
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

fn main(info: &'static BootInfo) -> u32 {
    let Some(peer) = info.arg_endpoint("peer") else {
        println!("forge: needs peer=NODE:PARTITION:PROCESS");
        return 2;
    };
    let process = info.arg_u64("process", 1).unwrap_or(1) as u32;
    let Some(mut ch) = open_channel(info, "forge") else { return CANNOT_RUN };
    let Ok(channel) = ch.connect_patiently(info, process, peer, None, 1000) else {
        println!("forge: could not open the legitimate channel");
        return 2;
    };
    let me = ch.endpoint(process);
    let mut failures = 0;
    let mut check = |what: &str, got: u32, want: u32| {
        let verdict = if got == want { "refused as expected" } else { "WRONG" };
        println!("forge: {what}: status {got} (want {want}): {verdict}");
        if got != want {
            failures += 1;
        }
    };

    let send_as = |ch: &mut SecureChannel, source: Endpoint, channel: u32| {
        status_of(ch.send_as(channel, source, b"forged"))
    };
    check(
        "source in another partition",
        send_as(&mut ch, Endpoint { partition: me.partition + 1, ..me }, channel),
        status::FORGED_SOURCE,
    );
    check(
        "source on another node",
        send_as(&mut ch, Endpoint { node: me.node + 1, ..me }, channel),
        status::FORGED_SOURCE,
    );
    check(
        "source another process",
        send_as(&mut ch, Endpoint { process: process + 1, ..me }, channel),
        status::FORGED_SOURCE,
    );
    check("channel never opened", send_as(&mut ch, me, 0x7777), status::NO_CHANNEL);
    let stranger = Endpoint { process: 999, ..peer };
    check(
        "open to an endpoint that never listened",
        status_of(ch.connect(process, stranger, None).map(|_| ())),
        status::NO_LISTENER,
    );

    let raw = |op: u32, flags: u32| {
        ControlRequest { op, flags, process, remote: peer, ..Default::default() }.to_bytes()
    };
    check("unknown operation", ch.control_raw(raw(99, 0)).unwrap_or(u32::MAX), status::UNKNOWN_OP);
    check(
        "listen with reserved flags",
        ch.control_raw(raw(op::LISTEN, 0x80)).unwrap_or(u32::MAX),
        status::BAD_REQUEST,
    );
    check(
        "list with reserved flags",
        ch.control_raw(raw(op::LIST, 1)).unwrap_or(u32::MAX),
        status::BAD_REQUEST,
    );
    let mut reserved = raw(op::LIST, 0);
    reserved[29] = 1;
    check("reserved bytes set", ch.control_raw(reserved).unwrap_or(u32::MAX), status::BAD_REQUEST);
    let huge = TxHeader { channel, source: me, len: 1 << 20 }.to_bytes();
    check("length past max_message", ch.send_raw(huge, b"x").unwrap_or(u32::MAX), status::TOO_BIG);
    let short = TxHeader { channel, source: me, len: 100 }.to_bytes();
    check(
        "length past the buffer",
        ch.send_raw(short, b"only 10 b.").unwrap_or(u32::MAX),
        status::BAD_REQUEST,
    );

    // The legitimate path still works, and the echo proves who sent it.
    let mut back = [0u8; 16];
    let echoed = ch.send(channel, process, b"genuine").is_ok()
        && ch.recv_wait(&mut back).ok().map(|m| (m.header.source, m.copied)) == Some((peer, 7));
    println!("forge: genuine message echoed: {echoed}");
    if !echoed || &back[..7] != b"genuine" {
        failures += 1;
    }
    match ch.stats() {
        Ok(stats) => println!(
            "forge: device counted {} forged sends, {} refused requests",
            stats.forged, stats.refused
        ),
        Err(_) => failures += 1,
    }
    let _ = ch.send(channel, process, &[]);
    println!("forge: {failures} checks failed");
    u32::from(failures != 0)
}

fn status_of(result: Result<(), ChannelError>) -> u32 {
    match result {
        Ok(()) => status::OK,
        Err(ChannelError::Status(code)) => code,
        Err(_) => u32::MAX,
    }
}

guest_agent::entry!(main);
