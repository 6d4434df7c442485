//! `cargo xtask bench rt`: the reference RT guest (`guests/rtref`) and PREEMPT_RT Linux running
//! cyclictest, in a realtime partition of tandem against QEMU with its closest settings
//! (`-accel kvm -cpu host,+invtsc -overcommit cpu-pm=on -overcommit mem-lock=on`, its vCPU
//! thread pinned and `chrt -f 40`), each beside a busy general VM (a CPU hog and a web server
//! fetched from through a forward, on the other CPU), in one testbed run. Both VMMs' exits are
//! read the same way, from KVM's per-VM counters in debugfs: exits per second while the guest
//! idles (a 100 ms period) and per tick of a 1 ms periodic task, by reason, with the exits that
//! reach the VMM's user space (`io_exits` + `mmio_exits`; for tandem also its own per-device
//! count from `tandem stats`). Latencies come from the guests' own reports; in the emulated
//! testbed they say little, the counts say what each VMM costs.

use std::path::{Path, PathBuf};

use crate::bench_dev::{number, print_table, results, run_testbed};
use crate::{assets, tasks};

/// Seconds between the two readings of the counters.
const WINDOW_S: u32 = 8;

const SCRIPT: &str = r#"set -u
mount -t debugfs none /sys/kernel/debug 2>/dev/null
at() { echo "at $(cut -d' ' -f1 /proc/uptime) s: $*"; }
# The general VM beside: a CPU hog, and a web server the test host fetches from all along.
busy='console=ttyS0 reboot=k panic=-1 quiet tandem.exec="ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; mkdir -p /www; echo hello >/www/index.html; httpd -p 80 -h /www; while :; do :; done"'
tandem run --kernel /guests/vmlinuz --initrd /guests/initramfs.cpio.gz --memory 256M \
  --pin-cpus 0 --serial none --forward tcp:8080:80 --cmdline "$busy" </dev/null >/tmp/busy.err 2>&1 &
