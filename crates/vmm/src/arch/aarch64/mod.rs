//! aarch64: the guest memory map and interrupt numbering the shared code is built on. Booting
//! VMs is not implemented yet (issue 12: GICv3, PSCI, a device tree, arm64 `Image` loading);
//! until it is, [`ensure_vm_support`] and [`validate_boot`] refuse with one clear error and
//! [`crate::run`] does too.

pub mod irq;
pub mod layout;
pub mod probe;
pub mod regs;

use kvm_ioctls::Cap;

use crate::error::VmError;
use crate::vm::VmConfig;

/// KVM capabilities an aarch64 VM will need, with their names for messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::OneReg, "KVM_CAP_ONE_REG"),
    (Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
    (Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Whether this build can boot VMs: not on aarch64, yet.
pub fn ensure_vm_support() -> Result<(), VmError> {
    Err(VmError::ArchNotImplemented("aarch64"))
}

/// Checks the boot images; on aarch64 there is no boot protocol to check them against yet.
pub fn validate_boot(_cfg: &VmConfig) -> Result<(), VmError> {
    ensure_vm_support()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booting_is_refused_as_bad_input_naming_the_issue() {
        let e = ensure_vm_support().unwrap_err();
        assert!(e.is_user_error());
        assert_eq!(
            e.to_string(),
            "booting VMs on aarch64 is not implemented yet (tracked in issue 12)"
        );
    }
}
