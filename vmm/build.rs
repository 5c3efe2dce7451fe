//! Stamps the build with the git revision it was made from, for `keyhold --version` and the
//! API's `/v1/node` (`unknown` outside a git checkout).

use std::path::PathBuf;
use std::process::Command;

/// `git ARGS`, trimmed, if git runs and says something.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KEYHOLD_GIT_REVISION={revision}");
    // A new commit moves HEAD, the branch it names (a loose ref, or packed-refs), in this
    // worktree's git directory or the common one; watch every one of them that exists.
    let dirs = ["--absolute-git-dir", "--git-common-dir"].map(|flag| git(&["rev-parse", flag]));
    let branch = git(&["rev-parse", "--symbolic-full-name", "HEAD"]);
    for dir in dirs.into_iter().flatten().map(PathBuf::from) {
        let mut watched = vec![dir.join("HEAD"), dir.join("packed-refs")];
        watched.extend(branch.as_deref().map(|b| dir.join(b)));
        for path in watched.into_iter().filter(|p| p.is_file()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
