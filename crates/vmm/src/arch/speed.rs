//! What the doctor's speed probes share: each architecture's `probe` runs a counting loop in a
//! throw-away VM's vCPU in guest kernel mode (x86_64 ring 0, aarch64 EL1); this module times two
//! runs of it and judges the rate.

use std::time::Duration;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::VmError;

/// Iterations of the short run: about 0.1 ms on hardware.
pub const PROBE_ITERATIONS: u64 = 200_000;
/// Below this rate the host cannot boot guest kernels in reasonable time.
pub const HARDWARE_SPEED_THRESHOLD: f64 = 50e6;

/// What the probe measured.
#[derive(Debug, Clone, Copy)]
pub struct ProbeResult {
    /// Loop iterations per second in guest kernel mode.
    pub iterations_per_sec: f64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl ProbeResult {
    /// The result of `iterations` run in `elapsed`.
    pub fn new(iterations: u64, elapsed: Duration) -> ProbeResult {
        ProbeResult {
            iterations_per_sec: iterations as f64 / elapsed.as_secs_f64().max(1e-9),
            elapsed,
        }
    }

    /// Whether guest kernels will run at hardware speed.
    pub fn hardware_speed(&self) -> bool {
        self.iterations_per_sec >= HARDWARE_SPEED_THRESHOLD
    }
}

/// A probe's throw-away VM with memory at guest physical address 0. The fields drop in order:
/// the VM before its memory; a vCPU made from `vm` must be dropped before this (declared after
/// it, in the same scope).
pub struct ProbeVm {
    /// The VM.
    pub vm: VmFd,
    /// Its memory.
    pub mem: GuestMemoryMmap<()>,
}

impl ProbeVm {
    /// A VM with `size` bytes of memory at guest physical address 0.
    pub fn new(kvm: &Kvm, size: usize) -> Result<ProbeVm, VmError> {
        let memory = |e: String| VmError::Memory(e);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| memory(e.to_string()))?;
        let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `mem` is a live mapping of `size` bytes that the returned ProbeVm owns, and
        // it drops `vm` before `mem` (field order), so the guest never runs on unmapped memory.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(ProbeVm { vm, mem })
    }
}

/// The doctor's measurement with `run(iterations)`: a short run, and where it is not clearly
/// slow a ten times longer one. The rate is the longer run's marginal one (its extra iterations
/// over its extra time), so the fixed cost of entering the guest, large under nested emulation,
/// does not count.
pub fn measure(run: impl Fn(u64) -> Result<ProbeResult, VmError>) -> Result<ProbeResult, VmError> {
    let short = run(PROBE_ITERATIONS)?;
    if short.iterations_per_sec < HARDWARE_SPEED_THRESHOLD / 10.0 {
        return Ok(short);
    }
    let long = run(PROBE_ITERATIONS * 10)?;
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

    fn at_rate(per_sec: f64, fixed: Duration) -> impl Fn(u64) -> Result<ProbeResult, VmError> {
        move |n| {
            Ok(ProbeResult::new(
                n,
                fixed + Duration::from_secs_f64(n as f64 / per_sec),
            ))
        }
    }

    #[test]
    fn the_cost_of_entering_the_guest_does_not_count() {
        // 1 G iterations/s behind 5 ms of VM creation and entry: the short run alone would say
        // 40 M/s, below the threshold.
        let fixed = Duration::from_millis(5);
        assert!(!at_rate(1e9, fixed)(PROBE_ITERATIONS)
            .unwrap()
            .hardware_speed());
        let p = measure(at_rate(1e9, fixed)).unwrap();
        assert!((p.iterations_per_sec / 1e9 - 1.0).abs() < 0.01, "{p:?}");
        assert!(p.hardware_speed());
    }

    #[test]
    fn a_clearly_slow_host_is_measured_once() {
        let runs = std::cell::Cell::new(0);
        let p = measure(|n| {
            runs.set(runs.get() + 1);
            at_rate(1e6, Duration::ZERO)(n)
        })
        .unwrap();
        assert_eq!(runs.get(), 1);
        assert!(!p.hardware_speed());
    }
}
