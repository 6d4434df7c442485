//! `tandem doctor` on this machine: whatever the host, its verdict and exit status agree.

use std::process::Command;

#[test]
fn doctor_verdict_matches_its_exit_status() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = text
        .lines()
        .find(|l| l.starts_with("verdict: "))
        .unwrap_or_else(|| panic!("no verdict:\n{text}"));
    if out.status.success() {
        assert!(verdict.starts_with("verdict: ok"), "{verdict}");
        assert!(text.contains("M loop iterations/s"), "{text}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{text}");
        let slow = verdict.contains("will NOT run at hardware speed")
            && verdict.contains("cargo xtask testbed");
        let broken = verdict.contains("cannot run here") || verdict.contains("could not run");
        assert!(
            slow || broken,
            "a failing doctor must say why and what to do: {verdict}"
        );
    }
}

/// Where KVM opens, doctor goes on to say what the host offers for sandboxing, each with a
/// yes or no.
#[test]
fn doctor_reports_seccomp_namespaces_and_landlock() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("KVM API version") {
        return; // no usable /dev/kvm here: doctor stops before (checked above).
    }
    for what in ["seccomp filters", "user namespaces", "jail", "Landlock"] {
        let l = text
            .lines()
            .find(|l| l.trim_start().starts_with(what))
            .unwrap_or_else(|| panic!("no {what} line:\n{text}"));
        let verdict = l.trim_start()[what.len()..].trim_start();
        assert!(
            verdict.starts_with("yes") || verdict.starts_with("no") || verdict.starts_with("NO"),
            "{l}"
        );
    }
}
