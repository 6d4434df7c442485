//! rt-status: in a Linux guest, reads the live figures the reference RT guest (`rtref`)
//! publishes into a channel (the ivshmem device's BAR2, through sysfs) and prints them once
//! (`rt-status once`) or serves them over HTTP (`rt-status serve PORT`): the general partition's
//! half of `cargo xtask demo`.
//!
//! The record is a seqlock (`tandem_rtref::shm`): copied between two reads of its sequence
//! number and kept when both give the same even value.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use tandem_rtref::shm::{Figures, RECORD_SIZE, SEQ_OFFSET, STATE_DONE};

/// The first ivshmem device's BAR2 in sysfs.
fn find_channel() -> Result<PathBuf, String> {
    let dir = "/sys/bus/pci/devices";
    let entries = fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))?;
    for e in entries.flatten() {
        let id = |f: &str| fs::read_to_string(e.path().join(f)).unwrap_or_default();
        if id("vendor").trim() == "0x1af4" && id("device").trim() == "0x1110" {
            return Ok(e.path().join("resource2"));
        }
    }
    Err("no ivshmem device (1af4:1110): is this VM a member of the channel?".into())
}

/// The channel's first page, mapped read-only.
struct Channel {
    base: *const u8,
}

impl Channel {
    fn open() -> Result<Channel, String> {
        let path = find_channel()?;
        let f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: a new read-only shared mapping of one page of the BAR; nothing else in this
        // process refers to it and it is never unmapped (the program lives as long as it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Channel { base: p.cast() })
    }

    fn copy(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        for (i, byte) in b.iter_mut().enumerate() {
            // SAFETY: `i` < RECORD_SIZE < 4096, inside the mapping; volatile because another VM
            // writes it.
            *byte = unsafe { self.base.add(i).read_volatile() };
        }
        b
    }

    fn seq(&self) -> u32 {
        // SAFETY: an aligned u32 inside the mapping (offset 8 of a page-aligned mapping).
        unsafe { self.base.add(SEQ_OFFSET).cast::<u32>().read_volatile() }
    }

    /// A consistent copy of the record, if the guest has published one.
    fn read(&self) -> Option<Figures> {
        for _ in 0..1000 {
            let bytes = self.copy();
            fence(Ordering::Acquire);
            let Some((seq, figures)) = Figures::decode(&bytes) else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            if self.seq() == seq {
                return Some(figures);
            }
        }
        None
    }
}

fn describe(f: Option<Figures>) -> String {
    match f {
        None => "rtref: no figures yet (the RT guest has not published)\n".into(),
        Some(f) => format!(
            "rtref: state={} ticks={} planned={} period_ns={} min_ns={} avg_ns={} max_ns={} \
             p999_ns={} last_ns={} tsc_hz={}\n",
            if f.state == STATE_DONE {
                "done"
            } else {
                "running"
            },
            f.ticks,
            f.ticks_planned,
            f.period_ns,
            f.min_ns,
            f.avg_ns,
            f.max_ns,
            f.p999_ns,
            f.last_ns,
            f.tsc_hz
        ),
    }
}

fn serve(ch: &Channel, port: u16) -> Result<(), String> {
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("port {port}: {e}"))?;
    println!("rt-status: serving on port {port}");
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = [0u8; 1024];
        let _ = c.read(&mut req);
        let body = format!(
            "Live figures of the real-time partition (tandem's reference RT guest),\n\
             read from its channel by the general partition:\n\n{}",
            describe(ch.read())
        );
        let _ = write!(
            c,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = Channel::open().and_then(|ch| match args.first().map(String::as_str) {
        Some("once") => {
            print!("{}", describe(ch.read()));
            Ok(())
        }
        Some("serve") => {
            let port = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(80);
            serve(&ch, port)
        }
        _ => Err("usage: rt-status once | serve [PORT]".into()),
    });
    if let Err(e) = result {
        eprintln!("rt-status: {e}");
        std::process::exit(1);
    }
}
