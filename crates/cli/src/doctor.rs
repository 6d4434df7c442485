//! `tandem doctor`: can this host run tandem guests, and at what speed?

use std::process::ExitCode;

// Compiled everywhere (its verdicts are tested on any host), used on aarch64.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod aarch64;

#[cfg(target_arch = "x86_64")]
use tandem_vmm::probe::measure;
use tandem_vmm::vm::{check_kvm, open_kvm, REQUIRED_CAPS};

fn line(what: &str, verdict: &str) {
    println!("  {what:<28} {verdict}");
}

pub fn main() -> ExitCode {
    println!("tandem doctor");
    let kvm = match open_kvm() {
        Ok(k) => {
            line("/dev/kvm", "ok (opened read/write)");
            k
        }
        Err(e) => {
            line("/dev/kvm", "FAILED");
            println!("verdict: tandem cannot run here: {e}");
            return ExitCode::FAILURE;
        }
    };
    let max = match check_kvm(&kvm) {
        Ok(max) => {
            line("KVM API version", &format!("{} ok", kvm.get_api_version()));
            let names: Vec<&str> = REQUIRED_CAPS
                .iter()
                .map(|(_, n)| n.trim_start_matches("KVM_CAP_"))
                .collect();
            line(
                "required capabilities",
                &format!("ok ({})", names.join(", ")),
            );
            max
        }
        Err(e) => {
            line("KVM API and capabilities", "FAILED");
            println!("verdict: tandem cannot run here: {e}");
            return ExitCode::FAILURE;
        }
    };
    line("max vCPUs per VM", &max.to_string());
    #[cfg(target_arch = "aarch64")]
    let arm_ok = aarch64::lines(&kvm, line);
    for &(cap, name) in OPTIONAL_CAPS {
        let v = kvm.check_extension_raw(cap.into());
        line(
            &format!("optional {name}"),
            &if v > 0 {
                format!("yes ({v})")
            } else {
                "no".into()
            },
        );
    }
    sandbox_lines();
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        line(
            "hint",
            "kvm_pvm module loaded (KVM inside a VM, without hardware virtualization)",
        );
    }
    #[cfg(target_arch = "aarch64")]
    if !arm_ok {
        println!(
            "verdict: tandem cannot run here: its aarch64 VMs need KVM's in-kernel GICv3 and PSCI 0.2"
        );
        return ExitCode::FAILURE;
    }
    speed_verdict(&kvm)
}

/// Capabilities tandem uses where the host has them, with their names for the report.
#[cfg(target_arch = "x86_64")]
const OPTIONAL_CAPS: &[(u32, &str)] = &[
    (kvm_bindings::KVM_CAP_X86_DISABLE_EXITS, "X86_DISABLE_EXITS"),
    (kvm_bindings::KVM_CAP_HALT_POLL, "HALT_POLL"),
    (kvm_bindings::KVM_CAP_IOEVENTFD, "IOEVENTFD"),
    (
        kvm_bindings::KVM_CAP_TSC_DEADLINE_TIMER,
        "TSC_DEADLINE_TIMER",
    ),
    (kvm_bindings::KVM_CAP_SPLIT_IRQCHIP, "SPLIT_IRQCHIP"),
    // KVM's exit counts in `tandem stats` (Linux 5.14 and later).
    (kvm_bindings::KVM_CAP_BINARY_STATS_FD, "BINARY_STATS_FD"),
];

/// Capabilities tandem uses where the host has them, with their names for the report. Arm has
/// no exit-disabling capability (its WFI/WFE trapping is a per-vCPU policy instead), no TSC and
/// no split irqchip.
#[cfg(not(target_arch = "x86_64"))]
const OPTIONAL_CAPS: &[(u32, &str)] = &[
    (kvm_bindings::KVM_CAP_HALT_POLL, "HALT_POLL"),
    (kvm_bindings::KVM_CAP_IOEVENTFD, "IOEVENTFD"),
    (kvm_bindings::KVM_CAP_BINARY_STATS_FD, "BINARY_STATS_FD"),
    // The guest's own performance counters.
    (kvm_bindings::KVM_CAP_ARM_PMU_V3, "ARM_PMU_V3"),
];

/// What a speed probe measured: loop iterations per second, its wall time, and whether that is
/// hardware speed.
type Probe = Result<(f64, std::time::Duration, bool), tandem_vmm::VmError>;

