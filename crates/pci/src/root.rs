//! The PCI root: bus 0 behind a host bridge, reached through configuration mechanism #1 (the
//! address register at port 0xcf8, the data window at 0xcfc-0xcff), as every x86 OS knows it,
//! or through an ECAM window (PCI Express 5.0, section 7.2.2: function `bus:dev.fn`'s 4 KiB of
//! configuration space at `bus << 20 | dev << 15 | fn << 12`), as a device tree's
//! `pci-host-ecam-generic` host bridge describes it on Arm. Which one a VM gets is its
//! architecture's choice.

use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::config::{PciConfig, PciId};

/// First port of configuration mechanism #1.
pub const CONFIG_PORT: u16 = 0xcf8;
/// Ports it spans (address and data).
pub const CONFIG_PORTS: u16 = 8;
/// Device slots on bus 0 (slot 0 is the host bridge).
pub const SLOTS: usize = 32;
const ENABLE: u32 = 1 << 31;
/// Bytes of configuration space per function in an ECAM window.
pub const ECAM_FUNCTION_SIZE: u64 = 1 << 12;
/// Bytes of an ECAM window per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// Its configuration space, to be written.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Called after the guest wrote `len` bytes at `offset` of the configuration space.
    fn config_written(&mut self, _offset: usize, _len: usize) {}
}

/// The host bridge at 00:00.0 (class 06 00 00). It has no BARs; Linux checks that bus 0 holds a
/// host bridge before it trusts configuration mechanism #1.
pub struct HostBridge(PciConfig);

impl HostBridge {
    /// Red Hat's ID for a virtual PCIe host bridge, as QEMU's microvm uses.
    pub fn new() -> Self {
        HostBridge(PciConfig::new(
            PciId {
                vendor: 0x1b36,
                device: 0x0008,
                class: 0x06_00_00,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            },
            0,
        ))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
}

/// Why a device could not be plugged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    /// Every slot is taken.
    #[error("no free PCI slot (at most {} devices)", SLOTS - 1)]
    Full,
}

