//! Stamps the build with the git revision it was made from, for `keyhold --version` and the
//! API's `/v1/node` (`unknown` outside a git checkout).

use std::path::Path;
use std::process::Command;

fn main() {
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|rev| rev.trim().to_owned())
        .filter(|rev| !rev.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KEYHOLD_GIT_REVISION={revision}");
    // A new commit moves HEAD or the branch it names; watch both, when they are files.
    let git = Path::new("../.git");
    let head = git.join("HEAD");
    if head.is_file() {
        println!("cargo:rerun-if-changed={}", head.display());
        if let Some(branch) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| git.join(r.trim())))
            .filter(|branch| branch.is_file())
        {
            println!("cargo:rerun-if-changed={}", branch.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
