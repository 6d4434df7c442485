//! The channel (tandem's ivshmem device, docs/channels.md): found on PCI bus 0 through the
//! configuration ports at start-up; the live figures go to the start of its shared memory (BAR2)
//! under a seqlock (layout: tandem_rtref::shm).

use core::cell::Cell;
use core::fmt;
use core::ptr::write_volatile;

use tandem_rtref::shm::{Figures, FIGURES_OFFSET, MAGIC, SEQ_OFFSET, VERSION};

use crate::hw::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const IVSHMEM_ID: u32 = 0x1110_1af4;
const COMMAND: u8 = 0x04;
const COMMAND_MEMORY: u32 = 1 << 1;
const BAR0: u8 = 0x10;
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
    // SAFETY: as config_read; the only register written is the command register.
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

impl Channel {
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
            // SAFETY: the Doorbell register of BAR0, write-only, 32 bits: `peer << 16 | vector`.
            unsafe { write_volatile((self.regs + DOORBELL) as *mut u32, u32::from(peer) << 16) };
        }
    }
}
