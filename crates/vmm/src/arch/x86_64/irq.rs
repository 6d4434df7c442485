//! KVM's default interrupt routes on x86_64: the PICs and the IOAPIC.

use kvm_bindings::{
    kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};

use crate::irq::irqchip;

/// First GSI above the IOAPIC's pins, where MSI routes start.
pub const FIRST_MSI_GSI: u32 = 24;
/// MSI routes carry only the message: the LAPICs need no device ID.
pub const MSI_NEEDS_DEVID: bool = false;

/// KVM's default routes (what the in-kernel irqchip starts with): GSI n to IOAPIC pin n, and
/// GSIs 0-15 to the PICs too.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..16 {
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        v.push(irqchip(gsi, chip, pin));
    }
    for gsi in 0..24 {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}
