//! The virtio-pci fuzz target: a hostile driver against the transport, the PCI root and the
//! rings behind them.

use std::sync::{Arc, Mutex};

use tandem_pci::msix::{MsiMessage, MsiRouter, Vector};
use tandem_pci::{PciDevice, PciRoot};
use tandem_virtio::pci::NOTIFY;
use tandem_virtio::{Mem, VirtioPci};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size.
const MEM_SIZE: u64 = 1 << 20;
/// Where queue `q`'s descriptor table goes after a bring-up; its avail ring is 0x1000 above,
/// its used ring 0x2000 above.
fn ring_base(q: usize) -> u64 {
    0x1_0000 + q as u64 * 0x4000
}
/// The MSI-X table's offset in BAR0 (see `tandem_virtio::pci`).
const MSIX_TABLE: u64 = 0x4000;
/// Where buffers are placed when the input asks for a plausible address.
const DATA_BASE: u64 = 0x2_0000;

struct NoRoutes;
impl MsiRouter for NoRoutes {
    fn route(&self, _gsi: u32, _msg: MsiMessage) -> Result<(), String> {
        Ok(())
    }
}

/// The driver-side view of one queue: its size and the next avail index.
#[derive(Clone, Copy)]
struct DriverQueue {
    size: u16,
    avail_idx: u16,
}

