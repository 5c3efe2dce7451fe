//! Fuzz target `link`: records on an authenticated host link, read by a node's router and CMM
//! (see docs/FUZZING.md and `keyhold_fuzz::link`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keyhold_fuzz::link::run(data);
});
