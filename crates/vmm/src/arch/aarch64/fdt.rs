//! The flattened device tree the arm64 kernel learns the machine from (written with rust-vmm's
//! `vm-fdt`): memory, CPUs (PSCI enable method), PSCI 0.2 over HVC, the GICv3, the architected
//! timer, the 16550-compatible UART with `stdout-path`, the command line and initramfs, one
//! `virtio,mmio` node per virtio device, and for a VM with PCI devices a generic ECAM host
//! bridge (with the GICv3's ITS as its MSI controller where there is one).

use vm_fdt::{FdtWriter, FdtWriterNode};

use super::gic::{MAINTENANCE_PPI, TIMER_PPIS};
use super::layout;
use super::regs::mpidr_affinity;
use crate::virtio::VirtioSlot;

/// Most bytes the kernel accepts for a device tree (arm64 booting.txt).
pub const FDT_MAX_SIZE: u64 = 0x20_0000;

/// `interrupts` cells: the kind of interrupt.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// `interrupts` cells: trigger flags.
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// The GIC's phandle, every interrupt's parent.
const GIC_PHANDLE: u32 = 1;
/// The ITS's phandle, the PCI host bridge's MSI controller.
const ITS_PHANDLE: u32 = 2;
/// PCI `ranges` space code: 32-bit memory, not prefetchable.
const PCI_SPACE_MEM32: u32 = 0x0200_0000;
/// The UART's input clock, as on PC hardware (the 8250 driver needs one to compute divisors).
const UART_CLOCK_HZ: u32 = 1_843_200;

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// Guest RAM size (from [`layout::RAM_START`]).
    pub memory: u64,
    /// Each vCPU's MPIDR_EL1, by index.
    pub mpidrs: &'a [u64],
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initramfs's guest-physical range (start, end exclusive).
    pub initrd: Option<(u64, u64)>,
    /// The virtio-mmio devices.
    pub virtio: &'a [VirtioSlot],
    /// Random bytes for `/chosen/rng-seed`, which Linux mixes into its random number generator
    /// at boot and trusts as a bootloader's seed (as QEMU's `virt` machine passes one); many
    /// Arm CPUs have no random number instruction for the guest to seed from. Empty: no seed.
    pub rng_seed: &'a [u8],
    /// The PCI host bridge, for a VM with PCI devices.
    pub pci: Option<PciHost>,
}

/// What the device tree says of the PCI host bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHost {
    /// Whether the VM has an ITS: the bridge's MSIs then go there (`msi-map`); without, its
    /// devices have INTx only.
    pub msi: bool,
}

/// Errors from building the device tree.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// vm-fdt refused a node or property.
    #[error("device tree: {0}")]
    Write(#[from] vm_fdt::Error),
    /// The tree is larger than the kernel accepts.
    #[error("device tree of {0} bytes is larger than the 2 MiB the kernel accepts")]
    TooLarge(usize),
}

/// Builds the device tree blob.
pub fn build(cfg: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("interrupt-parent", GIC_PHANDLE)?;

    chosen(&mut w, cfg)?;
    memory(&mut w, cfg.memory)?;
    cpus(&mut w, cfg.mpidrs)?;
    psci(&mut w)?;
    let its = cfg.pci.is_some_and(|p| p.msi);
    gic(&mut w, cfg.mpidrs.len(), its)?;
    timer(&mut w)?;
    uart(&mut w)?;
    for slot in cfg.virtio {
        virtio_mmio(&mut w, slot)?;
    }
    if let Some(host) = cfg.pci {
        pci(&mut w, host)?;
    }

    w.end_node(root)?;
    let blob = w.finish()?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge(blob.len()));
    }
    Ok(blob)
}

fn uart_path() -> String {
    format!("/uart@{:x}", layout::SERIAL_BASE)
}

