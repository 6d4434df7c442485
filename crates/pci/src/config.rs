//! A type-0 PCI configuration space (PCI Local Bus 3.0, section 6): the standard header, BARs
//! with the sizing protocol, and a capability list. Registers the guest may not change are
//! protected by a per-bit write mask, so no guest write can corrupt IDs, BAR sizes or the list.

/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Command: the device answers memory accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx is disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Offset of the status register.
pub const STATUS: usize = 0x06;
/// Status: a capability list is present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status: the device asserts INTx (read-only, set by the device).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Offset of the capabilities pointer.
pub const CAP_POINTER: usize = 0x34;
/// Offset of the interrupt line register.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Where capabilities start.
const CAP_START: usize = 0x40;
/// Size of the configuration space tandem models (conventional PCI).
pub const CONFIG_SIZE: usize = 256;

/// What a BAR maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    Memory32,
    /// 64-bit memory (takes two BAR slots).
    Memory64 {
        /// Prefetchable (no side effects on reads: shared memory, not registers).
        prefetchable: bool,
    },
}

/// A BAR as the device placed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Its index (0-5).
    pub index: usize,
    /// Kind.
    pub kind: BarKind,
    /// Guest-physical address.
    pub addr: u64,
    /// Size (a power of two, at least 16 bytes).
    pub size: u64,
}

/// Why a BAR or capability could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR index out of range or already used.
    #[error("BAR {0} is out of range or taken")]
    BarSlot(usize),
    /// BAR size not a power of two of at least 4 KiB, or address not aligned to it.
    #[error("BAR {index}: size {size:#x} at {addr:#x} is not a naturally aligned power of two")]
    BarGeometry {
        /// The BAR.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// No room for the capability.
    #[error("the capability list is full")]
    CapabilitySpace,
}

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciId {
    /// Vendor.
    pub vendor: u16,
    /// Device.
    pub device: u16,
    /// Class code (base class << 16 | subclass << 8 | programming interface).
    pub class: u32,
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor.
    pub subsystem_vendor: u16,
    /// Subsystem.
    pub subsystem: u16,
}

