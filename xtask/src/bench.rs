//! `cargo xtask bench boot`: boot time and VMM memory overhead, tandem against QEMU, in one
//! testbed run.
//!
//! Inside the test host, `xtask bench-run` (this same binary, carried in) starts each VMM,
//! timestamps the moment the guest's marker appears on its console and the moment the process
//! exits, and samples `/proc/PID/smaps` for the VMM's resident memory outside its guest-RAM
//! mapping. The host side prints min/median/max and ratios to QEMU `-M pc`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{assets, bench_dev, tasks};

const ROUNDS: usize = 5;
const MEM_MIB: u64 = 512;
const CPUS: u32 = 1;
const MARKER: &str = "BOOT-MARKER-42";
/// The guest computes the marker, so the kernel's echo of its command line cannot match it.
const GUEST_EXEC: &str = "echo BOOT-MARKER-$((40+2))";

/// The VMMs compared, as (name, command line in the test host).
fn configs() -> Vec<(&'static str, String)> {
    let append = format!("console=ttyS0 reboot=k panic=-1 quiet tandem.exec=\\\"{GUEST_EXEC}\\\"");
    let tandem = |kernel: &str| {
        format!("TANDEM_LOG=info tandem run --kernel {kernel} --initrd /guests/initramfs.cpio.gz --cpus {CPUS} --memory {MEM_MIB}M --cmdline \"{append}\"")
    };
    // As the issue states the peer: QEMU's default devices for the machine, `-nic none`.
    let qemu = |machine: &str, extra: &str| {
        format!(
            "qemu-system-x86_64 -M {machine} -accel kvm -cpu host -m {MEM_MIB}M -smp {CPUS} {extra} \
             -display none -serial stdio -nic none -no-reboot -kernel /guests/vmlinuz \
             -initrd /guests/initramfs.cpio.gz -append \"{append}\""
        )
    };
    vec![
        ("tandem-bzImage", tandem("/guests/vmlinuz")),
        ("tandem-vmlinux", tandem("/guests/vmlinux")),
        ("qemu-pc", qemu("pc", "")),
        ("qemu-microvm", qemu("microvm", "")),
        // QEMU trimmed as far as it goes: no default devices (VGA, IDE, floppy, ...).
        (
            "qemu-pc-nodefaults",
            qemu("pc", "-nodefaults -no-user-config"),
        ),
    ]
}

/// `cargo xtask bench boot`.
pub fn boot(root: &Path) -> Result<i32, String> {
    tasks::ensure_host_packages()?;
    tasks::cargo(root, &["build", "--release", "-p", "tandem"])?;
    assets::ensure(&assets::cache_root()?)?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut script = String::from("set -u\n");
    for round in 1..=ROUNDS {
        for (name, cmd) in configs() {
            script.push_str(&format!(
                "/usr/bin/xtask-bench bench-run {name} {round} {} {MARKER} -- sh -c '{}'\n",
                MEM_MIB << 20,
                cmd.replace('\'', r"'\''")
            ));
        }
    }
    eprintln!(
        "bench: {} boots in one testbed run (a few minutes)",
        ROUNDS * configs().len()
    );
    let carry = [PathBuf::from(format!(
        "{}:/usr/bin/xtask-bench",
        me.display()
    ))];
    let out = bench_dev::run_testbed(&script, &carry, 850)?;
    let rows: Vec<Sample> = out.lines().filter_map(Sample::parse).collect();
    if rows.len() != ROUNDS * configs().len() {
        eprintln!("{out}");
        return Err(format!(
            "expected {} results, got {}",
            ROUNDS * configs().len(),
            rows.len()
        ));
    }
    print_table(&rows);
    Ok(if rows.iter().all(|r| r.ok) { 0 } else { 1 })
}

struct Sample {
    name: String,
    marker_ms: Option<f64>,
    exit_ms: f64,
    overhead_kib: u64,
    exits: Option<u64>,
    ok: bool,
}