fn chosen(w: &mut FdtWriter, cfg: &FdtConfig<'_>) -> Result<(), FdtError> {
    let n = w.begin_node("chosen")?;
    w.property_string("bootargs", cfg.cmdline)?;
    w.property_string("stdout-path", &uart_path())?;
    if let Some((start, end)) = cfg.initrd {
        w.property_u64("linux,initrd-start", start)?;
        w.property_u64("linux,initrd-end", end)?;
    }
    if !cfg.rng_seed.is_empty() {
        w.property("rng-seed", cfg.rng_seed)?;
    }
    if cfg.pci.is_some() {
        // tandem places every BAR itself and does not move them (KVM memory slots and
        // ioeventfds sit at those addresses); without this, Linux reassigns every BAR of a
        // generic host bridge.
        w.property_u32("linux,pci-probe-only", 1)?;
    }
    w.end_node(n)?;
    Ok(())
}

fn memory(w: &mut FdtWriter, size: u64) -> Result<(), FdtError> {
    let n = w.begin_node(&format!("memory@{:x}", layout::RAM_START))?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &[layout::RAM_START, size])?;
    w.end_node(n)?;
    Ok(())
}

fn cpus(w: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), FdtError> {
    let n = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 0)?;
    for mpidr in mpidrs {
        let aff = mpidr_affinity(*mpidr);
        let cpu = w.begin_node(&format!("cpu@{aff:x}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,arm-v8")?;
        w.property_string("enable-method", "psci")?;
        w.property_u64("reg", aff)?;
        w.end_node(cpu)?;
    }
    w.end_node(n)?;
    Ok(())
}

fn psci(w: &mut FdtWriter) -> Result<(), FdtError> {
    let n = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        vec!["arm,psci-0.2".to_string(), "arm,psci".to_string()],
    )?;
    // KVM's PSCI is reached by HVC from EL1.
    w.property_string("method", "hvc")?;
    w.end_node(n)?;
    Ok(())
}