/// Bus 0 and its configuration ports.
pub struct PciRoot {
    address: u32,
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    warned_moves: bool,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciRoot {
            address: 0,
            slots,
            warned_moves: false,
        }
    }

    /// Plugs `dev` into the first free slot; returns the slot number.
    pub fn plug(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<usize, RootError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(RootError::Full)?;
        self.slots[slot] = Some(dev);
        Ok(slot)
    }

    /// Function `function` of slot `slot` on bus `bus`, if it exists (bus 0, function 0 of an
    /// occupied slot).
    fn function(&self, bus: u32, slot: u32, function: u32) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(slot as usize)?.as_ref()
    }

    /// The function the address register selects, and the register offset, if it is one that
    /// exists.
    fn selected(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, usize)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let dev = self.function(
            (self.address >> 16) & 0xff,
            (self.address >> 11) & 0x1f,
            (self.address >> 8) & 0x7,
        )?;
        Some((dev, (self.address & 0xfc) as usize))
    }

    /// The function an ECAM offset names, and the register within its 4 KiB.
    fn ecam_selected(&self, offset: u64) -> Option<(Arc<Mutex<dyn PciDevice>>, usize)> {
        let bus = u32::try_from(offset / ECAM_BUS_SIZE).ok()?;
        let dev = self.function(
            bus,
            (offset >> 15) as u32 & 0x1f,
            (offset >> 12) as u32 & 0x7,
        )?;
        Some((dev.clone(), (offset % ECAM_FUNCTION_SIZE) as usize))
    }

    /// Writes `data` at register `at` of `dev`'s configuration space.
    fn write_config(&mut self, dev: &Arc<Mutex<dyn PciDevice>>, at: usize, data: &[u8]) {
        let Ok(mut d) = dev.lock() else {
            return;
        };
        d.config_mut().write(at, data);
        d.config_written(at, data.len());
        let cfg = d.config();
        if !self.warned_moves && cfg.command() & crate::config::COMMAND_MEMORY != 0 {
            if let Some((bar, to)) = cfg.bar_moves().first() {
                tracing::warn!(
                    "the guest moved BAR {} from {:#x} to {to:#x}; tandem does not relocate BARs, the device stays at {:#x}",
                    bar.index, bar.addr, bar.addr
                );
                self.warned_moves = true;
            }
        }
    }

    /// A read of `data.len()` bytes at `offset` of the ECAM window. Accesses of 1, 2 or 4
    /// naturally aligned bytes within the 256 bytes of a function that exists read its
    /// configuration space; anything else reads all ones (no device, or no such register).
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((dev, reg)) = self.ecam_selected(offset) else {
            data.fill(0xff);
            return;
        };
        let Ok(d) = dev.lock() else {
            data.fill(0xff);
            return;
        };
        // PciConfig answers all ones to a size, alignment or offset it does not have.
        d.config().read(reg, data);
    }

    /// A write of `data` at `offset` of the ECAM window; one to a function that does not exist,
    /// or of a size or alignment configuration space does not take, is ignored.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, reg)) = self.ecam_selected(offset) {
            self.write_config(&dev, reg, data);
        }
    }

    /// A read of `data.len()` bytes at `offset` (0-7) of the configuration ports.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, n) if (offset as usize).is_multiple_of(n) && offset as usize - 4 + n <= 4 => {
                match self.selected() {
                    Some((dev, reg)) => match dev.lock() {
                        Ok(d) => d.config().read(reg + offset as usize - 4, data),
                        Err(_) => data.fill(0xff),
                    },
                    // Nothing there: all ones, which reads as vendor 0xffff (no device).
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// A write of `data` at `offset` (0-7) of the configuration ports.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            (4..=7, n) if (offset as usize).is_multiple_of(n) && offset as usize - 4 + n <= 4 => {
                let Some((dev, reg)) = self.selected() else {
                    return;
                };
                let dev = dev.clone();
                self.write_config(&dev, reg + offset as usize - 4, data);
            }
            // Linux's type-1 probe writes a byte to 0xcfb; such writes select nothing.
            _ => {}
        }
    }
}

impl MutDevicePio for PciRoot {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.read(offset.into(), data);
    }
    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.write(offset.into(), data);
    }
}

