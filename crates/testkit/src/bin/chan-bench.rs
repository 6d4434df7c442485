//! `chan-bench ROLE MODE ROUNDS MIB`: ping-pong and bulk transfer between two guests, run as
//! ROLE `a` in one and `b` in the other.
//!
//! MODE:
//! - `poll`: through a channel's shared memory (the ivshmem device, mapped from sysfs), each
//!   side spinning on the other's counter;
//! - `bell`: through the shared memory, each side sleeping in `uio_pci_generic` until the other
//!   rings its doorbell (the guest must have bound uio_pci_generic to the device);
//! - `tcp`: over the network: `b` listens on port 7000, `a` connects to 10.0.2.2:7000 (the host,
//!   which forwards to `b`).
//!
//! ROUNDS round trips of one 32-bit counter, then MIB MiB from `a` to `b` (through a ring buffer
//! in the shared memory for `poll` and `bell`, through the socket for `tcp`). `a` prints
//! `chan-bench mode=M rounds=N rt-per-s=X mb-per-s=Y`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use tandem_testkit::BarMap;

/// Words of the shared memory: the two counters, then the bulk ring's head and tail; data from
/// byte 4096.
const PING: usize = 0;
const PONG: usize = 1;
const HEAD: usize = 2;
const TAIL: usize = 3;
const READY: usize = 4;
const DATA: usize = 4096;
const CHUNK: usize = 64 << 10;

struct Channel {
    shm: BarMap,
    regs: BarMap,
    /// `/dev/uioN` (read to wait) and the device's PCI config file (to unmask INTx).
    uio: Option<(File, File)>,
    peer: u32,
}

/// uio_pci_generic has no irqcontrol: user space unmasks INTx by clearing the command
/// register's Interrupt Disable bit in configuration space.
fn unmask(config: &File) {
    use std::os::unix::fs::FileExt;
    let mut cmd = [0u8; 2];
    config
        .read_exact_at(&mut cmd, 4)
        .expect("read the command register");
    let v = u16::from_le_bytes(cmd) & !(1 << 10);
    config
        .write_all_at(&v.to_le_bytes(), 4)
        .expect("write the command register");
}

impl Channel {
    fn open(bell: bool, peer: u32) -> Channel {
        let dev = std::fs::read_dir("/sys/bus/pci/devices")
            .expect("sysfs")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                let id = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                id("vendor").trim() == "0x1af4" && id("device").trim() == "0x1110"
            })
            .expect("no ivshmem device");
        let uio = bell.then(|| {
            let name = std::fs::read_dir(dev.join("uio"))
                .expect("uio_pci_generic is not bound")
                .filter_map(Result::ok)
                .next()
                .expect("no uio device")
                .file_name();
            let uio = File::open(format!("/dev/{}", name.to_string_lossy())).expect("open uio");
            let config = File::options()
                .read(true)
                .write(true)
                .open(dev.join("config"))
                .expect("open config");
            (uio, config)
        });
        Channel {
            shm: BarMap::new(&format!("{}/resource2", dev.display())),
            regs: BarMap::new(&format!("{}/resource0", dev.display())),
            uio,
            peer,
        }
    }

    fn ring(&self) {
        self.regs.set(3, self.peer << 16);
    }

    /// Waits until the counter `word` reaches `value`: spinning, or sleeping on the doorbell.
    fn wait(&mut self, word: usize, value: u32) {
        loop {
            if self.shm.word(word) >= value {
                return;
            }
            if let Some((uio, config)) = self.uio.as_mut() {
                unmask(config);
                if self.shm.word(word) >= value {
                    return;
                }
                let mut n = [0u8; 4];
                uio.read_exact(&mut n).expect("wait for the doorbell");
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn shm_mode(role: &str, bell: bool, rounds: u32, mib: usize) {
    let mut ch = Channel::open(bell, if role == "a" { 1 } else { 0 });
    let ring_len = (ch.shm.len() - DATA) / CHUNK * CHUNK;
    if role == "b" {
        ch.shm.set(READY, 1);
        ch.ring();
        for i in 1..=rounds {
            ch.wait(PING, i);
            ch.shm.set(PONG, i);
            ch.ring();
        }
        let total = (mib << 20) / CHUNK;
        for t in 1..=total as u32 {
            ch.wait(HEAD, t);
            ch.shm.set(TAIL, t);
            ch.ring();
        }
        return;
    }
    ch.wait(READY, 1);
    let start = Instant::now();
    for i in 1..=rounds {
        ch.shm.set(PING, i);
        ch.ring();
        ch.wait(PONG, i);
    }
    let rt = f64::from(rounds) / start.elapsed().as_secs_f64();
    let chunk = vec![0x5au8; CHUNK];
    let total = (mib << 20) / CHUNK;
    let slots = (ring_len / CHUNK) as u32;
    let start = Instant::now();
    for h in 1..=total as u32 {
        if h > slots {
            ch.wait(TAIL, h - slots);
        }
        let off = DATA + ((h - 1) % slots) as usize * CHUNK;
        // SAFETY: off + CHUNK is within the ring inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), ch.shm.ptr().add(off), CHUNK) };
        ch.shm.set(HEAD, h);
        ch.ring();
    }
    ch.wait(TAIL, total as u32);
    let mbs = mib as f64 / start.elapsed().as_secs_f64();
    println!(
        "chan-bench mode={} rounds={rounds} rt-per-s={rt:.0} mb-per-s={mbs:.1}",
        if bell { "bell" } else { "poll" }
    );
}

fn tcp_mode(role: &str, rounds: u32, mib: usize) {
    let mut s = if role == "b" {
        let l = TcpListener::bind("0.0.0.0:7000").expect("listen");
        l.accept().expect("accept").0
    } else {
        let mut tries = 0;
        loop {
            match TcpStream::connect("10.0.2.2:7000") {
                Ok(s) => break s,
                Err(_) if tries < 600 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    };
    s.set_nodelay(true).expect("nodelay");
    let mut w = [0u8; 4];
    if role == "b" {
        for _ in 0..rounds {
            s.read_exact(&mut w).expect("ping");
            s.write_all(&w).expect("pong");
        }
        let mut buf = vec![0u8; CHUNK];
        let mut left = mib << 20;
        while left > 0 {
            let n = s.read(&mut buf).expect("bulk");
            assert!(n > 0, "eof");
            left -= n.min(left);
        }
        s.write_all(b"done").expect("ack");
        return;
    }
    // Wait for the first round to succeed before timing: the listener may start late.
    let start = Instant::now();
    for i in 0..rounds {
        s.write_all(&i.to_ne_bytes()).expect("ping");
        s.read_exact(&mut w).expect("pong");
    }
    let rt = f64::from(rounds) / start.elapsed().as_secs_f64();
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    for _ in 0..(mib << 20) / CHUNK {
        s.write_all(&buf).expect("bulk");
    }
    s.read_exact(&mut w).expect("ack");
    let mbs = mib as f64 / start.elapsed().as_secs_f64();
    println!("chan-bench mode=tcp rounds={rounds} rt-per-s={rt:.0} mb-per-s={mbs:.1}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: chan-bench a|b poll|bell|tcp ROUNDS MIB";
    let (Some(role), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let rounds: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let mib: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64);
    match mode.as_str() {
        "poll" => shm_mode(role, false, rounds, mib),
        "bell" => shm_mode(role, true, rounds, mib),
        "tcp" => tcp_mode(role, rounds, mib),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
