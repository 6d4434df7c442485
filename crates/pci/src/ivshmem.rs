//! ivshmem: inter-VM shared memory as QEMU's `ivshmem-plain` and `ivshmem-doorbell` present it
//! (QEMU's docs/specs/ivshmem-spec), so existing guest code finds it: vendor 0x1af4, device
//! 0x1110, class 05 00 (RAM), BAR0 the registers, BAR2 the shared memory.
//!
//! BAR0 (256 bytes):
//!
//! | offset | register | |
//! | --- | --- | --- |
//! | 0x00 | IntrMask | read/write (INTx only) |
//! | 0x04 | IntrStatus | read clears it (INTx only) |
//! | 0x08 | IVPosition | read-only: this VM's peer ID |
//! | 0x0c | Doorbell | write-only: peer ID << 16 \| vector |
//!
//! BAR2 is plain guest memory (a KVM memory slot over the shared object), so data moves between
//! VMs without any exit. Doorbells are served by KVM (an ioeventfd per peer and vector), not here:
//! a doorbell write that reaches this model has no peer behind it and is dropped.
//!
//! With doorbells the function also has MSI-X (one vector, table and PBA in BAR1, as QEMU's
//! `ivshmem-doorbell`). A guest that enables it gets each doorbell as a message signalled
//! interrupt that KVM injects from the peer's ioeventfd through this VM's irqfd: nothing per
//! interrupt passes through tandem or configuration space. A guest that leaves MSI-X off gets
//! INTA, which drivers such as `uio_pci_generic` mask and unmask through the command register.

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use std::sync::Arc;

use crate::config::{
    Bar, BarKind, ConfigError, PciConfig, PciId, COMMAND_INTX_DISABLE, STATUS, STATUS_INTERRUPT,
};
use crate::msix::{MsiRouter, Msix, Vector};
use crate::root::PciDevice;

/// Size of the register BAR.
pub const REGS_SIZE: u64 = 256;
/// Offset of the doorbell register in BAR0.
pub const DOORBELL: u64 = 0x0c;
const INTR_MASK: u64 = 0x00;
const INTR_STATUS: u64 = 0x04;
const IV_POSITION: u64 = 0x08;

/// The PCI identity of ivshmem.
pub const IVSHMEM_ID: PciId = PciId {
    vendor: 0x1af4,
    device: 0x1110,
    class: 0x05_00_00,
    revision: 1,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
};

/// Size of the MSI-X BAR (BAR1): the table at 0, the PBA at [`MSIX_PBA`].
pub const MSIX_BAR_SIZE: u64 = 4096;
/// Offset of the pending-bit array in BAR1.
pub const MSIX_PBA: u64 = 2048;

/// Where this VM's doorbell interrupt goes: the irqfd of the doorbell eventfd is bound to the
/// INTx line, to the MSI-X vector's GSI, or to nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellRoute {
    /// Not delivered (INTx disabled, or the MSI-X vector masked): doorbells stay pending in the
    /// eventfd and arrive when a route opens again.
    Off,
    /// INTA.
    Intx,
    /// The MSI-X vector.
    Msix,
}

/// Moves the doorbell interrupt (the VMM's irqfd) between INTx, MSI-X and nothing as the guest
/// enables and masks them.
pub type DoorbellGate = Box<dyn FnMut(DoorbellRoute) + Send>;

/// An ivshmem function.
pub struct Ivshmem {
    config: PciConfig,
    peer_id: u16,
    intr_mask: u32,
    intr_status: u32,
    doorbell: bool,
    gate: Option<DoorbellGate>,
    /// Where the gate last sent the doorbell interrupt.
    route: DoorbellRoute,
    msix: Option<(Msix, u64)>,
}

impl Ivshmem {
    /// An ivshmem device for peer `peer_id`, its registers at `regs` (256-byte aligned) and the
    /// shared memory of `shm_size` bytes (a power of two) at `shm`. With `doorbell`, it has an
    /// INTx pin (INTA) that peers' doorbells raise.
    pub fn new(
        peer_id: u16,
        regs: u64,
        shm: u64,
        shm_size: u64,
        doorbell: bool,
    ) -> Result<Self, ConfigError> {
        let mut config = PciConfig::new(IVSHMEM_ID, u8::from(doorbell));
        config.add_bar(Bar {
            index: 0,
            kind: BarKind::Memory32,
            addr: regs,
            size: REGS_SIZE,
        })?;
        config.add_bar(Bar {
            index: 2,
            kind: BarKind::Memory64 { prefetchable: true },
            addr: shm,
            size: shm_size,
        })?;
        let mut dev = Ivshmem {
            config,
            peer_id,
            intr_mask: 0,
            intr_status: 0,
            doorbell,
            gate: None,
            route: if doorbell {
                DoorbellRoute::Intx
            } else {
                DoorbellRoute::Off
            },
            msix: None,
        };
        dev.update_status();
        Ok(dev)
    }

