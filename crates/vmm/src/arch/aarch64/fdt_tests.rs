//! The device tree parsed back (with the `fdt` crate): what a Linux guest needs is there.

use super::*;

fn slot(i: usize) -> VirtioSlot {
    let (addr, gsi) = layout::virtio_slot(i).unwrap();
    VirtioSlot {
        addr,
        len: layout::VIRTIO_MMIO_SIZE,
        gsi,
    }
}

fn blob(mpidrs: &[u64], initrd: Option<(u64, u64)>, virtio: &[VirtioSlot]) -> Vec<u8> {
    build(&FdtConfig {
        memory: 256 << 20,
        mpidrs,
        cmdline: "console=ttyS0 panic=-1",
        initrd,
        virtio,
        rng_seed: &[7; 64],
        pci: None,
    })
    .unwrap()
}

fn prop<'a>(fdt: &'a fdt::Fdt<'a>, node: &str, name: &str) -> &'a [u8] {
    fdt.find_node(node)
        .unwrap_or_else(|| panic!("no node {node}"))
        .property(name)
        .unwrap_or_else(|| panic!("no {node}:{name}"))
        .value
}

fn cells32(b: &[u8]) -> Vec<u32> {
    b.chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

fn cells64(b: &[u8]) -> Vec<u64> {
    b.chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

fn string(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap().trim_end_matches('\0')
}

#[test]
fn memory_command_line_initramfs_and_console() {
    let b = blob(&[0x8000_0000], Some((0x4f00_0000, 0x4f10_0000)), &[]);
    let fdt = fdt::Fdt::new(&b).unwrap();
    assert_eq!(
        cells64(prop(&fdt, "/memory@40000000", "reg")),
        [0x4000_0000, 256 << 20]
    );
    assert_eq!(
        string(prop(&fdt, "/memory@40000000", "device_type")),
        "memory"
    );
    assert_eq!(fdt.chosen().bootargs(), Some("console=ttyS0 panic=-1"));
    assert_eq!(
        cells64(prop(&fdt, "/chosen", "linux,initrd-start")),
        [0x4f00_0000]
    );
    assert_eq!(
        cells64(prop(&fdt, "/chosen", "linux,initrd-end")),
        [0x4f10_0000]
    );
    // stdout-path names the UART node, which the 8250 driver binds to.
    let path = string(prop(&fdt, "/chosen", "stdout-path"));
    assert_eq!(path, "/uart@9000000");
    assert_eq!(string(prop(&fdt, path, "compatible")), "ns16550a");
    assert_eq!(
        cells64(prop(&fdt, path, "reg")),
        [layout::SERIAL_BASE, 0x1000]
    );
    assert_eq!(cells32(prop(&fdt, path, "reg-shift")), [0]);
    assert_eq!(cells32(prop(&fdt, path, "clock-frequency")), [1_843_200]);
    assert_eq!(
        cells32(prop(&fdt, path, "interrupts")),
        [0, layout::SERIAL_GSI, 1]
    );
}

#[test]
fn without_an_initramfs_chosen_names_none() {
    let b = blob(&[0x8000_0000], None, &[]);
    let fdt = fdt::Fdt::new(&b).unwrap();
    let chosen = fdt.find_node("/chosen").unwrap();
    assert!(chosen.property("linux,initrd-start").is_none());
    assert!(chosen.property("bootargs").is_some());
}

#[test]
fn one_cpu_node_per_vcpu_named_by_affinity_with_psci() {
    let b = blob(&[0x8000_0000, 0x8000_0001], None, &[]);
    let fdt = fdt::Fdt::new(&b).unwrap();
    assert_eq!(cells32(prop(&fdt, "/cpus", "#address-cells")), [2]);
    assert_eq!(cells32(prop(&fdt, "/cpus", "#size-cells")), [0]);
    for (i, node) in ["/cpus/cpu@0", "/cpus/cpu@1"].iter().enumerate() {
        assert_eq!(cells64(prop(&fdt, node, "reg")), [i as u64]);
        assert_eq!(string(prop(&fdt, node, "enable-method")), "psci");
        assert_eq!(string(prop(&fdt, node, "device_type")), "cpu");
    }
    assert_eq!(fdt.cpus().count(), 2);
    let psci = fdt.find_node("/psci").unwrap();
    assert!(psci
        .compatible()
        .unwrap()
        .all()
        .any(|c| c == "arm,psci-0.2"));
    assert_eq!(string(prop(&fdt, "/psci", "method")), "hvc");
}

#[test]
fn the_gic_covers_every_redistributor_and_parents_all_interrupts() {
    let b = blob(&[0x8000_0000, 0x8000_0001, 0x8000_0002], None, &[]);
    let fdt = fdt::Fdt::new(&b).unwrap();
    let gic = "/intc@8000000";
    assert_eq!(string(prop(&fdt, gic, "compatible")), "arm,gic-v3");
    assert!(fdt
        .find_node(gic)
        .unwrap()
        .property("interrupt-controller")
        .is_some());
    assert_eq!(cells32(prop(&fdt, gic, "#interrupt-cells")), [3]);
    assert_eq!(
        cells64(prop(&fdt, gic, "reg")),
        [0x0800_0000, 0x1_0000, 0x080a_0000, 3 * 0x2_0000]
    );
    let phandle = cells32(prop(&fdt, gic, "phandle"));
    assert_eq!(cells32(prop(&fdt, "/", "interrupt-parent")), phandle);
    assert_eq!(
        cells32(prop(&fdt, "/timer", "interrupts")),
        [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
    );
    assert_eq!(
        string(prop(&fdt, "/timer", "compatible")),
        "arm,armv8-timer"
    );
}

#[test]
fn every_virtio_device_has_its_window_and_spi() {
    let slots = [slot(0), slot(1)];
    let b = blob(&[0x8000_0000], None, &slots);
    let fdt = fdt::Fdt::new(&b).unwrap();
    let nodes: Vec<_> = fdt
        .all_nodes()
        .filter(|n| {
            n.compatible()
                .is_some_and(|c| c.all().any(|c| c == "virtio,mmio"))
        })
        .collect();
    assert_eq!(nodes.len(), 2);
    for (node, s) in nodes.iter().zip(&slots) {
        assert_eq!(node.name, format!("virtio_mmio@{:x}", s.addr));
        assert_eq!(
            cells64(node.property("reg").unwrap().value),
            [s.addr, 0x1000]
        );
        assert_eq!(
            cells32(node.property("interrupts").unwrap().value),
            [0, s.gsi, 1]
        );
    }
    assert_eq!(slots[1].gsi, layout::VIRTIO_IRQ_BASE + 1);
}

#[test]
fn a_blob_too_large_for_the_kernel_is_refused() {
    let huge = "x".repeat(FDT_MAX_SIZE as usize);
    let e = build(&FdtConfig {
        memory: 256 << 20,
        mpidrs: &[0],
        cmdline: &huge,
        initrd: None,
        virtio: &[],
        rng_seed: &[],
        pci: None,
    })
    .unwrap_err();
    assert!(matches!(e, FdtError::TooLarge(_)), "{e}");
}

#[test]
fn chosen_carries_the_random_seed_it_is_given() {
    let b = blob(&[0], None, &[]);
    let fdt = fdt::Fdt::new(&b).unwrap();
    assert_eq!(prop(&fdt, "/chosen", "rng-seed"), &[7u8; 64][..]);
    let empty = build(&FdtConfig {
        memory: 256 << 20,
        mpidrs: &[0],
        cmdline: "",
        initrd: None,
        virtio: &[],
        rng_seed: &[],
        pci: None,
    })
    .unwrap();
    let fdt = fdt::Fdt::new(&empty).unwrap();
    assert!(fdt
        .find_node("/chosen")
        .unwrap()
        .property("rng-seed")
        .is_none());
}

fn with_pci(msi: bool) -> Vec<u8> {
    build(&FdtConfig {
        memory: 256 << 20,
        mpidrs: &[0x8000_0000],
        cmdline: "",
        initrd: None,
        virtio: &[],
        rng_seed: &[],
        pci: Some(PciHost { msi }),
    })
    .unwrap()
}

const PCI: &str = "/pcie@3f000000";

#[test]
fn the_pci_host_bridge_is_a_generic_ecam_one_with_the_bar_window() {
    let b = with_pci(true);
    let fdt = fdt::Fdt::new(&b).unwrap();
    assert_eq!(
        string(prop(&fdt, PCI, "compatible")),
        "pci-host-ecam-generic"
    );
    assert_eq!(string(prop(&fdt, PCI, "device_type")), "pci");
    assert_eq!(cells32(prop(&fdt, PCI, "#address-cells")), [3]);
    assert_eq!(cells32(prop(&fdt, PCI, "#size-cells")), [2]);
    assert_eq!(cells32(prop(&fdt, PCI, "#interrupt-cells")), [1]);
    assert_eq!(
        cells64(prop(&fdt, PCI, "reg")),
        [layout::PCI_ECAM_BASE, layout::PCI_ECAM_SIZE]
    );
    // 16 MiB of ECAM: buses 0 to 15.
    assert_eq!(cells32(prop(&fdt, PCI, "bus-range")), [0, 15]);
    assert!(fdt
        .find_node(PCI)
        .unwrap()
        .property("dma-coherent")
        .is_some());
    // One 32-bit memory window, identity-mapped: where tandem places the BARs.
    assert_eq!(
        cells32(prop(&fdt, PCI, "ranges")),
        [
            0x0200_0000,
            0,
            0x1000_0000,
            0,
            0x1000_0000,
            0,
            0x3eff_0000 - 0x1000_0000
        ]
    );
    // Linux keeps tandem's BAR placement instead of reassigning it.
    assert_eq!(cells32(prop(&fdt, "/chosen", "linux,pci-probe-only")), [1]);
}

#[test]
fn every_slots_intx_pins_map_to_the_spis_the_devices_raise() {
    let b = with_pci(false);
    let fdt = fdt::Fdt::new(&b).unwrap();
    let mask = cells32(prop(&fdt, PCI, "interrupt-map-mask"));
    assert_eq!(mask, [0x1800, 0, 0, 7]);
    let map = cells32(prop(&fdt, PCI, "interrupt-map"));
    // Each entry: phys.hi phys.mid phys.lo pin, GIC phandle, 2 GIC address cells, 3 SPI cells.
    assert_eq!(map.len(), 16 * 10);
    let gic = cells32(prop(&fdt, "/intc@8000000", "phandle"))[0];
    let lookup = |slot: u32, pin: u32| -> Vec<u32> {
        let key = [(slot << 11) & mask[0], 0, 0, pin & mask[3]];
        map.chunks(10)
            .find(|e| e[..4] == key)
            .unwrap_or_else(|| panic!("no entry for slot {slot} pin {pin}"))[4..]
            .to_vec()
    };
    // What tandem raises for slot s's INTA (an ivshmem doorbell) is what the guest expects.
    for slot in [0u32, 1, 2, 3, 4, 5, 31] {
        assert_eq!(
            lookup(slot, 1),
            [gic, 0, 0, 0, layout::pci_intx_gsi(slot as usize), 1],
            "slot {slot}"
        );
        for pin in 1..=4 {
            let spi = lookup(slot, pin)[4];
            assert!(
                (layout::PCI_INTX_GSI_BASE..layout::PCI_INTX_GSI_BASE + 4).contains(&spi),
                "slot {slot} pin {pin}: SPI {spi}"
            );
            assert_eq!(spi, pci_pin_gsi(slot as usize, pin));
        }
    }
    // Without an ITS: no MSI controller anywhere.
    assert!(fdt.find_node(PCI).unwrap().property("msi-map").is_none());
    assert!(fdt
        .find_node("/intc@8000000/msi-controller@8080000")
        .is_none());
}

#[test]
fn with_an_its_the_bridges_msis_go_to_it_by_requester_id() {
    let b = with_pci(true);
    let fdt = fdt::Fdt::new(&b).unwrap();
    let its = "/intc@8000000/msi-controller@8080000";
    assert_eq!(string(prop(&fdt, its, "compatible")), "arm,gic-v3-its");
    assert!(fdt
        .find_node(its)
        .unwrap()
        .property("msi-controller")
        .is_some());
    assert_eq!(cells32(prop(&fdt, its, "#msi-cells")), [1]);
    assert_eq!(
        cells64(prop(&fdt, its, "reg")),
        [layout::GIC_ITS_BASE, layout::GIC_ITS_SIZE]
    );
    // The GIC's children are addressed as the root's devices are.
    assert_eq!(cells32(prop(&fdt, "/intc@8000000", "#address-cells")), [2]);
    assert!(fdt
        .find_node("/intc@8000000")
        .unwrap()
        .property("ranges")
        .is_some());
    let phandle = cells32(prop(&fdt, its, "phandle"))[0];
    assert_eq!(
        cells32(prop(&fdt, PCI, "msi-map")),
        [0, phandle, 0, 0x1_0000]
    );
}

#[test]
fn without_pci_there_is_no_host_bridge_its_or_probe_only() {
    let b = blob(&[0x8000_0000], None, &[]);
    let fdt = fdt::Fdt::new(&b).unwrap();
    assert!(fdt.find_node(PCI).is_none());
    assert!(fdt
        .find_node("/intc@8000000/msi-controller@8080000")
        .is_none());
    assert!(fdt
        .find_node("/chosen")
        .unwrap()
        .property("linux,pci-probe-only")
        .is_none());
}
