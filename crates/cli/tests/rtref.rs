//! The reference real-time guest (guests/rtref) under `tandem run`: its periodic task handles
//! every deadline without exits to tandem, its report parses, its live figures reach the
//! channel, and its errors show.
//!
//! Latencies in the nested testbed are emulated (hundreds of µs and more): the tests check the
//! counts and the consistency of the figures, never their size.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, rtref_guest, run_script_with, Case};
use tandem_rtref::shm::{Figures, RECORD_SIZE, STATE_DONE};
use tandem_vmm::stats::Snapshot;

type Session = (HashMap<String, Case>, String);

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let rt = rtref_guest();
        let script = format!(
            r#"
RT="--kernel {rt} --memory 32M"
run_case rt --boot pvh $RT --cmdline 'period_us=2000 duration_s=2'
run_case chan $RT --channel path=/tmp/rtchan,size=1M,id=0 --cmdline 'period_us=2000 duration_s=1 publish_every=50 bell=1'
record chan-file od -A n -t x1 -v -N {RECORD_SIZE} /tmp/rtchan
run_case bad $RT --cmdline 'period_us=fast'
export TANDEM_LOG=info
for run in short:1 long:2; do
  r=${{run%:*}}
  run_case $r $RT --serial file:/tmp/$r.console --cmdline "period_us=2000 duration_s=${{run#*:}}"
  record $r-console cat /tmp/$r.console
  record $r-bytes wc -c /tmp/$r.console
done
# tandem stats twice during a 10 s run (after the start line, before the done line), without
# and with the realtime settings (HLT left to the guest).
wait_for() {{ i=0; while [ $i -lt 240 ] && ! grep -q "$1" "$2"; do sleep 0.5; i=$((i+1)); done; }}
for mode in plain realtime; do
  X=""; [ $mode = realtime ] && X="--realtime --pin-cpus 1"
  tandem run $RT $X --stats-socket /tmp/$mode.sock --serial file:/tmp/$mode.console \
    --cmdline 'period_us=1000 duration_s=10' </dev/null >/tmp/$mode.out 2>&1 &
  vm=$!
  wait_for "rtref: start" /tmp/$mode.console
  record $mode-before tandem stats --socket /tmp/$mode.sock --json
  sleep 2
  record $mode-after tandem stats --socket /tmp/$mode.sock --json
  record $mode-done-yet grep -c "rtref: done" /tmp/$mode.console
  wait $vm
  echo "status=$?" >>/tmp/$mode.out
  record $mode-run cat /tmp/$mode.out
  record $mode-console cat /tmp/$mode.console
done
"#
        );
        run_script_with(&script, &[&rt])
    })
}

