use std::sync::{Arc, Mutex};

use tandem_pci::msix::{MsiMessage, MsiRouter, Vector};
use tandem_pci::PciDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::Rng;

#[derive(Default)]
struct Routes(Mutex<Vec<(u32, MsiMessage)>>);
impl MsiRouter for Routes {
    fn route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String> {
        self.0.lock().unwrap().push((gsi, msg));
        Ok(())
    }
}

const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const BUF: u64 = 0x2_0000;

struct Rig {
    t: VirtioPci,
    mem: Mem,
    irq: Vec<EventFd>,
    routes: Arc<Routes>,
}

fn rig() -> Rig {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let dev: Box<dyn VirtioDevice> = Box::new(Rng::new());
    let n = VirtioPci::vectors_needed(dev.as_ref());
    let mut irq = Vec::new();
    let vectors = (0..n)
        .map(|i| {
            let fd = EventFd::new(EFD_NONBLOCK).unwrap();
            irq.push(fd.try_clone().unwrap());
            Vector::new(fd, 30 + i as u32)
        })
        .collect();
    let routes = Arc::new(Routes::default());
    let t = VirtioPci::new(dev, mem.clone(), 0xe000_0000, vectors, routes.clone(), "t").unwrap();
    Rig {
        t,
        mem,
        irq,
        routes,
    }
}

fn w(t: &mut VirtioPci, off: u64, v: u32, len: usize) {
    t.write_bar(off, &v.to_le_bytes()[..len]);
}

fn r(t: &mut VirtioPci, off: u64, len: usize) -> u32 {
    let mut b = [0u8; 4];
    t.read_bar(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

/// The capabilities: (id, cfg_type for vendor ones, offset in config space).
fn caps(t: &VirtioPci) -> Vec<(u8, u8, usize)> {
    let c = t.config();
    let mut out = Vec::new();
    let mut at = (c.read_u32(0x34) & 0xff) as usize;
    while at != 0 {
        let head = c.read_u32(at);
        out.push((head as u8, (head >> 24) as u8, at));
        at = ((head >> 8) & 0xff) as usize;
    }
    out
}

#[test]
fn config_space_announces_every_structure_and_msix() {
    let rig = rig();
    let c = rig.t.config();
    assert_eq!(c.read_u32(0), 0x1044_1af4, "modern virtio-rng");
    let caps = caps(&rig.t);
    let kinds: Vec<u8> = caps.iter().filter(|c| c.0 == 0x09).map(|c| c.1).collect();
    assert_eq!(kinds, vec![1, 2, 3, 4]);
    let notify = caps.iter().find(|c| c.0 == 0x09 && c.1 == 2).unwrap().2;
    assert_eq!(c.read_u32(notify + 8), NOTIFY as u32);
    assert_eq!(c.read_u32(notify + 16), NOTIFY_MULTIPLIER);
    assert!(caps.iter().any(|c| c.0 == 0x11), "MSI-X");
}

#[test]
fn a_driver_sets_up_a_queue_and_its_used_buffer_raises_the_queue_vector() {
    let mut rig = rig();
    let t = &mut rig.t;
    w(t, 0x14, 1 | 2, 1);
    w(t, 0x00, 1, 4);
    assert_eq!(r(t, 0x04, 4) & 1, 1, "VERSION_1 offered");
    w(t, 0x08, 1, 4);
    w(t, 0x0c, 1, 4);
    w(t, 0x14, 1 | 2 | 8, 1);
    assert_eq!(r(t, 0x14, 1), 1 | 2 | 8, "FEATURES_OK kept");
    assert_eq!(r(t, 0x12, 2), 1, "one queue");
    w(t, 0x16, 0, 2);
    w(t, 0x18, 8, 2);
    for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
        w(t, off, addr as u32, 4);
        w(t, off + 4, 0, 4);
    }
    assert_eq!(r(t, 0x20, 4), DESC as u32);
    w(t, 0x1a, 9, 2);
    assert_eq!(r(t, 0x1a, 2), u32::from(NO_VECTOR), "no such vector");
    w(t, 0x1a, 0, 2);
    assert_eq!(r(t, 0x1a, 2), 0);
    w(t, 0x10, 1, 2);
    w(t, 0x1c, 1, 2);
    // MSI-X on, vector 0 programmed and unmasked.
    let cap = caps(t).iter().find(|c| c.0 == 0x11).unwrap().2;
    t.config_mut().write(cap + 2, &0x8000u16.to_le_bytes());
    t.config_written(cap + 2, 2);
    w(t, MSIX_TABLE, 0xfee0_0000, 4);
    w(t, MSIX_TABLE + 8, 0x31, 4);
    w(t, MSIX_TABLE + 12, 0, 4);
    assert_eq!(
        rig.routes.0.lock().unwrap().last(),
        Some(&(
            30,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            }
        ))
    );
    let t = &mut rig.t;
    w(t, 0x14, 1 | 2 | 4 | 8, 1);
    // One 16-byte device-writable buffer.
    let m = &rig.mem;
    m.write_obj(BUF, GuestAddress(DESC)).unwrap();
    m.write_obj(16u32, GuestAddress(DESC + 8)).unwrap();
    m.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
    m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    w(t, NOTIFY, 0, 2);
    t.handle_notify(0);
    assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
    assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 16);
    assert_eq!(rig.irq[0].read().unwrap(), 1, "the queue's vector fired");
    assert!(rig.irq[1].read().is_err(), "not the config vector");
    let t = &mut rig.t;
    assert_eq!(r(t, ISR, 1), 1, "ISR says queue");
    assert_eq!(r(t, ISR, 1), 0, "and reading cleared it");
    w(t, 0x14, 0, 1);
    assert_eq!(r(t, 0x14, 1), 0, "reset");
    assert_eq!(r(t, 0x1a, 2), u32::from(NO_VECTOR));
}

#[test]
fn odd_accesses_are_harmless() {
    let mut rig = rig();
    let t = &mut rig.t;
    t.write_bar(0x14, &[1, 2, 3]);
    t.write_bar(BAR_SIZE + 4, &[1, 2, 3, 4]);
    t.write_bar(NOTIFY + 400, &[7, 0]);
    let mut d = [0u8; 8];
    t.read_bar(0x14, &mut d);
    t.read_bar(BAR_SIZE, &mut d);
    assert_eq!(d, [0; 8]);
    // An empty access reads nothing and does not consume the ISR.
    t.read_bar(ISR, &mut []);
    assert_eq!(t.status(), 0);
}
