//! Fuzz target `channel_queue`: see docs/FUZZING.md and `keyhold_fuzz::devices`.
#![no_main]

use keyhold_fuzz::devices::{Profile, World};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    World::new().run(Profile::Channel, data);
});
