//! The in-kernel GICv3: created with `KVM_CREATE_DEVICE` before the vCPUs, initialised once
//! every vCPU exists (the redistributors are per vCPU; no vCPU can be added after) and before
//! any device registers an irqfd (KVM refuses one with EAGAIN until then). For a VM with PCI
//! devices, an ITS beside it (KVM's emulation of the GICv3 Interrupt Translation Service) turns
//! their MSI-X messages into LPIs.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_ITS_ADDR_TYPE, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::layout::{GIC_DIST_BASE, GIC_ITS_BASE, GIC_REDIST_BASE, SPI_COUNT};
use crate::error::VmError;

/// Interrupt IDs the GIC implements: the 32 private ones (SGIs, PPIs), then tandem's SPIs.
/// KVM wants a multiple of 32.
pub const NR_IRQS: u32 = 32 + SPI_COUNT;
const _: () = assert!(NR_IRQS % 32 == 0 && NR_IRQS >= 64 && NR_IRQS <= 1024);

/// PPIs (as the FDT numbers them: interrupt ID - 16) of the architected timer: secure
/// physical, non-secure physical, virtual, hypervisor.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// PPI of the GIC's virtual maintenance interrupt.
pub const MAINTENANCE_PPI: u32 = 9;

/// The VM's GICv3 device.
pub struct Gic {
    fd: DeviceFd,
}

impl Gic {
    /// Creates the GICv3 with its distributor and redistributors at the addresses of
    /// [`super::layout`], and [`NR_IRQS`] interrupts.
    pub fn create(vm: &VmFd) -> Result<Self, VmError> {
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = vm
            .create_device(&mut dev)
            .map_err(VmError::kvm("KVM_CREATE_DEVICE (GICv3)"))?;
        let gic = Self { fd };
        gic.set_addr(KVM_VGIC_V3_ADDR_TYPE_DIST, GIC_DIST_BASE)?;
        gic.set_addr(KVM_VGIC_V3_ADDR_TYPE_REDIST, GIC_REDIST_BASE)?;
        let nr_irqs: u32 = NR_IRQS;
        gic.fd
            .set_device_attr(&kvm_device_attr {
                group: KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
                attr: 0,
                addr: &nr_irqs as *const u32 as u64,
                flags: 0,
            })
            .map_err(VmError::kvm("KVM_SET_DEVICE_ATTR (GIC interrupts)"))?;
        Ok(gic)
    }

    fn set_addr(&self, kind: u32, addr: u64) -> Result<(), VmError> {
        set_addr(&self.fd, kind, addr).map_err(VmError::kvm("KVM_SET_DEVICE_ATTR (GIC address)"))
    }

    /// Initialises the GIC; call once every vCPU is created and initialised (none can be added
    /// after).
    pub fn init(&self) -> Result<(), VmError> {
        ctrl_init(&self.fd).map_err(VmError::kvm("KVM_DEV_ARM_VGIC_CTRL_INIT"))
    }
}

fn set_addr(fd: &DeviceFd, kind: u32, addr: u64) -> Result<(), kvm_ioctls::Error> {
    // KVM reads the address from the u64 at `addr` during the call.
    fd.set_device_attr(&kvm_device_attr {
        group: KVM_DEV_ARM_VGIC_GRP_ADDR,
        attr: kind.into(),
        addr: &addr as *const u64 as u64,
        flags: 0,
    })
}

fn ctrl_init(fd: &DeviceFd) -> Result<(), kvm_ioctls::Error> {
    fd.set_device_attr(&kvm_device_attr {
        group: KVM_DEV_ARM_VGIC_GRP_CTRL,
        attr: KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
        addr: 0,
        flags: 0,
    })
}

/// The VM's ITS, at [`GIC_ITS_BASE`]: the guest's MSI-X vectors write their messages to its
/// GITS_TRANSLATER register, and tandem's MSI routes (with the requester ID as device ID, see
/// [`crate::irq`]) reach it through KVM.
pub struct Its {
    _fd: DeviceFd,
}

impl Its {
    /// Creates the ITS at [`GIC_ITS_BASE`] (after the GICv3; KVM initialises an ITS at once,
    /// with no ordering against the GIC's own initialisation). `Ok(None)` where the host's KVM
    /// has no ITS emulation.
    pub fn create(vm: &VmFd) -> Result<Option<Self>, VmError> {
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
            fd: 0,
            flags: 0,
        };
        let fd = match vm.create_device(&mut dev) {
            Ok(fd) => fd,
            Err(e) if e.errno() == libc::ENODEV => return Ok(None),
            Err(e) => return Err(VmError::kvm("KVM_CREATE_DEVICE (ITS)")(e)),
        };
        set_addr(&fd, KVM_VGIC_ITS_ADDR_TYPE, GIC_ITS_BASE)
            .map_err(VmError::kvm("KVM_SET_DEVICE_ATTR (ITS address)"))?;
        ctrl_init(&fd).map_err(VmError::kvm("KVM_DEV_ARM_VGIC_CTRL_INIT (ITS)"))?;
        Ok(Some(Its { _fd: fd }))
    }
}
