//! What the testkit programs share: a PCI BAR mapped from sysfs.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{fence, Ordering};

/// A PCI BAR (`/sys/bus/pci/devices/*/resourceN`) mapped whole, shared, for the life of the
/// process.
pub struct BarMap {
    ptr: *mut u8,
    len: usize,
}

impl BarMap {
    /// Maps the resource file at `path`; panics with the reason when it cannot.
    pub fn new(path: &str) -> BarMap {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let len = f.metadata().map(|m| m.len() as usize).expect("size");
        // SAFETY: maps the whole resource file, shared, for the life of the process.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap {path}: {}",
            std::io::Error::last_os_error()
        );
        BarMap {
            ptr: ptr.cast(),
            len,
        }
    }

    /// The mapping's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the BAR is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn word_ptr(&self, i: usize) -> *mut u32 {
        assert!(i * 4 + 4 <= self.len, "word {i} is outside the BAR");
        // SAFETY: checked above to be inside the mapping.
        unsafe { self.ptr.cast::<u32>().add(i) }
    }

    /// Reads 32-bit word `i`.
    pub fn word(&self, i: usize) -> u32 {
        fence(Ordering::SeqCst);
        // SAFETY: `word_ptr` is inside the live mapping and 4-byte aligned.
        unsafe { std::ptr::read_volatile(self.word_ptr(i)) }
    }

    /// Writes 32-bit word `i`.
    pub fn set(&self, i: usize, v: u32) {
        // SAFETY: as in `word`.
        unsafe { std::ptr::write_volatile(self.word_ptr(i), v) };
        fence(Ordering::SeqCst);
    }
}
