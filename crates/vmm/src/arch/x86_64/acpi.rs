//! ACPI tables for a hardware-reduced x86 platform: RSDP, XSDT, FADT, DSDT and MADT.
//!
//! The MADT announces one local APIC per vCPU (how the guest finds its CPUs) and the IOAPIC; the
//! FADT points the sleep-control and reset registers at [`tandem_devices::acpi_pm`], which is how
//! a guest `poweroff` and `reboot` reach tandem; the DSDT carries the `_S5_` sleep type.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use tandem_devices::acpi_pm::{ACPI_PM_PORT, ACPI_RESET_VALUE, S5_SLEEP_TYPE};
use tandem_devices::serial::{COM1_BASE, COM1_IRQ, UART_PORTS};

pub use crate::virtio::VirtioSlot;

use crate::layout::{
    ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, PCI_MMIO_END, PCI_MMIO_START, RESET_VECTOR,
};

const OEM_ID: [u8; 6] = *b"TANDEM";
const OEM_TABLE_ID: [u8; 8] = *b"TANDEMVM";
const OEM_REVISION: u32 = 1;
/// MADT flag: the platform also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flags: no VGA, no CMOS RTC. The i8042 flag is left clear so the
/// guest does not probe a keyboard (tandem's i8042 exists only for its reset line).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables do not fit between [`ACPI_START`] and the reset vector.
    #[error("ACPI tables need {0} bytes, more than the reserved area")]
    TooLarge(usize),
    /// Too many vCPUs for 8-bit APIC IDs.
    #[error("{0} vCPUs do not fit xAPIC ids")]
    TooManyCpus(usize),
}

/// The tables, laid out as one blob to be written at [`AcpiTables::base`].
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Guest address of the blob; the RSDP is at the start.
    pub base: u64,
    /// The bytes.
    pub blob: Vec<u8>,
    /// Offsets of each table in the blob, by signature.
    pub offsets: Vec<([u8; 4], usize)>,
}

impl AcpiTables {
    /// Guest address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }

    /// The table with this signature, if present.
    pub fn table(&self, sig: &[u8; 4]) -> Option<&[u8]> {
        let (_, off) = self.offsets.iter().find(|(s, _)| s == sig)?;
        let len = u32::from_le_bytes(self.blob.get(off + 4..off + 8)?.try_into().ok()?) as usize;
        self.blob.get(*off..off + len)
    }
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Recomputes an SDT's checksum byte (offset 9) so that all bytes sum to zero.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// COM1 as an ACPI device. In hardware-reduced mode Linux has no legacy PIC and maps no ISA
/// IRQs by itself: the UART's interrupt reaches the IOAPIC only once a device claims it here.
fn com1() -> Vec<u8> {
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let io = aml::IO::new(COM1_BASE, COM1_BASE, 1, UART_PORTS as u8);
    let crs = aml::ResourceTemplate::new(vec![&irq, &io]);
    let hid = aml::EISAName::new("PNP0501");
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_DDN".into(), &"COM1"),
        aml::Name::new("_CRS".into(), &crs),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    to_bytes(&aml::Device::new("_SB_.COM1".into(), children))
}

/// A virtio-mmio device as ACPI describes it (`LNRO0005`, as on QEMU's microvm): the Linux
/// driver binds to it by its ACPI id, so no kernel command-line option is needed.
fn virtio_mmio(index: usize, dev: &VirtioSlot) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, dev.addr as u32, dev.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    let names = [
        aml::Name::new("_HID".into(), &"LNRO0005"),
        aml::Name::new("_UID".into(), &uid),
        aml::Name::new("_CCA".into(), &aml::ONE),
        aml::Name::new("_CRS".into(), &crs),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    to_bytes(&aml::Device::new(
        format!("_SB_.V{index:03X}").as_str().into(),
        children,
    ))
}

/// The PCI root bridge (`PNP0A03`): bus 0, configuration mechanism #1 at 0xcf8, and the window
/// where tandem places BARs. Linux keeps BAR placements that lie inside the window.
fn pci_root() -> Vec<u8> {
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &config, &window]);
    // _PRT: INTA of every slot to one of four link devices (LNK0-LNK3), which hold the GSIs as
    // edge-triggered, active-high interrupts: INTx here is raised by KVM irqfds, which pulse the
    // line, and an edge is never lost while an earlier interrupt is in service.
    let links: Vec<aml::Path> = (0..4)
        .map(|i| aml::Path::new(&format!("\\_SB_.LNK{i}")))
        .collect();
    let addrs: Vec<u32> = (1..32u32).map(|slot| slot << 16 | 0xffff).collect();
    let packages: Vec<aml::Package> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| aml::Package::new(vec![addr, &0u8, &links[(i + 1) % 4], &0u8]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());
    let hid = aml::EISAName::new("PNP0A03");
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    let mut out = to_bytes(&aml::Device::new("_SB_.PCI0".into(), children));
    for i in 0..4u32 {
        out.extend_from_slice(&pci_link(i));
    }
    out
}

