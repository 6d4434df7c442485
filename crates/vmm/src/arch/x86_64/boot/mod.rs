//! Loading a Linux kernel (bzImage or ELF vmlinux), its initramfs and command line into guest
//! memory, and describing them in the zero page.

pub mod cmdline;
pub mod params;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{low_ram_end, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START};

const BZIMAGE_HDR_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Where an ELF header names its machine, and aarch64's number there.
const ELF_MACHINE_OFFSET: u64 = 18;
const EM_AARCH64: u16 = 183;
/// An arm64 `Image`'s magic ("ARM\x64") and where its header has it.
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";
const ARM64_MAGIC_OFFSET: u64 = 56;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point sits this far into a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

/// Errors loading the boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF.
    #[error("{0} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)")]
    NotAKernel(PathBuf),
    /// An arm64 kernel given to the x86_64 build.
    #[error("{0} is an arm64 kernel ({1}); this tandem runs on x86_64 and boots a bzImage or an ELF vmlinux")]
    Arm64Kernel(PathBuf, &'static str),
    /// A bzImage too old to have a 64-bit entry point.
    #[error(
        "{0} is a bzImage without a 64-bit entry point (boot protocol too old or 32-bit kernel)"
    )]
    No64BitEntry(PathBuf),
    /// The loader rejected the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The path given.
        path: PathBuf,
        /// The loader's reason.
        source: linux_loader::loader::Error,
    },
    /// The initramfs could not be opened or read.
    #[error("cannot read initramfs {path}: {source}")]
    InitrdRead {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Kernel and initramfs do not fit in guest memory.
    #[error("guest memory is too small: the kernel needs memory up to {kernel_end:#x} and the initramfs {initrd_size} bytes below {limit:#x}")]
    InitrdDoesNotFit {
        /// End of the kernel's memory.
        kernel_end: u64,
        /// Size of the initramfs.
        initrd_size: u64,
        /// Highest address the initramfs may reach.
        limit: u64,
    },
    /// The command line is too long or contains a NUL.
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(String),
    /// The boot structures (zero page, PVH start info) cannot describe this boot.
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    /// PVH was asked for but the kernel has no PVH entry point.
    #[error("{0} has no PVH entry point (only ELF kernels built with CONFIG_PVH have one); use --boot linux")]
    NoPvhEntry(PathBuf),
    /// Writing to guest memory failed.
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The image format of a kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage (Linux boot protocol).
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

pub use crate::vm::BootProtocol;

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit entry at this address (Linux boot protocol).
    Linux64(u64),
    /// 32-bit PVH entry at this address.
    Pvh(u64),
}

impl LoadedKernel {
    /// Resolves `protocol` for this kernel.
    pub fn entry(&self, protocol: BootProtocol, path: &Path) -> Result<Entry, BootError> {
        match (protocol, self.pvh_entry) {
            (BootProtocol::Auto | BootProtocol::Pvh, Some(pvh)) => Ok(Entry::Pvh(pvh)),
            (BootProtocol::Pvh, None) => Err(BootError::NoPvhEntry(path.to_owned())),
            (BootProtocol::Auto | BootProtocol::Linux, _) => Ok(Entry::Linux64(self.entry)),
        }
    }
}

/// A kernel in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Its format.
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// The bzImage's setup header (ELF kernels have none).
    pub header: Option<setup_header>,
    /// End of the memory the kernel occupies, including room to decompress itself.
    pub end: u64,
    /// The PVH (32-bit) entry point, for ELF kernels that announce one.
    pub pvh_entry: Option<u64>,
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Tells a bzImage from an ELF by their magic numbers.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    if read_at(file, 0, &mut magic).map_err(err)? && &magic == ELF_MAGIC {
        let mut machine = [0u8; 2];
        if read_at(file, ELF_MACHINE_OFFSET, &mut machine).map_err(err)?
            && u16::from_le_bytes(machine) == EM_AARCH64
        {
            return Err(BootError::Arm64Kernel(path.to_owned(), "an ELF vmlinux"));
        }
        return Ok(KernelFormat::Elf);
    }
    if read_at(file, BZIMAGE_HDR_OFFSET, &mut magic).map_err(err)? && &magic == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    if read_at(file, ARM64_MAGIC_OFFSET, &mut magic).map_err(err)? && &magic == ARM64_MAGIC {
        return Err(BootError::Arm64Kernel(path.to_owned(), "an Image"));
    }
    Err(BootError::NotAKernel(path.to_owned()))
}

/// Opens and checks a kernel image without loading it (for early, clear errors).
pub fn probe_kernel(path: &Path) -> Result<KernelFormat, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(BootError::NotAKernel(path.to_owned()));
    }
    detect_format(&mut file, path)
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    })?;
    let format = detect_format(&mut file, path)?;
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| BootError::NotAKernel(path.to_owned()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(path.to_owned()));
            }
            let load = r.kernel_load.0;
            // The decompressor needs `init_size` bytes from where the kernel runs.
            let run_at = load.max(hdr.pref_address);
            let end = r
                .kernel_end
                .max(run_at.saturating_add(u64::from(hdr.init_size)));
            Ok(LoadedKernel {
                format,
                entry: load + BZIMAGE_64BIT_ENTRY,
                header: Some(hdr),
                end,
                pvh_entry: None,
            })
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let pvh_entry = match r.pvh_boot_cap {
                linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                header: None,
                end: r.kernel_end,
                pvh_entry,
            })
        }
    }
}

