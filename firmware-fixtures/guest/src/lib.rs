//! What the fixture programs (`src/bin`) share.
#![no_std]

pub mod raw_queue;
pub mod snoop_key;

use guest_agent::channel::SecureChannel;
use guest_agent::{println, BootInfo};

/// The status a fixture exits with when it cannot run as asked: bad arguments, no device.
pub const CANNOT_RUN: u32 = 2;

/// The secure-channel device, or `None` after `program` has said on the console why not.
pub fn open_channel(info: &BootInfo, program: &str) -> Option<SecureChannel> {
    SecureChannel::open(info)
        .inspect_err(|e| println!("{program}: cannot open the secure channel device: {e:?}"))
        .ok()
}