    /// Gives a function with doorbells its MSI-X vector: `vector` is this VM's doorbell eventfd
    /// and the GSI `router` keeps routed to what the guest programs; the table and PBA are BAR1
    /// at `bar` (4 KiB).
    pub fn add_msix(
        &mut self,
        bar: u64,
        vector: Vector,
        router: Arc<dyn MsiRouter>,
    ) -> Result<(), ConfigError> {
        self.config.add_bar(Bar {
            index: 1,
            kind: BarKind::Memory32,
            addr: bar,
            size: MSIX_BAR_SIZE,
        })?;
        let msix = Msix::new(
            &mut self.config,
            vec![vector],
            router,
            1,
            0,
            MSIX_PBA as u32,
        )?;
        self.msix = Some((msix, bar));
        Ok(())
    }

    /// Calls `gate(route)` whenever the doorbell interrupt must go elsewhere: to INTx while
    /// the guest has it enabled and MSI-X off, to the MSI-X vector while MSI-X is on and the
    /// vector unmasked, else nowhere. So doorbells reach a guest only while it accepts them: a
    /// peer that rings continuously cannot interrupt a guest that has turned the interrupt
    /// off. (The route starts at INTx, as after reset.)
    pub fn set_doorbell_gate(&mut self, gate: DoorbellGate) {
        self.gate = Some(gate);
    }

    /// Where the doorbell interrupt must go now.
    fn wanted_route(&self) -> DoorbellRoute {
        if !self.doorbell {
            return DoorbellRoute::Off;
        }
        if let Some((msix, _)) = &self.msix {
            let v = msix.vectors();
            if v.enabled() {
                return if v.deliverable(0) {
                    DoorbellRoute::Msix
                } else {
                    DoorbellRoute::Off
                };
            }
        }
        if self.config.command() & COMMAND_INTX_DISABLE == 0 {
            DoorbellRoute::Intx
        } else {
            DoorbellRoute::Off
        }
    }

    fn update_route(&mut self) {
        let wanted = self.wanted_route();
        if wanted != self.route {
            self.route = wanted;
            if let Some(gate) = self.gate.as_mut() {
                gate(wanted);
            }
        }
    }

    /// The interrupt-status bit of the PCI status register. Doorbells reach the guest through
    /// KVM (an irqfd), never through this model, so the device cannot know whether one is
    /// pending; it reports "pending" whenever INTx is enabled. That is what a driver using INTx
    /// masking needs (`uio_pci_generic`: its handler masks INTx when the bit is set, and user
    /// space unmasks it before it waits again); a spurious interrupt then counts as an event,
    /// which such drivers' users must tolerate anyway.
    fn update_status(&mut self) {
        if let Some((msix, _)) = &self.msix {
            msix.config_written(&self.config);
        }
        let intx = self.config.command() & COMMAND_INTX_DISABLE == 0
            && !self
                .msix
                .as_ref()
                .is_some_and(|(m, _)| m.vectors().enabled());
        self.config
            .set_device_bits(STATUS, STATUS_INTERRUPT as u8, self.doorbell && intx);
        self.update_route();
    }

