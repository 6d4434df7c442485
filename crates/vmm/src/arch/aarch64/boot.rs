//! The arm64 boot protocol (Linux's Documentation/arch/arm64/booting.rst): the kernel `Image`
//! loaded 2 MiB-aligned at the start of RAM plus its `text_offset` (linux-loader's `pe`
//! loader), the device tree at the end of RAM, the initramfs just below it; the boot vCPU
//! enters the kernel with X0 = the device tree's address.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::pe::PE;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::fdt::FDT_MAX_SIZE;
use super::layout::RAM_START;

/// The arm64 `Image` header's magic, "ARM\x64", at byte 56.
const ARM64_MAGIC: u32 = 0x644d_5241;
const ARM64_MAGIC_OFFSET: usize = 56;
/// An x86 bzImage's "HdrS" at byte 0x202.
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// ELF e_machine values.
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
/// arm64's COMMAND_LINE_SIZE, with the terminating NUL.
pub const CMDLINE_MAX: usize = 2048;

/// Errors from loading the boot images.
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
    /// An x86 kernel given to the aarch64 build.
    #[error("{0} is an x86 kernel ({1}); this tandem runs on aarch64 and boots an arm64 Image")]
    X86Kernel(PathBuf, &'static str),
    /// An arm64 kernel in a form the boot protocol does not take.
    #[error("{0} is an arm64 kernel as {1}; tandem boots the uncompressed Image (arch/arm64/boot/Image)")]
    WrongArm64Form(PathBuf, &'static str),
    /// Not a kernel at all.
    #[error("{0} is not a Linux kernel (no arm64 Image header)")]
    NotAKernel(PathBuf),
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
    /// Kernel, initramfs and device tree do not fit in guest memory.
    #[error("guest memory is too small: the kernel needs memory up to {kernel_end:#x}, then the initramfs {initrd_size} bytes and the device tree below {limit:#x}")]
    DoesNotFit {
        /// End of the kernel's memory (its image size, BSS included).
        kernel_end: u64,
        /// Size of the initramfs.
        initrd_size: u64,
        /// End of guest RAM.
        limit: u64,
    },
    /// The command line is too long or contains a NUL.
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(String),
    /// The device tree could not be built.
    #[error(transparent)]
    Fdt(#[from] super::fdt::FdtError),
    /// Writing to guest memory failed.
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

impl BootError {
    /// Whether the error comes from the images or options the user gave.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, BootError::Memory(_) | BootError::Fdt(_))
    }
}

/// What the arm64 `Image` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Where the image goes above a 2 MiB-aligned base.
    pub text_offset: u64,
    /// The memory the kernel occupies from there, BSS included (0: an old kernel that does not
    /// say; then the file's size and a margin are assumed).
    pub image_size: u64,
}

/// Tells an arm64 `Image` from the other files a user might give: x86 kernels (bzImage, ELF),
/// an arm64 ELF vmlinux, compressed images. `head` is the file's first bytes (at least 64 for
/// an Image; shorter files are refused).
pub fn classify(head: &[u8], path: &Path) -> Result<ImageHeader, BootError> {
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if head.starts_with(b"\x7fELF") {
        return Err(match u16_at(18) {
            Some(EM_AARCH64) => BootError::WrongArm64Form(path.into(), "an ELF vmlinux"),
            Some(EM_X86_64) => BootError::X86Kernel(path.into(), "an ELF vmlinux"),
            _ => BootError::NotAKernel(path.into()),
        });
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        return Err(BootError::X86Kernel(path.into(), "a bzImage"));
    }
    if u32_at(ARM64_MAGIC_OFFSET) == Some(ARM64_MAGIC) {
        return Ok(ImageHeader {
            text_offset: u64_at(8).unwrap_or(0),
            image_size: u64_at(16).unwrap_or(0),
        });
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Err(BootError::WrongArm64Form(
            path.into(),
            "a gzip file, or not a kernel",
        ));
    }
    // EFI zboot: a PE stub ("MZ") around a compressed Image, "zimg" at byte 4.
    if head.starts_with(b"MZ") && head.get(4..8) == Some(b"zimg") {
        return Err(BootError::WrongArm64Form(
            path.into(),
            "a compressed EFI zboot image",
        ));
    }
    Err(BootError::NotAKernel(path.into()))
}

fn open_kernel(path: &Path) -> Result<(File, ImageHeader), BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(BootError::NotAKernel(path.to_owned()));
    }
    let mut head = Vec::with_capacity(0x210);
    (&mut file)
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let header = classify(&head, path)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    Ok((file, header))
}

/// Opens and checks a kernel image without loading it (for early, clear errors).
pub fn probe_kernel(path: &Path) -> Result<ImageHeader, BootError> {
    open_kernel(path).map(|(_, h)| h)
}

/// Checks the command line the device tree will carry.
pub fn check_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::Cmdline("it contains a NUL byte".into()));
    }
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes, but an arm64 kernel takes at most {}",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    Ok(())
}

/// Where the boot images go in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The device tree's address (2 MiB reserved at the end of RAM; 8-byte aligned).
    pub fdt: u64,
    /// The initramfs's range (start, end exclusive), page-aligned start.
    pub initrd: Option<(u64, u64)>,
}

