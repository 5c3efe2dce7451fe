//! Fuzz target `node_config`: `node.toml` as `node_config::parse` checks it. The file lives in
//! a directory (made once per process) that also holds a valid `cluster.toml` listing nodes
//! 1 and 2 and node 1's key file `node1.key` (mode 600), so a config naming them reaches the
//! cluster and key checks too.
#![no_main]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use keyhold_devices::crypto::node_key::NodeKey;

fn directory() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keyhold-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the config files");
        let one = NodeKey::generate().expect("a key");
        let two = NodeKey::generate().expect("a key");
        let cluster = format!(
            "[[node]]\nid = 1\naddress = \"127.0.0.1:7001\"\npublic_key = \"{}\"\n\n\
             [[node]]\nid = 2\naddress = \"[::1]:7002\"\npublic_key = \"{}\"\n",
            one.public_base64(),
            two.public_base64()
        );
        std::fs::write(dir.join("cluster.toml"), cluster).expect("cluster.toml");
        let key = dir.join("node1.key");
        std::fs::write(&key, one.private_base64()).expect("node1.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        dir
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = directory().join("node.toml");
    if let Ok(launch) = keyhold_vmm::node_config::parse(&path, text) {
        assert!(!launch.partitions.is_empty());
        let ids: BTreeSet<u32> = launch.partitions.iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), launch.partitions.len(), "partition IDs are unique");
        assert!(launch.cmm.capacity >= 1);
    }
});
