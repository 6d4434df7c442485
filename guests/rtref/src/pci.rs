//! The channel (tandem's ivshmem device, docs/channels.md): found on PCI bus 0 through the
//! configuration ports at start-up; the live figures go to the start of its shared memory (BAR2)
//! under a seqlock (layout: tandem_rtref::shm).

use core::cell::Cell;
use core::fmt;
use core::ptr::write_volatile;
use core::sync::atomic::AtomicU32;

use tandem_rtref::shm::{Figures, FIGURES_OFFSET, MAGIC, SEQ_OFFSET, VERSION};

use crate::hw::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const IVSHMEM_ID: u32 = 0x1110_1af4;
const COMMAND: u8 = 0x04;
const COMMAND_MEMORY: u32 = 1 << 1;
const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
const CAPABILITIES: u8 = 0x34;
const CAP_MSIX: u32 = 0x11;
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;
const BAR0: u8 = 0x10;
const BAR1: u8 = 0x14;
const BAR2: u8 = 0x18;
const BAR3: u8 = 0x1c;
const IVPOSITION: u64 = 0x08;
const DOORBELL: u64 = 0x0c;

fn config_read(dev: u8, reg: u8) -> u32 {
    // SAFETY: the PCI configuration mechanism #1 ports; selecting and reading a register of
    // bus 0 has no side effect.
    unsafe {
        outl(
            CONFIG_ADDRESS,
            0x8000_0000 | u32::from(dev) << 11 | u32::from(reg & 0xfc),
        );
        inl(CONFIG_DATA)
    }
}

fn config_write(dev: u8, reg: u8, v: u32) {
    // SAFETY: as config_read; the registers written are the command register and the MSI-X
    // capability's control word.
    unsafe {
        outl(
            CONFIG_ADDRESS,
            0x8000_0000 | u32::from(dev) << 11 | u32::from(reg & 0xfc),
        );
        outl(CONFIG_DATA, v);
    }
}

/// The ivshmem device, its registers and shared memory.
pub struct Channel {
    slot: u8,
    regs: u64,
    shm: u64,
    peer: u32,
    seq: Cell<u32>,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slot={} bar0={:#x} bar2={:#x} peer={}",
            self.slot, self.regs, self.shm, self.peer
        )
    }
}

/// The first ivshmem device on bus 0, with both BARs assigned below 4 GiB (the identity map).
pub fn find_channel() -> Option<Channel> {
    let slot = (0..32u8).find(|&d| config_read(d, 0) == IVSHMEM_ID)?;
    let regs = u64::from(config_read(slot, BAR0) & !0xf);
    let lo = config_read(slot, BAR2);
    let hi = if lo & 0x6 == 0x4 {
        config_read(slot, BAR3)
    } else {
        0
    };
    let shm = u64::from(hi) << 32 | u64::from(lo & !0xf);
    if regs == 0 || shm == 0 || hi != 0 {
        return None;
    }
    config_write(slot, COMMAND, config_read(slot, COMMAND) | COMMAND_MEMORY);
    // SAFETY: BAR0 is the device's 256-byte register block, identity-mapped; IVPosition is a
    // read-only 32-bit register.
    let peer = unsafe { core::ptr::read_volatile((regs + IVPOSITION) as *const u32) };
    let ch = Channel {
        slot,
        regs,
        shm,
        peer,
        seq: Cell::new(0),
    };
    // SAFETY: BAR2 is the channel's shared memory (at least a page), identity-mapped; the record
    // at its start belongs to this guest by the channel's convention (docs/realtime.md).
    unsafe {
        write_volatile((shm + SEQ_OFFSET as u64) as *mut u32, 0);
        write_volatile(shm as *mut u32, MAGIC);
        write_volatile((shm + 4) as *mut u32, VERSION);
    }
    Some(ch)
}

/// Why the channel's MSI-X vector cannot be set up.
#[derive(Debug)]
pub enum MsixError {
    /// The function lists no MSI-X capability (a channel without doorbells).
    NoCapability,
    /// The table is not at the start of BAR1, or BAR1 is not assigned below 4 GiB.
    NoTable(u32),
}

