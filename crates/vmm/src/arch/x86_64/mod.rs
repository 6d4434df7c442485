//! The x86_64 parts of a VM: the boot protocols (Linux 64-bit, PVH) with the zero page and e820
//! map, CPUID and MSRs, the ACPI tables, the legacy devices on I/O ports (COM1, i8042 reset,
//! ACPI PM), the in-kernel PIC/IOAPIC/PIT and local APICs, and the doctor's ring-0 probe.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod irq;
pub mod layout;
pub mod probe;
pub mod regs;

use std::fs::File;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use tandem_devices::acpi_pm::ACPI_PM_PORT;
use tandem_devices::i8042::{I8042_BASE, I8042_PORTS};
use tandem_devices::serial::{COM1_BASE, COM1_IRQ, UART_PORTS};
use tandem_devices::{AcpiPmDevice, ConsoleWriter, EventFdTrigger, SerialDevice, I8042};

use crate::bus::DeviceBus;
use crate::error::VmError;
use crate::virtio::VirtioSlot;
use crate::vm::VmConfig;
use boot::{params::BootInfo, Entry};

/// KVM capabilities tandem cannot run without, with their names for messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Whether this build can boot VMs: it can on x86_64.
pub fn ensure_vm_support() -> Result<(), VmError> {
    Ok(())
}

