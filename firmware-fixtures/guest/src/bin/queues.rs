//! Drives both devices' queues through what virtio 1.2 (4.2.2) lets a driver do with them,
//! and what a buggy driver does: stop a queue after DRIVER_OK and read QueueReady back,
//! set it up again on new rings and go on; misalign a ring or give a size that is not a
//! power of two (the device must refuse DRIVER_OK); notify during a reset (ignored); stop the
//! secure channel's receive queue mid-conversation with the echo partition named by
//! `peer=N:P:Q` (what arrives meanwhile waits in the device). Exits 0 when all of that holds.
#![no_std]
#![no_main]

use guest_agent::boot_info::DeviceKind;
use guest_agent::channel::abi::{self, Endpoint, RxHeader};
use guest_agent::channel::driver::{RX_SLOTS, TX_SLOTS};
use guest_agent::channel::{Reply, SecureChannel};
use guest_agent::idle::Backoff;
use guest_agent::virtio::queue::{Buffer, Virtqueue};
use guest_agent::virtio::registers::{reg, status};
use guest_agent::virtio::rng::DEVICE_ID as RNG;
use guest_agent::virtio::transport::Transport;
use guest_agent::virtio::{DriverError, F_VERSION_1};
use guest_agent::{println, BootInfo};
use keyhold_fixture_programs::{open_channel, CANNOT_RUN};

const QSIZE: u16 = 8;

struct Cases {
    failures: u32,
}

impl Cases {
    fn expect(&mut self, what: impl core::fmt::Display, ok: bool) {
        println!("queues: {what}: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            self.failures += 1;
        }
    }
}

/// Asks the rng for 16 bytes on `queue`; true if it answered with all of them.
fn entropy(t: &Transport, queue: &mut Virtqueue) -> bool {
    let mut buf = [0u8; 16];
    if queue.add(&[Buffer::writable(&mut buf)]).is_err() {
        return false;
    }
    queue.kick();
    let mut backoff = Backoff::new();
    for _ in 0..1_000_000 {
        match queue.poll() {
            Ok(Some((_, len))) => return len == 16,
            Ok(None) => {}
            Err(_) => return false,
        }
        if t.check().is_err() {
            return false;
        }
        backoff.snooze();
    }
    false
}

/// Resets the rng and takes it through set-up with queue 0 on fresh rings.
fn rng_up(t: &Transport) -> Result<Virtqueue, DriverError> {
    t.negotiate(F_VERSION_1)?;
    let queue = t.setup_queue(0, QSIZE, false)?;
    t.driver_ok()?;
    Ok(queue)
}

fn needs_reset(t: &Transport) -> bool {
    t.read(reg::STATUS) & status::NEEDS_RESET != 0
}

/// Sets queue 0 up, then stops it, writes `register` = `value` and enables it again.
fn with_bad_value(t: &Transport, register: u64, value: u32) -> bool {
    let setup = t.negotiate(F_VERSION_1).and_then(|_| t.setup_queue(0, QSIZE, false));
    if setup.is_err() || t.stop_queue(0).is_err() {
        return false;
    }
    t.write(register, value);
    t.write(reg::QUEUE_READY, 1);
    // The device must refuse to run with it.
    t.driver_ok().is_err() && needs_reset(t)
}

fn rng_cases(cases: &mut Cases, t: &Transport) {
    let up = rng_up(t);
    let answered = up.map(|mut q| entropy(t, &mut q)).unwrap_or(false);
    cases.expect("virtio-rng answers on its first rings", answered);

    let stopped = t.stop_queue(0).is_ok();
    cases.expect("QueueReady reads back 0 after the driver writes 0 (after DRIVER_OK)", stopped);
    let again = t.setup_queue(0, QSIZE, false);
    let answered = again.map(|mut q| entropy(t, &mut q)).unwrap_or(false);
    cases.expect("a stopped queue set up on new rings works again", answered && !needs_reset(t));

    for (what, register, value) in [
        ("a queue size that is not a power of two", reg::QUEUE_NUM, 12),
        ("a queue size of 0", reg::QUEUE_NUM, 0),
        ("a descriptor table not 16-byte aligned", reg::QUEUE_DESC_LOW, 0x1008),
        ("a used ring not 4-byte aligned", reg::QUEUE_DEVICE_LOW, 0x3002),
    ] {
        let refused = with_bad_value(t, register, value);
        cases.expect(format_args!("DRIVER_OK refused after {what}"), refused);
    }

    let rearmed = rng_up(t).is_ok_and(|_| {
        t.stop_queue(0).is_ok() && {
            t.write(reg::QUEUE_NUM, 3);
            t.write(reg::QUEUE_READY, 1);
            needs_reset(t)
        }
    });
    cases.expect("re-enabling a stopped queue with a refused size needs a reset", rearmed);

    // A notification that races a reset: the device ignores it and works once set up.
    let _ = t.negotiate(F_VERSION_1);
    t.write(reg::QUEUE_NOTIFY, 0);
    t.write(reg::STATUS, 0);
    t.write(reg::QUEUE_NOTIFY, 0);
    let answered = rng_up(t).map(|mut q| entropy(t, &mut q)).unwrap_or(false);
    cases.expect("notifications during a reset are ignored", answered && !needs_reset(t));
}

