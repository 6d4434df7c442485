//! The aarch64 parts of a VM: the in-kernel GICv3 and the architected timer, vCPUs with PSCI
//! 0.2 (secondaries started by the guest's `CPU_ON`, power-off and reset as KVM system
//! events), the arm64 `Image` boot protocol with a flattened device tree, and a
//! 16550-compatible UART on MMIO. virtio devices use virtio-mmio, or virtio-pci behind a
//! generic ECAM host bridge with MSI-X through the GICv3's ITS; inter-VM channels (ivshmem) sit
//! on the same PCI bus, their doorbells on MSI-X or INTx.

pub mod boot;
pub mod fdt;
pub mod gic;
pub mod irq;
pub mod layout;
pub mod probe;
pub mod regs;

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use tandem_devices::{ConsoleWriter, EventFdTrigger, SerialDevice};

use crate::bus::DeviceBus;
use crate::error::VmError;
use crate::virtio::VirtioSlot;
use crate::vm::{VirtioTransport, VmConfig};

/// KVM capabilities an aarch64 VM needs, with their names for messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::OneReg, "KVM_CAP_ONE_REG"),
    (Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
    (Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Whether this build can boot VMs: it can on aarch64.
pub fn ensure_vm_support() -> Result<(), VmError> {
    Ok(())
}

/// Checks the boot images (an arm64 `Image`, a readable initramfs) and the command line.
pub fn validate_boot(cfg: &VmConfig) -> Result<(), VmError> {
    boot::probe_kernel(&cfg.kernel)?;
    if let Some(initrd) = &cfg.initrd {
        boot::initrd_size(initrd)?;
    }
    boot::check_cmdline(&cfg.cmdline)?;
    Ok(())
}

/// The VM-wide platform: the GIC, kept until every vCPU exists, and the ITS of a VM with PCI
/// devices.
pub struct Platform {
    gic: gic::Gic,
    its: Option<gic::Its>,
}

/// Creates the in-kernel GICv3 (before the vCPUs; initialised by [`init_vcpus`]) and, when the
/// VM may have PCI devices, its ITS. Without an ITS on the host, virtio-pci (MSI-X only) is
/// refused, and channels' doorbells interrupt through INTx.
pub fn create_platform(vm: &VmFd, cfg: &VmConfig) -> Result<Platform, VmError> {
    let gic = gic::Gic::create(vm)?;
    let virtio_pci = cfg.virtio_transport == VirtioTransport::Pci;
    let its = if virtio_pci || !cfg.channels.is_empty() {
        let its = gic::Its::create(vm)?;
        if its.is_none() {
            if virtio_pci {
                return Err(VmError::NoMsi("virtio-pci (--virtio-transport pci)"));
            }
            tracing::warn!(
                "this host's KVM has no GICv3 ITS: channel doorbells interrupt through INTx, not MSI-X"
            );
        }
        its
    } else {
        None
    };
    Ok(Platform { gic, its })
}

/// Puts the PCI root's configuration space in the ECAM window the device tree's host bridge
/// names.
pub fn add_pci_root(bus: &mut DeviceBus, root: tandem_pci::PciRoot) -> Result<(), VmError> {
    bus.add_mmio_shared(
        "pci-ecam",
        layout::PCI_ECAM_BASE,
        layout::PCI_ECAM_SIZE,
        Arc::new(Mutex::new(root)),
    )?;
    Ok(())
}

/// The UART on the MMIO bus, its interrupt an irqfd into its SPI. Power-off and reset come
/// from PSCI (KVM system events, see [`crate::exit`]), not from a device.
pub fn add_platform_devices(
    vm: &VmFd,
    bus: &mut DeviceBus,
    console: ConsoleWriter,
    _poweroff: &EventFdTrigger,
    _reset: &EventFdTrigger,
) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
    let serial_irq = EventFdTrigger::new().map_err(VmError::Device)?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_GSI)
        .map_err(VmError::kvm("KVM_IRQFD"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
    bus.add_mmio_shared(
        "serial",
        layout::SERIAL_BASE,
        layout::SERIAL_SIZE,
        serial.clone(),
    )?;
    Ok(serial)
}

/// Where the boot vCPU starts and what the device tree will say of the boot images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The kernel's entry (its first byte).
    pub pc: u64,
    /// Where the device tree goes (X0 at entry).
    pub fdt: u64,
    /// The initramfs's range, if any.
    pub initrd: Option<(u64, u64)>,
    /// Whether the VM has a PCI bus (the device tree then has its host bridge).
    pub pci: bool,
}

/// Loads the kernel and the initramfs; the device tree is written by [`finish_platform`],
/// once the vCPUs exist.
pub fn load_boot_images(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    _virtio: &[VirtioSlot],
    pci: bool,
) -> Result<Entry, VmError> {
    let kernel = boot::load_kernel(mem, &cfg.kernel)?;
    let initrd_size = cfg.initrd.as_deref().map(boot::initrd_size).transpose()?;
    let place = boot::place(cfg.memory, kernel.end, initrd_size)?;
    if let (Some(path), Some((start, end))) = (&cfg.initrd, place.initrd) {
        boot::load_initrd(mem, path, start, end - start)?;
    }
    let entry = Entry {
        pc: kernel.entry,
        fdt: place.fdt,
        initrd: place.initrd,
        pci,
    };
    tracing::info!(?entry, kernel_end = kernel.end, "kernel loaded");
    Ok(entry)
}

/// Once every vCPU is created, before any device: initialises each (PSCI 0.2; all but the
/// boot vCPU powered off), then the GIC, which KVM wants before it takes an irqfd.
pub fn init_vcpus(platform: &Platform, vm: &VmFd, vcpus: &[VcpuFd]) -> Result<(), VmError> {
    for (index, fd) in (0..=u8::MAX).zip(vcpus) {
        regs::init_vcpu(vm, fd, index)?;
    }
    platform.gic.init()
}

/// Sets the boot vCPU's registers for `entry`; the others wait for the guest's PSCI `CPU_ON`.
pub fn configure_vcpu(
    _kvm: &Kvm,
    fd: &VcpuFd,
    index: u8,
    _cfg: &VmConfig,
    entry: Entry,
) -> Result<(), VmError> {
    if index == 0 {
        regs::set_boot_regs(fd, entry.pc, entry.fdt)?;
    }
    Ok(())
}

/// Once every vCPU is configured: writes the device tree with the vCPUs' MPIDRs.
pub fn finish_platform(
    platform: &Platform,
    vcpus: &[VcpuFd],
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    virtio: &[VirtioSlot],
    entry: Entry,
) -> Result<(), VmError> {
    let mpidrs = vcpus
        .iter()
        .map(regs::read_mpidr)
        .collect::<Result<Vec<_>, _>>()?;
    let blob = fdt::build(&fdt::FdtConfig {
        memory: cfg.memory,
        mpidrs: &mpidrs,
        cmdline: &cfg.cmdline,
        initrd: entry.initrd,
        virtio,
        rng_seed: &rng_seed(),
        pci: entry.pci.then_some(fdt::PciHost {
            msi: platform.its.is_some(),
        }),
    })
    .map_err(boot::BootError::from)?;
    mem.write_slice(&blob, GuestAddress(entry.fdt))
        .map_err(boot::BootError::from)?;
    tracing::info!(
        "device tree: {} bytes at {:#x}, {} vCPUs",
        blob.len(),
        entry.fdt,
        mpidrs.len()
    );
    Ok(())
}

/// 64 bytes from the host's `getrandom()` for the device tree's seed; none (with a warning)
/// where the host cannot give them, as the guest then still seeds itself, only later.
fn rng_seed() -> Vec<u8> {
    let mut seed = vec![0u8; 64];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), libc::GRND_NONBLOCK) };
    if n != seed.len() as isize {
        tracing::warn!(
            "no random seed for the guest's device tree: {}",
            std::io::Error::last_os_error()
        );
        seed.clear();
    }
    seed
}
