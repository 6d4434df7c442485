//! The ivshmem fuzz target: a hostile driver against a channel's PCI function with doorbells:
//! configuration space (MSI-X and INTx control), BAR0's registers and BAR1's MSI-X table and
//! PBA, while the doorbell interrupt is moved between INTx, MSI-X and nothing.

use std::sync::{Arc, Mutex};

use tandem_pci::ivshmem::DoorbellRoute;
use tandem_pci::msix::{MsiMessage, MsiRouter, Vector};
use tandem_pci::{Ivshmem, PciRoot};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const REGS: u64 = 0xe000_0000;
const MSIX: u64 = 0xe000_1000;

struct NoRoutes;
impl MsiRouter for NoRoutes {
    fn route(&self, _gsi: u32, _msg: MsiMessage) -> Result<(), String> {
        Ok(())
    }
}

/// `data` is a sequence of 12-byte operations: configuration accesses through the root's
/// ports, and reads and writes of any size at any offset of BAR0 and BAR1. The gate must only
/// ever be asked to move the interrupt somewhere else (never to where it already is). Returns
/// how often the interrupt moved to MSI-X (so tests can tell that inputs reach it).
pub fn ivshmem(data: &[u8]) -> usize {
    let Ok(mut dev) = Ivshmem::new(1, REGS, 0xe100_0000, 1 << 20, true) else {
        return 0;
    };
    let vector = Vector::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"), 40);
    if dev.add_msix(MSIX, vector, Arc::new(NoRoutes)).is_err() {
        return 0;
    }
    let to_msix = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = to_msix.clone();
    let mut last = DoorbellRoute::Intx;
    dev.set_doorbell_gate(Box::new(move |route| {
        assert_ne!(route, last, "the gate was asked to move nowhere");
        if route == DoorbellRoute::Msix {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        last = route;
    }));
    let dev = Arc::new(Mutex::new(dev));
    let mut root = PciRoot::new();
    if root.plug(dev.clone()).is_err() {
        return 0;
    }
    for op in data.chunks_exact(12) {
        let word = |i: usize| u32::from_le_bytes([op[i], op[i + 1], op[i + 2], op[i + 3]]);
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(word(2)) % 0x1100;
        let base = if op[1] & 4 == 0 { REGS } else { MSIX };
        match op[0] % 3 {
            0 => crate::pci::config_access(&mut root, op, len),
            1 => {
                let Ok(mut d) = dev.lock() else { break };
                let mut b = [0u8; 8];
                d.mmio_read(MmioAddress(base), offset, &mut b[..len]);
            }
            _ => {
                let Ok(mut d) = dev.lock() else { break };
                let b = [op[6], op[7], op[8], op[9], op[10], op[11], 0, 0];
                d.mmio_write(MmioAddress(base), offset, &b[..len]);
            }
        }
    }
    to_msix.load(std::sync::atomic::Ordering::Relaxed)
}
