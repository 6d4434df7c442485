//! The live figures the guest publishes at the start of a channel's shared memory (ivshmem BAR2),
//! for a reader in another partition. Layout (little endian, documented in docs/realtime.md):
//!
//! | offset | type | field |
//! | ---: | --- | --- |
//! | 0 | u32 | `magic` = [`MAGIC`] ("RTRF") |
//! | 4 | u32 | `version` = [`VERSION`] |
//! | 8 | u32 | `seq`: odd while the guest writes, even when the record is consistent |
//! | 12 | u32 | `state`: [`STATE_RUNNING`] or [`STATE_DONE`] |
//! | 16 | u64 | `ticks` handled so far |
//! | 24 | u64 | `ticks_planned` (duration / period) |
//! | 32 | u64 | `period_ns` |
//! | 40 | i64 | `min_ns` |
//! | 48 | i64 | `avg_ns` |
//! | 56 | i64 | `max_ns` |
//! | 64 | i64 | `p999_ns` |
//! | 72 | i64 | `last_ns`: the latest tick's lateness |
//! | 80 | u64 | `tsc_hz` |
//!
//! A reader copies the record between two reads of `seq` and keeps it when both are the same
//! even value (a seqlock).

use crate::stats::Stats;

/// `magic`: "RTRF" in memory order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RTRF");
/// Layout version.
pub const VERSION: u32 = 1;
/// `state` while the periodic task runs.
pub const STATE_RUNNING: u32 = 1;
/// `state` after the last tick.
pub const STATE_DONE: u32 = 2;

/// The record after `magic`, `version` and `seq` (offset 12 on).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// [`STATE_RUNNING`] or [`STATE_DONE`].
    pub state: u32,
    /// Ticks handled so far.
    pub ticks: u64,
    /// Ticks the run will handle.
    pub ticks_planned: u64,
    /// The period.
    pub period_ns: u64,
    /// Smallest lateness.
    pub min_ns: i64,
    /// Mean lateness.
    pub avg_ns: i64,
    /// Largest lateness.
    pub max_ns: i64,
    /// 99.9th percentile of the lateness.
    pub p999_ns: i64,
    /// The latest tick's lateness.
    pub last_ns: i64,
    /// TSC frequency.
    pub tsc_hz: u64,
}

/// Byte offset of `seq`.
pub const SEQ_OFFSET: usize = 8;
/// Byte offset of the [`Figures`] record (its `state`); it is 8-aligned from `ticks` on.
pub const FIGURES_OFFSET: usize = 12;
/// Bytes the whole record takes.
pub const RECORD_SIZE: usize = 88;
/// Ping-pong mode: the word the pong side sets to [`PONG_READY`] once its MSI-X vector is on
/// (the ping side rings only after that).
pub const PONG_READY_OFFSET: usize = 0x100;
/// Ping-pong mode: the word the ping side sets to [`PING_DONE`] after its last round trip,
/// before one last doorbell that ends the pong side.
pub const PING_DONE_OFFSET: usize = 0x104;
/// The value of the pong side's ready word.
pub const PONG_READY: u32 = u32::from_le_bytes(*b"PONG");
/// The value of the ping side's done word.
pub const PING_DONE: u32 = u32::from_le_bytes(*b"DONE");

impl Figures {
    /// The figures of `stats` so far.
    pub fn new(
        state: u32,
        stats: &Stats,
        last_ns: i64,
        ticks_planned: u64,
        period_ns: u64,
        tsc_hz: u64,
    ) -> Self {
        Self {
            state,
            ticks: stats.count(),
            ticks_planned,
            period_ns,
            min_ns: stats.min(),
            avg_ns: stats.avg(),
            max_ns: stats.max(),
            p999_ns: stats.p999(),
            last_ns,
            tsc_hz,
        }
    }

    /// The record's fields as they lie from [`FIGURES_OFFSET`] on: `state` as u32 at 12, then
    /// u64 words at 16, 24, ... 80.
    pub fn words(&self) -> (u32, [u64; 9]) {
        (
            self.state,
            [
                self.ticks,
                self.ticks_planned,
                self.period_ns,
                self.min_ns as u64,
                self.avg_ns as u64,
                self.max_ns as u64,
                self.p999_ns as u64,
                self.last_ns as u64,
                self.tsc_hz,
            ],
        )
    }

    /// Decodes a consistent record (`bytes` from offset 0, at least [`RECORD_SIZE`] long); `None`
    /// when the magic or version do not match or `seq` is odd.
    pub fn decode(bytes: &[u8]) -> Option<(u32, Self)> {
        let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
        if u32_at(0)? != MAGIC || u32_at(4)? != VERSION {
            return None;
        }
        let seq = u32_at(SEQ_OFFSET)?;
        if seq % 2 == 1 {
            return None;
        }
        Some((
            seq,
            Self {
                state: u32_at(12)?,
                ticks: u64_at(16)?,
                ticks_planned: u64_at(24)?,
                period_ns: u64_at(32)?,
                min_ns: u64_at(40)? as i64,
                avg_ns: u64_at(48)? as i64,
                max_ns: u64_at(56)? as i64,
                p999_ns: u64_at(64)? as i64,
                last_ns: u64_at(72)? as i64,
                tsc_hz: u64_at(80)?,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn words_decode_back_at_the_documented_offsets() {
        let mut s = Stats::new();
        s.record(1_500);
        s.record(-20);
        let f = Figures::new(STATE_RUNNING, &s, -20, 1000, 2_000_000, 2_500_000_000);
        let mut bytes = vec![0u8; RECORD_SIZE];
        bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&VERSION.to_le_bytes());
        bytes[SEQ_OFFSET..SEQ_OFFSET + 4].copy_from_slice(&6u32.to_le_bytes());
        let (state, words) = f.words();
        bytes[FIGURES_OFFSET..16].copy_from_slice(&state.to_le_bytes());
        for (i, w) in words.iter().enumerate() {
            bytes[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(16 + 8 * words.len(), RECORD_SIZE);
        assert_eq!(Figures::decode(&bytes), Some((6, f)));
        assert_eq!((f.ticks, f.min_ns, f.max_ns), (2, -20, 1_500));
        assert_eq!(&bytes[0..4], b"RTRF");
        bytes[SEQ_OFFSET] = 7;
        assert_eq!(Figures::decode(&bytes), None, "odd seq: being written");
        assert_eq!(Figures::decode(&bytes[..40]), None);
    }
}
