//! A minimal virtio driver working on guest memory, for tests and fuzzing: it negotiates through
//! the MMIO registers and places split-ring descriptors the way a guest driver does.

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Interrupt, VirtioDevice};
use crate::mmio::MmioTransport;
use crate::Mem;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// Where the driver puts queue `q`'s rings: 16 KiB apart from 0x1_0000.
pub fn ring_base(q: usize) -> u64 {
    0x1_0000 + q as u64 * 0x4000
}
/// Where test buffers may go.
pub const DATA_BASE: u64 = 0x10_0000;

/// A device on its transport plus the driver-side view of its queues.
pub struct Driver {
    /// The transport under test.
    pub t: MmioTransport,
    /// Guest memory (2 MiB).
    pub mem: Mem,
    sizes: Vec<u16>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

impl Driver {
    /// Puts `dev` behind a transport over fresh 2 MiB guest memory.
    pub fn new(dev: Box<dyn VirtioDevice>) -> Driver {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("guest memory");
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let t = MmioTransport::new(dev, mem.clone(), irq, "test").expect("transport");
        Driver {
            t,
            mem,
            sizes: Vec::new(),
            avail_idx: Vec::new(),
            used_seen: Vec::new(),
        }
    }

    /// Reads a 32-bit register.
    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Device features (64 bits).
    pub fn device_features(&mut self) -> u64 {
        self.write(0x14, 0);
        let lo = self.read(0x10) as u64;
        self.write(0x14, 1);
        lo | (self.read(0x10) as u64) << 32
    }

    /// Resets, acknowledges and accepts `features`; returns the status read back.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write(0x70, 0);
        self.write(0x70, 1);
        self.write(0x70, 1 | 2);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(0x70, 1 | 2 | 8);
        self.read(0x70)
    }

    /// Configures queue `q` with `size` entries at [`ring_base`] and marks it ready.
    pub fn setup_queue(&mut self, q: usize, size: u16) {
        let base = ring_base(q);
        self.write(0x30, q as u32);
        self.write(0x38, size.into());
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        // A driver sets up fresh, zeroed rings.
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(base))
            .expect("rings in memory");
        for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            self.write(off, addr as u32);
            self.write(off + 4, (addr >> 32) as u32);
        }
        self.write(0x44, 1);
        if self.sizes.len() <= q {
            self.sizes.resize(q + 1, 0);
            self.avail_idx.resize(q + 1, 0);
            self.used_seen.resize(q + 1, 0);
        }
        self.sizes[q] = size;
        self.avail_idx[q] = 0;
        self.used_seen[q] = 0;
    }

    /// Sets DRIVER_OK; returns the status read back.
    pub fn driver_ok(&mut self) -> u32 {
        let s = self.read(0x70);
        self.write(0x70, s | 4);
        self.read(0x70)
    }

    /// Writes raw descriptor `i` of queue `q`.
    pub fn put_desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(ring_base(q) + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).expect("descriptor in memory");
    }

    /// Offers the chain starting at descriptor `head` on queue `q` (without notifying).
    pub fn offer(&mut self, q: usize, head: u16) {
        let size = self.sizes[q].max(1);
        let idx = self.avail_idx[q];
        let avail = ring_base(q) + 0x1000;
        let slot = avail + 4 + 2 * u64::from(idx % size);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail ring");
        self.avail_idx[q] = idx.wrapping_add(1);
        self.set_avail_idx(q, self.avail_idx[q]);
    }

    /// Writes the avail ring's index directly (e.g. to jump it).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let avail = ring_base(q) + 0x1000;
        self.mem
            .write_obj(idx, GuestAddress(avail + 2))
            .expect("avail idx");
    }

    /// Places a chain of `(addr, len, device_writes)` buffers at descriptors 0.., offers it and
    /// notifies queue `q`.
    pub fn submit(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if w { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            self.put_desc(q, i as u16, addr, len, flags, i as u16 + 1);
        }
        self.offer(q, 0);
        self.notify(q);
    }

    /// Writes QueueNotify and lets the transport serve it, as the I/O thread would.
    pub fn notify(&mut self, q: usize) {
        self.write(0x50, q as u32);
        self.t.handle_notify(q);
    }

    /// Used-ring entries (id, len) not yet seen on queue `q`.
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = ring_base(q) + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let size = self.sizes[q].max(1);
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let slot = used + 4 + 8 * u64::from(self.used_seen[q] % size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used elem");
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used len");
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }
}