busyvm=$!
(while :; do wget -q -O /dev/null http://127.0.0.1:8080/ 2>/dev/null && echo ok >>/tmp/fetched; sleep 0.5; done) &
fetcher=$!
at "general VM started"
# KVM's counters for process $1's VM (one vCPU), from debugfs: name=value ...
counters() {
  d=$(ls -d /sys/kernel/debug/kvm/$1-* 2>/dev/null | head -1)
  [ -n "$d" ] || { echo "missing"; return; }
  for k in exits halt_exits irq_exits io_exits mmio_exits irq_window_exits insn_emulation irq_injections; do
    printf '%s=%s ' $k "$(cat $d/$k 2>/dev/null || echo 0)"
  done
}
# Exits tandem's devices handled, from its stats socket $1.
user_exits() {
  tandem stats --socket $1 --json 2>/dev/null | grep -o '"\(reads\|writes\)":[0-9]*' | awk -F: '{s+=$2} END {print s+0}'
}
# wait_for FILE PATTERN SECONDS
wait_for() {
  i=0; while [ $i -lt $(($3 * 5)) ] && ! grep -q "$2" $1 2>/dev/null; do sleep 0.2; i=$((i+1)); done
  grep -q "$2" $1 2>/dev/null || { at "no '$2' in $1 after $3 s:"; tail -5 $1; }
}
# measure NAME PERIOD_US PID LOG MARKER [STATS_SOCKET]: counters over WINDOW s once MARKER is seen.
measure() {
  name=$1 period=$2 pid=$3 log=$4 marker=$5 sock=${6:-}
  wait_for $log "$marker" 240
  sleep 1
  a=$(counters $pid); ta=$(cut -d' ' -f1 /proc/uptime); [ -n "$sock" ] && ua=$(user_exits $sock)
  sleep WINDOW
  b=$(counters $pid); tb=$(cut -d' ' -f1 /proc/uptime); [ -n "$sock" ] && ub=$(user_exits $sock)
  # No counters, or none moving, is a broken measurement, never a row of zeros.
  case "$a $b" in *missing*) at "$name: no KVM counters for process $pid"; echo "RESULT $name failed=1"; return ;; esac
  [ "${a%% *}" = "${b%% *}" ] && { at "$name: the VM made no exit in the window"; echo "RESULT $name failed=1"; return; }
  secs=$(echo "$tb - $ta" | bc)
  ticks=$(echo "$secs * 1000000 / $period" | bc)
  out="RESULT $name"
  for kv in $b; do
    k=${kv%%=*}; vb=${kv#*=}
    va=$(echo "$a" | tr ' ' '\n' | grep "^$k=" | cut -d= -f2)
    d=$((vb - ${va:-0}))
    out="$out $k-per-s=$(echo "scale=2; $d / $secs" | bc) $k-per-tick=$(echo "scale=4; $d / $ticks" | bc)"
  done
  if [ -n "$sock" ]; then
    d=$((ub - ua))
    out="$out devices-per-s=$(echo "scale=2; $d / $secs" | bc) devices-per-tick=$(echo "scale=4; $d / $ticks" | bc)"
    tandem stats --socket $sock | sed 's/^/  stats: /'
  fi
  echo "$out"
  at "$name measured over $secs s"
}
rtref_report() {
  wait_for $2 'rtref: done' 240
  line=$(grep -o 'rtref: done .*' $2 | head -1)
  echo "RESULT $1 $(echo $line | tr ' ' '\n' | grep -E '^(min|avg|max|p999)_ns=' | tr '\n' ' ')"
}
cyc_report() {
  wait_for $2 'cyclictest-done' 240
  line=$(grep -o 'T: 0 .*' $2 | head -1)
  [ -n "$line" ] || { at "no cyclictest report in $2:"; tail -5 $2; return; }
  f() { echo "$line" | sed "s/.*$1: *\([0-9]*\).*/\1/"; }
  echo "RESULT $1 loops=$(f C) min_us=$(f Min) avg_us=$(f Avg) max_us=$(f Max)"
}
# qemu TAG LOG ARGS...: QEMU on CPU 0 with its vCPU thread moved to CPU 1 under SCHED_FIFO 40.
qemu() {
  tag=$1 log=$2; shift 2
  taskset -c 0 qemu-system-x86_64 -name rt,debug-threads=on -M pc -accel kvm -cpu host,+invtsc \
    -overcommit cpu-pm=on -overcommit mem-lock=on -smp 1 -nodefaults -display none \
    -no-user-config -serial file:$log "$@" </dev/null >/tmp/q-$tag.err 2>&1 &
  q=$!
  i=0; tid=
  while [ $i -lt 100 ] && [ -z "$tid" ]; do
    for t in /proc/$q/task/*; do grep -q '^CPU 0/KVM' $t/comm 2>/dev/null && tid=${t##*/}; done
    sleep 0.1; i=$((i+1))
  done
  # Unpinned, QEMU's figures would not compare: no row rather than a wrong one.
  [ -n "$tid" ] && taskset -p -c 1 $tid >/dev/null && chrt -f -p 40 $tid || { at "QEMU's vCPU thread not pinned"; kill $q; }
}
RT="--realtime --pin-cpus 1 --lock-memory"
for tag in idle tick; do
  case $tag in idle) period=100000 ;; *) period=1000 ;; esac
  cmd="period_us=$period duration_s=14"
  tandem run --kernel /guests/rtref --memory 32M $RT --stats-socket /tmp/t-$tag.sock \
    --serial file:/tmp/t-$tag.log --cmdline "$cmd" </dev/null >/tmp/t-$tag.err 2>&1 &
  t=$!
  measure tandem-$tag $period $t /tmp/t-$tag.log 'rtref: start' /tmp/t-$tag.sock
  [ $tag = tick ] && rtref_report tandem-rtref /tmp/t-$tag.log
  wait $t; at "tandem ended: status $?"; grep -h 'rtref: \(start\|done\)' /tmp/t-$tag.log
  qemu $tag /tmp/q-$tag.log -m 32M -kernel /guests/rtref -append "$cmd"
  measure qemu-$tag $period $q /tmp/q-$tag.log 'rtref: start'
  [ $tag = tick ] && rtref_report qemu-rtref /tmp/q-$tag.log
  # rtref powers off through tandem's port, which QEMU does not have: it halts at its end.
  wait_for /tmp/q-$tag.log 'rtref: end' 120
  kill $q; wait $q; grep -h 'rtref: \(start\|done\)' /tmp/q-$tag.log
  at "QEMU ended"
