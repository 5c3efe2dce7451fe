//! Where the firmware fixtures are.
//!
//! The fixtures are bare-metal guest programs (sources in `guest/src/bin`), built by this crate's
//! build script into `target/fixtures/<name>.elf` whenever the workspace is built.

use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/index.rs"));

pub mod guest_build;

#[path = "../guest/src/snoop_key.rs"]
pub mod snoop_key;

/// The image of fixture `name` (which need not exist: see [`NAMES`]).
pub fn path(name: &str) -> PathBuf {
    Path::new(DIR).join(format!("{name}.elf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_was_built() {
        assert!(NAMES.contains(&"hello"));
        for name in NAMES {
            let meta = std::fs::metadata(path(name)).expect("fixture image exists");
            assert!(meta.len() > 0, "{name} is empty");
        }
    }
}
