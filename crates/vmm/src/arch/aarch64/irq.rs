//! Interrupt numbering on aarch64: GSI n is the GIC's shared peripheral interrupt (SPI) n, that
//! is interrupt ID 32 + n, as KVM's irqfd and routing use it for an in-kernel GIC.

use kvm_bindings::kvm_irq_routing_entry;

use super::layout::SPI_COUNT;
use crate::irq::irqchip;

/// First GSI above the SPIs tandem routes, where MSI routes start.
pub const FIRST_MSI_GSI: u32 = SPI_COUNT;
/// MSI routes name their device: KVM's ITS translates (device ID, event ID), and with an ITS
/// KVM refuses to deliver an MSI without a device ID.
pub const MSI_NEEDS_DEVID: bool = true;

/// The default routes: GSI n to SPI n of the GIC (irqchip 0).
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    (0..SPI_COUNT).map(|gsi| irqchip(gsi, 0, gsi)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_interrupt_has_a_route_below_the_msis() {
        let routes = default_routes();
        let gsis: Vec<u32> = routes.iter().map(|r| r.gsi).collect();
        assert_eq!(gsis, (0..FIRST_MSI_GSI).collect::<Vec<_>>());
        let last_device = super::super::layout::pci_intx_gsi(3);
        assert!(last_device < FIRST_MSI_GSI);
    }
}