done
# PREEMPT_RT Linux running cyclictest at 1 kHz.
cyc='console=ttyS0 reboot=k panic=-1 quiet tandem.exec="echo cyclictest-start; cyclictest -m -q -p 80 -i 1000 -l 14000; echo cyclictest-done"'
tandem run --kernel /guests/vmlinuz-rt --initrd /guests/initramfs-rt.cpio.gz --memory 256M $RT \
  --stats-socket /tmp/t-cyc.sock --serial file:/tmp/t-cyc.log --cmdline "$cyc" </dev/null >/tmp/t-cyc.err 2>&1 &
t=$!
measure tandem-cyc 1000 $t /tmp/t-cyc.log cyclictest-start /tmp/t-cyc.sock
cyc_report tandem-cyclictest /tmp/t-cyc.log
wait $t; at "tandem ended: status $?"
qemu cyc /tmp/q-cyc.log -m 256M -kernel /guests/vmlinuz-rt -initrd /guests/initramfs-rt.cpio.gz -append "$cyc"
measure qemu-cyc 1000 $q /tmp/q-cyc.log cyclictest-start
cyc_report qemu-cyclictest /tmp/q-cyc.log
wait_for /tmp/q-cyc.log 'reboot: Power down' 60
kill $q 2>/dev/null; wait $q
at "QEMU ended"
kill $fetcher; kill $busyvm; wait $busyvm
echo "general VM: $(wc -l </tmp/fetched) fetches through its forward answered"
for f in /tmp/t-*.err /tmp/q-*.err /tmp/busy.err; do [ -s $f ] && { echo "$f:"; head -5 $f; }; done
"#;

/// `cargo xtask bench rt`.
pub fn rt(root: &Path) -> Result<i32, String> {
    tasks::ensure_host_packages()?;
    tasks::cargo(root, &["build", "--release", "-p", "tandem"])?;
    tasks::build_rtref(root)?;
    assets::ensure(&assets::cache_root()?)?;
    let script = SCRIPT.replace("WINDOW", &WINDOW_S.to_string());
    eprintln!(
        "bench: the reference RT guest and cyclictest under tandem and QEMU, beside a busy VM, \
         in one testbed run (about 5 minutes)"
    );
    let out = run_testbed(&script, &[PathBuf::from("/usr/bin/chrt")], 1800)?;
    for l in out.lines().filter(|l| !l.starts_with("RESULT")) {
        eprintln!("  {l}");
    }
    let rows = results(&out);
    if rows.is_empty() {
        return Err("no results".into());
    }
    let pick = |suffix: &str| -> Vec<(String, Vec<(String, f64)>)> {
        rows.iter()
            .filter_map(|(n, kv)| Some((n.strip_suffix(suffix)?.to_string(), kv.clone())))
            .collect()
    };
    println!(
        "The realtime VM's exits, from KVM's counters (debugfs) over {WINDOW_S} s, by reason. \
         to user space = io_exits + mmio_exits (the exits KVM hands to the VMM); in KVM = the \
         rest; tandem's devices = the accesses tandem's devices handled (`tandem stats`)\n"
    );
    println!("Reference RT guest idle (a 100 ms period): exits per second\n");
    print_exits(&pick("-idle"), "s");
    println!("\nReference RT guest, 1 ms periodic task: exits per tick\n");
    print_exits(&pick("-tick"), "tick");
    println!("\nPREEMPT_RT Linux, cyclictest at 1 kHz: exits per cyclictest wake-up\n");
    print_exits(&pick("-cyc"), "tick");
    println!(
        "\nLateness of the 1 ms wake-ups, µs. EMULATED: the testbed's CPU is TCG, so these say \
         little about a real host; judge by the counts\n"
    );
    let mut lat: Vec<(String, Vec<(String, f64)>)> = pick("-rtref")
        .into_iter()
        .map(|(n, kv)| {
            let us = kv
                .iter()
                .map(|(k, v)| (k.replace("_ns", "_us"), v / 1000.0))
                .collect();
            (format!("{n} rtref"), us)
        })
        .collect();
    lat.extend(
        pick("-cyclictest")
            .into_iter()
            .map(|(n, kv)| (format!("{n} cyclictest"), kv)),
    );
    for guest in ["rtref", "cyclictest"] {
        let rows: Vec<_> = lat
            .iter()
            .filter(|(n, _)| n.ends_with(guest))
            .cloned()
            .collect();
        print_table(
            &rows,
            &["min_us", "avg_us", "p999_us", "max_us"],
            &[&format!("qemu {guest}")],
        );
        println!();
    }
    Ok(0)
}