/// One function's configuration space.
#[derive(Debug, Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: Vec<Bar>,
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    /// A header for `id`, with `pin` as its INTx pin (0: none, 1-4: INTA-INTD).
    pub fn new(id: PciId, pin: u8) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: Vec::new(),
            last_cap: None,
            next_cap: CAP_START,
        };
        c.put(0x00, &id.vendor.to_le_bytes());
        c.put(0x02, &id.device.to_le_bytes());
        c.put(0x08, &[id.revision]);
        c.put(0x09, &id.class.to_le_bytes()[..3]);
        c.put(0x2c, &id.subsystem_vendor.to_le_bytes());
        c.put(0x2e, &id.subsystem.to_le_bytes());
        c.put(0x3d, &[pin]);
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE | 1;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Places BAR `index`; the guest can size it and read it, not move it (see
    /// [`PciConfig::bar_moves`]).
    pub fn add_bar(&mut self, bar: Bar) -> Result<(), ConfigError> {
        let slots = match bar.kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 { .. } => 2,
        };
        let taken = |i: usize| {
            self.bars.iter().any(|b| {
                b.index == i || (matches!(b.kind, BarKind::Memory64 { .. }) && b.index + 1 == i)
            })
        };
        if bar.index + slots > 6 || (bar.index..bar.index + slots).any(taken) {
            return Err(ConfigError::BarSlot(bar.index));
        }
        let fits32 = matches!(bar.kind, BarKind::Memory64 { .. }) || bar.addr + bar.size <= 1 << 32;
        if !bar.size.is_power_of_two()
            || bar.size < 16
            || !bar.addr.is_multiple_of(bar.size)
            || !fits32
        {
            return Err(ConfigError::BarGeometry {
                index: bar.index,
                addr: bar.addr,
                size: bar.size,
            });
        }
        let flags: u64 = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 { prefetchable } => 0b100 | if prefetchable { 0b1000 } else { 0 },
        };
        let off = BAR0 + 4 * bar.index;
        let value = bar.addr | flags;
        let mask = !(bar.size - 1);
        self.put(off, &value.to_le_bytes()[..4 * slots]);
        // Address bits are writable (for sizing); the flag bits and the size's bits are not.
        self.writable[off..off + 4 * slots]
            .copy_from_slice(&(mask & !0xf).to_le_bytes()[..4 * slots]);
        self.bars.push(bar);
        Ok(())
    }

    /// The BARs as placed.
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// BARs whose register the guest has set to another address than the one tandem placed them
    /// at (sizing in progress does not count); the device stays at its address.
    pub fn bar_moves(&self) -> Vec<(Bar, u64)> {
        self.bars
            .iter()
            .filter_map(|b| {
                let off = BAR0 + 4 * b.index;
                let lo = u64::from(self.read_u32(off)) & !0xf;
                let addr = match b.kind {
                    BarKind::Memory32 => lo,
                    BarKind::Memory64 { .. } => lo | u64::from(self.read_u32(off + 4)) << 32,
                };
                let sizing = addr
                    == !(b.size - 1)
                        & if matches!(b.kind, BarKind::Memory32) {
                            0xffff_fff0
                        } else {
                            !0xf
                        };
                (addr != b.addr && !sizing).then_some((*b, addr))
            })
            .collect()
    }

    /// Appends a capability: `body` starts after the ID and next-pointer bytes; `writable` masks
    /// the bits of `body` the guest may change. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let off = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        if off + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace);
        }
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.put(off + 2, body);
        for (i, m) in writable.iter().take(body.len()).enumerate() {
            self.writable[off + 2 + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => self.bytes[CAP_POINTER] = off as u8,
        }
        let status =
            u16::from_le_bytes([self.bytes[STATUS], self.bytes[STATUS + 1]]) | STATUS_CAP_LIST;
        self.put(STATUS, &status.to_le_bytes());
        self.last_cap = Some(off);
        self.next_cap = off + len;
        Ok(off)
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`; anything else reads as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(b) if matches!(data.len(), 1 | 2 | 4) && offset.is_multiple_of(data.len()) => {
                data.copy_from_slice(b)
            }
            _ => data.fill(0xff),
        }
    }

    /// A dword at a dword-aligned `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes `data` at `offset` through the write mask; misaligned or odd-sized writes are
    /// ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4)
            || !offset.is_multiple_of(data.len())
            || offset + data.len() > CONFIG_SIZE
        {
            tracing::debug!(offset, len = data.len(), "PCI config write ignored");
            return;
        }
        for (i, v) in data.iter().enumerate() {
            let m = self.writable[offset + i];
            let b = &mut self.bytes[offset + i];
            *b = (*b & !m) | (v & m);
        }
    }

    /// Sets device-owned bits that the guest cannot write (e.g. the status register's interrupt
    /// bit, or an MSI-X pending bit).
    pub fn set_device_bits(&mut self, offset: usize, mask: u8, on: bool) {
        if let Some(b) = self.bytes.get_mut(offset) {
            if on {
                *b |= mask;
            } else {
                *b &= !mask;
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId {
            vendor: 0x1af4,
            device: 0x1110,
            class: 0x050000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    #[test]
    fn the_header_reads_back_and_ids_cannot_be_written() {
        let mut c = PciConfig::new(id(), 1);
        assert_eq!(c.read_u32(0), 0x1110_1af4);
        assert_eq!(c.read_u32(8), 0x0500_0001);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.read_u32(0), 0x1110_1af4);
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
        assert_eq!(c.read_u32(0x3c) >> 8 & 0xff, 1, "INTA");
        c.write(INTERRUPT_LINE, &[10]);
        assert_eq!(c.read_u32(0x3c) & 0xff, 10);
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.command(),
            0x0407,
            "only I/O, memory, bus master and INTx disable stick"
        );
    }

    #[test]
    fn bars_size_like_hardware_and_report_moves() {
        let mut c = PciConfig::new(id(), 0);
        c.add_bar(Bar {
            index: 0,
            kind: BarKind::Memory32,
            addr: 0xe000_0000,
            size: 0x1000,
        })
        .unwrap();
        c.add_bar(Bar {
            index: 2,
            kind: BarKind::Memory64 { prefetchable: true },
            addr: 0xe100_0000,
            size: 0x10_0000,
        })
        .unwrap();
        assert_eq!(c.read_u32(BAR0), 0xe000_0000);
        assert_eq!(c.read_u32(BAR0 + 8), 0xe100_000c);
        assert_eq!(c.read_u32(BAR0 + 12), 0);
        // Sizing: all ones in, the size mask (and the flags) out.
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0), 0xffff_f000);
        c.write(BAR0 + 8, &[0xff; 4]);
        c.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0 + 8), 0xfff0_000c);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_ffff);
        assert!(c.bar_moves().is_empty(), "sizing is not a move");
        c.write(BAR0, &0xe000_0000u32.to_le_bytes());
        c.write(BAR0 + 8, &0xe100_0000u32.to_le_bytes());
        c.write(BAR0 + 12, &[0; 4]);
        assert!(c.bar_moves().is_empty());
        c.write(BAR0, &0xe800_0000u32.to_le_bytes());
        assert_eq!(c.bar_moves().len(), 1);
        // Unused BARs read as zero and stay zero.
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0 + 4), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = PciConfig::new(id(), 0);
        let bar = |index, addr, size| Bar {
            index,
            kind: BarKind::Memory32,
            addr,
            size,
        };
        assert!(c.add_bar(bar(6, 0xe000_0000, 0x1000)).is_err());
        assert!(c.add_bar(bar(0, 0xe000_0800, 0x1000)).is_err());
        assert!(c.add_bar(bar(0, 0xe000_0000, 0x1800)).is_err());
        c.add_bar(Bar {
            index: 4,
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            addr: 0xe000_0000,
            size: 0x1000,
        })
        .unwrap();
        assert_eq!(
            c.add_bar(bar(5, 0xe001_0000, 0x1000)),
            Err(ConfigError::BarSlot(5))
        );
    }

    #[test]
    fn capabilities_chain_and_only_masked_bits_are_writable() {
        let mut c = PciConfig::new(id(), 0);
        let a = c
            .add_capability(0x11, &[0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0])
            .unwrap();
        let b = c.add_capability(0x09, &[4, 1], &[]).unwrap();
        assert_eq!(
            c.read_u32(STATUS - 2) >> 16 & u32::from(STATUS_CAP_LIST),
            u32::from(STATUS_CAP_LIST)
        );
        assert_eq!(c.read_u32(CAP_POINTER) & 0xff, a as u32);
        assert_eq!(c.read_u32(a) & 0xffff, 0x11 | (b as u32) << 8);
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(c.read_u32(a) >> 16, 0xc000);
        // Misaligned and odd-sized accesses.
        c.write(a + 1, &[0, 0]);
        assert_eq!(c.read_u32(a) & 0xff00, (b as u32) << 8);
        let mut d = [0u8; 2];
        c.read(CONFIG_SIZE - 1, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
