//! The aarch64 guest-physical memory map, after QEMU's `virt` machine (which Linux and its
//! device trees know well): devices low, RAM from 1 GiB up.
//!
//! ```text
//! 0x0800_0000  GIC distributor, ITS (0x0808_0000) and redistributors (0x080a_0000)
//! 0x0900_0000  UART, RTC (reserved for the platform's own devices)
//! 0x0a00_0000  virtio-mmio windows, one page each
//! 0x1000_0000  PCI BAR window, up to 0x3eff_0000
//! 0x3f00_0000  PCI configuration space (ECAM, 16 MiB: 16 buses)
//! 0x4000_0000  RAM, contiguous
//! ```
//!
//! Interrupts are numbered by GSI, which KVM maps to the GIC's shared peripheral interrupt
//! (SPI) of the same number ([`super::irq`]).

/// Start of the GIC's registers.
pub const GIC_BASE: u64 = 0x0800_0000;
/// The GICv3 distributor's registers (64 KiB).
pub const GIC_DIST_BASE: u64 = GIC_BASE;
/// Size of the distributor's registers.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// The ITS's registers (its control frame and its translation frame, 64 KiB each), as on
/// QEMU's `virt`.
pub const GIC_ITS_BASE: u64 = 0x0808_0000;
/// Size of the ITS's registers.
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// The redistributors, one [`GIC_REDIST_SIZE`] frame pair per vCPU (after QEMU's `virt`).
pub const GIC_REDIST_BASE: u64 = 0x080a_0000;
/// Size of one vCPU's redistributor (its RD and SGI frames).
pub const GIC_REDIST_SIZE: u64 = 0x2_0000;
/// Start of the platform devices' registers (UART, RTC).
pub const PLATFORM_MMIO_BASE: u64 = 0x0900_0000;
/// Most vCPUs: as many redistributors as fit below the platform devices.
pub const MAX_VCPUS: usize = ((PLATFORM_MMIO_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE) as usize;
/// The 16550-compatible UART's registers (one page; byte registers, no shift).
pub const SERIAL_BASE: u64 = PLATFORM_MMIO_BASE;
/// Size of the UART's window.
pub const SERIAL_SIZE: u64 = 0x1000;
/// The UART's SPI (as GSI), as on QEMU's `virt`.
pub const SERIAL_GSI: u32 = 1;
/// First virtio-mmio device window (one [`VIRTIO_MMIO_SIZE`] page per device).
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Start of the window where tandem places PCI BARs.
pub const PCI_MMIO_START: u64 = 0x1000_0000;
/// End (exclusive) of the PCI BAR window.
pub const PCI_MMIO_END: u64 = 0x3eff_0000;
/// The PCI configuration space (ECAM).
pub const PCI_ECAM_BASE: u64 = 0x3f00_0000;
/// Size of the ECAM region.
pub const PCI_ECAM_SIZE: u64 = 0x0100_0000;
/// PCI buses the ECAM region covers (1 MiB each); tandem's devices are all on bus 0.
pub const PCI_ECAM_BUSES: u32 = (PCI_ECAM_SIZE >> 20) as u32;
/// Where guest RAM starts.
pub const RAM_START: u64 = 0x4000_0000;
/// Smallest guest memory tandem accepts.
pub const MIN_MEMORY: u64 = 32 << 20;

/// SPI (as GSI) of the first virtio-mmio device; the next ones follow. SPIs below it are left
/// to the platform's own devices.
pub const VIRTIO_IRQ_BASE: u32 = 16;
/// Most virtio-mmio devices.
pub const VIRTIO_MAX_DEVICES: usize = 32;
/// SPIs of PCI INTx: slot s's INTA is `PCI_INTX_GSI_BASE + s % 4`.
pub const PCI_INTX_GSI_BASE: u32 = VIRTIO_IRQ_BASE + VIRTIO_MAX_DEVICES as u32;
/// SPIs tandem routes to the GIC; MSIs take the GSIs above.
pub const SPI_COUNT: u32 = 64;

const _: () = assert!(
    GIC_DIST_BASE + GIC_DIST_SIZE <= GIC_ITS_BASE
        && GIC_ITS_BASE + GIC_ITS_SIZE <= GIC_REDIST_BASE
        && GIC_REDIST_BASE + MAX_VCPUS as u64 * GIC_REDIST_SIZE <= PLATFORM_MMIO_BASE
        && SERIAL_BASE + SERIAL_SIZE <= VIRTIO_MMIO_BASE
        && SERIAL_GSI < VIRTIO_IRQ_BASE
        && GIC_BASE < PLATFORM_MMIO_BASE
        && PLATFORM_MMIO_BASE < VIRTIO_MMIO_BASE
        && VIRTIO_MMIO_BASE + VIRTIO_MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE <= PCI_MMIO_START
        && PCI_MMIO_END <= PCI_ECAM_BASE
        && PCI_ECAM_BASE + PCI_ECAM_SIZE <= RAM_START
        && PCI_INTX_GSI_BASE + 4 <= SPI_COUNT
);

/// The SPI (as GSI) of PCI slot `slot`'s INTA.
pub fn pci_intx_gsi(slot: usize) -> u32 {
    PCI_INTX_GSI_BASE + (slot % 4) as u32
}

/// Where virtio device `index` sits: its MMIO window and its SPI (as GSI).
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    (index < VIRTIO_MAX_DEVICES).then(|| {
        (
            VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
            VIRTIO_IRQ_BASE + index as u32,
        )
    })
}

/// The redistributors' region for `vcpus` vCPUs: (base, length).
pub fn gic_redist_region(vcpus: usize) -> (u64, u64) {
    (GIC_REDIST_BASE, vcpus as u64 * GIC_REDIST_SIZE)
}

/// Guest RAM regions (start, length) for `mem_size` bytes of guest memory: one, from
/// [`RAM_START`].
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, mem_size)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_stay_below_ram_and_slots_end_where_they_should() {
        let (last, gsi) = virtio_slot(VIRTIO_MAX_DEVICES - 1).unwrap();
        assert!(last + VIRTIO_MMIO_SIZE <= PCI_MMIO_START);
        assert_eq!(gsi + 1, PCI_INTX_GSI_BASE);
        assert_eq!(virtio_slot(VIRTIO_MAX_DEVICES), None);
        assert_eq!(ram_regions(1 << 30), [(RAM_START, 1 << 30)]);
        assert_eq!(pci_intx_gsi(5), PCI_INTX_GSI_BASE + 1);
    }

    #[test]
    fn the_gic_fits_every_vcpu_tandem_accepts_below_the_uart() {
        assert_eq!(MAX_VCPUS, 123);
        let (base, len) = gic_redist_region(MAX_VCPUS);
        assert!(base + len <= SERIAL_BASE);
        assert_eq!(gic_redist_region(2), (0x080a_0000, 0x4_0000));
    }
}
