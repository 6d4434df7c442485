//! `tandem doctor`'s lines for an aarch64 host: the in-kernel interrupt controller (GIC), the
//! guest physical address (IPA) size and PSCI. The verdicts are plain functions of what KVM
//! answered, so that they are tested on any host; only [`Gic::probe`] needs an Arm KVM.

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, KVMIO,
    KVM_CAP_ARM_PSCI_0_2, KVM_CAP_ARM_VM_IPA_SIZE, KVM_CREATE_DEVICE_TEST,
};
use kvm_ioctls::Kvm;

vmm_sys_util::ioctl_iowr_nr!(KVM_CREATE_DEVICE, KVMIO, 0xe0, kvm_create_device);

/// The IPA size of a VM that does not ask for one, and of kernels without
/// `KVM_CAP_ARM_VM_IPA_SIZE`.
pub const DEFAULT_IPA_BITS: u32 = 40;

/// Which in-kernel GIC models this host's KVM can create.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gic {
    /// A GICv3 distributor and redistributors (`KVM_DEV_TYPE_ARM_VGIC_V3`).
    pub v3: bool,
    /// A GICv3 ITS, which turns MSIs (virtio-pci's and ivshmem's MSI-X) into LPIs.
    pub its: bool,
    /// A GICv2 (`KVM_DEV_TYPE_ARM_VGIC_V2`): on hosts whose GIC has the v2 compatibility mode.
    pub v2: bool,
}

impl Gic {
    /// Asks KVM, in a throw-away VM, which GIC devices it could create (`KVM_CREATE_DEVICE` with
    /// `KVM_CREATE_DEVICE_TEST`, which creates nothing).
    pub fn probe(kvm: &Kvm) -> Result<Gic, kvm_ioctls::Error> {
        let vm = kvm.create_vm()?;
        let can = |type_| {
            let mut dev = kvm_create_device {
                type_,
                fd: 0,
                flags: KVM_CREATE_DEVICE_TEST,
            };
            // SAFETY: KVM_CREATE_DEVICE reads and writes a `kvm_create_device`, which `dev` is and
            // which outlives the call; with the TEST flag it creates no device and no file
            // descriptor. kvm-ioctls' `create_device` is not used as it would take `dev.fd` (0 here)
            // as the new device's descriptor and close it.
            unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_DEVICE(), &mut dev) == 0 }
        };
        Ok(Gic {
            v3: can(kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3),
            its: can(kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS),
            v2: can(kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2),
        })
    }

    /// The doctor's verdict: tandem's aarch64 VMs use an in-kernel GICv3, and its ITS for MSI-X.
    pub fn verdict(self) -> String {
        match self {
            Gic {
                v3: true,
                its: true,
                ..
            } => "GICv3 with ITS (in-kernel; MSI-X for virtio-pci and ivshmem)".into(),
            Gic { v3: true, .. } => {
                "GICv3 without ITS (in-kernel; no MSI-X: virtio-pci and ivshmem doorbells need it)"
                    .into()
            }
            Gic { v2: true, .. } => "GICv2 only: tandem needs a GICv3".into(),
            _ => "NONE: KVM offers no in-kernel GIC".into(),
        }
    }
}

/// The doctor's IPA line for what `KVM_CAP_ARM_VM_IPA_SIZE` answered: the largest guest
/// physical address size a VM may ask for, or 0 where the kernel only has the default.
pub fn ipa_verdict(cap: i32) -> String {
    let (bits, note) = match u32::try_from(cap) {
        Ok(bits @ 1..=63) => (bits, ""),
        _ => (
            DEFAULT_IPA_BITS,
            ", the fixed default: no KVM_CAP_ARM_VM_IPA_SIZE",
        ),
    };
    format!(
        "{bits} bits (guest physical addresses below {}{note})",
        power_of_two(bits)
    )
}

/// The doctor's PSCI line for what `KVM_CAP_ARM_PSCI_0_2` answered.
pub fn psci_verdict(cap: i32) -> String {
    if cap > 0 {
        "0.2 or later (CPU_ON for SMP, SYSTEM_OFF and SYSTEM_RESET to tandem's exit statuses)"
            .into()
    } else {
        "NO: only PSCI 0.1; tandem needs 0.2 (CPU_ON, SYSTEM_OFF, SYSTEM_RESET)".into()
    }
}

/// `2^bits` bytes in binary units ("1 TiB").
fn power_of_two(bits: u32) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let unit = (bits / 10).min(UNITS.len() as u32 - 1);
    format!("{} {}", 1u64 << (bits - unit * 10), UNITS[unit as usize])
}

/// Prints the aarch64 lines through `line`; false when the host cannot run tandem's VMs (no
/// GICv3, or no PSCI 0.2).
pub fn lines(kvm: &Kvm, line: impl Fn(&str, &str)) -> bool {
    let gic = match Gic::probe(kvm) {
        Ok(gic) => {
            line("interrupt controller", &gic.verdict());
            gic
        }
        Err(e) => {
            line(
                "interrupt controller",
                &format!("FAILED: KVM_CREATE_VM: {e}"),
            );
            Gic::default()
        }
    };
    let cap = |c: u32| kvm.check_extension_raw(c.into());
    line("IPA size", &ipa_verdict(cap(KVM_CAP_ARM_VM_IPA_SIZE)));
    let psci = cap(KVM_CAP_ARM_PSCI_0_2);
    line("PSCI", &psci_verdict(psci));
    gic.v3 && psci > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gic_verdicts_name_what_tandem_needs() {
        let v3_its = Gic {
            v3: true,
            its: true,
            v2: false,
        };
        assert!(v3_its.verdict().starts_with("GICv3 with ITS"));
        let v3 = Gic {
            its: false,
            ..v3_its
        };
        assert!(v3.verdict().starts_with("GICv3 without ITS"));
        assert!(v3.verdict().contains("MSI-X"));
        let v2 = Gic {
            v2: true,
            ..Gic::default()
        };
        assert_eq!(v2.verdict(), "GICv2 only: tandem needs a GICv3");
        // A host with both reports the GICv3 that tandem uses.
        assert!(Gic { v2: true, ..v3_its }
            .verdict()
            .starts_with("GICv3 with ITS"));
        assert!(Gic::default().verdict().starts_with("NONE"));
    }

    #[test]
    fn ipa_sizes_in_bits_and_bytes() {
        assert_eq!(
            ipa_verdict(48),
            "48 bits (guest physical addresses below 256 TiB)"
        );
        assert_eq!(
            ipa_verdict(44),
            "44 bits (guest physical addresses below 16 TiB)"
        );
        assert_eq!(
            ipa_verdict(52),
            "52 bits (guest physical addresses below 4 PiB)"
        );
        // 0: a kernel without the capability, whose VMs all have the default 40 bits.
        for absent in [0, -1] {
            assert_eq!(
                ipa_verdict(absent),
                "40 bits (guest physical addresses below 1 TiB, the fixed default: no \
                 KVM_CAP_ARM_VM_IPA_SIZE)"
            );
        }
        assert_eq!(power_of_two(0), "1 B");
        assert_eq!(power_of_two(31), "2 GiB");
    }

    #[test]
    fn psci_verdict_says_yes_or_no() {
        assert!(psci_verdict(1).starts_with("0.2 or later"));
        assert!(psci_verdict(0).starts_with("NO"));
    }
}