/// Places the device tree in the last 2 MiB of RAM and the initramfs (`initrd_size` bytes,
/// if any) right below it, above the kernel's memory (ending at `kernel_end`).
pub fn place(
    memory: u64,
    kernel_end: u64,
    initrd_size: Option<u64>,
) -> Result<Placement, BootError> {
    let ram_end = RAM_START + memory;
    let too_small = || BootError::DoesNotFit {
        kernel_end,
        initrd_size: initrd_size.unwrap_or(0),
        limit: ram_end,
    };
    let fdt = ram_end
        .checked_sub(FDT_MAX_SIZE)
        .filter(|f| *f >= kernel_end)
        .ok_or_else(too_small)?;
    let initrd = match initrd_size {
        None => None,
        Some(size) => {
            let start = fdt.checked_sub(size).ok_or_else(too_small)? & !0xfff;
            if start < kernel_end {
                return Err(too_small());
            }
            Some((start, start + size))
        }
    };
    Ok(Placement { fdt, initrd })
}

/// The kernel as loaded: its entry point and the end of the memory it claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts (the image's first byte).
    pub entry: u64,
    /// End of the kernel's memory, BSS included.
    pub end: u64,
}

/// Loads the `Image` at `path` at the start of RAM (plus its `text_offset`).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let (mut file, header) = open_kernel(path)?;
    let r = PE::load(mem, Some(GuestAddress(RAM_START)), &mut file, None).map_err(|source| {
        BootError::Load {
            path: path.to_owned(),
            source,
        }
    })?;
    let entry = r.kernel_load.0;
    // An Image that does not give its size: the file and a generous margin for BSS.
    let size = if header.image_size == 0 {
        (r.kernel_end - entry) * 2
    } else {
        header.image_size
    };
    Ok(LoadedKernel {
        entry,
        end: (entry + size).max(r.kernel_end),
    })
}

/// Reads the initramfs at `path` into guest memory at `addr` (`size` bytes, from
/// [`initrd_size`]).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    addr: u64,
    size: u64,
) -> Result<(), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::Memory)
}

/// The initramfs's size.
pub fn initrd_size(path: &Path) -> Result<u64, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(read_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    Ok(meta.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_head(text_offset: u64, image_size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[56..60].copy_from_slice(&ARM64_MAGIC.to_le_bytes());
        h
    }

    #[test]
    fn an_arm64_image_header_is_read() {
        let h = classify(&image_head(0, 0x2a0_0000), Path::new("Image")).unwrap();
        assert_eq!(
            h,
            ImageHeader {
                text_offset: 0,
                image_size: 0x2a0_0000
            }
        );
    }

    #[test]
    fn x86_kernels_and_other_forms_are_refused_naming_what_they_are() {
        let p = Path::new("/k");
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let e = classify(&bz, p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/k is an x86 kernel (a bzImage); this tandem runs on aarch64 and boots an arm64 Image"
        );
        assert!(e.is_user_error());
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(64, 0);
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        assert!(matches!(
            classify(&elf, p),
            Err(BootError::X86Kernel(_, "an ELF vmlinux"))
        ));
        elf[18..20].copy_from_slice(&EM_AARCH64.to_le_bytes());
        assert!(matches!(
            classify(&elf, p),
            Err(BootError::WrongArm64Form(_, "an ELF vmlinux"))
        ));
        assert!(matches!(
            classify(&[0x1f, 0x8b, 8, 0], p),
            Err(BootError::WrongArm64Form(..))
        ));
        assert!(matches!(
            classify(b"MZ\0\0zimg", p),
            Err(BootError::WrongArm64Form(..))
        ));
        assert!(matches!(
            classify(b"hello", p),
            Err(BootError::NotAKernel(_))
        ));
        assert!(matches!(classify(&[], p), Err(BootError::NotAKernel(_))));
    }

    #[test]
    fn fdt_at_the_end_of_ram_and_initramfs_right_below() {
        let p = place(256 << 20, RAM_START + (40 << 20), Some(5000)).unwrap();
        let end = RAM_START + (256 << 20);
        assert_eq!(p.fdt, end - 0x20_0000);
        let (start, stop) = p.initrd.unwrap();
        assert_eq!(start % 0x1000, 0);
        assert_eq!(stop, start + 5000);
        assert!(stop <= p.fdt && p.fdt - stop < 0x1000);
        assert_eq!(place(256 << 20, RAM_START, None).unwrap().initrd, None);
    }

    #[test]
    fn too_little_memory_for_kernel_initramfs_and_fdt_is_refused() {
        let kernel_end = RAM_START + (40 << 20);
        assert!(matches!(
            place(32 << 20, kernel_end, None),
            Err(BootError::DoesNotFit { .. })
        ));
        assert!(matches!(
            place(64 << 20, kernel_end, Some(30 << 20)),
            Err(BootError::DoesNotFit { .. })
        ));
        assert!(matches!(
            place(64 << 20, kernel_end, Some(u64::MAX)),
            Err(BootError::DoesNotFit { .. })
        ));
        assert!(place(64 << 20, kernel_end, Some(20 << 20)).is_ok());
    }

    #[test]
    fn command_lines_too_long_or_with_nul_are_refused() {
        assert!(check_cmdline("console=ttyS0").is_ok());
        assert!(check_cmdline(&"x".repeat(2047)).is_ok());
        assert!(check_cmdline(&"x".repeat(2048)).is_err());
        assert!(check_cmdline("a\0b").is_err());
    }
}