    /// A read of BAR1 (the MSI-X table and PBA).
    fn read_msix(&mut self, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some((m, _)) if offset < MSIX_PBA => m.read_table(offset, data),
            Some((m, _)) if offset < MSIX_BAR_SIZE => m.read_pba(offset - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    /// A write of BAR1: only the table is writable.
    fn write_msix(&mut self, offset: u64, data: &[u8]) {
        if let Some((m, _)) = &self.msix {
            if offset < MSIX_PBA {
                m.write_table(offset, data);
                self.update_route();
            }
        }
    }

    /// Reads a BAR0 register.
    pub fn read_reg(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            INTR_MASK => self.intr_mask,
            INTR_STATUS => std::mem::take(&mut self.intr_status),
            IV_POSITION => u32::from(self.peer_id),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Writes a BAR0 register.
    pub fn write_reg(&mut self, offset: u64, data: &[u8]) {
        let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            return;
        };
        match offset {
            INTR_MASK => self.intr_mask = v,
            INTR_STATUS => self.intr_status = v,
            DOORBELL => tracing::debug!(
                "ivshmem: doorbell for peer {} vector {} has no receiver",
                v >> 16,
                v & 0xffff
            ),
            _ => {}
        }
    }
}

impl PciDevice for Ivshmem {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, _offset: usize, _len: usize) {
        self.update_status();
    }
}

/// BAR0 and BAR1 are two ranges on the MMIO bus, both served here: `base` says which.
impl MutDeviceMmio for Ivshmem {
    fn mmio_read(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if self.msix.as_ref().is_some_and(|(_, bar)| base.0 == *bar) {
            self.read_msix(offset, data);
        } else {
            self.read_reg(offset, data);
        }
    }
    fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if self.msix.as_ref().is_some_and(|(_, bar)| base.0 == *bar) {
            self.write_msix(offset, data);
        } else {
            self.write_reg(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::COMMAND;

    #[test]
    fn config_space_is_what_ivshmem_drivers_look_for() {
        let d = Ivshmem::new(3, 0xe000_0000, 0xe100_0000, 1 << 20, false).unwrap();
        let c = d.config();
        assert_eq!(c.read_u32(0), 0x1110_1af4);
        assert_eq!(c.read_u32(8) >> 8, 0x05_00_00);
        assert_eq!(c.read_u32(0x10), 0xe000_0000);
        assert_eq!(c.read_u32(0x18), 0xe100_000c, "BAR2: 64-bit prefetchable");
        assert_eq!(c.read_u32(0x1c), 0);
    }

    #[test]
    fn registers() {
        let mut d = Ivshmem::new(3, 0xe000_0000, 0xe100_0000, 1 << 20, false).unwrap();
        let mut b = [0u8; 4];
        d.read_reg(IV_POSITION, &mut b);
        assert_eq!(u32::from_le_bytes(b), 3);
        d.write_reg(IV_POSITION, &9u32.to_le_bytes());
        d.read_reg(IV_POSITION, &mut b);
        assert_eq!(u32::from_le_bytes(b), 3, "read-only");
        d.write_reg(INTR_MASK, &0xffu32.to_le_bytes());
        d.read_reg(INTR_MASK, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xff);
        d.write_reg(INTR_STATUS, &1u32.to_le_bytes());
        d.read_reg(INTR_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        d.read_reg(INTR_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "reading clears it");
        let mut short = [0u8; 2];
        d.read_reg(IV_POSITION, &mut short);
        assert_eq!(short, [0, 0]);
        d.write_reg(DOORBELL, &[1]);
    }

    #[test]
    fn with_a_doorbell_intx_reads_pending_while_enabled_as_uio_pci_generic_needs() {
        let mut d = Ivshmem::new(1, 0xe000_0000, 0xe100_0000, 1 << 20, true).unwrap();
        let status = |d: &Ivshmem| (d.config().read_u32(COMMAND) >> 16) as u16;
        assert_eq!(d.config().read_u32(0x3c) >> 8 & 0xff, 1, "INTA");
        assert_ne!(status(&d) & STATUS_INTERRUPT, 0);
        // The handler masks INTx: no longer pending, so user space can unmask it.
        d.config_mut()
            .write(COMMAND, &(COMMAND_INTX_DISABLE | 2).to_le_bytes());
        d.config_written(COMMAND, 2);
        assert_eq!(status(&d) & STATUS_INTERRUPT, 0);
        d.config_mut().write(COMMAND, &2u16.to_le_bytes());
        d.config_written(COMMAND, 2);
        assert_ne!(status(&d) & STATUS_INTERRUPT, 0);
        // Without a doorbell there is no pin and nothing pending.
        let plain = Ivshmem::new(1, 0xe000_0000, 0xe100_0000, 1 << 20, false).unwrap();
        assert_eq!(plain.config().read_u32(0x3c) >> 8 & 0xff, 0);
        assert_eq!(status(&plain) & STATUS_INTERRUPT, 0);
    }

    #[test]
    fn disabling_intx_disconnects_the_doorbell_interrupt_until_it_is_enabled_again() {
        use std::sync::{Arc, Mutex};
        let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
        let log = seen.clone();
        let mut d = Ivshmem::new(1, 0xe000_0000, 0xe100_0000, 1 << 20, true).unwrap();
        d.set_doorbell_gate(Box::new(move |r| {
            log.lock().unwrap().push(r == DoorbellRoute::Intx)
        }));
        let command = |d: &mut Ivshmem, v: u16| {
            d.config_mut().write(COMMAND, &v.to_le_bytes());
            d.config_written(COMMAND, 2);
        };
        command(&mut d, 2);
        assert!(seen.lock().unwrap().is_empty(), "INTx already enabled");
        command(&mut d, COMMAND_INTX_DISABLE | 2);
        command(&mut d, COMMAND_INTX_DISABLE | 6);
        command(&mut d, 2);
        assert_eq!(*seen.lock().unwrap(), vec![false, true]);
    }

    #[derive(Default)]
    struct Routes(std::sync::Mutex<Vec<(u32, crate::msix::MsiMessage)>>);
    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, msg: crate::msix::MsiMessage) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    /// An ivshmem with doorbells and MSI-X, the routes it set, and the gate's calls.
    fn with_msix() -> (
        Ivshmem,
        Arc<Routes>,
        Arc<std::sync::Mutex<Vec<DoorbellRoute>>>,
        usize,
    ) {
        let mut d = Ivshmem::new(1, 0xe000_0000, 0xe100_0000, 1 << 20, true).unwrap();
        let routes = Arc::new(Routes::default());
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        d.add_msix(0xe000_1000, Vector::new(efd, 40), routes.clone())
            .unwrap();
        let seen: Arc<std::sync::Mutex<Vec<DoorbellRoute>>> = Arc::default();
        let log = seen.clone();
        d.set_doorbell_gate(Box::new(move |r| log.lock().unwrap().push(r)));
        // Walk the capability list to MSI-X, as a driver does.
        let mut cap = (d.config().read_u32(0x34) & 0xff) as usize;
        while cap != 0 && d.config().read_u32(cap) & 0xff != u32::from(crate::msix::CAP_ID) {
            cap = ((d.config().read_u32(cap) >> 8) & 0xff) as usize;
        }
        assert_ne!(cap, 0, "an MSI-X capability");
        (d, routes, seen, cap)
    }

    fn msix_control(d: &mut Ivshmem, cap: usize, ctrl: u16) {
        d.config_mut().write(cap + 2, &ctrl.to_le_bytes());
        d.config_written(cap + 2, 2);
    }

    fn bar1_write(d: &mut Ivshmem, offset: u64, v: u32) {
        d.mmio_write(MmioAddress(0xe000_1000), offset, &v.to_le_bytes());
    }

    #[test]
    fn msix_takes_the_doorbell_from_intx_while_enabled_and_unmasked() {
        let (mut d, routes, seen, cap) = with_msix();
        // The capability says one vector, table and PBA in BAR1; BAR1 is 4 KiB of memory.
        assert_eq!(d.config().read_u32(cap) >> 16 & 0x7ff, 0, "table size 1");
        assert_eq!(d.config().read_u32(cap + 4), 1, "table at BAR1 + 0");
        assert_eq!(d.config().read_u32(cap + 8), MSIX_PBA as u32 | 1);
        assert_eq!(d.config().read_u32(0x14), 0xe000_1000);
        // The guest programs vector 0 (still masked), then enables MSI-X: still nowhere.
        bar1_write(&mut d, 0, 0xfee0_0000);
        bar1_write(&mut d, 4, 0);
        bar1_write(&mut d, 8, 0x41);
        msix_control(&mut d, cap, 0x8000);
        assert_eq!(*seen.lock().unwrap(), vec![DoorbellRoute::Off]);
        let status = |d: &Ivshmem| (d.config().read_u32(crate::config::COMMAND) >> 16) as u16;
        assert_eq!(
            status(&d) & STATUS_INTERRUPT,
            0,
            "no INTx pending under MSI-X"
        );
        // Unmasking routes the GSI to the message and moves the doorbell there.
        bar1_write(&mut d, 12, 0);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![DoorbellRoute::Off, DoorbellRoute::Msix]
        );
        let r = routes.0.lock().unwrap().last().copied().unwrap();
        assert_eq!((r.0, r.1.address, r.1.data), (40, 0xfee0_0000, 0x41));
        let mut b = [0u8; 4];
        d.mmio_read(MmioAddress(0xe000_1000), 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x41, "the table reads back");
        // Masking the vector stops it; the function mask too; MSI-X off gives INTx back.
        bar1_write(&mut d, 12, 1);
        bar1_write(&mut d, 12, 0);
        msix_control(&mut d, cap, 0xc000);
        msix_control(&mut d, cap, 0x0000);
        assert_eq!(
            seen.lock().unwrap()[2..],
            [
                DoorbellRoute::Off,
                DoorbellRoute::Msix,
                DoorbellRoute::Off,
                DoorbellRoute::Intx
            ]
        );
        assert_ne!(status(&d) & STATUS_INTERRUPT, 0, "INTx pending again");
        // BAR0 is still the registers.
        d.mmio_read(MmioAddress(0xe000_0000), IV_POSITION, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
    }

    #[test]
    fn bad_msix_accesses_are_ignored() {
        let (mut d, _, seen, _) = with_msix();
        let mut b = [0xffu8; 4];
        d.mmio_read(MmioAddress(0xe000_1000), 0x7f0, &mut b);
        assert_eq!(b, [0; 4], "past the one entry");
        d.mmio_read(MmioAddress(0xe000_1000), 0x1000, &mut b);
        bar1_write(&mut d, 0x7fc, 0);
        bar1_write(&mut d, MSIX_PBA, 0xffff_ffff);
        d.mmio_write(MmioAddress(0xe000_1000), 13, &[1, 2, 3]);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn the_shared_memory_must_be_a_power_of_two() {
        assert!(Ivshmem::new(0, 0xe000_0000, 0xe100_0000, 3 << 20, false).is_err());
    }
}