/// The ring-0 speed probe and the verdict.
#[cfg(target_arch = "x86_64")]
fn speed_verdict(kvm: &kvm_ioctls::Kvm) -> ExitCode {
    let probe = measure(kvm).map(|p| (p.iterations_per_sec, p.elapsed, p.hardware_speed()));
    report_probe("ring-0 speed probe", probe, "cargo xtask testbed")
}

/// The EL1 speed probe and the verdict, once this build boots VMs on aarch64 (issue 12).
#[cfg(target_arch = "aarch64")]
fn speed_verdict(kvm: &kvm_ioctls::Kvm) -> ExitCode {
    let probe = tandem_vmm::arch::probe::measure(kvm)
        .map(|p| (p.iterations_per_sec, p.elapsed, p.hardware_speed()));
    if let Err(e) = tandem_vmm::arch::ensure_vm_support() {
        if let Ok((rate, elapsed, _)) = probe {
            probe_line("EL1 speed probe", rate, elapsed);
        }
        println!("verdict: tandem cannot run guests here: {e}");
        return ExitCode::FAILURE;
    }
    report_probe(
        "EL1 speed probe",
        probe,
        "cargo xtask testbed --arch aarch64",
    )
}

fn probe_line(name: &str, rate: f64, elapsed: std::time::Duration) {
    line(
        name,
        &format!(
            "{:.1} M loop iterations/s in {:.3} s (hardware: ~1000 M/s)",
            rate / 1e6,
            elapsed.as_secs_f64()
        ),
    );
}

/// The probe's line and the verdict; `testbed` is the command of this architecture's testbed.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn report_probe(name: &str, probe: Probe, testbed: &str) -> ExitCode {
    let (rate, elapsed, hardware) = match probe {
        Ok(p) => p,
        Err(e) => {
            line(name, "FAILED");
            println!("verdict: a minimal guest could not run: {e}");
            return ExitCode::FAILURE;
        }
    };
    probe_line(name, rate, elapsed);
    if hardware {
        println!("verdict: ok: guest kernels run at hardware speed on this host");
        ExitCode::SUCCESS
    } else {
        println!(
            "verdict: guest kernels will NOT run at hardware speed here: this KVM emulates guest kernel code \
             (about {:.0}x slower than hardware), so Linux guests will not boot in reasonable time. \
             Run tandem inside the nested testbed instead: {testbed} -- tandem run --kernel /guests/vmlinuz --initrd /guests/initramfs.cpio.gz",
            1000.0 / (rate / 1e6).max(1e-3)
        );
        ExitCode::FAILURE
    }
}

/// No probe and no VMs on this architecture.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn speed_verdict(_kvm: &kvm_ioctls::Kvm) -> ExitCode {
    println!(
        "verdict: tandem cannot run guests here: {}",
        tandem_vmm::VmError::ArchNotImplemented(std::env::consts::ARCH)
    );
    ExitCode::FAILURE
}

/// What the host offers for sandboxing tandem (informational: none of it is needed to run).
fn sandbox_lines() {
    use tandem_sandbox::{probe, syscall_count, ThreadKind};
    let counts: Vec<String> = ThreadKind::ALL
        .iter()
        .map(|&k| format!("{k} {}", syscall_count(k).unwrap_or(0)))
        .collect();
    line(
        "seccomp filters",
        &match probe::seccomp() {
            Ok(()) => format!(
                "yes (tandem run enforces per-thread lists: {})",
                counts.join(", ")
            ),
            Err(e) => format!("NO: {e}; tandem run needs --seccomp off here"),
        },
    );
    line(
        "user namespaces",
        &match probe::user_namespaces() {
            Ok(()) => "yes".into(),
            Err(e) => format!("no ({e})"),
        },
    );
    line(
        "jail",
        &match probe::jail() {
            Ok(()) => "yes (tandem run --jail; tandem up jails its VMs)".into(),
            Err(e) => format!("no ({e})"),
        },
    );
    line(
        "Landlock",
        &match probe::landlock() {
            Ok(abi) => format!("yes (ABI {abi})"),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                "no (built in but not enabled: add landlock to the lsm= boot parameter)".into()
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => "no (not in this kernel)".into(),
            Err(e) => format!("no ({e})"),
        },
    );
}
