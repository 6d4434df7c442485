//! Lateness statistics: min/avg/max, a fine histogram for percentiles, and a power-of-two
//! histogram for the report. Fixed size, no allocation: recording is O(1).

/// Width of the fine buckets below [`FINE_LIMIT_NS`].
pub const FINE_NS: u64 = 1_000;
/// Number of fine buckets: `[0, 1024 µs)` in 1 µs steps.
pub const FINE_BUCKETS: usize = 1024;
/// Width of the coarse buckets above the fine ones.
pub const COARSE_NS: u64 = 64_000;
/// Number of coarse buckets: `[1.024 ms, 66.56 ms)` in 64 µs steps.
pub const COARSE_BUCKETS: usize = 1024;
/// Where the fine buckets end.
pub const FINE_LIMIT_NS: u64 = FINE_NS * FINE_BUCKETS as u64;
/// Where the coarse buckets end; later wake-ups go to the overflow count.
pub const COARSE_LIMIT_NS: u64 = FINE_LIMIT_NS + COARSE_NS * COARSE_BUCKETS as u64;
/// Number of power-of-two buckets: `[0, 1 µs)`, then `[2^(k-1), 2^k) µs` for k = 1..=30, then
/// everything from 2^30 µs up.
pub const POW2_BUCKETS: usize = 32;

/// Lateness statistics of a run, in nanoseconds (negative: woke before the deadline).
#[derive(Debug, Clone)]
pub struct Stats {
    count: u64,
    sum: i128,
    min: i64,
    max: i64,
    early: u64,
    overflow: u64,
    fine: [u32; FINE_BUCKETS],
    coarse: [u32; COARSE_BUCKETS],
    pow2: [u64; POW2_BUCKETS],
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// No samples yet.
    pub const fn new() -> Self {
        Self {
            count: 0,
            sum: 0,
            min: i64::MAX,
            max: i64::MIN,
            early: 0,
            overflow: 0,
            fine: [0; FINE_BUCKETS],
            coarse: [0; COARSE_BUCKETS],
            pow2: [0; POW2_BUCKETS],
        }
    }

