//! The flattened device tree the arm64 kernel learns the machine from (written with rust-vmm's
//! `vm-fdt`): memory, CPUs (PSCI enable method), PSCI 0.2 over HVC, the GICv3, the architected
//! timer, the 16550-compatible UART with `stdout-path`, the command line and initramfs, and one
//! `virtio,mmio` node per virtio device.

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
    gic(&mut w, cfg.mpidrs.len())?;
    timer(&mut w)?;
    uart(&mut w)?;
    for slot in cfg.virtio {
        virtio_mmio(&mut w, slot)?;
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

fn gic(w: &mut FdtWriter, vcpus: usize) -> Result<(), FdtError> {
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

#[cfg(test)]
#[path = "fdt_tests.rs"]
mod tests;
