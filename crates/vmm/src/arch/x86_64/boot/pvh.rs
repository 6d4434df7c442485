//! The PVH boot protocol: 32-bit protected-mode entry with an `hvm_start_info` in RBX.
//!
//! Used for ELF kernels that carry a `XEN_ELFNOTE_PHYS32_ENTRY` note (Linux with `CONFIG_PVH`).

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::params::{ParamsError, E820_MAX};
use super::BootError;
use crate::layout::E820Entry;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Where the start info goes (below the zero page, which PVH does not use).
pub const START_INFO_ADDR: u64 = 0x6000;
/// The module list (the initramfs), right after the start info.
pub const MODLIST_ADDR: u64 = START_INFO_ADDR + 0x40;
/// The memory map, after the module list; room for 128 entries below 0x7000.
pub const MEMMAP_ADDR: u64 = MODLIST_ADDR + 0x40;
const MEMMAP_MAX: usize = E820_MAX;

/// The start info and the tables it points to.
#[derive(Debug, Clone)]
pub struct PvhInfo {
    /// The structure RBX points to.
    pub start_info: hvm_start_info,
    /// The initramfs, if any.
    pub modules: Vec<hvm_modlist_entry>,
    /// The memory map.
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// Builds the start info for a kernel with this command line, initramfs, memory map and RSDP.
pub fn build(
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp_addr: u64,
) -> Result<PvhInfo, BootError> {
    if e820.len() > MEMMAP_MAX {
        return Err(ParamsError::TooManyE820(e820.len()).into());
    }
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_ADDR },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    Ok(PvhInfo {
        start_info,
        modules,
        memmap,
    })
}

/// Writes the start info and its tables at their fixed addresses.
pub fn write(mem: &GuestMemoryMmap, info: &PvhInfo) -> Result<(), BootError> {
    mem.write_obj(info.start_info, GuestAddress(START_INFO_ADDR))?;
    for (i, m) in info.modules.iter().enumerate() {
        mem.write_obj(*m, GuestAddress(MODLIST_ADDR + (i * 32) as u64))?;
    }
    for (i, e) in info.memmap.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(MEMMAP_ADDR + (i * 24) as u64))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{e820_map, ACPI_START, CMDLINE_ADDR, ZERO_PAGE_ADDR};

    #[test]
    fn start_info_points_at_cmdline_initrd_memmap_and_rsdp() {
        let map = e820_map(512 << 20);
        let info = build(CMDLINE_ADDR, Some((0x1f00_0000, 0x1234)), &map, ACPI_START).unwrap();
        let s = info.start_info;
        assert_eq!(
            (s.magic, s.version, s.nr_modules),
            (XEN_HVM_START_MAGIC, 1, 1)
        );
        assert_eq!(
            (s.cmdline_paddr, s.rsdp_paddr, s.modlist_paddr),
            (CMDLINE_ADDR, ACPI_START, MODLIST_ADDR)
        );
        assert_eq!(
            (s.memmap_paddr, s.memmap_entries as usize),
            (MEMMAP_ADDR, map.len())
        );
        assert_eq!(
            (info.modules[0].paddr, info.modules[0].size),
            (0x1f00_0000, 0x1234)
        );
        assert_eq!(
            (
                info.memmap[2].addr,
                info.memmap[2].size,
                info.memmap[2].type_
            ),
            (map[2].addr, map[2].size, 1)
        );
        let none = build(CMDLINE_ADDR, None, &map, ACPI_START).unwrap();
        assert_eq!(
            (none.start_info.nr_modules, none.start_info.modlist_paddr),
            (0, 0)
        );
    }

    #[test]
    fn tables_fit_below_the_zero_page_and_are_written_where_announced() {
        assert!(MEMMAP_ADDR + (MEMMAP_MAX * 24) as u64 <= ZERO_PAGE_ADDR);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = e820_map(512 << 20);
        let info = build(CMDLINE_ADDR, Some((0x100_0000, 4096)), &map, ACPI_START).unwrap();
        write(&mem, &info).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let size: u64 = mem.read_obj(GuestAddress(MODLIST_ADDR + 8)).unwrap();
        assert_eq!(size, 4096);
        let last_type: u32 = mem
            .read_obj(GuestAddress(
                MEMMAP_ADDR + ((map.len() - 1) * 24) as u64 + 16,
            ))
            .unwrap();
        assert_eq!(last_type, map.last().unwrap().kind);
        assert!(build(0, None, &vec![map[0]; 129], 0).is_err());
    }
}
