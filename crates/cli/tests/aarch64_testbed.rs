//! The aarch64 testbed (`cargo xtask testbed --arch aarch64`): an Arm test host whose KVM works,
//! with the cross-built tandem, whose `doctor` reports that KVM: its API, the GICv3 and PSCI
//! that tandem's aarch64 VMs need, the IPA size, and the speed of a loop at EL1.

mod common;

use common::{case, run_script_on, Arch};

#[test]
fn doctor_reports_the_kvm_of_the_aarch64_test_host() {
    let (cases, all) = run_script_on(
        Arch::Aarch64,
        "record machine uname -m\nrecord kvm test -c /dev/kvm\nrecord doctor tandem doctor\n",
        &[],
    );
    assert_eq!(case(&cases, &all, "machine").output.trim(), "aarch64");
    assert_eq!(case(&cases, &all, "kvm").rc, 0, "no /dev/kvm:\n{all}");
    let doctor = &case(&cases, &all, "doctor").output;
    let verdict = |what: &str| -> &str {
        doctor
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(what))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {what} line:\n{doctor}"))
    };
    assert_eq!(verdict("/dev/kvm"), "ok (opened read/write)");
    assert_eq!(verdict("KVM API version"), "12 ok");
    assert!(
        verdict("required capabilities").starts_with("ok ("),
        "{doctor}"
    );
    assert!(
        verdict("required capabilities").contains("ARM_PSCI_0_2"),
        "{doctor}"
    );
    // QEMU's `virt` board with gic-version=3 under the test host, whose KVM emulates GICv3 and
    // its ITS.
    assert!(
        verdict("interrupt controller").starts_with("GICv3 with ITS"),
        "{doctor}"
    );
    assert!(verdict("IPA size").ends_with(')'), "{doctor}");
    let bits: u32 = verdict("IPA size")
        .split(' ')
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("IPA size in bits:\n{doctor}"));
    assert!((40..=52).contains(&bits), "{doctor}");
    assert!(verdict("PSCI").starts_with("0.2 or later"), "{doctor}");
    // The EL1 probe ran a loop in a VM of the test host's KVM (at whatever speed the emulator
    // gives it).
    let probe = verdict("EL1 speed probe");
    assert!(probe.contains(" M loop iterations/s in "), "{doctor}");
    let rate: f64 = probe
        .split(' ')
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    assert!(rate > 0.0, "{doctor}");
    // Arm has no exit-disabling capability: the x86 lines are not there.
    assert!(!doctor.contains("X86_DISABLE_EXITS"), "{doctor}");
    assert!(
        doctor.lines().any(|l| l.starts_with("verdict: ")),
        "{doctor}"
    );
}
