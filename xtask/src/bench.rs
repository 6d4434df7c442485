//! `cargo xtask bench boot`: boot time and VMM memory overhead, tandem against Firecracker (built
//! from source, see [`crate::firecracker`]) and QEMU (on aarch64 Debian's arm64 build, see
//! [`crate::qemu_aarch64`]), in one testbed run.
//!
//! Inside the test host, `xtask bench-run` (this same binary, carried in) starts each VMM,
//! timestamps the moment the guest's marker appears on its console and the moment the process
//! exits, and samples `/proc/PID/smaps` for the VMM's resident memory outside its guest-RAM
//! mapping. The host side prints min/median/max and ratios to the best peer (the peer with the
//! lowest median for that column).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{assets, bench_dev, firecracker, qemu_aarch64, tasks, Arch};

/// Boots per row (`$TANDEM_BENCH_ROUNDS` overrides it, for tighter medians).
fn rounds() -> usize {
    std::env::var("TANDEM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5)
}

/// Seconds the test host may take for `boots` boots: the slowest row (QEMU's microvm) takes
/// about 22 s a boot in the one-CPU test host, so 40 s each leaves room for a loaded machine.
fn testbed_timeout(boots: usize) -> u32 {
    (120 + 40 * boots).try_into().unwrap_or(u32::MAX)
}

/// The rows `$TANDEM_BENCH_ROWS` (comma-separated names) keeps, or all.
fn wanted(name: &str) -> bool {
    std::env::var("TANDEM_BENCH_ROWS").map_or(true, |rows| rows.split(',').any(|r| r == name))
}
const MEM_MIB: u64 = 256;
const CPUS: u32 = 1;
const MARKER: &str = "BOOT-MARKER-42";
/// The guest computes the marker, so the kernel's echo of its command line cannot match it.
const GUEST_EXEC: &str = "echo BOOT-MARKER-$((40+2))";
/// Firecracker's guests cannot power off (hardware-reduced ACPI without a sleep register: Linux
/// halts), so its guest ends as Firecracker documents, with a reset (`reboot=k`).
const FC_GUEST_EXEC: &str = "echo BOOT-MARKER-$((40+2)); reboot -f";

/// Where the Firecracker configurations lie in the test host: without a device, and with its
/// entropy device.
const FC_CONFIG: &str = "/tmp/fc-boot.json";
const FC_CONFIG_ENTROPY: &str = "/tmp/fc-boot-entropy.json";
/// Rows with the same devices, as (tandem, peer): their ratio is printed under the table.
const LIKE_FOR_LIKE: &[(&str, &str)] = &[
    ("tandem-vmlinux", "firecracker-vmlinux"),
    ("tandem-vmlinux-rng", "firecracker-vmlinux-entropy"),
    ("tandem-vmlinux-reset", "firecracker-vmlinux"),
    ("tandem-Image", "firecracker-Image"),
    ("tandem-Image-rng", "firecracker-Image-entropy"),
];

/// The guest's command line (the same for every VMM but for how the guest ends).
fn cmdline(exec: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 quiet tandem.exec=\"{exec}\"")
}

