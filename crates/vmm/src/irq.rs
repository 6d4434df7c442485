//! The VM's interrupt routing table (KVM_SET_GSI_ROUTING): KVM's default routes for the legacy
//! pins, plus one MSI route per MSI-X vector, kept in step with the guest's MSI-X tables.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use tandem_pci::msix::{MsiMessage, MsiRouter};

pub use crate::arch::irq::{default_routes, FIRST_MSI_GSI};

/// A route from `gsi` to `pin` of the in-kernel interrupt controller `chip`.
pub(crate) fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The routing table; MSI routes are added as the guest programs vectors.
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next: AtomicU32,
}

impl GsiRoutes {
    /// The table of `vm`, with no MSI routes yet.
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRoutes {
            vm,
            msi: Mutex::default(),
            next: AtomicU32::new(FIRST_MSI_GSI),
        }
    }

    /// A GSI for a new MSI-X vector.
    pub fn alloc(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The full table: the defaults and every MSI route.
    pub fn entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
        let mut v = default_routes();
        v.extend(msi.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
        v
    }
}

impl MsiRouter for GsiRoutes {
    fn route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String> {
        let mut table = self.msi.lock().map_err(|e| e.to_string())?;
        if table.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        table.insert(gsi, msg);
        let routing =
            KvmIrqRouting::from_entries(&Self::entries(&table)).map_err(|e| format!("{e:?}"))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }
}

// The legacy pins are the PICs' and the IOAPIC's.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use kvm_bindings::KVM_IRQCHIP_IOAPIC;

    #[test]
    fn the_table_keeps_the_legacy_pins_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            25,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        let t = GsiRoutes::entries(&msi);
        assert_eq!(t.len(), 16 + 24 + 1);
        let ioapic: Vec<u32> = t
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries carry the irqchip member of the union.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .map(|e| e.gsi)
            .collect();
        assert_eq!(ioapic, (0..24).collect::<Vec<_>>());
        let m = t.last().unwrap();
        assert_eq!((m.gsi, m.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member of the union.
        let (lo, hi, data) = unsafe { (m.u.msi.address_lo, m.u.msi.address_hi, m.u.msi.data) };
        assert_eq!((lo, hi, data), (0xfee0_1000, 1, 0x4041));
    }
}