/// PCI interrupt link `LNKi` (`PNP0C0F`): fixed at GSI `PCI_INTX_GSI_BASE + i`, edge-triggered,
/// active high; `_SRS` accepts the one setting there is.
fn pci_link(i: u32) -> Vec<u8> {
    let gsi = crate::layout::PCI_INTX_GSI_BASE + i;
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let prs = aml::ResourceTemplate::new(vec![&irq]);
    let hid = aml::EISAName::new("PNP0C0F");
    let uid = i + 1;
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &uid);
    let name_prs = aml::Name::new("_PRS".into(), &prs);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let srs = aml::Method::new("_SRS".into(), 1, false, vec![]);
    let children: Vec<&dyn Aml> = vec![&name_hid, &name_uid, &name_prs, &name_crs, &srs];
    to_bytes(&aml::Device::new(
        format!("_SB_.LNK{i}").as_str().into(),
        children,
    ))
}

fn dsdt(virtio: &[VirtioSlot], pci: bool) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    body.extend_from_slice(&com1());
    for (i, dev) in virtio.iter().enumerate() {
        body.extend_from_slice(&virtio_mmio(i, dev));
    }
    if pci {
        body.extend_from_slice(&pci_root());
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |width| {
        GAS::new(
            AddressSpace::SystemIo,
            width,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_PORT.into(),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = port(8);
    b.sleep_status_reg = port(8);
    b.reset_reg = port(8);
    b.reset_value = ACPI_RESET_VALUE;
    b.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"TANDEMVM").into();
    to_bytes(&b.finalize())
}

fn madt(cpus: usize) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    // The IOAPIC id follows the CPUs' APIC ids.
    m.add_structure(IoApic::new(cpus as u8, IOAPIC_ADDR as u32, 0));
    let mut bytes = to_bytes(&m);
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

/// Builds the tables for `cpus` vCPUs, the given virtio devices and, when `pci`, the PCI root
/// bridge, to be placed at [`ACPI_START`].
pub fn build(cpus: usize, virtio: &[VirtioSlot], pci: bool) -> Result<AcpiTables, AcpiError> {
    if cpus == 0 || cpus > 254 {
        return Err(AcpiError::TooManyCpus(cpus));
    }
    let base = ACPI_START;
    let align = |n: usize| (n + 15) & !15;
    let mut blob = vec![0u8; align(Rsdp::len())];
    let mut offsets = Vec::new();
    let mut push = |blob: &mut Vec<u8>, sig: [u8; 4], bytes: Vec<u8>| -> u64 {
        let off = blob.len();
        blob.extend_from_slice(&bytes);
        blob.resize(align(blob.len()), 0);
        offsets.push((sig, off));
        base + off as u64
    };
    let dsdt_addr = push(&mut blob, *b"DSDT", dsdt(virtio, pci));
    let fadt_addr = push(&mut blob, *b"FACP", fadt(dsdt_addr));
    let madt_addr = push(&mut blob, *b"APIC", madt(cpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = push(&mut blob, *b"XSDT", to_bytes(&xsdt));
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    blob[..rsdp.len()].copy_from_slice(&rsdp);
    if base + blob.len() as u64 > RESET_VECTOR {
        return Err(AcpiError::TooLarge(blob.len()));
    }
    Ok(AcpiTables {
        base,
        blob,
        offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn rsdp_leads_to_every_table_and_all_checksums_hold() {
        let t = build(4, &[], false).unwrap();
        let rsdp = &t.blob[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));
        let xsdt_addr = u64_at(rsdp, 24);
        let xsdt = t.table(b"XSDT").unwrap();
        assert_eq!(
            t.base + t.offsets.iter().find(|(s, _)| s == b"XSDT").unwrap().1 as u64,
            xsdt_addr
        );
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);
        for sig in [b"XSDT", b"FACP", b"APIC", b"DSDT"] {
            let table = t.table(sig).unwrap();
            assert_eq!(&table[..4], sig);
            assert!(
                sums_to_zero(table),
                "{} checksum",
                String::from_utf8_lossy(sig)
            );
        }
        for e in entries {
            let off = (e - t.base) as usize;
            assert!([&b"FACP"[..], b"APIC"].contains(&&t.blob[off..off + 4]));
        }
    }

    #[test]
    fn madt_lists_one_enabled_local_apic_per_cpu() {
        for cpus in [1usize, 2, 4, 64] {
            let t = build(cpus, &[], false).unwrap();
            let madt = t.table(b"APIC").unwrap();
            assert_eq!(u32_at(madt, 36), LAPIC_ADDR as u32);
            assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
            let (mut off, mut lapics, mut ioapics) = (44, vec![], 0);
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(u32_at(madt, off + 4), 1, "enabled");
                        lapics.push(madt[off + 3]);
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, off + 4), IOAPIC_ADDR as u32);
                    }
                    _ => panic!("unexpected MADT entry {kind}"),
                }
                off += len;
            }
            assert_eq!(lapics, (0..cpus as u8).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_the_pm_port_and_the_dsdt() {
        let t = build(1, &[], false).unwrap();
        let fadt = t.table(b"FACP").unwrap();
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // X_DSDT at 140, reset register GAS at 116 (address at +4), sleep control GAS at 244.
        let dsdt_off = t.offsets.iter().find(|(s, _)| s == b"DSDT").unwrap().1 as u64;
        assert_eq!(u64_at(fadt, 140), t.base + dsdt_off);
        assert_eq!(u64_at(fadt, 120), ACPI_PM_PORT as u64);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(u64_at(fadt, 248), ACPI_PM_PORT as u64);
        let dsdt = t.table(b"DSDT").unwrap();
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        // COM1: PNP0501 (EISA-compressed 0x0105d041) with IRQ 4 in an extended IRQ descriptor.
        assert!(dsdt.windows(4).any(|w| w == 0x0105_d041u32.to_le_bytes()));
        assert!(dsdt
            .windows(9)
            .any(|w| w == [0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
    }

    #[test]
    fn virtio_devices_are_described_with_their_window_and_edge_interrupt() {
        let slots = [
            VirtioSlot {
                addr: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            VirtioSlot {
                addr: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let t = build(1, &slots, false).unwrap();
        let dsdt = t.table(b"DSDT").unwrap();
        assert!(sums_to_zero(dsdt));
        let hids = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hids, 2);
        for s in slots {
            // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend_from_slice(&(s.addr as u32).to_le_bytes());
            mem.extend_from_slice(&(s.len as u32).to_le_bytes());
            assert!(dsdt.windows(mem.len()).any(|w| w == mem), "window of {s:?}");
            // Extended interrupt: consumer, edge, active high, exclusive; one GSI.
            let irq = [0x89, 6, 0, 0x03, 1, s.gsi as u8, 0, 0, 0];
            assert!(dsdt.windows(9).any(|w| w == irq), "interrupt of {s:?}");
        }
    }

    #[test]
    fn the_pci_root_announces_its_bus_config_ports_and_bar_window() {
        assert!(!build(1, &[], false)
            .unwrap()
            .table(b"DSDT")
            .unwrap()
            .windows(4)
            .any(|w| w == b"PCI0"));
        let t = build(1, &[], true).unwrap();
        let dsdt = t.table(b"DSDT").unwrap();
        assert!(sums_to_zero(dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        // EISA id PNP0A03, compressed: 0x41d0 0x0a03.
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x03]));
        // IO descriptor: 0xcf8-0xcf8, alignment 1, length 8.
        assert!(dsdt
            .windows(8)
            .any(|w| w == [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        // DWordMemory: granularity 0, then the window's first and last addresses.
        let mut window = vec![0u8; 4];
        window.extend_from_slice(&(PCI_MMIO_START as u32).to_le_bytes());
        window.extend_from_slice(&((PCI_MMIO_END - 1) as u32).to_le_bytes());
        assert!(dsdt.windows(window.len()).any(|w| w == window));
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert_eq!(build(0, &[], false).unwrap_err(), AcpiError::TooManyCpus(0));
        assert_eq!(
            build(255, &[], false).unwrap_err(),
            AcpiError::TooManyCpus(255)
        );
        assert!(build(254, &[], false).is_ok());
    }
}