fn gic(w: &mut FdtWriter, vcpus: usize, its: bool) -> Result<(), FdtError> {
    let (redist, redist_len) = layout::gic_redist_region(vcpus);
    let n = w.begin_node(&format!("intc@{:x}", layout::GIC_DIST_BASE))?;
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_null("interrupt-controller")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_null("ranges")?;
    w.property_array_u64(
        "reg",
        &[
            layout::GIC_DIST_BASE,
            layout::GIC_DIST_SIZE,
            redist,
            redist_len,
        ],
    )?;
    w.property_array_u32(
        "interrupts",
        &[GIC_PPI, MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    w.property_phandle(GIC_PHANDLE)?;
    if its {
        let i = w.begin_node(&format!("msi-controller@{:x}", layout::GIC_ITS_BASE))?;
        w.property_string("compatible", "arm,gic-v3-its")?;
        w.property_null("msi-controller")?;
        w.property_u32("#msi-cells", 1)?;
        w.property_array_u64("reg", &[layout::GIC_ITS_BASE, layout::GIC_ITS_SIZE])?;
        w.property_phandle(ITS_PHANDLE)?;
        w.end_node(i)?;
    }
    w.end_node(n)?;
    Ok(())
}

fn timer(w: &mut FdtWriter) -> Result<(), FdtError> {
    let n = w.begin_node("timer")?;
    w.property_string("compatible", "arm,armv8-timer")?;
    w.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|ppi| [GIC_PPI, *ppi, IRQ_TYPE_LEVEL_HIGH])
        .collect();
    w.property_array_u32("interrupts", &cells)?;
    w.end_node(n)?;
    Ok(())
}

fn uart(w: &mut FdtWriter) -> Result<(), FdtError> {
    let n = w.begin_node(&uart_path()[1..])?;
    w.property_string("compatible", "ns16550a")?;
    w.property_array_u64("reg", &[layout::SERIAL_BASE, layout::SERIAL_SIZE])?;
    w.property_u32("clock-frequency", UART_CLOCK_HZ)?;
    w.property_u32("reg-shift", 0)?;
    w.property_u32("reg-io-width", 1)?;
    w.property_array_u32(
        "interrupts",
        &[GIC_SPI, layout::SERIAL_GSI, IRQ_TYPE_EDGE_RISING],
    )?;
    w.end_node(n)?;
    Ok(())
}

fn virtio_mmio(w: &mut FdtWriter, slot: &VirtioSlot) -> Result<(), FdtError> {
    let n: FdtWriterNode = w.begin_node(&format!("virtio_mmio@{:x}", slot.addr))?;
    w.property_string("compatible", "virtio,mmio")?;
    w.property_array_u64("reg", &[slot.addr, slot.len])?;
    // irqfd interrupts are edges: KVM raises and lowers the line at once.
    w.property_array_u32("interrupts", &[GIC_SPI, slot.gsi, IRQ_TYPE_EDGE_RISING])?;
    w.property_null("dma-coherent")?;
    w.end_node(n)?;
    Ok(())
}

/// The SPI (as GSI) of INTx pin `pin` (1-4: INTA-INTD) of PCI slot `slot`: INTA as
/// [`layout::pci_intx_gsi`] says, the others rotated from it as PCI bridges swizzle them.
pub fn pci_pin_gsi(slot: usize, pin: u32) -> u32 {
    layout::PCI_INTX_GSI_BASE + (slot as u32 + pin.saturating_sub(1)) % 4
}

/// The generic ECAM host bridge (Linux's `pci-host-generic`): bus 0 to 15 in the ECAM window,
/// the 32-bit memory window where tandem places BARs, and every slot's INTA-INTD to its SPI
/// (`interrupt-map`, which depends only on the slot modulo 4); MSIs to the ITS, the requester
/// ID as the device ID.
fn pci(w: &mut FdtWriter, host: PciHost) -> Result<(), FdtError> {
    let n = w.begin_node(&format!("pcie@{:x}", layout::PCI_ECAM_BASE))?;
    w.property_string("compatible", "pci-host-ecam-generic")?;
    w.property_string("device_type", "pci")?;
    w.property_u32("#address-cells", 3)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("#interrupt-cells", 1)?;
    w.property_array_u64("reg", &[layout::PCI_ECAM_BASE, layout::PCI_ECAM_SIZE])?;
    w.property_array_u32("bus-range", &[0, layout::PCI_ECAM_BUSES - 1])?;
    w.property_u32("linux,pci-domain", 0)?;
    w.property_null("dma-coherent")?;
    let start = layout::PCI_MMIO_START;
    let size = layout::PCI_MMIO_END - layout::PCI_MMIO_START;
    // (space, PCI address, CPU address, size): PCI and CPU addresses are the same.
    w.property_array_u32(
        "ranges",
        &[
            PCI_SPACE_MEM32,
            (start >> 32) as u32,
            start as u32,
            (start >> 32) as u32,
            start as u32,
            (size >> 32) as u32,
            size as u32,
        ],
    )?;
    // Child unit address (phys.hi's device number), pin; GIC, its 2 address cells, its SPI.
    // irqfd interrupts are edges, as for virtio-mmio.
    w.property_array_u32("interrupt-map-mask", &[0x3 << 11, 0, 0, 7])?;
    let mut map = Vec::new();
    for slot in 0..4usize {
        for pin in 1..=4u32 {
            map.extend_from_slice(&[(slot as u32) << 11, 0, 0, pin, GIC_PHANDLE, 0, 0]);
            map.extend_from_slice(&[GIC_SPI, pci_pin_gsi(slot, pin), IRQ_TYPE_EDGE_RISING]);
        }
    }
    w.property_array_u32("interrupt-map", &map)?;
    if host.msi {
        // Requester IDs 0-0xffff map one to one to the ITS's device IDs.
        w.property_array_u32("msi-map", &[0, ITS_PHANDLE, 0, 0x1_0000])?;
    }
    w.end_node(n)?;
    Ok(())
}

#[cfg(test)]
#[path = "fdt_tests.rs"]
mod tests;