/// The VMMs compared, as (name, command line in the test host); Firecracker's rows when `fc`,
/// and on aarch64 QEMU's when `qemu` (on x86_64 this machine's QEMU is always carried in).
fn configs(arch: Arch, fc: bool, qemu: bool) -> Vec<(&'static str, String)> {
    // For `sh -c '...'`: the marker's `$((40+2))` must reach the guest unexpanded.
    let quoted = |exec: &str| cmdline(exec).replace('"', "\\\"").replace('$', "\\$");
    let (append, fc_append) = (quoted(GUEST_EXEC), quoted(FC_GUEST_EXEC));
    let tandem = |kernel: &str, extra: &str| {
        format!("TANDEM_LOG=info tandem run --kernel {kernel} --initrd /guests/initramfs.cpio.gz --cpus {CPUS} --memory {MEM_MIB}M{extra} --cmdline \"{append}\"")
    };
    let firecracker = |config: &str| format!("firecracker --no-api --config-file {config}");
    if arch == Arch::Aarch64 {
        // The arm64 kernel package's `vmlinuz` is the uncompressed `Image` both VMMs load.
        let mut v = vec![
            ("tandem-Image", tandem("/guests/vmlinuz", "")),
            ("tandem-Image-rng", tandem("/guests/vmlinuz", " --rng on")),
        ];
        if fc {
            v.push(("firecracker-Image", firecracker(FC_CONFIG)));
            v.push(("firecracker-Image-entropy", firecracker(FC_CONFIG_ENTROPY)));
        }
        if qemu {
            // The board's console is a PL011 (ttyAMA0); the other VMMs' is a 16550 (ttyS0).
            let append = append.replace("console=ttyS0", "console=ttyAMA0");
            v.push((
                "qemu-virt",
                qemu_aarch64::command(
                    "/guests/vmlinuz",
                    "/guests/initramfs.cpio.gz",
                    &append,
                    CPUS,
                    MEM_MIB,
                ),
            ));
        }
        return v;
    }
    // As the issue states the peer: QEMU's default devices for the machine, `-nic none`.
    let qemu = |machine: &str, extra: &str| {
        format!(
            "qemu-system-x86_64 -M {machine} -accel kvm -cpu host -m {MEM_MIB}M -smp {CPUS} {extra} \
             -display none -serial stdio -nic none -no-reboot -kernel /guests/vmlinuz \
             -initrd /guests/initramfs.cpio.gz -append \"{append}\""
        )
    };
    let mut v = vec![
        ("tandem-bzImage", tandem("/guests/vmlinuz", "")),
        ("tandem-vmlinux", tandem("/guests/vmlinux", "")),
        // One device, the entropy device, beside Firecracker's with its own: what a device
        // costs the boot (mostly the guest's: its driver modules), like for like.
        ("tandem-vmlinux-rng", tandem("/guests/vmlinux", " --rng on")),
        // The guest ending as Firecracker's must (a reset): power-off to exit, like for like.
        (
            "tandem-vmlinux-reset",
            tandem("/guests/vmlinux", "").replace(&append, &fc_append),
        ),
    ];
    if fc {
        // Unjailed, no API socket; its serial console is its stdout.
        v.push(("firecracker-vmlinux", firecracker(FC_CONFIG)));
        v.push((
            "firecracker-vmlinux-entropy",
            firecracker(FC_CONFIG_ENTROPY),
        ));
    }
    v.extend([
        ("qemu-pc", qemu("pc", "")),
        ("qemu-microvm", qemu("microvm", "")),
        // QEMU trimmed as far as it goes: no default devices (VGA, IDE, floppy, ...).
        (
            "qemu-pc-nodefaults",
            qemu("pc", "-nodefaults -no-user-config"),
        ),
    ]);
    v
}

/// Whether a row's guest ends with a reset instead of a power-off.
fn name_ends_reset(name: &str) -> bool {
    name.ends_with("-reset")
}

/// Whether a row is a peer (not tandem).
fn is_peer(name: &str) -> bool {
    !name.starts_with("tandem")
}

