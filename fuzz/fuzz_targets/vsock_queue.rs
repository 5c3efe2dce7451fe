//! Fuzz target `vsock_queue`: see docs/FUZZING.md and `keyhold_fuzz::vsock`.
#![no_main]

use keyhold_fuzz::vsock::VsockWorld;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    VsockWorld::new().run(data);
});