/// The rows of an exit table: label and counter (KVM's name, or one this file derives).
const EXIT_ROWS: &[(&str, &str)] = &[
    ("all exits", "exits"),
    ("in KVM", "in-kvm"),
    ("to user space (io + mmio)", "user-space"),
    ("tandem's devices (`tandem stats`)", "devices"),
    ("halt_exits", "halt_exits"),
    ("irq_exits (host interrupts)", "irq_exits"),
    ("irq_window_exits", "irq_window_exits"),
    ("insn_emulation", "insn_emulation"),
    ("irq_injections", "irq_injections"),
];

/// VMM `vmm`'s figure `key` (an [`EXIT_ROWS`] counter) per `unit`, if it was measured.
fn exit_figure(
    rows: &[(String, Vec<(String, f64)>)],
    vmm: &str,
    key: &str,
    unit: &str,
) -> Option<f64> {
    let kv = &rows.iter().find(|(n, _)| n == vmm)?.1;
    let at = |k: &str| {
        kv.iter()
            .find(|(kk, _)| kk == &format!("{k}-per-{unit}"))
            .map(|(_, v)| *v)
    };
    match key {
        "user-space" => Some(at("io_exits")? + at("mmio_exits")?),
        "in-kvm" => Some(at("exits")? - at("io_exits")? - at("mmio_exits")?),
        k => at(k),
    }
}

/// One table per scenario: a row per counter, a column per VMM, and tandem's ratio to QEMU.
fn print_exits(rows: &[(String, Vec<(String, f64)>)], unit: &str) {
    let get = |vmm: &str, key: &str| exit_figure(rows, vmm, key, unit);
    println!("| per {unit} | tandem | QEMU | tandem ÷ QEMU |\n| --- | --- | --- | --- |");
    for (label, key) in EXIT_ROWS {
        let cell = |v: Option<f64>| v.map_or("n/a".to_string(), number);
        let (t, q) = (get("tandem", key), get("qemu", key));
        let ratio = match (t, q) {
            (Some(t), Some(q)) if q > 0.0 => format!("{:.2}", t / q),
            (Some(0.0), Some(_)) => "both 0".to_string(),
            _ => "n/a".to_string(),
        };
        println!("| {label} | {} | {} | {ratio} |", cell(t), cell(q));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_derives_in_kvm_and_user_space_exits() {
        let row = |n: &str, exits: f64, io: f64, mmio: f64| {
            (
                n.to_string(),
                vec![
                    ("exits-per-tick".to_string(), exits),
                    ("io_exits-per-tick".to_string(), io),
                    ("mmio_exits-per-tick".to_string(), mmio),
                ],
            )
        };
        let rows = vec![row("tandem", 3.0, 0.5, 0.25), row("qemu", 3.0, 1.0, 0.0)];
        assert_eq!(
            exit_figure(&rows, "tandem", "user-space", "tick"),
            Some(0.75)
        );
        assert_eq!(exit_figure(&rows, "tandem", "in-kvm", "tick"), Some(2.25));
        assert_eq!(exit_figure(&rows, "qemu", "in-kvm", "tick"), Some(2.0));
        assert_eq!(exit_figure(&rows, "qemu", "devices", "tick"), None);
    }
}
