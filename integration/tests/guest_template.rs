//! The guest template (examples/guest-template) builds with one plain `cargo build` into
//! firmware that boots and talks to `echo` across a secure channel, as docs/GUEST.md says.

use std::path::Path;

use firmware_fixtures::guest_build::release_build;
use keyhold_integration::{fixture, keyhold, require_kvm};

#[test]
fn the_guest_template_builds_and_talks_to_echo() {
    require_kvm!();
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guest-template");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let built = release_build(cargo.as_ref(), &template).arg("--quiet").output().unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let image = template.join("target/x86_64-unknown-linux-gnu/release/guest-template");

    let out = keyhold([
        "run",
        "--partition",
        &format!("1={}", fixture("echo").display()),
        "--arg",
        "1=peer=0:2:1",
        "--partition",
        &format!("2={}", image.display()),
        "--arg",
        "2=peer=0:1:1",
        "--timeout",
        "60",
    ]);
    out.assert_no_panic();
    assert_eq!(out.code(), 0, "{out:#?}");
    assert!(
        out.stdout.contains("[p2] template: 0:1:1 answered \"hello from the template\""),
        "{out:#?}"
    );
    assert!(out.stdout.contains("[p1] echo: echoed 1 messages; goodbye"), "{out:#?}");
}
