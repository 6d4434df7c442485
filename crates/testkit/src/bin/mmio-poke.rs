//! `mmio-poke FILE OFFSET VALUE COUNT`: maps FILE (a PCI BAR from sysfs, e.g.
//! `/sys/bus/pci/devices/0000:00:01.0/resource0`) and writes the 32-bit VALUE at OFFSET, COUNT
//! times: a guest hammering a device register, as tests of the VMM's bounds need.
//! Prints `mmio-poke wrote N` at the end.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, offset, value, count] = args.as_slice() else {
        eprintln!("usage: mmio-poke FILE OFFSET VALUE COUNT");
        std::process::exit(2);
    };
    let (Some(offset), Some(value), Some(count)) = (number(offset), number(value), number(count))
    else {
        eprintln!("mmio-poke: OFFSET, VALUE and COUNT are numbers");
        std::process::exit(2);
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap_or_else(|e| {
            eprintln!("mmio-poke: {file}: {e}");
            std::process::exit(1)
        });
    let page = 4096u64;
    let base = offset & !(page - 1);
    let len = (offset - base + 4).next_multiple_of(page) as usize;
    // SAFETY: a fresh shared mapping of the BAR file; nothing else refers to it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            base as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        eprintln!(
            "mmio-poke: mmap {file}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // SAFETY: offset - base + 4 <= len, inside the mapping; 32-bit aligned as the caller gives.
    let reg = unsafe { ptr.cast::<u8>().add((offset - base) as usize).cast::<u32>() };
    for _ in 0..count {
        // SAFETY: `reg` points into the live mapping.
        unsafe { reg.write_volatile(value as u32) };
    }
    println!("mmio-poke wrote {count}");
}
