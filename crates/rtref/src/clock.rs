//! The TSC's frequency, where it came from, and conversions between TSC ticks and nanoseconds.

use core::fmt;

/// Where the TSC frequency was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// KVM's paravirtual clock (`MSR_KVM_SYSTEM_TIME_NEW`): `tsc_to_system_mul`/`tsc_shift`.
    Kvmclock,
    /// CPUID leaf 0x15: crystal clock times the TSC/crystal ratio.
    Cpuid15,
    /// CPUID leaf 0x40000010 (hypervisor timing leaf): TSC kHz.
    CpuidHypervisor,
    /// CPUID leaf 0x16: the processor base frequency in MHz (an approximation).
    Cpuid16,
}

impl TscSource {
    /// The name printed in the start line (`tsc_source=`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Kvmclock => "kvmclock",
            Self::Cpuid15 => "cpuid15",
            Self::CpuidHypervisor => "cpuid40000010",
            Self::Cpuid16 => "cpuid16",
        }
    }
}

impl fmt::Display for TscSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The TSC frequency from kvmclock's scale: `ns = ((tsc << shift) * mul) >> 32` (a negative
/// shift shifts right), so `hz = 10^9 * 2^32 / mul`, shifted the other way. `None` for `mul == 0`.
pub fn hz_from_pvclock(mul: u32, shift: i8) -> Option<u64> {
    if mul == 0 {
        return None;
    }
    let hz = (1_000_000_000u128 << 32) / u128::from(mul);
    let hz = if shift < 0 {
        hz << (-i32::from(shift)).min(63)
    } else {
        hz >> i32::from(shift).min(63)
    };
    u64::try_from(hz).ok().filter(|&h| h > 0)
}

/// The TSC frequency from CPUID leaf 0x15 (`eax` denominator, `ebx` numerator, `ecx` crystal Hz);
/// `None` when the leaf does not enumerate it.
pub fn hz_from_cpuid15(eax: u32, ebx: u32, ecx: u32) -> Option<u64> {
    if eax == 0 || ebx == 0 || ecx == 0 {
        return None;
    }
    Some(u64::from(ecx) * u64::from(ebx) / u64::from(eax))
}

/// TSC ticks to and from nanoseconds at one frequency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscScale {
    hz: u64,
}

impl TscScale {
    /// A scale for a TSC of `hz` (non-zero).
    pub fn new(hz: u64) -> Option<Self> {
        (hz > 0).then_some(Self { hz })
    }

    /// The frequency.
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// `ns` nanoseconds in TSC ticks, rounded to the nearest tick (saturating).
    pub fn ns_to_ticks(&self, ns: u64) -> u64 {
        let t = (u128::from(ns) * u128::from(self.hz) + 500_000_000) / 1_000_000_000;
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// A signed TSC difference in nanoseconds (saturating).
    pub fn ticks_to_ns(&self, ticks: i64) -> i64 {
        let ns = i128::from(ticks) * 1_000_000_000 / i128::from(self.hz);
        i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvclock_scale_gives_the_frequency() {
        // 1 tick = mul / 2^32 ns, times 2^shift.
        assert_eq!(hz_from_pvclock(1 << 31, 0), Some(2_000_000_000));
        assert_eq!(hz_from_pvclock(1 << 31, 1), Some(1_000_000_000));
        assert_eq!(hz_from_pvclock(u32::MAX, -1), Some(2_000_000_000));
        // About 3 GHz in KVM's terms: shift -1, mul ~ 2^32 * 2/3.
        let hz = hz_from_pvclock(0xab0a_6e71, -1).unwrap();
        assert!((2_990_000_000..3_000_000_000).contains(&hz), "{hz}");
        assert_eq!(hz_from_pvclock(0, 0), None);
        assert_eq!(hz_from_pvclock(1, 127), None);
    }

    #[test]
    fn cpuid15_needs_all_three_values() {
        assert_eq!(hz_from_cpuid15(2, 216, 24_000_000), Some(2_592_000_000));
        assert_eq!(hz_from_cpuid15(2, 216, 0), None);
        assert_eq!(hz_from_cpuid15(0, 216, 24_000_000), None);
    }

    #[test]
    fn conversions_round_trip() {
        let s = TscScale::new(2_500_000_000).unwrap();
        assert_eq!(s.ns_to_ticks(1_000_000), 2_500_000);
        assert_eq!(s.ticks_to_ns(2_500_000), 1_000_000);
        assert_eq!(s.ticks_to_ns(-2_500), -1_000);
        assert_eq!(s.ticks_to_ns(i64::MAX), 3_689_348_814_741_910_322);
        let slow = TscScale::new(1).unwrap();
        assert_eq!(slow.ticks_to_ns(i64::MAX), i64::MAX);
        assert_eq!(slow.ticks_to_ns(i64::MIN), i64::MIN);
        assert_eq!(
            TscScale::new(3).unwrap().ns_to_ticks(u64::MAX),
            55_340_232_221
        );
        assert_eq!(
            TscScale::new(u64::MAX).unwrap().ns_to_ticks(u64::MAX),
            u64::MAX
        );
        assert!(TscScale::new(0).is_none());
    }
}
