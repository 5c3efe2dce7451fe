//! Crash reports: each kind of guest failure stops its partition with a one-paragraph report
//! and a distinct exit status.

use keyhold_integration::{fixture, keyhold, require_kvm, Outcome};

fn run_alone(name: &str) -> Outcome {
    let out =
        keyhold(["run", "--firmware", &fixture(name).display().to_string(), "--timeout", "0.5"]);
    out.assert_no_panic();
    out
}

/// The report: one line on stderr, for partition 1.
fn report(out: &Outcome) -> &str {
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(lines[0].starts_with("keyhold: partition 1 stopped: "), "{out:#?}");
    lines[0]
}

#[test]
fn triple_fault_reports_registers_cr2_and_last_console_line() {
    require_kvm!();
    let out = run_alone("fault");
    assert_eq!(out.code(), 121);
    let report = report(&out);
    assert!(report.contains("triple fault"), "{report}");
    assert!(report.contains(" rip=0x10"), "{report}");
    assert!(report.contains(" rsp=0x"), "{report}");
    assert!(report.contains("cr2=0x8000000000"), "{report}");
    assert!(report.ends_with("last console line: \"about to read 0x8000000000\""), "{report}");
}

#[test]
fn emulation_failure_is_reported() {
    require_kvm!();
    let out = run_alone("emulation-failure");
    assert_eq!(out.code(), 122);
    let report = report(&out);
    assert!(report.contains("could not emulate a guest instruction"), "{report}");
    assert!(report.contains("last console line: \"paddd from MMIO 0xc8000000\""), "{report}");
}

#[test]
fn unhandled_port_write_is_reported() {
    require_kvm!();
    let out = run_alone("stray-port");
    assert_eq!(out.code(), 123);
    let report = report(&out);
    assert!(report.contains("1-byte write of I/O port 0x80, where no device is"), "{report}");
    assert!(!report.contains("cr2"), "CR2 means nothing here: {report}");
}

#[test]
fn unhandled_mmio_read_is_reported() {
    require_kvm!();
    let out = run_alone("stray-mmio");
    assert_eq!(out.code(), 123);
    let report = report(&out);
    assert!(report.contains("4-byte read of guest-physical 0xc8000000"), "{report}");
}

#[test]
fn timeout_stops_a_spinning_guest() {
    require_kvm!();
    let out = run_alone("spin");
    assert_eq!(out.code(), 124);
    let report = report(&out);
    assert!(report.contains("still running at the --timeout limit"), "{report}");
    assert!(report.contains("last console line: \"partition 1 spinning\""), "{report}");
}