/// Checks the boot images: the kernel's format, and that the initramfs can be read.
pub fn validate_boot(cfg: &VmConfig) -> Result<(), VmError> {
    boot::probe_kernel(&cfg.kernel)?;
    if let Some(initrd) = &cfg.initrd {
        File::open(initrd).map_err(|source| boot::BootError::InitrdRead {
            path: initrd.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Puts the PCI root's configuration space where x86 guests look for it: configuration
/// mechanism #1, ports 0xcf8-0xcff.
pub fn add_pci_root(bus: &mut DeviceBus, root: tandem_pci::PciRoot) -> Result<(), VmError> {
    use tandem_pci::root::{CONFIG_PORT, CONFIG_PORTS};
    bus.add_pio("pci-config", CONFIG_PORT, CONFIG_PORTS, root)?;
    Ok(())
}

/// The VM-wide platform, once created: on x86_64 it is all in KVM, with nothing to keep.
pub struct Platform;

/// The VM-wide platform, before memory and vCPUs: KVM's TSS and identity-map pages, the
/// in-kernel PIC and IOAPIC, and the PIT.
pub fn create_platform(vm: &VmFd, _cfg: &VmConfig) -> Result<Platform, VmError> {
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(VmError::kvm("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(VmError::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(VmError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(VmError::kvm("KVM_CREATE_PIT2"))?;
    Ok(Platform)
}

/// The platform's own devices on `bus`: the serial console (COM1, writing to `console`), the
/// i8042's reset line and the ACPI PM registers (poweroff, reset). Returns the serial port,
/// which takes the console's input.
pub fn add_platform_devices(
    vm: &VmFd,
    bus: &mut DeviceBus,
    console: ConsoleWriter,
    poweroff: &EventFdTrigger,
    reset: &EventFdTrigger,
) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
    let serial_irq = EventFdTrigger::new().map_err(VmError::Device)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(VmError::kvm("KVM_IRQFD"))?;
    let serial = bus.add_pio(
        "serial",
        COM1_BASE,
        UART_PORTS,
        SerialDevice::new(serial_irq, console),
    )?;
    bus.add_pio(
        "i8042",
        I8042_BASE,
        I8042_PORTS,
        I8042::new(reset.try_clone().map_err(VmError::Device)?),
    )?;
    bus.add_pio(
        "acpi-pm",
        ACPI_PM_PORT,
        1,
        AcpiPmDevice::new(
            poweroff.try_clone().map_err(VmError::Device)?,
            reset.try_clone().map_err(VmError::Device)?,
        ),
    )?;
    Ok(serial)
}

/// Loads kernel, initramfs, command line, ACPI tables and the boot protocol's structures (zero
/// page or PVH start info); returns where the boot vCPU starts.
pub fn load_boot_images(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    virtio: &[VirtioSlot],
    pci: bool,
) -> Result<Entry, VmError> {
    let kernel = boot::load_kernel(mem, &cfg.kernel)?;
    let entry = kernel.entry(cfg.boot, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(boot::load_initrd(mem, cfg.memory, &kernel, p)?),
        None => None,
    };
    let cmdline_len = boot::write_cmdline(mem, &boot::cmdline::guest_cmdline(&cfg.cmdline, pci))?;
    let tables = acpi::build(cfg.vcpus.into(), virtio, pci)?;
    mem.write_slice(&tables.blob, GuestAddress(tables.base))
        .map_err(boot::BootError::from)?;
    let e820 = layout::e820_map(cfg.memory);
    match entry {
        Entry::Linux64(_) => {
            let params = boot::params::build_boot_params(&BootInfo {
                header: kernel.header,
                cmdline_addr: layout::CMDLINE_ADDR,
                cmdline_len,
                initrd,
                e820: &e820,
                rsdp_addr: tables.rsdp_addr(),
            })
            .map_err(boot::BootError::from)?;
            mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
                .map_err(boot::BootError::from)?;
        }
        Entry::Pvh(_) => {
            let info = boot::pvh::build(layout::CMDLINE_ADDR, initrd, &e820, tables.rsdp_addr())?;
            boot::pvh::write(mem, &info)?;
        }
    }
    regs::write_boot_tables(mem).map_err(boot::BootError::from)?;
    boot::write_reset_stub(mem)?;
    tracing::info!(format = ?kernel.format, ?entry, "kernel loaded");
    Ok(entry)
}

/// Once every vCPU is created, before any device: nothing on x86_64 (each is configured by
/// [`configure_vcpu`]).
pub fn init_vcpus(_platform: &Platform, _vm: &VmFd, _vcpus: &[VcpuFd]) -> Result<(), VmError> {
    Ok(())
}

/// Sets up vCPU `index`: CPUID, MSRs, FPU, local APIC, and for the boot vCPU the registers of
/// `entry`.
pub fn configure_vcpu(
    kvm: &Kvm,
    fd: &VcpuFd,
    index: u8,
    cfg: &VmConfig,
    entry: Entry,
) -> Result<(), VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    cpuid::patch(cpuid.as_mut_slice(), index.into(), cfg.vcpus.into());
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    if tsc_deadline {
        cpuid::set_tsc_deadline(cpuid.as_mut_slice());
    }
    if cfg.placement.realtime && index == 0 {
        if !tsc_deadline {
            tracing::warn!("realtime: this host's KVM has no TSC-deadline timer for the guest");
        }
        if !cpuid::has_invariant_tsc(cpuid.as_slice()) {
            tracing::warn!(
                "realtime: the host's TSC is not invariant, so the guest is not told it is"
            );
        }
    }
    fd.set_cpuid2(&cpuid)
        .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&regs::boot_msrs())
        .map_err(|e| VmError::Memory(format!("MSR list: {e:?}")))?;
    fd.set_msrs(&msrs).map_err(VmError::kvm("KVM_SET_MSRS"))?;
    fd.set_fpu(&regs::boot_fpu())
        .map_err(VmError::kvm("KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(VmError::kvm("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    fd.set_lapic(&lapic)
        .map_err(VmError::kvm("KVM_SET_LAPIC"))?;
    if index == 0 {
        let mut sregs = fd.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        let regs = match entry {
            Entry::Linux64(addr) => {
                regs::long_mode_sregs(&mut sregs);
                regs::boot_regs(addr)
            }
            Entry::Pvh(addr) => {
                regs::protected_mode_sregs(&mut sregs);
                regs::pvh_regs(addr, boot::pvh::START_INFO_ADDR)
            }
        };
        fd.set_sregs(&sregs)
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&regs).map_err(VmError::kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// Once every vCPU is configured: nothing left to do on x86_64 (the boot tables are written
/// by [`load_boot_images`]).
pub fn finish_platform(
    _platform: &Platform,
    _vcpus: &[VcpuFd],
    _cfg: &VmConfig,
    _mem: &GuestMemoryMmap,
    _virtio: &[VirtioSlot],
    _entry: Entry,
) -> Result<(), VmError> {
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output), LINT1 as NMI, as firmware leaves them.
fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[off..off + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
}