impl Sample {
    fn parse(line: &str) -> Option<Sample> {
        let rest = line.trim().strip_prefix("BENCH ")?;
        let get = |k: &str| {
            rest.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .map(str::to_string)
        };
        Some(Sample {
            name: get("name=")?,
            marker_ms: get("marker_ms=")?.parse().ok(),
            exit_ms: get("exit_ms=")?.parse().ok()?,
            overhead_kib: get("overhead_kib=")?.parse().ok()?,
            exits: get("exits=").and_then(|v| v.parse().ok()),
            ok: get("rc=")? == "0" && get("marker_ms=")? != "none",
        })
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn print_table(rows: &[Sample]) {
    let names: Vec<&str> = configs().iter().map(|(n, _)| *n).collect();
    let median = |name: &str, f: &dyn Fn(&Sample) -> f64| {
        stats(rows.iter().filter(|r| r.name == name).map(f).collect()).1
    };
    let base_marker = median("qemu-pc", &|r| r.marker_ms.unwrap_or(f64::NAN));
    let base_exit = median("qemu-pc", &|r| r.exit_ms);
    let base_mem = median("qemu-pc", &|r| r.overhead_kib as f64);
    println!("boot benchmark: {ROUNDS} boots each, {CPUS} vCPU, {MEM_MIB} MiB, Debian cloud kernel + busybox initramfs, in the nested testbed");
    println!(
        "| VMM | to marker min/median/max (s) | ×pc | to exit min/median/max (s) | ×pc | VMM RSS outside guest RAM, median (MiB) | ×pc | VM exits, median | failures |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for name in names {
        let mine: Vec<&Sample> = rows.iter().filter(|r| r.name == name).collect();
        let (m0, m1, m2) = stats(
            mine.iter()
                .map(|r| r.marker_ms.unwrap_or(f64::NAN))
                .collect(),
        );
        let (e0, e1, e2) = stats(mine.iter().map(|r| r.exit_ms).collect());
        let mem = median(name, &|r| r.overhead_kib as f64);
        let exits: Vec<f64> = mine
            .iter()
            .filter_map(|r| r.exits)
            .map(|e| e as f64)
            .collect();
        let exits = if exits.is_empty() {
            "n/a".to_string()
        } else {
            format!("{:.0}", stats(exits).1)
        };
        println!(
            "| {name} | {:.2} / {:.2} / {:.2} | {:.2} | {:.2} / {:.2} / {:.2} | {:.2} | {:.1} | {:.2} | {exits} | {} |",
            m0 / 1e3, m1 / 1e3, m2 / 1e3, m1 / base_marker,
            e0 / 1e3, e1 / 1e3, e2 / 1e3, e1 / base_exit,
            mem / 1024.0, mem / base_mem,
            mine.iter().filter(|r| !r.ok).count()
        );
    }
}

/// `xtask bench-run NAME ROUND MEM_BYTES MARKER -- CMD...`, inside the test host: runs one VMM
/// and prints one `BENCH ...` line.
pub fn run_one(args: &[String]) -> Result<i32, String> {
    let [name, round, mem, marker, dashdash, cmd @ ..] = args else {
        return Err("usage: bench-run NAME ROUND MEM_BYTES MARKER -- CMD...".into());
    };
    if dashdash != "--" || cmd.is_empty() {
        return Err("bench-run: expected -- CMD".into());
    }
    let mem: u64 = mem.parse().map_err(|_| "bench-run: bad MEM_BYTES")?;
    let start = Instant::now();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("bench-run: cannot start {}: {e}", cmd[0]))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    let marker = marker.clone();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut sent = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !sent && String::from_utf8_lossy(&seen).contains(&marker) {
                let _ = tx.send(start.elapsed());
                sent = true;
            }
            if seen.len() > 1 << 20 {
                seen.drain(..seen.len() - 4096);
            }
        }
    });
    let mut peak_kib = 0u64;
    let deadline = Duration::from_secs(180);
    let status = loop {
        // The VMM is the shell's child (sh -c exec's the last command, so usually the same pid).
        for pid in std::iter::once(child.id()).chain(children(child.id())) {
            peak_kib = peak_kib.max(rss_outside_guest_ram(pid, mem));
        }
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            break child.wait().map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(40));
    };
    let exit = start.elapsed();
    let marker_ms = rx.try_recv().ok().map_or("none".to_string(), |d| {
        format!("{:.0}", d.as_secs_f64() * 1e3)
    });
    let exits =
        vm_exits(&errors.join().unwrap_or_default()).map_or("none".into(), |n| n.to_string());
    println!(
        "BENCH name={name} round={round} marker_ms={marker_ms} exit_ms={:.0} overhead_kib={peak_kib} exits={exits} rc={}",
        exit.as_secs_f64() * 1e3,
        status.code().unwrap_or(-1)
    );
    Ok(0)
}

/// Total VM exits from tandem's `vcpuN: M exits (...)` log lines, if it printed any.
fn vm_exits(log: &str) -> Option<u64> {
    let counts: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split(" exits (").next().filter(|h| h.len() < l.len()))
        .filter_map(|head| head.rsplit(' ').next()?.parse().ok())
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Resident KiB of `pid` in mappings smaller than the guest's RAM (guest RAM is one mapping of at
/// least `mem` bytes in every VMM measured).
fn rss_outside_guest_ram(pid: u32, mem: u64) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let (mut total, mut size_kib) = (0u64, 0u64);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => size_kib = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) if size_kib * 1024 < mem => {
                total += v.parse::<u64>().unwrap_or(0)
            }
            _ => {}
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_summed_over_vcpus_and_lines_without_them_ignored() {
        let log = "INFO kernel loaded\nINFO vcpu0: 1200 exits (pio in 1, pio out 2, mmio 0, interrupted 1, other 0)\n\
                   INFO vcpu1: 34 exits (pio in 0, pio out 0, mmio 0, interrupted 1, other 0)\n";
        assert_eq!(vm_exits(log), Some(1234));
        assert_eq!(vm_exits("qemu: warning\n"), None);
    }

    #[test]
    fn bench_lines_parse() {
        let s = Sample::parse("BENCH name=qemu-pc round=2 marker_ms=4100 exit_ms=4200 overhead_kib=58000 exits=none rc=0").unwrap();
        assert_eq!(
            (
                s.name.as_str(),
                s.marker_ms,
                s.exit_ms,
                s.overhead_kib,
                s.exits,
                s.ok
            ),
            ("qemu-pc", Some(4100.0), 4200.0, 58000, None, true)
        );
        assert!(
            !Sample::parse(
                "BENCH name=t round=1 marker_ms=none exit_ms=9 overhead_kib=1 exits=5 rc=0"
            )
            .unwrap()
            .ok
        );
    }
}
