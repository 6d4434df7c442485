//! tandem's reference real-time guest: a periodic task on the LAPIC TSC-deadline timer that
//! measures how late each wake-up is against its deadline, then prints the figures on COM1 and
//! powers off. Booted by tandem as an ELF through the PVH entry. Output format, command line and
//! shared-memory layout: docs/realtime.md.
#![no_std]
#![no_main]

mod boot;
mod hw;
mod mem;
mod pci;
mod pingpong;
mod tsc;

use core::fmt::{self, Write};
use core::sync::atomic::Ordering;

use tandem_rtref::clock::TscScale;
use tandem_rtref::cmdline::Config;
use tandem_rtref::report::{self, Platform};
use tandem_rtref::shm::{STATE_DONE, STATE_RUNNING};
use tandem_rtref::stats::Stats;

use boot::{TIMER_STAMP, TIMER_VECTOR};
use hw::{Apic, Serial};

/// `hvm_start_info.magic`.
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Longest command line read.
const CMDLINE_MAX: usize = 4096;

/// The start of `struct hvm_start_info` (what the guest reads of it).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
}

/// Prints `rtref: error: ...` and stops with a triple fault, so that tandem exits non-zero.
pub(crate) fn fail(args: fmt::Arguments) -> ! {
    let _ = writeln!(Serial, "rtref: error: {args}");
    boot::triple_fault()
}

/// The command line PVH's start info points at ("" when none).
fn cmdline(start_info: u32) -> &'static str {
    let si = start_info as usize as *const StartInfo;
    // SAFETY: PVH puts the start info at %ebx in RAM (identity-mapped); it is only read.
    let (magic, paddr) = unsafe { ((*si).magic, (*si).cmdline_paddr) };
    if magic != START_INFO_MAGIC {
        fail(format_args!(
            "no PVH start info at {start_info:#x} (magic {magic:#x})"
        ));
    }
    if paddr == 0 {
        return "";
    }
    let base = paddr as usize as *const u8;
    // SAFETY: the VMM put a NUL-terminated string there; reading stops at the NUL or after
    // CMDLINE_MAX bytes, all in RAM below 4 GiB.
    let bytes = unsafe {
        let len = (0..CMDLINE_MAX)
            .find(|&i| *base.add(i) == 0)
            .unwrap_or(CMDLINE_MAX);
        core::slice::from_raw_parts(base, len)
    };
    core::str::from_utf8(bytes)
        .unwrap_or_else(|_| fail(format_args!("the command line is not UTF-8")))
}

/// Sleeps until the timer's interrupt stub has stamped the TSC; returns the stamp, with
/// interrupts disabled.
fn wait_for_tick() -> u64 {
    loop {
        hw::cli();
        let stamp = TIMER_STAMP.load(Ordering::Relaxed);
        if stamp != 0 {
            return stamp;
        }
        hw::sti_hlt();
    }
}

#[no_mangle]
extern "C" fn rtref_main(start_info: u32) -> ! {
    boot::init_cpu_tables();
    let line = cmdline(start_info);
    let cfg = Config::parse(line).unwrap_or_else(|e| fail(format_args!("command line: {e}")));
    if let Some(pp) = cfg.pingpong {
        pingpong::run(&pp)
    }
    if !hw::has_tsc_deadline() {
        fail(format_args!(
            "the CPU has no TSC-deadline timer (CPUID.1:ECX[24])"
        ));
    }
    let Some((hz, source)) = tsc::frequency() else {
        fail(format_args!(
            "cannot tell the TSC frequency (no kvmclock, CPUID 0x15, 0x40000010 or 0x16)"
        ));
    };
    let scale = TscScale::new(hz).unwrap_or_else(|| fail(format_args!("TSC frequency 0")));
    let channel = pci::find_channel();
    let apic = Apic::init(TIMER_VECTOR);
    let platform = Platform {
        tsc_hz: hz,
        tsc_source: source,
        x2apic: apic.is_x2apic(),
    };
    let _ = report::start(&mut Serial, &platform, &cfg);
    if let Some(ch) = &channel {
        let _ = writeln!(Serial, "rtref: channel {ch}");
    }

    let ticks = cfg.ticks();
    let period = scale.ns_to_ticks(cfg.period_ns);
    let mut stats = Stats::new();
    let publish = |stats: &Stats, state: u32, last: i64| {
        if let Some(ch) = &channel {
            ch.publish(
                &tandem_rtref::shm::Figures::new(state, stats, last, ticks, cfg.period_ns, hz),
                cfg.bell,
            );
        }
    };
    publish(&stats, STATE_RUNNING, 0);
    // Absolute deadlines: each is the previous one plus the period, never "now + period", so
    // lateness does not accumulate and the run handles exactly `ticks` deadlines.
    let mut deadline = hw::rdtsc();
    let mut last = 0;
    for tick in 1..=ticks {
        deadline = deadline.wrapping_add(period);
        TIMER_STAMP.store(0, Ordering::Relaxed);
        apic.arm(deadline);
        let woke = wait_for_tick();
        apic.eoi();
        last = scale.ticks_to_ns(woke.wrapping_sub(deadline) as i64);
        stats.record(last);
        if cfg.report_every != 0 && tick % cfg.report_every == 0 {
            let _ = report::progress(&mut Serial, &stats);
        }
        if tick % cfg.publish_every == 0 {
            publish(&stats, STATE_RUNNING, last);
        }
    }
    publish(&stats, STATE_DONE, last);
    let _ = report::done(&mut Serial, &cfg, &stats);
    hw::power_off()
}

/// Called by the exception stubs (on the exception IST stack).
#[no_mangle]
extern "C" fn rtref_fault(f: &boot::Fault) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    if f.vector == 256 {
        fail(format_args!("unexpected interrupt at rip={:#x}", f.rip));
    }
    fail(format_args!(
        "exception vector={} error={:#x} rip={:#x} rsp={:#x} rflags={:#x} cr2={cr2:#x}",
        f.vector, f.error, f.rip, f.rsp, f.rflags
    ))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    fail(format_args!("panic: {info}"))
}
