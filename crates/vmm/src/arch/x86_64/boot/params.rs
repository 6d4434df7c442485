//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::E820Entry;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Most memory-map entries the zero page (and tandem's PVH memory map) holds.
pub const E820_MAX: usize = 128;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    /// More e820 entries than the zero page holds.
    #[error("too many e820 entries ({0})")]
    TooManyE820(usize),
    /// The command line does not fit the kernel's limit.
    #[error("the command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length with the terminating NUL.
        len: usize,
        /// The kernel's limit (with NUL).
        max: usize,
    },
}

/// What the zero page must say.
#[derive(Debug, Clone)]
pub struct BootInfo<'a> {
    /// The bzImage's own setup header, or `None` for an ELF vmlinux (a default one is made).
    pub header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command-line length including the NUL.
    pub cmdline_len: usize,
    /// Guest address and size of the initramfs.
    pub initrd: Option<(u64, u64)>,
    /// The memory map.
    pub e820: &'a [E820Entry],
    /// Guest address of the ACPI RSDP.
    pub rsdp_addr: u64,
}

/// Builds the zero page.
pub fn build_boot_params(info: &BootInfo<'_>) -> Result<boot_params, ParamsError> {
    let hdr = match info.header {
        Some(h) => h,
        None => setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            // Protocol 2.06+ semantics for the fields below, which the 64-bit entry honours.
            version: 0x020f,
            cmdline_size: crate::layout::CMDLINE_MAX as u32,
            initrd_addr_max: u32::MAX,
            ..Default::default()
        },
    };
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    // Kernels with protocol < 2.06 have a 255-byte command line limit.
    let max = match params.hdr.cmdline_size {
        0 => 256,
        n => n as usize + 1,
    };
    if info.cmdline_len > max {
        return Err(ParamsError::CmdlineTooLong {
            len: info.cmdline_len,
            max,
        });
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (info.cmdline_addr >> 32) as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    if info.e820.len() > E820_MAX {
        return Err(ParamsError::TooManyE820(info.e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = info.e820.len() as u8;
    params.acpi_rsdp_addr = info.rsdp_addr;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{e820_map, ACPI_START, CMDLINE_ADDR};

    #[test]
    fn elf_kernel_gets_a_valid_default_header_and_everything_is_filled() {
        let map = e820_map(256 << 20);
        let p = build_boot_params(&BootInfo {
            header: None,
            cmdline_addr: CMDLINE_ADDR,
            cmdline_len: 20,
            initrd: Some((0x0f00_0000, 0x12345)),
            e820: &map,
            rsdp_addr: ACPI_START,
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x0f00_0000, 0x12345)
        );
        assert_eq!(p.e820_entries as usize, map.len());
        let third = p.e820_table[2];
        assert_eq!(
            ({ third.addr }, { third.size }, { third.r#type }),
            (map[2].addr, map[2].size, 1)
        );
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
    }

    #[test]
    fn bzimage_header_is_kept_and_its_cmdline_limit_enforced() {
        let hdr = setup_header {
            cmdline_size: 2047,
            code32_start: 0x100000,
            version: 0x020f,
            ..Default::default()
        };
        let base = BootInfo {
            header: Some(hdr),
            cmdline_addr: CMDLINE_ADDR,
            cmdline_len: 2048,
            initrd: None,
            e820: &[],
            rsdp_addr: 0,
        };
        let p = build_boot_params(&base).unwrap();
        assert_eq!({ p.hdr.code32_start }, 0x100000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        let too_long = BootInfo {
            cmdline_len: 2049,
            ..base
        };
        assert_eq!(
            build_boot_params(&too_long).unwrap_err(),
            ParamsError::CmdlineTooLong {
                len: 2049,
                max: 2048
            }
        );
    }
}
