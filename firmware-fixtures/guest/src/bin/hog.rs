//! A guest that tries to keep the device thread to itself: it keeps the secure channel's
//! transmit queue full, 128 requests at a time (two descriptors each: the queue's whole
//! size), over and over, each one refused (it names no channel). Argument: `rounds=N`
//! (default 1000). Exits 0 when every request got its NO_CHANNEL status, 1 if not.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use guest_agent::boot_info::DeviceKind;
use guest_agent::channel::abi::{self, status, Endpoint, TxHeader, TX_HEADER_SIZE};
use guest_agent::idle::Backoff;
use guest_agent::virtio::registers::reg;
use guest_agent::virtio::transport::Transport;
use guest_agent::virtio::F_VERSION_1;
use guest_agent::{pages, println, BootInfo};
use keyhold_fixture_programs::raw_queue::{RawQueue, DESC_F_NEXT, DESC_F_WRITE};
use keyhold_fixture_programs::CANNOT_RUN;

const QSIZE: u16 = 256;
const BATCH: u16 = QSIZE / 2;

fn main(info: &'static BootInfo) -> u32 {
    let rounds = info.arg_u64("rounds", 1000).unwrap_or(1000);
    let Some(dev) = info.find_device(DeviceKind::SecureChannel) else { return CANNOT_RUN };
    let Ok(t) = Transport::probe(dev, abi::DEVICE_ID) else { return CANNOT_RUN };
    if t.negotiate(F_VERSION_1).is_err() {
        return CANNOT_RUN;
    }
    let q = RawQueue::new();
    q.attach(&t, u32::from(abi::TX_QUEUE), QSIZE, q.desc);
    if t.driver_ok().is_err() {
        return CANNOT_RUN;
    }
    let (Some(header), Some(statuses)) = (pages::alloc(4096), pages::alloc(4096)) else {
        return CANNOT_RUN;
    };
    let source = Endpoint { node: t.config32(0), partition: t.config32(4), process: 1 };
    let bytes = TxHeader { channel: 0, source, len: 0 }.to_bytes();
    // SAFETY: our own page, large enough.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), header as *mut u8, bytes.len()) };
    for i in 0..BATCH {
        let status_at = statuses + 4 * u64::from(i);
        q.set_desc(2 * i, header, TX_HEADER_SIZE as u32, DESC_F_NEXT, 2 * i + 1);
        q.set_desc(2 * i + 1, status_at, 4, DESC_F_WRITE, 0);
    }
    let mut idx: u16 = 0;
    let mut wrong = 0u64;
    for _ in 0..rounds {
        for i in 0..BATCH {
            // SAFETY: our own page; the device writes it only once the chain is published.
            unsafe { write_volatile((statuses + 4 * u64::from(i)) as *mut u32, u32::MAX) };
            q.publish(idx.wrapping_add(i) % QSIZE, 2 * i, idx.wrapping_add(i + 1));
        }
        idx = idx.wrapping_add(BATCH);
        t.write(reg::QUEUE_NOTIFY, u32::from(abi::TX_QUEUE));
        let mut backoff = Backoff::new();
        while q.used_idx() != idx {
            if t.check().is_err() {
                println!("hog: the device needs a reset");
                return 1;
            }
            backoff.snooze();
        }
        for i in 0..BATCH {
            // SAFETY: as above; the device is done with it.
            let got = unsafe { read_volatile((statuses + 4 * u64::from(i)) as *const u32) };
            wrong += u64::from(got != status::NO_CHANNEL);
        }
    }
    println!("hog: {} requests answered, {wrong} with the wrong status", rounds * u64::from(BATCH));
    u32::from(wrong != 0)
}

guest_agent::entry!(main);
