//! Finding the TSC frequency: kvmclock first (in a VM it is what the hypervisor scales the TSC
//! by), then CPUID leaves 0x15, 0x40000010 and 0x16.

use core::cell::UnsafeCell;

use tandem_rtref::clock::{hz_from_cpuid15, hz_from_pvclock, TscSource};

use crate::hw::{cpuid, wrmsr};

/// MSR_KVM_SYSTEM_TIME_NEW: the guest-physical address of a pvclock record, bit 0 = enable.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]; // "KVMKVMKVM\0\0\0"
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const HV_BASE: u32 = 0x4000_0000;

/// `struct pvclock_vcpu_time_info`.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    _pad0: u32,
    _tsc_timestamp: u64,
    _system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    _flags: u8,
    _pad: [u8; 2],
}

struct Shared(UnsafeCell<PvClock>);
// SAFETY: one CPU; the hypervisor writes it while the MSR points at it, and we only read it with
// volatile reads then.
unsafe impl Sync for Shared {}

static PVCLOCK: Shared = Shared(UnsafeCell::new(PvClock {
    version: 0,
    _pad0: 0,
    _tsc_timestamp: 0,
    _system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    _flags: 0,
    _pad: [0; 2],
}));

fn kvmclock_hz() -> Option<u64> {
    let (max, b, c, d) = cpuid(HV_BASE);
    if [b, c, d] != KVM_SIGNATURE
        || max < HV_BASE + 1
        || cpuid(HV_BASE + 1).0 & KVM_FEATURE_CLOCKSOURCE2 == 0
    {
        return None;
    }
    let rec = PVCLOCK.0.get();
    // SAFETY: the kvmclock MSR exists (CPUID says so); the record is a 64-byte aligned static
    // (identity-mapped, so its address is its guest-physical address) nothing else uses. KVM
    // writes it before the wrmsr returns; we read it with volatile reads (retrying while KVM
    // updates it: odd or changed version) and switch the clock off again so that KVM stops
    // updating it during the run.
    unsafe {
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, rec as u64 | 1);
        let (mul, shift) = loop {
            let v = core::ptr::read_volatile(&raw const (*rec).version);
            let mul = core::ptr::read_volatile(&raw const (*rec).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&raw const (*rec).tsc_shift);
            if v.is_multiple_of(2) && v == core::ptr::read_volatile(&raw const (*rec).version) {
                break (mul, shift);
            }
        };
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
        hz_from_pvclock(mul, shift)
    }
}

/// The TSC frequency and where it was found.
pub fn frequency() -> Option<(u64, TscSource)> {
    if let Some(hz) = kvmclock_hz() {
        return Some((hz, TscSource::Kvmclock));
    }
    let max = cpuid(0).0;
    if max >= 0x15 {
        let (a, b, c, _) = cpuid(0x15);
        if let Some(hz) = hz_from_cpuid15(a, b, c) {
            return Some((hz, TscSource::Cpuid15));
        }
    }
    if cpuid(HV_BASE).0 >= HV_BASE + 0x10 {
        let khz = cpuid(HV_BASE + 0x10).0;
        if khz != 0 {
            return Some((u64::from(khz) * 1000, TscSource::CpuidHypervisor));
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16).0 & 0xffff;
        if mhz != 0 {
            return Some((u64::from(mhz) * 1_000_000, TscSource::Cpuid16));
        }
    }
    None
}
