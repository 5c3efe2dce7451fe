//! Fuzz target `wire`: a decrypted header block, as `check_block` and `frames` read it.
//!
//! Beyond "never panics": a block `check_block` accepts decodes into frames whose encodings
//! give back the block byte for byte, and whose DATA lengths add up to what it returned; a
//! block with CREDIT in it is refused for a link of version 2 and only then.
#![no_main]

use keyhold_devices::link::wire::{check_block, frames, kind, Frame, MAX_RECORD_PAYLOAD, VERSION};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let checked = check_block(data, VERSION);
    let decoded: Vec<_> = frames(data).collect();
    let Ok(payload) = checked else { return };
    let credit = decoded.iter().any(|f| matches!(f, Ok(f) if f.kind() == kind::CREDIT));
    assert_eq!(check_block(data, 2).is_err(), credit, "version 2 refuses CREDIT, only CREDIT");
    assert!(payload <= MAX_RECORD_PAYLOAD);
    let mut again = Vec::new();
    let mut sum = 0;
    for frame in decoded {
        let frame = frame.expect("a checked block holds only good frames");
        if let Frame::Data(head) = frame {
            sum += head.len as usize;
        }
        let at = again.len();
        again.resize(at + frame.size(), 0);
        frame.encode(&mut again[at..]);
    }
    assert_eq!(sum, payload, "check_block's payload sum");
    assert_eq!(again, data, "frames re-encode to their block");
});
