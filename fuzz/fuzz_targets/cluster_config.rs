//! Fuzz target `cluster_config`: `cluster.toml` as `parse_cluster` checks it.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(directory) =
        keyhold_vmm::cluster_config::parse_cluster(Path::new("/fuzz/cluster.toml"), text)
    {
        let peers = directory.peers();
        assert!(!peers.is_empty());
        for p in peers {
            assert_eq!(directory.by_id(p.id).map(|q| q.public_key), Some(p.public_key));
            assert_eq!(directory.by_key(&p.public_key).map(|q| q.id), Some(p.id));
        }
    }
});
