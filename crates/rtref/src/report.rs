//! The lines the guest prints (format documented in docs/realtime.md): one `key=value` record per
//! line, each starting with `rtref: ` and a word saying what it is.

use core::fmt::{self, Write};

use crate::clock::TscSource;
use crate::cmdline::Config;
use crate::stats::Stats;

/// What the start line says about the platform.
#[derive(Debug, Clone, Copy)]
pub struct Platform {
    /// TSC frequency.
    pub tsc_hz: u64,
    /// Where it was read.
    pub tsc_source: TscSource,
    /// Whether the local APIC is driven through x2APIC MSRs (else xAPIC MMIO).
    pub x2apic: bool,
}

/// `rtref: start ...`: the run about to begin.
pub fn start(w: &mut impl Write, p: &Platform, c: &Config) -> fmt::Result {
    writeln!(
        w,
        "rtref: start tsc_hz={} tsc_source={} timer=tsc-deadline apic={} period_ns={} duration_ns={} ticks={}",
        p.tsc_hz,
        p.tsc_source,
        if p.x2apic { "x2apic" } else { "xapic" },
        c.period_ns,
        c.duration_ns,
        c.ticks()
    )
}

/// `rtref: tick ...`: progress (only with `report_every=`).
pub fn progress(w: &mut impl Write, s: &Stats) -> fmt::Result {
    writeln!(
        w,
        "rtref: tick ticks={} min_ns={} avg_ns={} max_ns={}",
        s.count(),
        s.min(),
        s.avg(),
        s.max()
    )
}

/// `rtref: done ...` and the histogram's `rtref: hist ...` lines, then `rtref: end`.
pub fn done(w: &mut impl Write, c: &Config, s: &Stats) -> fmt::Result {
    writeln!(
        w,
        "rtref: done ticks={} period_ns={} min_ns={} avg_ns={} max_ns={} p999_ns={} early={} overflow={}",
        s.count(),
        c.period_ns,
        s.min(),
        s.avg(),
        s.max(),
        s.p999(),
        s.early(),
        s.overflow()
    )?;
    for (from, to, count) in s.pow2_buckets() {
        if to == u64::MAX {
            writeln!(w, "rtref: hist from_ns={from} to_ns=inf count={count}")?;
        } else {
            writeln!(w, "rtref: hist from_ns={from} to_ns={to} count={count}")?;
        }
    }
    writeln!(w, "rtref: end")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    #[test]
    fn lines_are_key_value_records() {
        let c = Config::parse("period_us=2000 duration_s=2").unwrap();
        let mut out = String::new();
        let p = Platform {
            tsc_hz: 2_500_000_000,
            tsc_source: TscSource::Kvmclock,
            x2apic: true,
        };
        start(&mut out, &p, &c).unwrap();
        let mut s = Stats::new();
        for v in [1_500, 2_500, 700_000] {
            s.record(v);
        }
        progress(&mut out, &s).unwrap();
        done(&mut out, &c, &s).unwrap();
        assert_eq!(
            out,
            "rtref: start tsc_hz=2500000000 tsc_source=kvmclock timer=tsc-deadline apic=x2apic period_ns=2000000 duration_ns=2000000000 ticks=1000\n\
             rtref: tick ticks=3 min_ns=1500 avg_ns=234666 max_ns=700000\n\
             rtref: done ticks=3 period_ns=2000000 min_ns=1500 avg_ns=234666 max_ns=700000 p999_ns=700000 early=0 overflow=0\n\
             rtref: hist from_ns=1000 to_ns=2000 count=1\n\
             rtref: hist from_ns=2000 to_ns=4000 count=1\n\
             rtref: hist from_ns=512000 to_ns=1024000 count=1\n\
             rtref: end\n"
        );
    }
}