    /// Records one wake-up `lateness_ns` after its deadline.
    pub fn record(&mut self, lateness_ns: i64) {
        self.count += 1;
        self.sum += i128::from(lateness_ns);
        self.min = self.min.min(lateness_ns);
        self.max = self.max.max(lateness_ns);
        if lateness_ns < 0 {
            self.early += 1;
        }
        let ns = lateness_ns.max(0) as u64;
        if ns < FINE_LIMIT_NS {
            let b = &mut self.fine[(ns / FINE_NS) as usize];
            *b = b.saturating_add(1);
        } else if ns < COARSE_LIMIT_NS {
            let b = &mut self.coarse[((ns - FINE_LIMIT_NS) / COARSE_NS) as usize];
            *b = b.saturating_add(1);
        } else {
            self.overflow += 1;
        }
        self.pow2[pow2_bucket(ns)] += 1;
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest lateness (0 without samples).
    pub fn min(&self) -> i64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest lateness (0 without samples).
    pub fn max(&self) -> i64 {
        if self.count == 0 {
            0
        } else {
            self.max
        }
    }

    /// Mean lateness, rounded toward zero (0 without samples).
    pub fn avg(&self) -> i64 {
        if self.count == 0 {
            0
        } else {
            (self.sum / i128::from(self.count)) as i64
        }
    }

    /// Wake-ups before their deadline (counted in the first bucket).
    pub fn early(&self) -> u64 {
        self.early
    }

    /// Wake-ups later than [`COARSE_LIMIT_NS`].
    pub fn overflow(&self) -> u64 {
        self.overflow
    }

    /// The `per_million / 10^6` quantile (e.g. 999_000 for the 99.9th percentile): the upper edge
    /// of the histogram bucket holding the sample of that rank, kept within `[min, max]`; `max`
    /// when that sample is beyond the histogram. 0 without samples.
    pub fn quantile(&self, per_million: u64) -> i64 {
        if self.count == 0 {
            return 0;
        }
        let rank = (u128::from(self.count) * u128::from(per_million.min(1_000_000)))
            .div_ceil(1_000_000)
            .max(1) as u64;
        let mut seen = 0u64;
        let fine = self
            .fine
            .iter()
            .enumerate()
            .map(|(i, &n)| (FINE_NS * (i as u64 + 1), n));
        let coarse = self
            .coarse
            .iter()
            .enumerate()
            .map(|(i, &n)| (FINE_LIMIT_NS + COARSE_NS * (i as u64 + 1), n));
        for (upper, n) in fine.chain(coarse) {
            seen += u64::from(n);
            if seen >= rank {
                return (upper as i64).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// The 99.9th percentile (see [`Stats::quantile`]).
    pub fn p999(&self) -> i64 {
        self.quantile(999_000)
    }

    /// The non-empty power-of-two buckets: `(from_ns, to_ns, count)`, `to_ns` exclusive
    /// (`u64::MAX` for the last).
    pub fn pow2_buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.pow2
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(k, &n)| {
                let (lo, hi) = pow2_bounds(k);
                (lo, hi, n)
            })
    }
}

/// The power-of-two bucket of `ns`.
fn pow2_bucket(ns: u64) -> usize {
    let us = ns / 1_000;
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(POW2_BUCKETS - 1)
    }
}

/// Bounds of power-of-two bucket `k` in ns.
fn pow2_bounds(k: usize) -> (u64, u64) {
    match k {
        0 => (0, 1_000),
        k if k == POW2_BUCKETS - 1 => ((1u64 << (k - 1)) * 1_000, u64::MAX),
        k => ((1u64 << (k - 1)) * 1_000, (1u64 << k) * 1_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn empty_stats_are_zero() {
        let s = Stats::new();
        assert_eq!(
            (s.count(), s.min(), s.avg(), s.max(), s.p999()),
            (0, 0, 0, 0, 0)
        );
        assert_eq!(s.pow2_buckets().count(), 0);
    }

    #[test]
    fn min_avg_max_and_early() {
        let mut s = Stats::new();
        for v in [3_000, -500, 10_500, 2_000] {
            s.record(v);
        }
        assert_eq!((s.count(), s.min(), s.max()), (4, -500, 10_500));
        assert_eq!(s.avg(), 15_000 / 4);
        assert_eq!((s.early(), s.overflow()), (1, 0));
    }

    #[test]
    fn p999_of_a_thousand_samples_is_the_largest_but_one() {
        // 998 samples at 5.2 µs, one at 40.5 µs, one at 900 µs: rank 999 is the 40.5 µs one.
        let mut s = Stats::new();
        for _ in 0..998 {
            s.record(5_200);
        }
        s.record(40_500);
        s.record(900_000);
        assert_eq!(s.p999(), 41_000, "upper edge of the 40 µs bucket");
        assert_eq!(s.quantile(500_000), 6_000);
        assert_eq!(s.quantile(1_000_000), 900_000, "clamped to max");
        assert_eq!(s.quantile(0), 6_000, "rank at least 1");
    }

    #[test]
    fn coarse_and_overflow_ranges() {
        let mut s = Stats::new();
        s.record(2_000_000);
        assert_eq!(
            s.p999(),
            2_000_000,
            "clamped to max inside the coarse bucket"
        );
        s.record(1_100_000);
        assert_eq!(
            s.quantile(500_000),
            1_152_000,
            "upper edge of its 64 µs bucket"
        );
        let mut o = Stats::new();
        o.record(COARSE_LIMIT_NS as i64 + 5);
        o.record(COARSE_LIMIT_NS as i64 + 9);
        assert_eq!((o.overflow(), o.p999()), (2, COARSE_LIMIT_NS as i64 + 9));
        let mut e = Stats::new();
        e.record(-300);
        assert_eq!(e.p999(), -300, "an early sample: clamped to max");
    }

    #[test]
    fn pow2_buckets_cover_everything_once() {
        let mut s = Stats::new();
        for v in [
            0,
            999,
            1_000,
            1_999,
            2_000,
            3_999,
            4_000,
            1_000_000,
            i64::MAX,
            -7,
        ] {
            s.record(v);
        }
        let b: Vec<_> = s.pow2_buckets().collect();
        assert_eq!(
            b,
            [
                (0, 1_000, 3),
                (1_000, 2_000, 2),
                (2_000, 4_000, 2),
                (4_000, 8_000, 1),
                (512_000, 1_024_000, 1),
                ((1 << 30) * 1_000, u64::MAX, 1),
            ]
        );
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), s.count());
    }
}