/// A hostile driver against the virtio-pci transport and the PCI root: `data` is a sequence of
/// 16-byte operations on configuration space (through ports 0xcf8/0xcfc or an ECAM window,
/// MSI-X control included), BAR0 (common configuration, ISR, device configuration, doorbells, MSI-X table and
/// PBA), guest memory, and the rings (a complete bring-up as Linux does it, descriptors
/// anywhere, offered heads, avail index jumps), with queue notifications served in between.
/// The device is virtio-blk over an in-memory disk, or virtio-rng when `data[0]` is odd.
pub fn virtio_pci(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let device: Box<dyn tandem_virtio::VirtioDevice> = if first & 1 == 0 {
        crate::mem_disk(first & 2 != 0)
    } else {
        Box::new(tandem_virtio::Rng::new())
    };
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
    let nvec = VirtioPci::vectors_needed(device.as_ref());
    let vectors = (0..nvec)
        .map(|i| Vector::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"), 24 + i as u32))
        .collect();
    let Ok(dev) = VirtioPci::new(
        device,
        mem.clone(),
        0xe000_0000,
        vectors,
        Arc::new(NoRoutes),
        "fuzz",
    ) else {
        return;
    };
    let dev = Arc::new(Mutex::new(dev));
    let mut root = PciRoot::new();
    if root.plug(dev.clone()).is_err() {
        return;
    }
    let mut queues = [DriverQueue {
        size: 1,
        avail_idx: 0,
    }; 2];
    while rest.len() >= 16 {
        let (op, next) = rest.split_at(16);
        rest = next;
        let word = |i: usize| u32::from_le_bytes([op[i], op[i + 1], op[i + 2], op[i + 3]]);
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let q = usize::from(op[1] >> 7);
        let Ok(mut d) = dev.lock() else {
            return;
        };
        match op[0] % 8 {
            0 => {
                drop(d);
                config_access(&mut root, op, len);
            }
            1 => d.write_bar(u64::from(word(2)) % 0x9000, &op[8..8 + len]),
            2 => {
                let mut b = [0u8; 8];
                d.read_bar(u64::from(word(2)) % 0x9000, &mut b[..len]);
            }
            3 => {
                let at = if op[1] & 1 == 0 {
                    DATA_BASE + u64::from(op[2]) * 16
                } else {
                    u64::from(word(0) >> 8) % MEM_SIZE
                };
                let _ = mem.write_slice(&op[4..], GuestAddress(at));
            }
            4 => {
                if op[2] & 1 == 0 {
                    d.handle_notify(q);
                } else {
                    // The doorbell register, as when KVM has no ioeventfd for it.
                    d.write_bar(NOTIFY + 4 * u64::from(op[3] & 3), &[0, 0]);
                    d.handle_notify(usize::from(op[3] & 1));
                }
            }
            5 => {
                let size = 1u16 << (op[2] % 9);
                bring_up(&mut d, &mem, op, size);
                queues = [DriverQueue { size, avail_idx: 0 }; 2];
            }
            6 => {
                // A descriptor of queue q: anywhere, any length, flags and next.
                let size = queues[q].size;
                // At the 16-byte slots that op 3 can fill (so a request header is easy to
                // place), anywhere in the data area, or anywhere at all.
                let addr = match op[2] & 5 {
                    0 => DATA_BASE + u64::from(op[3]) * 16,
                    4 => DATA_BASE + u64::from(word(3)) % (MEM_SIZE - DATA_BASE),
                    _ => u64::from(word(3)) << ((op[2] >> 1) & 31),
                };
                // Small lengths (a 16-byte header, a 1-byte status) half the time.
                let len = if op[2] & 2 == 0 {
                    word(7) % (1 << 18)
                } else {
                    u32::from(op[7])
                };
                let mut desc = [0u8; 16];
                desc[..8].copy_from_slice(&addr.to_le_bytes());
                desc[8..12].copy_from_slice(&len.to_le_bytes());
                desc[12..14].copy_from_slice(&(u16::from(op[11]) & 7).to_le_bytes());
                desc[14..16].copy_from_slice(&(u16::from(op[12]) % (size * 2)).to_le_bytes());
                let at = ring_base(q) + 16 * (u64::from(op[13]) % u64::from(size));
                let _ = mem.write_slice(&desc, GuestAddress(at));
            }
            _ => {
                // Offer a head (or jump the avail index), then notify.
                let dq = &mut queues[q];
                let avail = ring_base(q) + 0x1000;
                if op[2] & 1 == 0 {
                    let head = u16::from(op[3]) % (dq.size * 2);
                    let slot = avail + 4 + 2 * u64::from(dq.avail_idx % dq.size);
                    let _ = mem.write_obj(head, GuestAddress(slot));
                    dq.avail_idx = dq.avail_idx.wrapping_add(1);
                } else {
                    dq.avail_idx = u16::from_le_bytes([op[3], op[4]]);
                }
                let _ = mem.write_obj(dq.avail_idx, GuestAddress(avail + 2));
                if op[5] & 1 == 0 {
                    d.handle_notify(q);
                }
            }
        }
    }
}

/// One configuration access, as `op` says: through the root's ports (bytes 2-5 select the
/// address: bus 0, slot 1, a register, or anything else; byte 6 the data port's byte), or, when
/// byte 6's bit 2 is set, through an ECAM window as on Arm (bytes 2-5 the offset in its 16
/// MiB); byte 7 read or write, bytes 8-11 the value; `len` bytes (at most 4 through the ports,
/// up to 8 through ECAM, as a 64-bit load or store would).
pub(crate) fn config_access(root: &mut PciRoot, op: &[u8], len: usize) {
    let word = |i: usize| u32::from_le_bytes([op[i], op[i + 1], op[i + 2], op[i + 3]]);
    let value = u64::from(word(8)) * 0x1_0000_0001;
    if op[6] & 4 != 0 {
        let offset = u64::from(word(2)) % (16 << 20);
        if op[7] & 1 == 0 {
            root.ecam_write(offset, &value.to_le_bytes()[..len]);
        } else {
            let mut b = [0u8; 8];
            root.ecam_read(offset, &mut b[..len]);
        }
        return;
    }
    root.write(0, &word(2).to_le_bytes());
    let port = 4 + u64::from(op[6] & 3);
    let n = len.min(4);
    if op[7] & 1 == 0 {
        root.write(port, &value.to_le_bytes()[..n]);
    } else {
        let mut b = [0u8; 4];
        root.read(port, &mut b[..n]);
    }
}

/// A complete, well-formed bring-up as Linux's virtio-pci driver does it: reset, features
/// (VERSION_1, and EVENT_IDX and INDIRECT_DESC as `op` says), every queue at [`ring_base`] with
/// `size` entries and its own MSI-X vector, MSI-X enabled and unmasked, DRIVER_OK. Some steps
/// are skipped as `op` says, so that the device sees partial bring-ups too.
fn bring_up(d: &mut VirtioPci, mem: &Mem, op: &[u8], size: u16) {
    let skip = op[4];
    let w8 = |d: &mut VirtioPci, off: u64, v: u8| d.write_bar(off, &[v]);
    let w16 = |d: &mut VirtioPci, off: u64, v: u16| d.write_bar(off, &v.to_le_bytes());
    let w32 = |d: &mut VirtioPci, off: u64, v: u32| d.write_bar(off, &v.to_le_bytes());
    w8(d, 0x14, 0);
    w8(d, 0x14, 1 | 2);
    if skip & 1 == 0 {
        w32(d, 0x08, 0);
        w32(d, 0x0c, u32::from(op[3] & 0x30) << 24);
        w32(d, 0x08, 1);
        w32(d, 0x0c, 1);
    }
    w8(d, 0x14, 1 | 2 | 8);
    let mut b = [0u8; 2];
    d.read_bar(0x12, &mut b);
    let nqueues = u16::from_le_bytes(b).min(2);
    for q in 0..nqueues {
        let base = ring_base(usize::from(q));
        let _ = mem.write_slice(&[0u8; 0x3000], GuestAddress(base));
        w16(d, 0x16, q);
        if skip & 2 == 0 {
            w16(d, 0x18, size);
        }
        w16(d, 0x1a, q + 1);
        for (off, addr) in [(0x20, base), (0x28, base + 0x1000), (0x30, base + 0x2000)] {
            w32(d, off, addr as u32);
            w32(d, off + 4, (addr >> 32) as u32);
        }
        if skip & 4 == 0 {
            w16(d, 0x1c, 1);
        }
    }
    w16(d, 0x10, 0);
    if skip & 8 == 0 {
        enable_msix(d);
    }
    if skip & 16 == 0 {
        w8(d, 0x14, 1 | 2 | 4 | 8);
    }
}

/// Sets MSI-X Enable in the capability and unmasks every table entry.
fn enable_msix(d: &mut VirtioPci) {
    let mut at = usize::from(d.config().read_u32(0x34) as u8);
    for _ in 0..16 {
        if at == 0 {
            return;
        }
        let header = d.config().read_u32(at);
        if header as u8 == 0x11 {
            let n = ((header >> 16) & 0x7ff) + 1;
            d.config_mut().write(at + 2, &0x8000u16.to_le_bytes());
            d.config_written(at + 2, 2);
            for i in 0..u64::from(n) {
                d.write_bar(MSIX_TABLE + 16 * i + 12, &0u32.to_le_bytes());
            }
            return;
        }
        at = usize::from((header >> 8) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bring-up gets a device running, so the fuzzer's descriptors reach the device: a
    /// buffer offered on virtio-rng's queue comes back used and filled.
    #[test]
    fn the_bring_up_runs_the_device_and_its_queue() {
        let device = Box::new(tandem_virtio::Rng::new());
        let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory");
        let vectors = (0..VirtioPci::vectors_needed(device.as_ref()))
            .map(|i| Vector::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"), 24 + i as u32))
            .collect();
        let mut d = VirtioPci::new(device, mem.clone(), 0, vectors, Arc::new(NoRoutes), "t")
            .expect("device");
        bring_up(&mut d, &mem, &[0; 16], 8);
        assert_eq!(d.status(), 1 | 2 | 4 | 8);
        // One 64-byte device-writable buffer at DATA_BASE, offered as head 0.
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&DATA_BASE.to_le_bytes());
        desc[8..12].copy_from_slice(&64u32.to_le_bytes());
        desc[12..14].copy_from_slice(&2u16.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(ring_base(0)))
            .expect("desc");
        mem.write_obj(1u16, GuestAddress(ring_base(0) + 0x1002))
            .expect("avail idx");
        d.handle_notify(0);
        let used_idx: u16 = mem
            .read_obj(GuestAddress(ring_base(0) + 0x2002))
            .expect("used idx");
        let used_len: u32 = mem
            .read_obj(GuestAddress(ring_base(0) + 0x2008))
            .expect("used len");
        assert_eq!((used_idx, used_len), (1, 64));
    }

    /// Both ways into configuration space reach the device: a command-register write through
    /// the ports and one through ECAM each land in slot 1's configuration space.
    #[test]
    fn config_accesses_reach_the_device_through_ports_and_ecam() {
        let device = Box::new(tandem_virtio::Rng::new());
        let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory");
        let vectors = (0..VirtioPci::vectors_needed(device.as_ref()))
            .map(|i| Vector::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"), 24 + i as u32))
            .collect();
        let d = VirtioPci::new(device, mem, 0, vectors, Arc::new(NoRoutes), "t").expect("device");
        let mut root = PciRoot::new();
        root.plug(Arc::new(Mutex::new(d))).expect("slot");
        let command = |root: &mut PciRoot| {
            let mut b = [0u8; 2];
            root.ecam_read(1 << 15 | 4, &mut b);
            u16::from_le_bytes(b)
        };
        let mut op = [0u8; 16];
        // Ports: address 0x8000_0804 (bus 0, slot 1, register 4), data port byte 0, memory
        // space enabled.
        op[2..6].copy_from_slice(&0x8000_0804u32.to_le_bytes());
        op[8] = 2;
        config_access(&mut root, &op, 2);
        assert_eq!(command(&mut root) & 7, 2);
        // ECAM: offset 1 << 15 | 4, bus master enabled as well.
        op[2..6].copy_from_slice(&(1u32 << 15 | 4).to_le_bytes());
        op[6] = 4;
        op[8] = 6;
        config_access(&mut root, &op, 2);
        assert_eq!(command(&mut root) & 7, 6);
    }
}
