//! Drives the secure-channel device the way a broken or hostile driver would: a notification
//! before DRIVER_OK (ignored), rings and descriptors outside RAM, a descriptor loop, an absurd length, an
//! invalid queue index, an avail index far ahead. After each, the device must answer with an
//! error or DEVICE_NEEDS_RESET (and come back after a reset); at the end a normal driver must
//! still work against the echo partition named by `peer=N:P:Q`. Exits 0 when all of that holds.
#![no_std]
#![no_main]

use guest_agent::boot_info::DeviceKind;
use guest_agent::channel::abi::{self, op, ControlRequest, Endpoint};
use guest_agent::channel::SecureChannel;
use guest_agent::time::spin_for;
use guest_agent::virtio::registers::{reg, status};
use guest_agent::virtio::transport::Transport;
use guest_agent::virtio::F_VERSION_1;
use guest_agent::{pages, println, BootInfo};
use keyhold_fixture_programs::raw_queue::{RawQueue, DESC_F_NEXT};

/// Guest-physical memory that is neither RAM nor a device (RAM is far smaller).
const NOT_RAM: u64 = 0xc000_0000;
const QSIZE: u16 = 8;

struct Bad {
    t: Transport,
    info: &'static BootInfo,
    failures: u32,
}

impl Bad {
    /// Resets the device and takes it to FEATURES_OK.
    fn negotiate(&self) -> bool {
        self.t.negotiate(F_VERSION_1).is_ok()
    }

    /// Points queue `index` at `q` (or at `desc` for the descriptor table) and marks it ready.
    fn setup(&self, index: u32, desc: u64, q: &RawQueue) {
        q.attach(&self.t, index, QSIZE, desc);
    }

    fn driver_ok(&self) {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.t.write(reg::STATUS, s);
    }

    /// Waits up to half a second for the device to ask for a reset.
    fn needs_reset(&self) -> bool {
        for _ in 0..500 {
            if self.t.read(reg::STATUS) & status::NEEDS_RESET != 0 {
                return true;
            }
            spin_for(self.info, 1000);
        }
        false
    }

    fn expect(&mut self, what: &str, ok: bool) {
        println!("bad-queue: {what}: {}", if ok { "handled" } else { "NOT HANDLED" });
        if !ok {
            self.failures += 1;
        }
    }

    /// A queue-0 set-up with a control request whose chain is built by `chain`, notified.
    fn control_chain(&self, chain: impl FnOnce(&RawQueue, u64)) -> RawQueue {
        let q = RawQueue::new();
        let req = pages::alloc(4096).expect("RAM");
        let request = ControlRequest { op: op::STATS, ..Default::default() }.to_bytes();
        // SAFETY: our own page.
        unsafe { core::ptr::copy_nonoverlapping(request.as_ptr(), req as *mut u8, request.len()) };
        self.negotiate();
        self.setup(0, q.desc, &q);
        self.driver_ok();
        chain(&q, req);
        q.publish(0, 0, 1);
        self.t.write(reg::QUEUE_NOTIFY, 0);
        q
    }
}

fn main(info: &'static BootInfo) -> u32 {
    let Some(peer) = info.arg_endpoint("peer") else {
        println!("bad-queue: needs peer=NODE:PARTITION:PROCESS");
        return 2;
    };
    let Some(dev) = info.find_device(DeviceKind::SecureChannel) else { return 2 };
    let Ok(t) = Transport::probe(dev, abi::DEVICE_ID) else { return 2 };
    let mut bad = Bad { t, info, failures: 0 };

    bad.negotiate();
    let q = RawQueue::new();
    bad.setup(0, q.desc, &q);
    bad.t.write(reg::QUEUE_NOTIFY, 0);
    // A notification can race a reset; the device ignores it (virtio 1.2 is silent on it).
    spin_for(info, 100_000);
    let ignored = bad.t.read(reg::STATUS) & status::NEEDS_RESET == 0;
    bad.expect("notification before DRIVER_OK (ignored as spurious)", ignored);

    bad.negotiate();
    bad.setup(0, NOT_RAM, &q);
    bad.driver_ok();
    let answer = bad.needs_reset();
    bad.expect("descriptor table outside RAM", answer);

    bad.control_chain(|q, _| q.set_desc(0, NOT_RAM, 64, 0, 0));
    let answer = bad.needs_reset();
    bad.expect("descriptor pointing outside RAM", answer);

    bad.control_chain(|q, req| q.set_desc(0, req, 0x8000_0000, 0, 0));
    let answer = bad.needs_reset();
    bad.expect("descriptor length past RAM", answer);

    let looped = bad.control_chain(|q, req| q.set_desc(0, req, 64, DESC_F_NEXT, 0));
    spin_for(info, 100_000);
    let answered_empty = looped.used_idx() == 1 && looped.used_len(0) == 0;
    let still_fine = bad.t.read(reg::STATUS) & status::NEEDS_RESET == 0;
    bad.expect(
        "descriptor loop (answered with nothing, device still usable)",
        answered_empty && still_fine,
    );

    let ahead = bad.control_chain(|q, req| q.set_desc(0, req, 64, 0, 0));
    spin_for(info, 100_000);
    ahead.publish(1, 0, 1 + 2 * QSIZE);
    bad.t.write(reg::QUEUE_NOTIFY, 0);
    let answer = bad.needs_reset();
    bad.expect("avail index ahead by more than the queue size", answer);

    bad.negotiate();
    bad.t.write(reg::QUEUE_SEL, 9);
    let no_queue = bad.t.read(reg::QUEUE_NUM_MAX) == 0;
    bad.t.write(reg::QUEUE_READY, 1);
    bad.t.write(reg::QUEUE_NOTIFY, 9);
    let ignored =
        bad.t.read(reg::QUEUE_READY) == 0 && bad.t.read(reg::STATUS) & status::NEEDS_RESET == 0;
    bad.expect("invalid queue index (no such queue; notify ignored)", no_queue && ignored);

    let recovered = talk_to_echo(info, peer);
    bad.expect("after a reset a normal driver works again", recovered);
    println!("bad-queue: {} cases not handled", bad.failures);
    u32::from(bad.failures != 0)
}

/// Brings the device up properly and exchanges one message with the echo partition.
fn talk_to_echo(info: &BootInfo, peer: Endpoint) -> bool {
    let Ok(mut ch) = SecureChannel::open(info) else { return false };
    let Ok(channel) = ch.connect_patiently(info, 1, peer, None, 1000) else { return false };
    let mut back = [0u8; 8];
    if ch.send(channel, 1, b"again").is_err() {
        return false;
    }
    let echoed = ch.recv_wait(&mut back).is_ok_and(|msg| msg.copied == 5 && &back[..5] == b"again");
    let _ = ch.send(channel, 1, &[]);
    echoed
}

guest_agent::entry!(main);