fn channel_cases(cases: &mut Cases, info: &BootInfo, peer: Endpoint) -> bool {
    let Some(mut ch) = open_channel(info, "queues") else { return false };
    let Ok(channel) = ch.connect_patiently(info, 1, peer, None, 1000) else { return false };
    let mut back = [0u8; 16];
    let echoed = ch.send(channel, 1, b"before").is_ok()
        && ch.recv_wait(&mut back).is_ok_and(|m| m.copied == 6 && &back[..6] == b"before");
    cases.expect("the echo answers", echoed);

    // Stop the receive queue, then send: the echo's answer waits in the device.
    let stopped = ch.stop_receive().is_ok();
    let sent = ch.send(channel, 1, b"while stopped").is_ok();
    guest_agent::time::spin_for(info, 50_000);
    let restarted = ch.restart_receive().is_ok();
    let held =
        ch.recv_wait(&mut back).is_ok_and(|m| m.copied == 13 && &back[..13] == b"while stopped");
    cases.expect(
        "an answer that came while the receive queue was stopped arrives once it is back",
        stopped && sent && restarted && held,
    );
    let lent = lend_across_restart(&mut ch, info, channel);
    cases.expect(
        "a receive buffer lent to a reply goes back once, when its send is reaped, across a \
         restart of the receive queue",
        lent,
    );
    let _ = ch.send(channel, 1, &[]);
    true
}

/// Answers an echo from its receive buffer (`recv_reply`), stops and restarts the receive
/// queue while that buffer is lent (stopped first, so that the answer to the answer waits in
/// the device rather than in the old rings), then reaps the send, which posts the buffer
/// again: each buffer must now be posted exactly once. Checked by `RX_SLOTS + 1` echoes in a
/// row: the device fills `RX_SLOTS` buffers and holds the last echo (a buffer posted twice
/// would take it, over an earlier one), and all arrive intact and in order.
fn lend_across_restart(ch: &mut SecureChannel, info: &BootInfo, channel: u32) -> bool {
    let mut back = [0u8; 16];
    if ch.send(channel, 1, b"lend").is_err() {
        return false;
    }
    let reply = |h: RxHeader, p: &mut [u8]| {
        Some(Reply { channel: h.channel, process: h.process, len: p.len() })
    };
    let mut backoff = Backoff::patient();
    let answered = loop {
        match ch.recv_reply(reply) {
            Ok(Some(header)) => break header.len == 4,
            Ok(None) => backoff.snooze(),
            Err(_) => return false,
        }
    };
    if !answered || ch.stop_receive().is_err() {
        return false;
    }
    ch.flush();
    if ch.restart_receive().is_err() || !reap(ch, 1) {
        return false;
    }
    if !ch.recv_wait(&mut back).is_ok_and(|m| m.copied == 4 && &back[..4] == b"lend") {
        return false;
    }
    let Ok(before) = ch.stats() else { return false };
    let total = RX_SLOTS as u32 + 1;
    // The transmit queue takes TX_SLOTS at a time.
    for first in (0..total).step_by(TX_SLOTS) {
        let batch = first..total.min(first + TX_SLOTS as u32);
        let count = batch.len();
        if batch.into_iter().any(|i| ch.post_send(channel, 1, &i.to_le_bytes()).is_err()) {
            return false;
        }
        ch.flush();
        if !reap(ch, count) {
            return false;
        }
    }
    let delivered =
        |ch: &mut SecureChannel| ch.stats().map_or(u64::MAX, |s| s.received - before.received);
    let mut backoff = Backoff::patient();
    while delivered(ch) < RX_SLOTS as u64 {
        backoff.snooze();
    }
    // The last echo has had time to arrive (the others did): it must be waiting, not written.
    guest_agent::time::spin_for(info, 100_000);
    if delivered(ch) != RX_SLOTS as u64 {
        return false;
    }
    (0..total).all(|i| {
        ch.recv_wait(&mut back).is_ok_and(|m| m.copied == 4 && back[..4] == i.to_le_bytes())
    })
}

/// Reaps `count` sends, each of which must have gone.
fn reap(ch: &mut SecureChannel, count: usize) -> bool {
    let mut backoff = Backoff::patient();
    let mut reaped = 0;
    while reaped < count {
        match ch.reap_send() {
            Ok(Some(abi::status::OK)) => reaped += 1,
            Ok(Some(_)) | Err(_) => return false,
            Ok(None) => backoff.snooze(),
        }
    }
    true
}

fn main(info: &'static BootInfo) -> u32 {
    let Some(peer) = info.arg_endpoint("peer") else {
        println!("queues: needs peer=NODE:PARTITION:PROCESS");
        return CANNOT_RUN;
    };
    let Some(t) =
        info.find_device(DeviceKind::VirtioRng).and_then(|d| Transport::probe(d, RNG).ok())
    else {
        println!("queues: no virtio-rng");
        return CANNOT_RUN;
    };
    let mut cases = Cases { failures: 0 };
    rng_cases(&mut cases, &t);
    if !channel_cases(&mut cases, info, peer) {
        return CANNOT_RUN;
    }
    println!("queues: {} cases failed", cases.failures);
    u32::from(cases.failures != 0)
}

guest_agent::entry!(main);