impl MutDeviceMmio for PciRoot {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.ecam_read(offset, data);
    }
    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.ecam_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &mut PciRoot, slot: u32, reg: u32) {
        root.write(0, &(ENABLE | slot << 11 | reg).to_le_bytes());
    }

    fn read32(root: &mut PciRoot) -> u32 {
        let mut d = [0u8; 4];
        root.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn linux_type1_probe_finds_the_host_bridge() {
        let mut root = PciRoot::new();
        // pci_check_type1: a byte to 0xcfb, then the address register must hold what is written.
        root.write(3, &[1]);
        root.write(0, &ENABLE.to_le_bytes());
        let mut d = [0u8; 4];
        root.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), ENABLE);
        select(&mut root, 0, 0);
        assert_eq!(read32(&mut root), 0x0008_1b36);
        select(&mut root, 0, 8);
        assert_eq!(read32(&mut root) >> 8, 0x06_00_00);
    }

    #[test]
    fn empty_slots_other_buses_and_functions_read_all_ones() {
        let mut root = PciRoot::new();
        select(&mut root, 5, 0);
        assert_eq!(read32(&mut root), 0xffff_ffff);
        root.write(0, &(ENABLE | 1 << 16).to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff);
        root.write(0, &(ENABLE | 1 << 8).to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff);
        root.write(0, &0u32.to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff, "the enable bit is clear");
    }

    #[test]
    fn plugged_devices_take_the_next_slots_and_sub_dword_access_works() {
        let mut root = PciRoot::new();
        let slot = root.plug(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        assert_eq!(slot, 1);
        select(&mut root, 1, 0);
        let mut w = [0u8; 2];
        root.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        let mut b = [0u8; 1];
        root.read(4, &mut b);
        assert_eq!(b[0], 0x36);
        // A misaligned word straddles the window: all ones.
        root.read(7, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        for _ in 2..SLOTS {
            root.plug(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        }
        assert!(root.plug(Arc::new(Mutex::new(HostBridge::new()))).is_err());
    }

    fn ecam(slot: u64, function: u64, reg: u64) -> u64 {
        slot << 15 | function << 12 | reg
    }

    fn ecam_read32(root: &mut PciRoot, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        root.ecam_read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ecam_reads_each_slot_at_its_offset_and_nothing_elsewhere() {
        let mut root = PciRoot::new();
        root.plug(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        assert_eq!(ecam_read32(&mut root, ecam(0, 0, 0)), 0x0008_1b36);
        assert_eq!(ecam_read32(&mut root, ecam(1, 0, 8)) >> 8, 0x06_00_00);
        let mut w = [0u8; 2];
        root.ecam_read(ecam(1, 0, 2), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        // An empty slot, another function, another bus (the window has 16): all ones.
        assert_eq!(ecam_read32(&mut root, ecam(2, 0, 0)), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut root, ecam(1, 1, 0)), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut root, ECAM_BUS_SIZE), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut root, 15 * ECAM_BUS_SIZE), 0xffff_ffff);
        // Extended configuration space (from 0x100) is not there: a conventional PCI function.
        assert_eq!(ecam_read32(&mut root, ecam(1, 0, 0x100)), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut root, ecam(1, 0, 0xffc)), 0xffff_ffff);
    }

    #[test]
    fn ecam_writes_reach_the_function_through_its_write_mask() {
        let mut root = PciRoot::new();
        root.plug(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        let cmd = ecam(1, 0, crate::config::COMMAND as u64);
        root.ecam_write(cmd, &0xffffu16.to_le_bytes());
        let mut w = [0u8; 2];
        root.ecam_read(cmd, &mut w);
        // Only I/O, memory, bus master and INTx disable are writable.
        assert_eq!(u16::from_le_bytes(w), 0x0407);
        // IDs are read-only.
        root.ecam_write(ecam(1, 0, 0), &0u32.to_le_bytes());
        assert_eq!(ecam_read32(&mut root, ecam(1, 0, 0)), 0x0008_1b36);
        // Slot 0 is untouched by a write to slot 1.
        root.ecam_read(ecam(0, 0, crate::config::COMMAND as u64), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0);
    }

    #[test]
    fn odd_ecam_accesses_from_the_guest_are_harmless() {
        let mut root = PciRoot::new();
        root.plug(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        // Misaligned, odd-sized, 8-byte, empty and far out of range: all ones, nothing written,
        // no panic.
        for (offset, len) in [
            (ecam(1, 0, 1), 2),
            (ecam(1, 0, 2), 4),
            (ecam(1, 0, 0), 3),
            (ecam(1, 0, 0), 8),
            (ecam(1, 0, 0xfff), 4),
            (ecam(1, 0, 0xfff), 1),
            (u64::MAX - 3, 4),
            (u64::MAX, 1),
            (1 << 40, 4),
        ] {
            let mut d = vec![0u8; len];
            root.ecam_read(offset, &mut d);
            assert!(d.iter().all(|&b| b == 0xff), "{offset:#x}/{len}: {d:?}");
            root.ecam_write(offset, &vec![0xaa; len]);
        }
        let mut none: [u8; 0] = [];
        root.ecam_read(ecam(1, 0, 0), &mut none);
        root.ecam_write(ecam(1, 0, 4), &[]);
        assert_eq!(ecam_read32(&mut root, ecam(1, 0, 0)), 0x0008_1b36);
        let mut w = [0u8; 2];
        root.ecam_read(ecam(1, 0, 4), &mut w);
        assert_eq!(w, [0, 0], "the command register was not written");
    }
}
