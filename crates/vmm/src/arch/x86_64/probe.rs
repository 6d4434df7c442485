//! A short timed ring-0 probe: does this host's KVM run guest kernel code at hardware speed?
//!
//! Some hosts (nested setups without hardware virtualization passed through) expose a `/dev/kvm`
//! that executes guest ring-0 code by instruction emulation, thousands of times slower than
//! hardware. Booting a kernel there is hopeless; the probe measures it in well under a second.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::VmError;
use crate::regs;

const CODE_ADDR: u64 = 0x10_0000;
const PROBE_MEM: usize = 2 << 20;
/// Iterations of the probe loop (`dec rcx; jnz`): about 0.1 ms on hardware.
pub const PROBE_ITERATIONS: u64 = 200_000;
/// Below this rate the host cannot boot guest kernels in reasonable time.
pub const HARDWARE_SPEED_THRESHOLD: f64 = 50e6;

/// What the probe measured.
#[derive(Debug, Clone, Copy)]
pub struct ProbeResult {
    /// Loop iterations per second in guest ring 0.
    pub iterations_per_sec: f64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl ProbeResult {
    /// Whether guest kernels will run at hardware speed.
    pub fn hardware_speed(&self) -> bool {
        self.iterations_per_sec >= HARDWARE_SPEED_THRESHOLD
    }
}

/// Machine code: `mov rcx, PROBE_ITERATIONS; 1: dec rcx; jnz 1b; hlt`.
fn probe_code(iterations: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0xc9, 0x75, 0xfb, 0xf4]);
    code
}

/// Runs the probe in a throw-away VM with one vCPU in 64-bit mode.
pub fn ring0_speed(kvm: &Kvm, iterations: u64) -> Result<ProbeResult, VmError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PROBE_MEM)])
        .map_err(|e| VmError::Memory(e.to_string()))?;
    // Declared after `mem`, so dropped before it: the VM never outlives its memory.
    let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: PROBE_MEM as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `mem` is a live mapping of PROBE_MEM bytes; `vm` and its vCPU are dropped before
    // it (reverse declaration order), so the guest can never run on unmapped memory.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    regs::write_boot_tables(&mem).map_err(|e| VmError::Memory(e.to_string()))?;
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
    Ok(ProbeResult {
        iterations_per_sec: iterations as f64 / elapsed.as_secs_f64().max(1e-9),
        elapsed,
    })
}

/// The doctor's measurement: a short probe, and where it is not clearly slow a ten times longer
/// one. The rate is the longer run's marginal one (its extra iterations over its extra time), so
/// the fixed cost of entering the guest, large under nested emulation, does not count.
pub fn measure(kvm: &Kvm) -> Result<ProbeResult, VmError> {
    let short = ring0_speed(kvm, PROBE_ITERATIONS)?;
    if short.iterations_per_sec < HARDWARE_SPEED_THRESHOLD / 10.0 {
        return Ok(short);
    }
    let long = ring0_speed(kvm, PROBE_ITERATIONS * 10)?;
    let extra = long.elapsed.saturating_sub(short.elapsed).as_secs_f64();
    let marginal = if extra > 0.0 {
        (PROBE_ITERATIONS * 9) as f64 / extra
    } else {
        long.iterations_per_sec
    };
    Ok(ProbeResult {
        iterations_per_sec: marginal.max(long.iterations_per_sec),
        elapsed: short.elapsed + long.elapsed,
    })
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
