//! Initial vCPU state for the Linux 64-bit boot protocol: GDT, identity page tables, control
//! registers, MSRs and FPU.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{BOOT_STACK, GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

/// GDT: null, null, 64-bit code (selector 0x10, `__BOOT_CS`), data (0x18, `__BOOT_DS`), TSS,
/// and 32-bit code (0x28) for the PVH entry.
pub const GDT: [u64; 6] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
];
const CODE_IDX: usize = 2;
const DATA_IDX: usize = 3;
const TSS_IDX: usize = 4;
const CODE32_IDX: usize = 5;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT descriptor from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register that a descriptor loads.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Writes the GDT and page tables identity-mapping the low 4 GiB with 2 MiB pages.
pub fn write_boot_tables<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + (i * 8) as u64))?;
    }
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    for dir in 0..4u64 {
        let pd = PD_ADDR + dir * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + dir * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| ((((dir << 9) + i) << 21) | 0x83).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

/// Loads the boot GDT with flat segments: code from GDT entry `code_idx`, data everywhere else.
fn flat_segments(sregs: &mut kvm_sregs, code_idx: usize) {
    let data = segment_from_gdt(GDT[DATA_IDX], DATA_IDX);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.cs = segment_from_gdt(GDT[code_idx], code_idx);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[TSS_IDX], TSS_IDX);
}

/// Puts `sregs` in 64-bit mode with the boot GDT and page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    flat_segments(sregs, CODE_IDX);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Puts `sregs` in flat 32-bit protected mode without paging, as the PVH entry requires.
pub fn protected_mode_sregs(sregs: &mut kvm_sregs) {
    flat_segments(sregs, CODE32_IDX);
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// General registers at a PVH entry point, with the start info in RBX.
pub fn pvh_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: start_info,
        ..Default::default()
    }
}

/// General registers at the kernel's 64-bit entry point, with the zero page in RSI.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 0x6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The vCPU's registers as one line, for a failure report.
pub fn dump_state(fd: &kvm_ioctls::VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => describe_state(&r, &s),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    }
}

/// One line of a vCPU's registers for a failure report. A vCPU found at the reset vector in real
/// mode was reset by KVM (on AMD, KVM reinitialises the vCPU when the guest shuts down), so its
/// registers say nothing of the fault and are not shown as if they did.
fn describe_state(r: &kvm_bindings::kvm_regs, s: &kvm_bindings::kvm_sregs) -> String {
    const CR0_PE: u64 = 1;
    if r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cr0 & CR0_PE == 0 {
        return "registers at the fault unknown: KVM had already reset the vCPU".into();
    }
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} \
         rdi={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        s.cr0,
        s.cr3,
        s.cr4,
        s.efer,
        s.cs.selector
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_descriptors_decode_to_flat_64bit_segments() {
        let cs = segment_from_gdt(GDT[CODE_IDX], CODE_IDX);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (0x10, 1, 0, 1, 1, 0xb)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment_from_gdt(GDT[DATA_IDX], DATA_IDX);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x18, 0, 1, 0x3));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_4g_with_2m_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // Walk an address in the 4th GiB: PDPT[3] -> PD[3] entry 0x1ff.
        let va: u64 = 0xfee0_0000;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(PDPT_ADDR + 8 * (va >> 30)))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((va >> 21) & 0x1ff)))
            .unwrap();
        assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
        assert_eq!(pde & !0xfff, va, "identity");
        let gdt2: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 16)).unwrap();
        assert_eq!(gdt2, GDT[2]);
    }

    #[test]
    fn pvh_entry_is_flat_32bit_protected_mode_without_paging() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        protected_mode_sregs(&mut s);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.base, s.cs.limit),
            (0x28, 1, 0, 0, 0xffff_ffff)
        );
        assert_eq!((s.ds.db, s.ds.limit, s.ss.selector), (1, 0xffff_ffff, 0x18));
        let r = pvh_regs(0x100_0850, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0850, 0x6000, 2));
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_lma() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(
            (s.cs.selector, s.ds.selector, s.cr3),
            (0x10, 0x18, PML4_ADDR)
        );
    }
}

#[cfg(test)]
mod state_tests {
    use super::describe_state;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    #[test]
    fn a_vcpu_reset_by_kvm_is_not_reported_as_the_fault_state() {
        let mut r = kvm_regs {
            rip: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        let mut s = kvm_sregs::default();
        s.cs.selector = 0xf000;
        s.cr0 = 0x10;
        assert!(describe_state(&r, &s).contains("unknown"));
        r.rip = 0xffff_ffff_8100_0000;
        s.cs.selector = 0x10;
        s.cr0 = 0x8005_0033;
        let line = describe_state(&r, &s);
        assert!(line.starts_with("rip=0xffffffff81000000 "), "{line}");
        assert!(
            line.contains("cr0=0x80050033") && line.contains("cs=0x10"),
            "{line}"
        );
    }
}