/// `cargo xtask bench boot [--arch aarch64]`.
pub fn boot(root: &Path, arch: Arch) -> Result<i32, String> {
    let aarch64 = arch == Arch::Aarch64;
    tasks::ensure_testbed_packages(arch)?;
    let fc = match firecracker::binary_for(aarch64) {
        Ok(bin) => Some(bin),
        Err(e) => {
            eprintln!("bench: no Firecracker row ({e}); comparing with QEMU alone");
            None
        }
    };
    // QEMU for the arm64 test host: Debian's arm64 package, unpacked and cached.
    let qemu = if aarch64 && wanted("qemu-virt") {
        match qemu_aarch64::bundle() {
            Ok((dir, version)) => {
                eprintln!("bench: QEMU row: Debian's qemu-system-arm:arm64 {version}");
                Some(dir)
            }
            Err(e) => {
                eprintln!("bench: no QEMU row ({e})");
                None
            }
        }
    } else {
        None
    };
    // The in-host measurements are this program's: for an aarch64 test host, built for it.
    let me = if aarch64 {
        crate::aarch64::build(root)?;
        crate::aarch64::build_xtask(root)?
    } else {
        tasks::cargo(root, &["build", "--release", "-p", "tandem"])?;
        assets::ensure(&assets::cache_root()?)?;
        std::env::current_exe().map_err(|e| e.to_string())?
    };
    let mut configs = configs(arch, fc.is_some(), qemu.is_some());
    configs.retain(|(name, _)| wanted(name));
    let rounds = rounds();
    let mut script = String::from("set -u\n");
    for round in 1..=rounds {
        for (name, cmd) in &configs {
            script.push_str(&format!(
                "/usr/bin/xtask-bench bench-run {name} {round} {} {MARKER} -- sh -c '{}'\n",
                MEM_MIB << 20,
                cmd.replace('\'', r"'\''")
            ));
        }
    }
    let boots = rounds * configs.len();
    eprintln!("bench: {boots} boots in one testbed run (about 10 s each)");
    let mut carry = vec![PathBuf::from(format!(
        "{}:/usr/bin/xtask-bench",
        me.display()
    ))];
    if let Some(dir) = &qemu {
        carry.push(format!("{}:{}", dir.display(), qemu_aarch64::IN_HOST).into());
    }
    let mut fc_configs = Vec::new();
    if let Some(bin) = &fc {
        carry.push(format!("{}:/usr/bin/firecracker", bin.display()).into());
        // Firecracker on x86_64 cannot power its guest off; on aarch64 it takes PSCI's.
        let (kernel, exec) = if aarch64 {
            ("/guests/vmlinuz", GUEST_EXEC)
        } else {
            ("/guests/vmlinux", FC_GUEST_EXEC)
        };
        for (entropy, at) in [(false, FC_CONFIG), (true, FC_CONFIG_ENTROPY)] {
            let json = firecracker::config(
                kernel,
                "/guests/initramfs.cpio.gz",
                &cmdline(exec),
                CPUS,
                MEM_MIB,
                entropy,
            );
            let path = std::env::temp_dir()
                .join(format!("tandem-fc-{}-{entropy}.json", std::process::id()));
            std::fs::write(&path, json).map_err(|e| e.to_string())?;
            carry.push(format!("{}:{at}", path.display()).into());
            fc_configs.push(path);
        }
    }
    let out = bench_dev::run_testbed_on(arch, &script, &carry, testbed_timeout(boots));
    for p in &fc_configs {
        let _ = std::fs::remove_file(p);
    }
    let out = out?;
    let rows: Vec<Sample> = out.lines().filter_map(Sample::parse).collect();
    if rows.len() != rounds * configs.len() {
        eprintln!("{out}");
        return Err(format!(
            "expected {} results, got {}",
            rounds * configs.len(),
            rows.len()
        ));
    }
    let names: Vec<&str> = configs.iter().map(|(n, _)| *n).collect();
    print_table(arch, rounds, &names, &rows);
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
            // A `-reset` row's guest resets as Firecracker's does, which tandem reports as 4.
            ok: get("rc=")?
                == if name_ends_reset(&get("name=")?) {
                    "4"
                } else {
                    "0"
                }
                && get("marker_ms=")? != "none",
        })
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// A column of the table: heading and value of one boot.
type Column = (&'static str, fn(&Sample) -> f64);

const COLUMNS: [Column; 4] = [
    ("to marker (s)", |r| r.marker_ms.unwrap_or(f64::NAN) / 1e3),
    ("to exit (s)", |r| r.exit_ms / 1e3),
    ("marker to exit (s)", |r| {
        (r.exit_ms - r.marker_ms.unwrap_or(f64::NAN)) / 1e3
    }),
    ("VMM RSS outside guest RAM (MiB)", |r| {
        r.overhead_kib as f64 / 1024.0
    }),
];

/// Per row, per column: (min, median, max).
type Stats = Vec<(String, Vec<(f64, f64, f64)>)>;

fn table_stats(names: &[&str], rows: &[Sample]) -> Stats {
    names
        .iter()
        .map(|name| {
            let mine: Vec<&Sample> = rows.iter().filter(|r| r.name == *name).collect();
            let cols = COLUMNS
                .iter()
                .map(|(_, f)| stats(mine.iter().map(|r| f(r)).collect()))
                .collect();
            (name.to_string(), cols)
        })
        .collect()
}

/// For each column, the peer with the lowest median and that median.
fn best_peers(st: &Stats) -> Vec<Option<(String, f64)>> {
    (0..COLUMNS.len())
        .map(|c| {
            st.iter()
                .filter(|(n, cols)| is_peer(n) && !cols[c].1.is_nan())
                .map(|(n, cols)| (n.clone(), cols[c].1))
                .min_by(|a, b| a.1.total_cmp(&b.1))
        })
        .collect()
}

fn print_table(arch: Arch, rounds: usize, names: &[&str], rows: &[Sample]) {
    let st = table_stats(names, rows);
    let best = best_peers(&st);
    let (kernel, fc_end) = match arch {
        Arch::X86_64 => (
            "Debian's cloud kernel",
            "Firecracker: reset, it has no power-off",
        ),
        Arch::Aarch64 => (
            "Debian's arm64 kernel (Image)",
            "PSCI SYSTEM_OFF under every VMM",
        ),
    };
    println!("boot benchmark: {rounds} boots each, {CPUS} vCPU, {MEM_MIB} MiB, {kernel} + busybox initramfs, in the nested testbed");
    println!("\"marker to exit\": from the guest's power-off ({fc_end}), which follows the marker at once, to the VMM's exit; a -reset row's guest resets instead, as Firecracker's.");
    for (c, b) in best.iter().enumerate() {
        match b {
            Some((n, v)) => println!("best peer for {}: {n} ({v:.2})", COLUMNS[c].0),
            None => println!("best peer for {}: none", COLUMNS[c].0),
        }
    }
    let mut head = String::from("| VMM |");
    for (h, _) in COLUMNS {
        head.push_str(&format!(" {h} min/median/max | ×best peer |"));
    }
    println!("{head} VM exits, median | failures |");
    println!("|{}", " --- |".repeat(2 * COLUMNS.len() + 3));
    for (name, cols) in &st {
        let mut line = format!("| {name} |");
        for (c, (lo, med, hi)) in cols.iter().enumerate() {
            let ratio = best[c]
                .as_ref()
                .map_or("n/a".to_string(), |(_, b)| format!("{:.2}", med / b));
            line.push_str(&format!(" {lo:.2} / {med:.2} / {hi:.2} | {ratio} |"));
        }
        let mine: Vec<&Sample> = rows.iter().filter(|r| &r.name == name).collect();
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
        let failures = mine.iter().filter(|r| !r.ok).count();
        println!("{line} {exits} | {failures} |");
    }
    for (t, p) in LIKE_FOR_LIKE {
        let median = |n: &str, c: usize| st.iter().find(|(x, _)| x == n).map(|(_, cols)| cols[c].1);
        if let (Some(a), Some(b)) = (median(t, 0), median(p, 0)) {
            println!(
                "same devices: {t} ÷ {p}, to marker {:.2}, marker to exit {:.2}",
                a / b,
                median(t, 2).unwrap_or(f64::NAN) / median(p, 2).unwrap_or(f64::NAN)
            );
        }
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
    fn fifteen_rounds_of_every_row_fit_in_the_test_hosts_time() {
        // 22 s: QEMU microvm's boot in the one-CPU test host, the slowest row measured.
        let boots = 15 * configs(Arch::X86_64, true, true).len();
        assert!(boots >= 15 * 9, "{boots}");
        assert!(testbed_timeout(boots) as usize > boots * 22);
    }

    #[test]
    fn the_aarch64_qemu_row_boots_the_same_guest_on_its_own_console() {
        let rows = configs(Arch::Aarch64, true, true);
        let (_, tandem) = rows.iter().find(|(n, _)| *n == "tandem-Image").unwrap();
        let (_, qemu) = rows.iter().find(|(n, _)| *n == "qemu-virt").unwrap();
        assert!(tandem.contains("console=ttyS0 "), "{tandem}");
        assert!(
            qemu.contains(
                r#"-append "console=ttyAMA0 reboot=k panic=-1 quiet tandem.exec=\"echo BOOT-MARKER-\$((40+2))\"""#
            ),
            "{qemu}"
        );
        for want in [
            " -m 256M -smp 1 ",
            " -kernel /guests/vmlinuz -initrd /guests/initramfs.cpio.gz ",
            "-M virt,gic-version=3 -accel kvm -cpu host",
        ] {
            assert!(qemu.contains(want), "{want:?} not in {qemu}");
        }
        assert!(is_peer("qemu-virt"));
        // Without the bundle, no row; the x86_64 rows do not depend on it.
        assert!(!configs(Arch::Aarch64, true, false)
            .iter()
            .any(|(n, _)| n.starts_with("qemu")));
        assert_eq!(
            configs(Arch::X86_64, true, false).len(),
            configs(Arch::X86_64, true, true).len()
        );
    }

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
        // A row whose guest resets succeeds with tandem's reboot status, and only with it.
        let reset = |rc: u32| {
            Sample::parse(&format!(
                "BENCH name=tandem-vmlinux-reset round=1 marker_ms=5 exit_ms=9 overhead_kib=1 exits=5 rc={rc}"
            ))
            .unwrap()
            .ok
        };
        assert!(reset(4) && !reset(0));
    }

    #[test]
    fn ratios_are_to_the_best_peer_per_column_and_tandem_is_no_peer() {
        let line = |name: &str, marker: u32, exit: u32, kib: u32| {
            Sample::parse(&format!(
                "BENCH name={name} round=1 marker_ms={marker} exit_ms={exit} overhead_kib={kib} exits=none rc=0"
            ))
            .unwrap()
        };
        let rows = [
            line("tandem-vmlinux", 1000, 1100, 1024),
            line("firecracker-vmlinux", 2000, 2050, 4096),
            line("qemu-pc", 3000, 3500, 2048),
        ];
        let st = table_stats(&["tandem-vmlinux", "firecracker-vmlinux", "qemu-pc"], &rows);
        let best = best_peers(&st);
        let names: Vec<&str> = best
            .iter()
            .map(|b| b.as_ref().unwrap().0.as_str())
            .collect();
        let values: Vec<f64> = best.iter().map(|b| b.as_ref().unwrap().1).collect();
        // Firecracker is fastest; QEMU uses less memory than Firecracker; tandem is never a peer.
        assert_eq!(
            names,
            [
                "firecracker-vmlinux",
                "firecracker-vmlinux",
                "firecracker-vmlinux",
                "qemu-pc"
            ]
        );
        for (v, want) in values.iter().zip([2.0, 2.05, 0.05, 2.0]) {
            assert!((v - want).abs() < 1e-9, "{v} vs {want}");
        }
    }
}
