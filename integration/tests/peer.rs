//! A peer written from docs/PROTOCOL.md alone (`integration/peer/peer.py`: Python, with the
//! `noiseprotocol` package for Noise and `cryptography` for the rest, none of keyhold's code)
//! links with a real node in both roles and passes messages through its `echo` partition: the
//! handshake and key confirmation, an OFFER, credit as keyhold grants it (so echo may meet
//! NO_ROOM, and sends again, in order: the peer checks each echo against its message), channel
//! epochs moving both ways, keepalives through an idle spell, a
//! rekey each way, CLOSE and GOODBYE, and keyhold's audit log saying so. The document is enough
//! to build a peer from, and says what the code does.

use std::time::Duration;

use keyhold_integration::{fixture, keyhold_bin, python_imports, require_kvm, run_with_deadline};

#[test]
fn a_peer_written_from_the_protocol_document_alone_links_and_exchanges_messages() {
    require_kvm!();
    if !python_imports("noise.connection, cryptography") {
        return;
    }
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/peer/peer.py");
    let echo = fixture("echo");
    let fixtures = echo.parent().expect("the fixtures' folder");
    let bin = keyhold_bin();
    let args: [&std::ffi::OsStr; 8] = [
        peer.as_ref(),
        "--keyhold".as_ref(),
        bin.as_os_str(),
        "--fixtures".as_ref(),
        fixtures.as_os_str(),
        "--no-grant-ahead".as_ref(),
        "--count".as_ref(),
        "300".as_ref(),
    ];
    let out = run_with_deadline("python3".as_ref(), args, Duration::from_secs(400));
    assert_eq!(out.code(), 0, "{out:#?}");
    for role in ["initiator", "responder"] {
        assert!(out.stdout.contains(&format!("=== role {role}: interop OK")), "{out:#?}");
    }
    assert_eq!(out.stdout.matches("all 300 echoes verified and equal").count(), 2, "{out:#?}");
    assert!(out.stdout.contains("rekeys completed on this link"), "{out:#?}");
}
