//! aarch64 vCPU registers through `KVM_{GET,SET}_ONE_REG`, and vCPU initialisation
//! (`KVM_ARM_VCPU_INIT` with PSCI 0.2).

use std::mem::offset_of;

use kvm_bindings::{
    kvm_regs, kvm_vcpu_init, user_pt_regs, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
    KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::VmError;

/// The id of the 64-bit core register at byte `offset` in `struct kvm_regs` (KVM numbers core
/// registers by their offset in 32-bit words).
pub const fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

/// General-purpose register Xn.
pub const fn x(n: usize) -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs) + 8 * n)
}

/// The program counter.
pub const PC: u64 = core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc));
/// PSTATE.
pub const PSTATE: u64 = core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate));
/// The stack pointer (SP_EL0).
pub const SP: u64 = core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, sp));

/// The id of system register (op0, op1, CRn, CRm, op2).
pub const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

/// MPIDR_EL1: the vCPU's affinity, which the FDT's `cpu` nodes give as their `reg`.
pub const MPIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 5);
/// ESR_EL1 and FAR_EL1, for a failure report (the guest's last exception).
pub const ESR_EL1: u64 = sys_reg(3, 0, 5, 2, 0);
/// The faulting address of the guest's last exception.
pub const FAR_EL1: u64 = sys_reg(3, 0, 6, 0, 0);

/// PSTATE at the kernel's entry (arm64 booting.txt): EL1 with SP_EL1 (EL1h), and debug,
/// SError, IRQ and FIQ masked.
pub const BOOT_PSTATE: u64 = PSR_MODE_EL1H | PSR_D | PSR_A | PSR_I | PSR_F;
const PSR_MODE_EL1H: u64 = 0x5;
const PSR_F: u64 = 1 << 6;
const PSR_I: u64 = 1 << 7;
const PSR_A: u64 = 1 << 8;
const PSR_D: u64 = 1 << 9;

/// The affinity fields of an MPIDR, as a `cpu` node's `reg` and PSCI `CPU_ON` name a CPU.
pub fn mpidr_affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

/// The features vCPU `index` starts with: PSCI 0.2 (SMP bring-up with `CPU_ON`, power-off and
/// reset as system events); every vCPU but the boot one starts powered off, until the guest
/// turns it on.
pub fn init_features(index: u8) -> u32 {
    let mut f = 1 << KVM_ARM_VCPU_PSCI_0_2;
    if index > 0 {
        f |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    f
}

/// `KVM_ARM_VCPU_INIT` for vCPU `index`, with the host's preferred target.
pub fn init_vcpu(vm: &VmFd, fd: &VcpuFd, index: u8) -> Result<(), VmError> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(VmError::kvm("KVM_ARM_PREFERRED_TARGET"))?;
    kvi.features[0] |= init_features(index);
    fd.vcpu_init(&kvi)
        .map_err(VmError::kvm("KVM_ARM_VCPU_INIT"))
}

fn set(fd: &VcpuFd, id: u64, value: u64) -> Result<(), VmError> {
    fd.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(VmError::kvm("KVM_SET_ONE_REG"))
}

fn get(fd: &VcpuFd, id: u64) -> Result<u64, kvm_ioctls::Error> {
    let mut b = [0u8; 8];
    fd.get_one_reg(id, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// The boot vCPU's registers at the kernel's entry: PC at the kernel, X0 the FDT's address,
/// X1-X3 zero, PSTATE [`BOOT_PSTATE`].
pub fn set_boot_regs(fd: &VcpuFd, entry: u64, fdt: u64) -> Result<(), VmError> {
    set(fd, PSTATE, BOOT_PSTATE)?;
    set(fd, PC, entry)?;
    set(fd, x(0), fdt)?;
    for n in 1..4 {
        set(fd, x(n), 0)?;
    }
    Ok(())
}

/// The vCPU's MPIDR_EL1, as KVM set it at `KVM_ARM_VCPU_INIT`.
pub fn read_mpidr(fd: &VcpuFd) -> Result<u64, VmError> {
    get(fd, MPIDR_EL1).map_err(VmError::kvm("KVM_GET_ONE_REG (MPIDR_EL1)"))
}

/// The vCPU's registers as one line, for a failure report.
pub fn dump_state(fd: &VcpuFd) -> String {
    let names = [
        ("pc", PC),
        ("pstate", PSTATE),
        ("sp", SP),
        ("x0", x(0)),
        ("x30", x(30)),
        ("esr_el1", ESR_EL1),
        ("far_el1", FAR_EL1),
    ];
    names
        .iter()
        .map(|(name, id)| match get(fd, *id) {
            Ok(v) => format!("{name}={v:#x}"),
            Err(_) => format!("{name}=?"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ids as Linux's arch/arm64/include/uapi/asm/kvm.h and QEMU compute them.
    #[test]
    fn register_ids_match_the_kernel_abi() {
        assert_eq!(x(0), 0x6030_0000_0010_0000);
        assert_eq!(x(1), 0x6030_0000_0010_0002);
        assert_eq!(SP, 0x6030_0000_0010_003e);
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
    }

    #[test]
    fn the_kernel_is_entered_at_el1h_with_interrupts_masked() {
        assert_eq!(BOOT_PSTATE, 0x3c5);
    }

    #[test]
    fn only_the_boot_vcpu_starts_powered_on_and_all_have_psci() {
        assert_eq!(init_features(0), 1 << 2);
        assert_eq!(init_features(1), (1 << 2) | 1);
        assert_eq!(init_features(7), init_features(1));
    }

    #[test]
    fn affinity_drops_the_flag_bits() {
        // Bit 31 (RES1) and the MT/U bits are not part of a CPU's name.
        assert_eq!(mpidr_affinity(0x8000_0000), 0);
        assert_eq!(mpidr_affinity(0x8000_0103), 0x103);
        assert_eq!(mpidr_affinity(0x01_c000_0000 | 0x10_0203), 0x01_0010_0203);
    }
}