impl fmt::Display for MsixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCapability => write!(
                f,
                "the channel has no MSI-X capability (no doorbells: run under tandem up)"
            ),
            Self::NoTable(bar) => write!(f, "no MSI-X table in BAR1 ({bar:#x})"),
        }
    }
}

impl Channel {
    /// Routes the channel's doorbell to this CPU as MSI-X vector 0 with interrupt vector
    /// `vector` (fixed, edge): programs table entry 0 in BAR1, enables MSI-X, unmasks the entry.
    pub fn enable_msix(&self, vector: u8, apic_id: u32) -> Result<(), MsixError> {
        let slot = self.slot;
        if config_read(slot, COMMAND) & STATUS_CAPABILITIES == 0 {
            return Err(MsixError::NoCapability);
        }
        let mut cap = (config_read(slot, CAPABILITIES) & 0xfc) as u8;
        // A list longer than the configuration space can hold is a loop.
        for _ in 0..48 {
            if cap == 0 || config_read(slot, cap) & 0xff == CAP_MSIX {
                break;
            }
            cap = ((config_read(slot, cap) >> 8) & 0xfc) as u8;
        }
        if cap == 0 || config_read(slot, cap) & 0xff != CAP_MSIX {
            return Err(MsixError::NoCapability);
        }
        let bar1 = config_read(slot, BAR1);
        let table = config_read(slot, cap + 4);
        if table != 1 || bar1 & 0x7 != 0 || bar1 & !0xf == 0 {
            return Err(MsixError::NoTable(bar1));
        }
        let entry = u64::from(bar1 & !0xf);
        // SAFETY: BAR1 (identity-mapped, memory decoding on) holds the MSI-X table at 0 (the
        // capability says so); entry 0 is four 32-bit words: address low, high, data, control.
        unsafe {
            write_volatile(entry as *mut u32, 0xfee0_0000 | (apic_id & 0xff) << 12);
            write_volatile((entry + 4) as *mut u32, 0);
            write_volatile((entry + 8) as *mut u32, u32::from(vector));
        }
        let ctrl = config_read(slot, cap);
        config_write(
            slot,
            cap,
            (ctrl | MSIX_ENABLE << 16) & !(MSIX_FUNCTION_MASK << 16),
        );
        // SAFETY: as above: the vector control word; bit 0 clear unmasks the entry.
        unsafe { write_volatile((entry + 12) as *mut u32, 0) };
        Ok(())
    }

    /// Rings peer `peer`'s doorbell.
    pub fn ring(&self, peer: u16) {
        // SAFETY: the Doorbell register of BAR0, write-only, 32 bits: `peer << 16 | vector`.
        unsafe { write_volatile((self.regs + DOORBELL) as *mut u32, u32::from(peer) << 16) };
    }

    /// The 32-bit word at `offset` of the shared memory, for the ping-pong's flags.
    pub fn word(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= 4096);
        // SAFETY: BAR2 is at least a page of shared memory, identity-mapped and never unmapped;
        // the word is aligned and accessed only atomically by this guest.
        unsafe { &*((self.shm + offset as u64) as *const AtomicU32) }
    }

    /// Publishes `f` (seqlock: `seq` odd while writing), then rings `bell`'s doorbell if given.
    pub fn publish(&self, f: &Figures, bell: Option<u16>) {
        let seq = self.seq.get();
        let (state, words) = f.words();
        let at = |off: usize| self.shm + off as u64;
        // SAFETY: the record lies in the first RECORD_SIZE bytes of BAR2 (see find_channel);
        // volatile writes are neither elided nor reordered among themselves, and x86 keeps
        // stores in order, so a reader that sees an even, unchanged `seq` saw a whole record.
        unsafe {
            write_volatile(at(SEQ_OFFSET) as *mut u32, seq.wrapping_add(1));
            write_volatile(at(FIGURES_OFFSET) as *mut u32, state);
            for (i, w) in words.iter().enumerate() {
                write_volatile(at(16 + 8 * i) as *mut u64, *w);
            }
            write_volatile(at(SEQ_OFFSET) as *mut u32, seq.wrapping_add(2));
        }
        self.seq.set(seq.wrapping_add(2));
        if let Some(peer) = bell {
            self.ring(peer);
        }
    }
}