/// Where an initramfs of `size` bytes goes: as high as possible below both the end of low RAM
/// and the kernel's `initrd_addr_max`, page aligned, and above the kernel.
pub fn initrd_placement(
    mem_size: u64,
    kernel_end: u64,
    addr_max: u64,
    size: u64,
) -> Result<u64, BootError> {
    let limit = low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let no_fit = BootError::InitrdDoesNotFit {
        kernel_end,
        initrd_size: size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(no_fit)? & !0xfff;
    if addr < kernel_end {
        return Err(BootError::InitrdDoesNotFit {
            kernel_end,
            initrd_size: size,
            limit,
        });
    }
    Ok(addr)
}

/// Loads the initramfs; returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let addr_max = kernel
        .header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(0x37ff_ffff);
    let addr = initrd_placement(mem_size, kernel.end, addr_max, size)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Real-mode code at the reset vector: pulse the i8042's reset line, then halt.
///
/// Linux on hardware-reduced ACPI without EFI picks "EFI reboot", which falls back to a jump to
/// the BIOS reset vector. With no firmware there, the guest would run zeros forever; this stub
/// turns that jump into a reset tandem sees, as a BIOS would.
pub const RESET_STUB: [u8; 7] = [
    0xb0, 0xfe, // mov al, 0xfe      (i8042 command: pulse reset)
    0xe6, 0x64, // out 0x64, al
    0xf4, //       hlt
    0xeb, 0xfd, // jmp short to hlt
];

/// Writes [`RESET_STUB`] at the reset vector.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_slice(&RESET_STUB, GuestAddress(crate::layout::RESET_VECTOR))?;
    Ok(())
}

/// Writes the NUL-terminated command line; returns its length including the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("it contains a NUL byte".into()));
    }
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{len} bytes, at most {CMDLINE_MAX}"
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!(
            "tandem-boot-test-{}-{}",
            std::process::id(),
            bytes.len()
        ));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        let f = File::open(&path).unwrap();
        (path, f)
    }

    #[test]
    fn boot_protocol_resolution() {
        let k = |pvh_entry| LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            header: None,
            end: 0,
            pvh_entry,
        };
        let p = Path::new("k");
        assert_eq!(
            k(Some(0x100_0850)).entry(BootProtocol::Auto, p).unwrap(),
            Entry::Pvh(0x100_0850)
        );
        assert_eq!(
            k(Some(0x100_0850)).entry(BootProtocol::Linux, p).unwrap(),
            Entry::Linux64(0x100_0000)
        );
        assert_eq!(
            k(None).entry(BootProtocol::Auto, p).unwrap(),
            Entry::Linux64(0x100_0000)
        );
        assert!(matches!(
            k(None).entry(BootProtocol::Pvh, p),
            Err(BootError::NoPvhEntry(_))
        ));
    }

    #[test]
    fn formats_are_told_apart_by_magic() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let (p, mut f) = temp_file(&bz);
        assert_eq!(detect_format(&mut f, &p).unwrap(), KernelFormat::BzImage);
        let (p, mut f) = temp_file(b"\x7fELF\x02\x01\x01");
        assert_eq!(detect_format(&mut f, &p).unwrap(), KernelFormat::Elf);
        let (p, mut f) = temp_file(b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(
            detect_format(&mut f, &p),
            Err(BootError::NotAKernel(_))
        ));
        let (p, mut f) = temp_file(b"");
        assert!(matches!(
            detect_format(&mut f, &p),
            Err(BootError::NotAKernel(_))
        ));
    }

    #[test]
    fn reset_stub_sits_at_the_reset_vector_inside_the_first_mib() {
        use crate::layout::{HIMEM_START, RESET_VECTOR};
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_reset_stub(&mem).unwrap();
        let mut got = [0u8; RESET_STUB.len()];
        mem.read_slice(&mut got, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(got, RESET_STUB);
        assert!(RESET_VECTOR + RESET_STUB.len() as u64 <= HIMEM_START);
        // `out 0x64, al` with al = 0xfe: the command the i8042 model treats as a reset.
        assert_eq!(&got[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
        // The jump goes back to the hlt: offset 7 - 3 = 4.
        assert_eq!(7 + (got[6] as i8) as i64, 4);
    }

    #[test]
    fn initrd_goes_high_but_never_over_the_kernel_or_limits() {
        let mem = 256 << 20;
        let a = initrd_placement(mem, 0x400_0000, u64::from(u32::MAX), 0x10_0001).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 0x10_0001 <= mem);
        assert!(a >= mem - 0x20_0000);
        // initrd_addr_max lower than memory.
        let a = initrd_placement(1 << 30, 0x400_0000, 0x0fff_ffff, 4096).unwrap();
        assert_eq!(a, 0x1000_0000 - 4096);
        // Too big.
        assert!(matches!(
            initrd_placement(64 << 20, 60 << 20, u64::from(u32::MAX), 8 << 20),
            Err(BootError::InitrdDoesNotFit { .. })
        ));
        assert!(initrd_placement(1 << 20, 0, u64::from(u32::MAX), 2 << 20).is_err());
    }
}
