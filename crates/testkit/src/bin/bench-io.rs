//! `bench-io DEVICE MIB SECONDS`: on a block device, with O_DIRECT, a sequential write and read
//! of MIB MiB in 1 MiB requests, then 4 KiB random reads and writes at queue depth 1 for SECONDS
//! each. Prints one line: `bench-io seq-write-MBps=.. seq-read-MBps=.. rand-read-iops=..
//! rand-write-iops=..`. The same binary runs under every VMM compared.

use std::ffi::CString;
use std::time::{Duration, Instant};

const BIG: usize = 1 << 20;
const SMALL: usize = 4096;

struct Buf(*mut u8);

impl Buf {
    fn new(len: usize) -> Buf {
        let mut p = std::ptr::null_mut();
        // SAFETY: posix_memalign writes an aligned allocation of len bytes to p.
        let rc = unsafe { libc::posix_memalign(&mut p, 4096, len) };
        assert_eq!(rc, 0, "posix_memalign");
        // SAFETY: p points to len writable bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xa5, len) };
        Buf(p.cast())
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated by posix_memalign above.
        unsafe { libc::free(self.0.cast()) };
    }
}

fn io(fd: i32, buf: &Buf, len: usize, off: u64, write: bool) {
    // SAFETY: buf holds at least len bytes; fd is an open descriptor.
    let n = unsafe {
        if write {
            libc::pwrite(fd, buf.0.cast(), len, off as i64)
        } else {
            libc::pread(fd, buf.0.cast(), len, off as i64)
        }
    };
    if n != len as isize {
        eprintln!(
            "bench-io: I/O at {off} failed: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: bench-io DEVICE MIB SECONDS");
        std::process::exit(2);
    }
    let dev = CString::new(args[1].as_str()).expect("device path");
    let mib: u64 = args[2].parse().expect("MIB");
    let secs: u64 = args[3].parse().expect("SECONDS");
    // SAFETY: dev is a valid C string.
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_DIRECT) };
    if fd < 0 {
        eprintln!(
            "bench-io: open {}: {}",
            args[1],
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let big = Buf::new(BIG);
    let small = Buf::new(SMALL);
    let mut results = Vec::new();
    for write in [true, false] {
        let t = Instant::now();
        for i in 0..mib {
            io(fd, &big, BIG, i * BIG as u64, write);
        }
        if write {
            // SAFETY: fd is open.
            unsafe { libc::fdatasync(fd) };
        }
        let mbps = mib as f64 * BIG as f64 / 1e6 / t.elapsed().as_secs_f64();
        results.push(format!(
            "seq-{}-MBps={mbps:.1}",
            if write { "write" } else { "read" }
        ));
    }
    let blocks = mib * (BIG / SMALL) as u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for write in [false, true] {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(secs) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            io(fd, &small, SMALL, (x % blocks) * SMALL as u64, write);
            n += 1;
        }
        if write {
            // SAFETY: fd is open.
            unsafe { libc::fdatasync(fd) };
        }
        let iops = n as f64 / t.elapsed().as_secs_f64();
        results.push(format!(
            "rand-{}-iops={iops:.0}",
            if write { "write" } else { "read" }
        ));
    }
    println!("bench-io {}", results.join(" "));
}