/// The `key=value` fields of the first line starting with `prefix`.
fn record<'a>(output: &'a str, prefix: &str) -> HashMap<&'a str, &'a str> {
    let line = output
        .lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{output}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn num(r: &HashMap<&str, &str>, key: &str) -> i64 {
    r.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in {r:?}"))
}

/// Checks the report of a run of `ticks` ticks of `period_ns`; returns the `done` line.
fn check_report(c: &Case, ticks: i64, period_ns: i64) -> HashMap<&str, &str> {
    let out = &c.output;
    assert_eq!(
        c.rc, 0,
        "tandem should exit 0 after the guest powers off:\n{out}"
    );
    assert!(!out.contains("rtref: error"), "{out}");
    let start = record(out, "rtref: start ");
    assert_eq!(start.get("timer"), Some(&"tsc-deadline"), "{out}");
    assert!(
        ["kvmclock", "cpuid15", "cpuid40000010", "cpuid16"].contains(&start["tsc_source"]),
        "{out}"
    );
    assert!(num(&start, "tsc_hz") > 0, "{out}");
    assert_eq!(
        (num(&start, "ticks"), num(&start, "period_ns")),
        (ticks, period_ns),
        "{out}"
    );
    let done = record(out, "rtref: done ");
    // Absolute deadlines: every one of duration/period is handled, however late.
    assert_eq!(num(&done, "ticks"), ticks, "{out}");
    assert_eq!(num(&done, "period_ns"), period_ns, "{out}");
    let (min, avg, max, p999) = (
        num(&done, "min_ns"),
        num(&done, "avg_ns"),
        num(&done, "max_ns"),
        num(&done, "p999_ns"),
    );
    assert!(min <= avg && avg <= max, "min <= avg <= max:\n{out}");
    assert!(min <= p999 && p999 <= max, "min <= p999 <= max:\n{out}");
    let in_hist: i64 = out
        .lines()
        .filter(|l| l.trim_start().starts_with("rtref: hist "))
        .map(|l| num(&record(l, "rtref: hist "), "count"))
        .sum();
    assert_eq!(in_hist, ticks, "the histogram holds every tick:\n{out}");
    assert!(
        out.lines().any(|l| l.trim() == "rtref: end"),
        "the report is complete:\n{out}"
    );
    done
}

#[test]
fn the_reference_guest_handles_every_deadline_and_reports() {
    let (cases, all) = session();
    // 2 s at 2 ms, booted through its PVH entry (`--boot pvh` fails without the ELF note).
    check_report(case(cases, all, "rt"), 1000, 2_000_000);
}

#[test]
fn the_reference_guest_publishes_its_figures_in_the_channel() {
    let (cases, all) = session();
    let c = case(cases, all, "chan");
    let done = check_report(c, 500, 2_000_000);
    let ch = record(&c.output, "rtref: channel ");
    assert_eq!(
        num(&ch, "peer"),
        0,
        "IVPosition is the channel's id:\n{}",
        c.output
    );
    let file = case(cases, all, "chan-file");
    let bytes: Vec<u8> = file
        .output
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("od prints hex bytes"))
        .collect();
    assert_eq!(bytes.len(), RECORD_SIZE, "{}", file.output);
    let (seq, f) = Figures::decode(&bytes).unwrap_or_else(|| {
        panic!(
            "the record has the magic, the version and an even seq:\n{}",
            file.output
        )
    });
    // One publication at the start, one every 50 of 500 ticks, one at the end: 12 writes.
    assert_eq!(seq, 2 * 12, "{f:?}");
    assert_eq!((f.state, f.ticks, f.ticks_planned), (STATE_DONE, 500, 500));
    assert_eq!(f.period_ns, 2_000_000);
    assert_eq!(
        (f.min_ns, f.avg_ns, f.max_ns, f.p999_ns),
        (
            num(&done, "min_ns"),
            num(&done, "avg_ns"),
            num(&done, "max_ns"),
            num(&done, "p999_ns")
        ),
        "the channel holds the figures of the report"
    );
    assert!(f.tsc_hz > 0);
}

#[test]
fn a_bad_command_line_stops_the_guest_with_an_error() {
    let (cases, all) = session();
    let c = case(cases, all, "bad");
    assert!(
        c.output
            .contains("rtref: error: command line: period_us=fast: not a number"),
        "{}",
        c.output
    );
    assert_ne!(
        c.rc, 0,
        "the guest's failure must fail tandem:\n{}",
        c.output
    );
    assert!(!c.output.contains("rtref: start"), "{}", c.output);
}

/// Exits to tandem's user space in a run, from tandem's info log line
/// `vcpu0: N exits (pio in A, pio out B, mmio C, interrupted D, other E)`, without the
/// `interrupted` ones (signals to the vCPU thread, not the guest's doing).
fn user_space_exits(out: &str) -> i64 {
    let line = out
        .lines()
        .find(|l| l.contains("vcpu0: ") && l.contains(" exits (pio in "))
        .unwrap_or_else(|| panic!("no exit counts in tandem's log:\n{out}"));
    common::user_space_exits_of(line)
}

/// The first number in a case's output (`wc -c`'s byte count).
fn first_number(c: &Case) -> i64 {
    c.output
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {:?}", c.output))
}

