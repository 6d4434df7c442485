//! CPUID for each vCPU: the host's supported set from KVM, with this vCPU's APIC ID and a
//! consistent one-socket topology (N cores, one thread each) on both Intel and AMD leaves.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
const LEAF_EXT_POWER: u32 = 0x8000_0007;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_INVARIANT_TSC: u32 = 1 << 8;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const TOPO_LEVEL_SMT: u32 = 1;
const TOPO_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patches `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `apic_id` of `nr_vcpus`.
pub fn patch(entries: &mut [kvm_cpuid_entry2], apic_id: u32, nr_vcpus: u32) {
    let cores = nr_vcpus.max(1);
    let shift = id_bits(cores);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xffff) | (apic_id << 24) | ((cores & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cores > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cores - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | ((cores - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPO_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = cores;
                        e.ecx = (TOPO_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_EXT_FEATURES => {
                if cores > 1 {
                    e.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDR_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | ((cores - 1) & 0xff);
            }
            LEAF_EXT_APIC_ID => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// Announces the LAPIC timer's TSC-deadline mode, which KVM emulates with an in-kernel irqchip
/// (`KVM_CAP_TSC_DEADLINE_TIMER`) but leaves out of `KVM_GET_SUPPORTED_CPUID`: arming the timer
/// is then one MSR write that KVM handles in the kernel, and deadlines are absolute.
pub fn set_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        e.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Whether the guest is told its TSC is invariant (KVM passes the host's bit on).
pub fn has_invariant_tsc(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .any(|e| e.function == LEAF_EXT_POWER && e.edx & EDX_INVARIANT_TSC != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0800,
            eax: 0,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        let mut l4_l3 = entry(LEAF_CACHE_PARAMS, 3);
        l4_l3.eax = (3 << 5) | 0x3;
        let mut l4_l1 = entry(LEAF_CACHE_PARAMS, 0);
        l4_l1.eax = (1 << 5) | 0x1;
        vec![
            entry(LEAF_FEATURES, 0),
            l4_l1,
            l4_l3,
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_EXT_FEATURES, 0),
            entry(LEAF_EXT_ADDR_SIZES, 0),
            entry(LEAF_EXT_APIC_ID, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_everywhere() {
        for id in 0..4 {
            let mut v = host();
            patch(&mut v, id, 4);
            assert_eq!(find(&v, LEAF_FEATURES, 0).ebx >> 24, id);
            assert_eq!(find(&v, LEAF_TOPOLOGY, 0).edx, id);
            assert_eq!(find(&v, LEAF_TOPOLOGY, 1).edx, id);
            assert_eq!(find(&v, LEAF_EXT_APIC_ID, 0).eax, id);
        }
    }

    #[test]
    fn topology_is_one_socket_of_n_single_thread_cores() {
        for n in [1u32, 2, 3, 4, 8] {
            let mut v = host();
            patch(&mut v, 0, n);
            let f1 = find(&v, LEAF_FEATURES, 0);
            assert_eq!((f1.ebx >> 16) & 0xff, n);
            assert_eq!(f1.ebx & 0xff00, 0x0800, "CLFLUSH size kept");
            assert_ne!(f1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(f1.edx & EDX_HTT != 0, n > 1);
            let smt = find(&v, LEAF_TOPOLOGY, 0);
            assert_eq!(
                (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff),
                (0, 1, TOPO_LEVEL_SMT)
            );
            let core = find(&v, LEAF_TOPOLOGY, 1);
            assert_eq!(core.ebx, n);
            assert!(1 << core.eax >= n, "shift {} too small for {n}", core.eax);
            assert_eq!((core.ecx >> 8) & 0xff, TOPO_LEVEL_CORE);
            assert_eq!(
                (find(&v, LEAF_TOPOLOGY, 2).ecx >> 8) & 0xff,
                0,
                "no level past cores"
            );
            assert_eq!(find(&v, LEAF_CACHE_PARAMS, 0).eax >> 26, n - 1);
            assert_eq!(
                (find(&v, LEAF_CACHE_PARAMS, 0).eax >> 14) & 0xfff,
                0,
                "L1 is per core"
            );
            assert_eq!(
                (find(&v, LEAF_CACHE_PARAMS, 3).eax >> 14) & 0xfff,
                n - 1,
                "L3 shared"
            );
            assert_eq!(find(&v, LEAF_EXT_ADDR_SIZES, 0).ecx & 0xff, n - 1);
        }
    }

    #[test]
    fn tsc_deadline_is_announced_and_invariant_tsc_read() {
        let mut v = host();
        assert_eq!(find(&v, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
        set_tsc_deadline(&mut v);
        assert_ne!(find(&v, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert!(!has_invariant_tsc(&v));
        let mut power = entry(LEAF_EXT_POWER, 0);
        power.edx = EDX_INVARIANT_TSC;
        v.push(power);
        assert!(has_invariant_tsc(&v));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
