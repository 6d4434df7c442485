//! A short timed ring-0 probe: does this host's KVM run guest kernel code at hardware speed?
//!
//! Some hosts (nested setups without hardware virtualization passed through) expose a `/dev/kvm`
//! that executes guest ring-0 code by instruction emulation, thousands of times slower than
//! hardware. Booting a kernel there is hopeless; the probe measures it in well under a second.

use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::error::VmError;
use crate::regs;

use crate::arch::speed::ProbeVm;
pub use crate::arch::speed::{ProbeResult, HARDWARE_SPEED_THRESHOLD, PROBE_ITERATIONS};

const CODE_ADDR: u64 = 0x10_0000;
const PROBE_MEM: usize = 2 << 20;

/// Machine code: `mov rcx, PROBE_ITERATIONS; 1: dec rcx; jnz 1b; hlt`.
fn probe_code(iterations: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0xc9, 0x75, 0xfb, 0xf4]);
    code
}

/// Runs the probe in a throw-away VM with one vCPU in 64-bit mode.
pub fn ring0_speed(kvm: &Kvm, iterations: u64) -> Result<ProbeResult, VmError> {
    let ProbeVm { vm, mem } = &ProbeVm::new(kvm, PROBE_MEM)?;
    regs::write_boot_tables(mem).map_err(|e| VmError::Memory(e.to_string()))?;
    mem.write_slice(&probe_code(iterations), GuestAddress(CODE_ADDR))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let mut vcpu = vm.create_vcpu(0).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
    regs::long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)
        .map_err(VmError::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs::boot_regs(CODE_ADDR))
        .map_err(VmError::kvm("KVM_SET_REGS"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => {
                return Err(VmError::Kvm {
                    op: "probe",
                    source: std::io::Error::other(format!("unexpected exit {other:?}")),
                })
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(VmError::kvm("KVM_RUN")(e)),
        }
    }
    let elapsed = start.elapsed();
    let rcx = vcpu.get_regs().map_err(VmError::kvm("KVM_GET_REGS"))?.rcx;
    if rcx != 0 {
        return Err(VmError::Kvm {
            op: "probe",
            source: std::io::Error::other(format!("loop ended early, rcx={rcx}")),
        });
    }
    Ok(ProbeResult::new(iterations, elapsed))
}

/// The doctor's measurement ([`crate::arch::speed::measure`]) with this probe.
pub fn measure(kvm: &Kvm) -> Result<ProbeResult, VmError> {
    crate::arch::speed::measure(|n| ring0_speed(kvm, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_code_encodes_the_count_and_ends_in_hlt() {
        let c = probe_code(0x1122);
        assert_eq!(&c[..2], &[0x48, 0xb9]);
        assert_eq!(u64::from_le_bytes(c[2..10].try_into().unwrap()), 0x1122);
        assert_eq!(*c.last().unwrap(), 0xf4);
        // jnz -5 jumps back to the dec.
        assert_eq!(&c[c.len() - 3..c.len() - 1], &[0x75, 0xfb]);
    }
}
