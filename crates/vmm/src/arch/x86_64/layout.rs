//! The x86_64 guest-physical memory map, and the e820 table that describes it to the guest.
//!
//! ```text
//! 0x0000_0000  RAM: real-mode area, GDT (0x500), zero page (0x7000), boot stack, page tables
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (not RAM to the guest)
//! 0x000e_0000  ACPI tables (RSDP first), reserved; reset stub at the reset vector 0xffff0
//! 0x0010_0000  RAM: kernel, initramfs (as high as it fits below the MMIO hole), rest
//! 0xc000_0000  MMIO hole (1 GiB): virtio-mmio 0xd000_0000, PCI BARs 0xe000_0000-0xfebf_ffff,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

/// Most vCPUs tandem gives a VM (APIC IDs 0-254; 255 is the broadcast ID).
pub const MAX_VCPUS: usize = 254;
/// Where the GDT used at the 64-bit entry lives.
pub const GDT_ADDR: u64 = 0x500;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, then the PDPT, then the page directories.
pub const PML4_ADDR: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories (4 of them: 4 GiB identity-mapped in 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line tandem accepts (the kernel's own limit may be lower).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the Extended BIOS Data Area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, starting with the RSDP (found here by the kernel's legacy scan too).
pub const ACPI_START: u64 = 0xe0000;
/// Where an x86 CPU starts after reset (F000:FFF0); guests that reboot "through the BIOS" jump
/// here, so tandem puts a tiny reset stub there (see [`crate::boot::RESET_STUB`]).
pub const RESET_VECTOR: u64 = 0xffff0;
/// End of the low 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window (one [`VIRTIO_MMIO_SIZE`] page per device).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio device; the next ones follow (COM1 has 4, the PIT 0).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// GSIs of PCI INTx: slot s's INTA is `PCI_INTX_GSI_BASE + s % 4` (announced in `_PRT`).
pub const PCI_INTX_GSI_BASE: u32 = 20;
/// Most virtio-mmio devices: one IOAPIC pin each, from [`VIRTIO_IRQ_BASE`] up to the PCI INTx
/// pins.
pub const VIRTIO_MAX_DEVICES: usize = (PCI_INTX_GSI_BASE - VIRTIO_IRQ_BASE) as usize;

/// The GSI of PCI slot `slot`'s INTA.
pub fn pci_intx_gsi(slot: usize) -> u32 {
    PCI_INTX_GSI_BASE + (slot % 4) as u32
}
/// Start of the window where tandem places PCI BARs (announced in the PCI root's `_CRS`).
pub const PCI_MMIO_START: u64 = 0xe000_0000;
/// End (exclusive) of the PCI BAR window.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// The IOAPIC's registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Needed by KVM on Intel for real-mode emulation; in the MMIO hole, away from devices.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity page table for real mode (the page below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Smallest guest memory tandem accepts.
pub const MIN_MEMORY: u64 = 32 << 20;

// The interrupt controllers must sit in the MMIO hole, never over RAM.
const _: () = assert!(IOAPIC_ADDR >= MMIO_HOLE_START && LAPIC_ADDR < MMIO_HOLE_END);
const _: () = assert!(
    VIRTIO_MMIO_BASE >= MMIO_HOLE_START
        && VIRTIO_MMIO_BASE + VIRTIO_MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE <= IOAPIC_ADDR
);

const _: () = assert!(
    VIRTIO_MMIO_BASE + VIRTIO_MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE <= PCI_MMIO_START
        && PCI_MMIO_END <= IOAPIC_ADDR
);

/// Where virtio device `index` sits: its MMIO window and its GSI.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    (index < VIRTIO_MAX_DEVICES).then(|| {
        (
            VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
            VIRTIO_IRQ_BASE + index as u32,
        )
    })
}

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type ([`E820_RAM`], [`E820_RESERVED`]).
    pub kind: u32,
}

/// Guest RAM regions (start, length) for `mem_size` bytes of guest memory: below the MMIO hole
/// first, the remainder above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// The e820 map for `mem_size` bytes of guest memory. The MMIO hole is left out, so the guest
/// never places anything there.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: HIMEM_START - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_has_no_ram_above_4g() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (512 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
        // Only the EBDA, the legacy VGA/ROM area and the ACPI area are missing from RAM.
        assert_eq!(ram_total(&map), (512 << 20) - (HIMEM_START - EBDA_START));
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let mem = 6u64 << 30;
        let map = e820_map(mem);
        let high = map.last().unwrap();
        assert_eq!(high.addr, MMIO_HOLE_END);
        assert_eq!(high.size, mem - MMIO_HOLE_START);
        for e in &map {
            let overlaps_hole = e.addr < MMIO_HOLE_END && e.addr + e.size > MMIO_HOLE_START;
            assert!(!overlaps_hole, "{e:?} overlaps the MMIO hole");
        }
        assert_eq!(
            ram_regions(mem),
            vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mem in [MIN_MEMORY, 1 << 30, 3 << 30, (3 << 30) + 4096, 8 << 30] {
            let map = e820_map(mem);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{mem}: {w:?}");
            }
        }
    }
}