#[test]
fn the_periodic_task_causes_no_exit_to_user_space() {
    let (cases, all) = session();
    // The console goes to a file, so that tandem's log cannot interleave with it.
    let mut fixed = Vec::new();
    for (name, ticks) in [("short", 500), ("long", 1000)] {
        let run = case(cases, all, name);
        let console = case(cases, all, &format!("{name}-console"));
        let console = Case {
            rc: run.rc,
            ..console.clone()
        };
        check_report(&console, ticks, 2_000_000);
        let bytes = first_number(case(cases, all, &format!("{name}-bytes")));
        // Each byte on the serial port is two exits (line status, then the byte); the rest is
        // the start-up and the power-off, the same in both runs.
        fixed.push((
            user_space_exits(&run.output) - 2 * bytes,
            run.output.clone(),
        ));
    }
    assert_eq!(
        fixed[0].0, fixed[1].0,
        "500 more ticks must add no exit to user space besides the console's:\n{}\n{}",
        fixed[0].1, fixed[1].1
    );
}

fn snapshot(c: &Case) -> Snapshot {
    assert_eq!(c.rc, 0, "tandem stats:\n{}", c.output);
    serde_json::from_str(c.output.trim()).unwrap_or_else(|e| panic!("{e}:\n{}", c.output))
}

/// A KVM counter of vCPU 0: how much it grew from `a` to `b`.
fn kvm_delta(a: &Snapshot, b: &Snapshot, name: &str) -> u64 {
    let get = |s: &Snapshot| {
        *s.vcpus[0]
            .kvm
            .get(name)
            .unwrap_or_else(|| panic!("no {name}: {s:?}"))
    };
    get(b) - get(a)
}

/// Exits to tandem's user space, all devices: how much they grew from `a` to `b`.
fn user_space_delta(a: &Snapshot, b: &Snapshot) -> u64 {
    let sum = |s: &Snapshot| s.devices.iter().map(|d| d.reads + d.writes).sum::<u64>();
    sum(b) - sum(a)
}

/// The two snapshots of `mode`'s run, taken while its periodic task ran; its report checked.
fn mid_run(mode: &str) -> (Snapshot, Snapshot) {
    let (cases, all) = session();
    let run = case(cases, all, &format!("{mode}-run"));
    assert!(run.output.contains("status=0"), "{}", run.output);
    let console = Case {
        rc: 0,
        ..case(cases, all, &format!("{mode}-console")).clone()
    };
    check_report(&console, 10_000, 1_000_000);
    let done_yet = case(cases, all, &format!("{mode}-done-yet"));
    assert_eq!(
        done_yet.output.trim(),
        "0",
        "the run ended before the second snapshot:\n{}",
        console.output
    );
    let before = snapshot(case(cases, all, &format!("{mode}-before")));
    let after = snapshot(case(cases, all, &format!("{mode}-after")));
    assert!(after.kvm_available, "{:?}", after.kvm_error);
    // Ticks happened between the snapshots: each is one timer interrupt injected.
    assert!(
        kvm_delta(&before, &after, "irq_injections") > 0,
        "{before:?}\n{after:?}"
    );
    (before, after)
}

#[test]
fn tandem_stats_sees_no_user_space_exit_during_the_periodic_task() {
    for mode in ["plain", "realtime"] {
        let (before, after) = mid_run(mode);
        assert_eq!(
            user_space_delta(&before, &after),
            0,
            "{mode}: exits to tandem between two snapshots of the periodic task:\n{before:?}\n{after:?}"
        );
    }
}

#[test]
fn hlt_exits_only_without_the_realtime_settings() {
    let (before, after) = mid_run("plain");
    assert!(
        kvm_delta(&before, &after, "halt_exits") > 0,
        "the guest sleeps in hlt between ticks, which exits by default:\n{before:?}\n{after:?}"
    );
    let (before, after) = mid_run("realtime");
    assert!(
        after.settings.values().any(|v| v.contains("hlt")),
        "the realtime settings leave HLT to the guest: {:?}",
        after.settings
    );
    assert_eq!(
        kvm_delta(&before, &after, "halt_exits"),
        0,
        "with HLT left to the guest, its hlt between ticks stays in guest mode:\n{before:?}\n{after:?}"
    );
}
