//! Fuzz target `abi`: the secure channel's request formats (guest-agent/src/channel/abi.rs)
//! as the device decodes them, and the guest's decoders of what the device writes.
//!
//! Beyond "never panics": whatever decodes re-encodes to the same bytes (reserved fields
//! aside), and a decoder refuses exactly the inputs with reserved bytes set.
#![no_main]

use guest_agent::channel::abi::{
    status, ChannelInfo, ControlRequest, ControlResponse, Endpoint, RxHeader, Stats, TxHeader,
    CHANNEL_INFO_SIZE, CONTROL_HEAD_SIZE, CONTROL_REQUEST_SIZE, RX_HEADER_SIZE, STATS_SIZE,
    TX_HEADER_SIZE,
};
use keyhold_fuzz::Input;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let request: [u8; CONTROL_REQUEST_SIZE] = input.array();
    let reserved = request[28..32] != [0; 4];
    match ControlRequest::from_bytes(&request) {
        Some(decoded) => {
            assert!(!reserved);
            assert_eq!(decoded.to_bytes(), request);
            let mut head = [0u8; CONTROL_HEAD_SIZE];
            head.copy_from_slice(&request[..CONTROL_HEAD_SIZE]);
            let head = ControlRequest::head_from_bytes(&head).expect("the head decodes too");
            assert_eq!(ControlRequest { key: decoded.key, ..head }, decoded);
        }
        None => assert!(reserved),
    }
    let tx: [u8; TX_HEADER_SIZE] = input.array();
    match TxHeader::from_bytes(&tx) {
        Some(decoded) => assert_eq!(decoded.to_bytes(), tx),
        None => assert_ne!(tx[20..24], [0; 4]),
    }
    let rx: [u8; RX_HEADER_SIZE] = input.array();
    assert_eq!(RxHeader::from_bytes(&rx).to_bytes(), rx);
    let response: [u8; 16] = input.array();
    assert_eq!(ControlResponse::from_bytes(&response).to_bytes()[..12], response[..12]);
    let info: [u8; CHANNEL_INFO_SIZE] = input.array();
    let again = ChannelInfo::from_bytes(&info).to_bytes();
    assert_eq!((&again[..24], &again[32..]), (&info[..24], &info[32..]));
    let stats: [u8; STATS_SIZE] = input.array();
    assert_eq!(Stats::from_bytes(&stats).to_bytes(), stats);
    let _ = status::name(u32::from_le_bytes(request[..4].try_into().expect("4 bytes")));
    // The rest: an endpoint as the command line and the demo parse it.
    let rest = input.bytes(usize::MAX);
    if let Ok(text) = std::str::from_utf8(rest) {
        if let Some(e) = Endpoint::parse(text) {
            let printed = format!("{}:{}:{}", e.node, e.partition, e.process);
            assert_eq!(Endpoint::parse(&printed), Some(e));
            assert_eq!(Endpoint::decode(&e.to_bytes()), e);
        }
    }
});
