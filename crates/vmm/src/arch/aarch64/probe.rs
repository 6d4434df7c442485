//! The doctor's EL1 speed probe on aarch64: a counting loop run in a throw-away VM's vCPU at EL1,
//! timed. A host whose KVM emulates guest kernel code instead of running it cannot boot guests in
//! reasonable time; the probe measures that in a fraction of a second.
//!
//! The vCPU starts as `KVM_ARM_VCPU_INIT` leaves it (PC 0, EL1h, interrupts masked, MMU off), so
//! the code sits at guest physical address 0 and no register is set: it loads its own count and
//! ends by storing the counter, which must then be 0, to an address without memory, an MMIO
//! exit that carries the value out.

use std::time::Instant;

use kvm_bindings::kvm_vcpu_init;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::error::VmError;

use crate::arch::speed::ProbeVm;
pub use crate::arch::speed::{ProbeResult, HARDWARE_SPEED_THRESHOLD, PROBE_ITERATIONS};

const PROBE_MEM: usize = 64 << 10;
/// Where the loop reports: no memory there.
const REPORT_ADDR: u64 = 0x1000_0000;

/// A64 machine code: `x0 = iterations; x1 = REPORT_ADDR; 1: subs x0, x0, #1; b.ne 1b;
/// str x0, [x1]; b .`.
fn probe_code(iterations: u32) -> Vec<u8> {
    let (lo, hi) = (iterations & 0xffff, iterations >> 16);
    let words = [
        0xd280_0000 | lo << 5,                           // movz x0, #lo
        0xf2a0_0000 | hi << 5,                           // movk x0, #hi, lsl #16
        0xd2a0_0001 | ((REPORT_ADDR >> 16) as u32) << 5, // movz x1, #REPORT_ADDR >> 16, lsl #16
        0xf100_0400,                                     // subs x0, x0, #1
        0x54ff_ffe1,                                     // b.ne -4
        0xf900_0020,                                     // str x0, [x1]
        0x1400_0000,                                     // b .
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Runs the loop `iterations` times (1 to `u32::MAX`) in a throw-away VM with one vCPU at EL1.
pub fn el1_speed(kvm: &Kvm, iterations: u64) -> Result<ProbeResult, VmError> {
    let count = u32::try_from(iterations)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| VmError::Kvm {
            op: "probe",
            source: std::io::Error::other(format!("{iterations} iterations: 1 to 2^32-1")),
        })?;
    let ProbeVm { vm, mem } = &ProbeVm::new(kvm, PROBE_MEM)?;
    mem.write_slice(&probe_code(count), GuestAddress(0))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let mut vcpu = vm.create_vcpu(0).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .map_err(VmError::kvm("KVM_ARM_PREFERRED_TARGET"))?;
    vcpu.vcpu_init(&init)
        .map_err(VmError::kvm("KVM_ARM_VCPU_INIT"))?;
    let unexpected = |what: String| VmError::Kvm {
        op: "probe",
        source: std::io::Error::other(what),
    };
    let start = Instant::now();
    let left = loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(REPORT_ADDR, data)) => {
                let mut bytes = [0u8; 8];
                let n = data.len().min(8);
                bytes[..n].copy_from_slice(&data[..n]);
                break u64::from_le_bytes(bytes);
            }
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => return Err(unexpected(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(VmError::kvm("KVM_RUN")(e)),
        }
    };
    let elapsed = start.elapsed();
    if left != 0 {
        return Err(unexpected(format!("loop ended early, x0={left}")));
    }
    Ok(ProbeResult::new(iterations, elapsed))
}

/// The doctor's measurement ([`crate::arch::speed::measure`]) with this probe.
pub fn measure(kvm: &Kvm) -> Result<ProbeResult, VmError> {
    crate::arch::speed::measure(|n| el1_speed(kvm, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(code: &[u8]) -> Vec<u32> {
        code.chunks(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_count_and_the_report_address_are_encoded() {
        let w = words(&probe_code(0x0012_3456));
        // movz x0, #0x3456 and movk x0, #0x12, lsl #16 (imm16 in bits 5..21, Rd 0).
        assert_eq!((w[0] >> 5) & 0xffff, 0x3456);
        assert_eq!((w[1] >> 5) & 0xffff, 0x12);
        assert_eq!(w[0] & 0x1f, 0);
        assert_eq!(w[1] >> 21, 0xf2a0_0000 >> 21);
        // movz x1, #(REPORT_ADDR >> 16), lsl #16.
        assert_eq!(u64::from((w[2] >> 5) & 0xffff) << 16, REPORT_ADDR);
        assert_eq!(w[2] & 0x1f, 1);
        assert!(
            REPORT_ADDR >= PROBE_MEM as u64,
            "the report must leave guest memory"
        );
    }

    #[test]
    fn the_loop_branches_back_one_instruction_and_reports_x0_through_x1() {
        let w = words(&probe_code(1));
        // b.ne: cond NE (1), imm19 = -1 instruction.
        assert_eq!(w[4] & 0xf, 1);
        assert_eq!(((w[4] >> 5) & 0x7ffff) as i32 - (1 << 19), -1);
        // str x0, [x1, #0].
        assert_eq!(w[5], 0xf900_0000 | 1 << 5);
        // b . ends it if the store ever returns.
        assert_eq!(w[6], 0x1400_0000);
    }
}
