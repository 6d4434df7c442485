//! The VM's interrupt routing table (KVM_SET_GSI_ROUTING): KVM's default routes for the legacy
//! pins, plus one MSI route per MSI-X vector, kept in step with the guest's MSI-X tables. Where
//! the architecture's MSI controller tells devices apart by requester ID (an Arm GICv3 ITS), each
//! MSI route carries the ID of the function whose vector it is.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MSI_VALID_DEVID,
};
use kvm_ioctls::VmFd;
use tandem_pci::msix::{MsiMessage, MsiRouter};

pub use crate::arch::irq::{default_routes, FIRST_MSI_GSI, MSI_NEEDS_DEVID};

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

/// What an MSI route delivers: the vector's message, from the function `requester` (its PCI
/// requester ID, `bus << 8 | device << 3 | function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiRoute {
    /// The message the guest programmed.
    pub msg: MsiMessage,
    /// The requester ID of the function sending it.
    pub requester: u32,
}

fn msi_entry(gsi: u32, route: MsiRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = route.msg.address as u32;
    e.u.msi.address_hi = (route.msg.address >> 32) as u32;
    e.u.msi.data = route.msg.data;
    if MSI_NEEDS_DEVID {
        // The ITS looks the device up by this ID (the device tree's msi-map is the identity).
        e.flags = KVM_MSI_VALID_DEVID;
        e.u.msi.__bindgen_anon_1.devid = route.requester;
    }
    e
}

/// The routing table; MSI routes are added as the guest programs vectors.
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiRoute>>,
    requesters: Mutex<BTreeMap<u32, u32>>,
    next: AtomicU32,
}

impl GsiRoutes {
    /// The table of `vm`, with no MSI routes yet.
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRoutes {
            vm,
            msi: Mutex::default(),
            requesters: Mutex::default(),
            next: AtomicU32::new(FIRST_MSI_GSI),
        }
    }

    /// A GSI for a new MSI-X vector.
    pub fn alloc(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Says that `gsi`'s vector belongs to the function with requester ID `requester` (before
    /// the guest programs it; 0, the host bridge's, until then).
    pub fn set_requester(&self, gsi: u32, requester: u32) {
        self.requesters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(gsi, requester);
    }

    /// The full table: the defaults and every MSI route.
    pub fn entries(msi: &BTreeMap<u32, MsiRoute>) -> Vec<kvm_irq_routing_entry> {
        let mut v = default_routes();
        v.extend(msi.iter().map(|(&gsi, &r)| msi_entry(gsi, r)));
        v
    }
}

/// The requester ID of function 0 of `slot` on bus 0.
pub fn requester_id(slot: usize) -> u32 {
    (slot as u32 & 0x1f) << 3
}

impl MsiRouter for GsiRoutes {
    fn route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String> {
        let requester = self
            .requesters
            .lock()
            .map_err(|e| e.to_string())?
            .get(&gsi)
            .copied()
            .unwrap_or(0);
        let route = MsiRoute { msg, requester };
        let mut table = self.msi.lock().map_err(|e| e.to_string())?;
        if table.get(&gsi) == Some(&route) {
            return Ok(());
        }
        table.insert(gsi, route);
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
            MsiRoute {
                msg: MsiMessage {
                    address: 0x1_fee0_1000,
                    data: 0x4041,
                },
                requester: 0x18,
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
        // x86's MSIs name no device: the route stays as x86 KVM takes it.
        assert_eq!(m.flags, 0);
    }
}

// On Arm the ITS needs the requester ID of each vector's function.
#[cfg(all(test, target_arch = "aarch64"))]
mod tests {
    use super::*;

    #[test]
    fn msi_routes_carry_the_requester_id_the_its_looks_devices_up_by() {
        let mut msi = BTreeMap::new();
        let route = MsiRoute {
            msg: MsiMessage {
                address: 0x0809_0040,
                data: 3,
            },
            requester: requester_id(2),
        };
        msi.insert(FIRST_MSI_GSI, route);
        let t = GsiRoutes::entries(&msi);
        assert_eq!(t.len(), FIRST_MSI_GSI as usize + 1);
        let m = t.last().unwrap();
        assert_eq!((m.gsi, m.type_), (FIRST_MSI_GSI, KVM_IRQ_ROUTING_MSI));
        assert_eq!(m.flags, KVM_MSI_VALID_DEVID);
        // SAFETY: MSI entries carry the msi member of the union, whose devid is set with the flag.
        let (lo, hi, data, devid) = unsafe {
            (
                m.u.msi.address_lo,
                m.u.msi.address_hi,
                m.u.msi.data,
                m.u.msi.__bindgen_anon_1.devid,
            )
        };
        assert_eq!((lo, hi, data, devid), (0x0809_0040, 0, 3, 0x10));
        // The routes before it are the SPIs, with no flags.
        assert!(t[..t.len() - 1].iter().all(|e| e.flags == 0));
    }
}
