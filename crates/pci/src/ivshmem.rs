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

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use crate::config::{
    Bar, BarKind, ConfigError, PciConfig, PciId, COMMAND_INTX_DISABLE, STATUS, STATUS_INTERRUPT,
};
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

/// Connects and disconnects the doorbell interrupt (the VMM's irqfd) as the guest enables and
/// disables INTx in the command register.
pub type IntxGate = Box<dyn FnMut(bool) + Send>;

/// An ivshmem function.
pub struct Ivshmem {
    config: PciConfig,
    peer_id: u16,
    intr_mask: u32,
    intr_status: u32,
    doorbell: bool,
    gate: Option<IntxGate>,
    /// Whether INTx was enabled when the gate last heard of it.
    intx_on: bool,
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
            intx_on: true,
        };
        dev.update_status();
        Ok(dev)
    }

    /// Calls `gate(false)` when the guest disables INTx and `gate(true)` when it enables it
    /// again, so doorbells reach a guest only while it accepts them: a peer that rings
    /// continuously cannot interrupt a guest that has turned the interrupt off. (INTx starts
    /// enabled, as after reset.)
    pub fn set_intx_gate(&mut self, gate: IntxGate) {
        self.gate = Some(gate);
    }

    /// The interrupt-status bit of the PCI status register. Doorbells reach the guest through
    /// KVM (an irqfd), never through this model, so the device cannot know whether one is
    /// pending; it reports "pending" whenever INTx is enabled. That is what a driver using INTx
    /// masking needs (`uio_pci_generic`: its handler masks INTx when the bit is set, and user
    /// space unmasks it before it waits again); a spurious interrupt then counts as an event,
    /// which such drivers' users must tolerate anyway.
    fn update_status(&mut self) {
        let enabled = self.config.command() & COMMAND_INTX_DISABLE == 0;
        self.config
            .set_device_bits(STATUS, STATUS_INTERRUPT as u8, self.doorbell && enabled);
        if enabled != self.intx_on {
            self.intx_on = enabled;
            if let Some(gate) = self.gate.as_mut() {
                gate(enabled);
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

impl MutDeviceMmio for Ivshmem {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read_reg(offset, data);
    }
    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write_reg(offset, data);
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
        d.set_intx_gate(Box::new(move |on| log.lock().unwrap().push(on)));
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

    #[test]
    fn the_shared_memory_must_be_a_power_of_two() {
        assert!(Ivshmem::new(0, 0xe000_0000, 0xe100_0000, 3 << 20, false).is_err());
    }
}
