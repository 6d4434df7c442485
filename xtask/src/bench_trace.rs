//! `cargo xtask bench boot --trace`: where boot time goes, tandem against Firecracker, in one
//! testbed run. Both boot the same ELF vmlinux (PVH for tandem) with the bench's command line
//! plus `initcall_debug printk.time=1`. `quiet` stays: the log is read with `dmesg` after the
//! marker, so nothing is lost, and without it the console's output (the same in both, but
//! flushed inside whichever initcall happens to print) dominates and blurs the per-initcall
//! times (measured 2026-12-01: 36,000 port exits for the serial port in each VMM). At the marker the test host reads KVM's per-VM counters from
//! debugfs (and `tandem stats`), then the guest prints its kernel log. The host side saves both
//! logs under `target/bench-boot-trace/` and prints the initcalls and boot phases with the largest
//! tandem-minus-Firecracker time. Times are the guest's own printk clock (emulated in the testbed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bench_dev::run_testbed;
use crate::{assets, firecracker, tasks};

const MARKER: &str = "BOOT-MARKER-42";
/// The marker, then time for the counters to be read before the kernel log goes out. The log
/// leaves out initcalls under 100 µs that printed nothing (their time falls to the next phase):
/// a long serial output raises the testbed's fault rate (docs/testbed.md).
const EXEC: &str = "echo BOOT-MARKER-$((40+2)); sleep 2; echo DMESG-BEGIN; dmesg | awk '\
    /^.[ 0-9.]*] calling  /{b=$0;k=1;next} \
    /^.[ 0-9.]*] initcall .* after /{match($0,/after [0-9]+/);u=substr($0,RSTART+6,RLENGTH-6)+0;\
    if(u>=100||k>1)print b RS $0;k=0;next} \
    k{b=b RS $0;k++;next} {print}'; echo DMESG-END";
const FC_CONFIG: &str = "/tmp/fc-trace.json";

/// The command line; Firecracker's guest ends with a reset (it cannot power off).
fn cmdline(fc: bool) -> String {
    let end = if fc { "; reboot -f" } else { "" };
    format!(
        "console=ttyS0 reboot=k panic=-1 quiet initcall_debug printk.time=1 log_buf_len=4M tandem.exec=\"{EXEC}{end}\""
    )
}

const SCRIPT: &str = r#"set -u
mount -t debugfs none /sys/kernel/debug 2>/dev/null
counters() {
  d=$(ls -d /sys/kernel/debug/kvm/$1-* 2>/dev/null | head -1)
  [ -n "$d" ] || d=$(ls -d /sys/kernel/debug/kvm/*-* 2>/dev/null | head -1)
  # Every counter KVM keeps for the VM (exits by kind, page faults, ...), non-zero ones.
  for f in $d/*; do
    [ -f "$f" ] || continue
    v=$(cat "$f" 2>/dev/null) || continue
    case "$v" in ''|*[!0-9]*|0) continue ;; esac
    printf '%s=%s ' "${f##*/}" "$v"
  done
}
# trace NAME CMD...: boots, reads the counters at the marker, prints the console with a prefix.
trace() {
  name=$1; shift
  t0=$(cut -d' ' -f1 /proc/uptime)
  "$@" </dev/null >/tmp/$name.log 2>/tmp/$name.err &
  pid=$!
  i=0; while [ $i -lt 1500 ] && ! grep -q MARKER /tmp/$name.log; do sleep 0.1; i=$((i+1)); done
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "KVM $name $(counters $pid)"
  echo "WALL $name to_marker_s=$(echo "$t1 - $t0" | bc)"
  [ "$name" = tandem ] && tandem stats --socket /tmp/t.sock 2>&1 | sed "s/^/STATS $name /"
  i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
  kill -0 $pid 2>/dev/null && { echo "HUNG $name: killed 90 s after the marker"; kill -9 $pid; }
  wait $pid
  echo "RC $name $?"
  sed "s/^/LOG $name /" /tmp/$name.log
  tail -20 /tmp/$name.err | sed "s/^/ERR $name /"
}
trace tandem env TANDEM_LOG=info tandem run --kernel /guests/vmlinux --initrd /guests/initramfs.cpio.gz \
  --cpus 1 --memory 256M --stats-socket /tmp/t.sock --cmdline "CMDLINE"
trace firecracker firecracker --no-api --config-file FC_CONFIG
"#;

/// `cargo xtask bench boot --trace`.
pub fn trace(root: &Path) -> Result<i32, String> {
    tasks::ensure_host_packages()?;
    let fc = firecracker::binary()?;
    tasks::cargo(root, &["build", "--release", "-p", "tandem"])?;
    assets::ensure(&assets::cache_root()?)?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let script = SCRIPT
        .replace("MARKER", MARKER)
        .replace(
            "CMDLINE",
            &cmdline(false).replace('"', "\\\"").replace('$', "\\$"),
        )
        .replace("FC_CONFIG", FC_CONFIG);
    let cfg = std::env::temp_dir().join(format!("tandem-fc-trace-{}.json", std::process::id()));
    let json = firecracker::config(
        "/guests/vmlinux",
        "/guests/initramfs.cpio.gz",
        &cmdline(true),
        1,
        256,
        false,
    );
    std::fs::write(&cfg, json).map_err(|e| e.to_string())?;
    let carry = [
        PathBuf::from(format!("{}:/usr/bin/xtask-bench", me.display())),
        format!("{}:/usr/bin/firecracker", fc.display()).into(),
        format!("{}:{FC_CONFIG}", cfg.display()).into(),
    ];
    eprintln!("bench: tracing one boot of tandem and one of Firecracker in one testbed run");
    let out = run_testbed(&script, &carry, 600);
    let _ = std::fs::remove_file(&cfg);
    let out = out?;
    let dir = root.join("target/bench-boot-trace");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("testbed-output.txt"), &out).map_err(|e| e.to_string())?;
    let mut logs = Vec::new();
    for name in ["tandem", "firecracker"] {
        let dmesg = dmesg_of(&out, name);
        std::fs::write(dir.join(format!("{name}.dmesg")), dmesg.join("\n") + "\n")
            .map_err(|e| e.to_string())?;
        logs.push(dmesg);
    }
    eprintln!("bench: kernel logs saved in {}", dir.display());
    for l in out.lines() {
        if l.starts_with("KVM ")
            || l.starts_with("WALL ")
            || l.starts_with("RC ")
            || l.starts_with("HUNG ")
            || l.starts_with("STATS ")
        {
            println!("{l}");
        }
    }
    let (t, f) = (phases(&logs[0]), phases(&logs[1]));
    if t.is_empty() || f.is_empty() {
        return Err(format!(
            "no kernel log from {} (see {})",
            if t.is_empty() {
                "tandem"
            } else {
                "Firecracker"
            },
            dir.join("testbed-output.txt").display()
        ));
    }
    let total = |p: &BTreeMap<String, f64>| p.values().sum::<f64>();
    let first = |l: &[String], pat: &str| {
        l.iter()
            .find(|x| x.contains(pat))
            .and_then(|x| line(x))
            .map_or(f64::NAN, |(t, _)| t)
    };
    println!("| kernel clock at | tandem (s) | Firecracker (s) |");
    println!("| --- | --- | --- |");
    for pat in ["calling  ", "Freeing unused kernel image", "Run /init"] {
        println!(
            "| first \"{}\" | {:.3} | {:.3} |",
            pat.trim(),
            first(&logs[0], pat),
            first(&logs[1], pat)
        );
    }
    println!(
        "| sum of initcalls and phases below | {:.3} | {:.3} |",
        total(&t),
        total(&f)
    );
    println!("\nThe 10 initcalls / phases with the largest tandem-minus-Firecracker time:");
    println!("| initcall or phase (the gap before a log line) | tandem (ms) | Firecracker (ms) | difference (ms) |");
    println!("| --- | --- | --- | --- |");
    for (k, a, b) in top_differences(&t, &f, 10) {
        println!(
            "| {k} | {:.1} | {:.1} | {:+.1} |",
            a * 1e3,
            b * 1e3,
            (a - b) * 1e3
        );
    }
    println!("\nThe 10 with the largest Firecracker-minus-tandem time:");
    println!("| initcall or phase | tandem (ms) | Firecracker (ms) | difference (ms) |");
    println!("| --- | --- | --- | --- |");
    for (k, b, a) in top_differences(&f, &t, 10) {
        println!(
            "| {k} | {:.1} | {:.1} | {:+.1} |",
            a * 1e3,
            b * 1e3,
            (a - b) * 1e3
        );
    }
    Ok(0)
}

/// The guest's kernel log from the console of `name` (between the DMESG markers).
fn dmesg_of(out: &str, name: &str) -> Vec<String> {
    let prefix = format!("LOG {name} ");
    out.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|l| l.trim_end_matches('\r'))
        .skip_while(|l| !l.starts_with("DMESG-BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("DMESG-END"))
        .map(str::to_string)
        .collect()
}

/// `[   1.234567] text` as (seconds, text).
fn line(l: &str) -> Option<(f64, &str)> {
    let rest = l.trim_start().strip_prefix('[')?;
    let (t, text) = rest.split_once(']')?;
    Some((t.trim().parse().ok()?, text.trim_start()))
}

/// A message with its numbers masked, so that the same phase matches across boots.
fn normalize(text: &str) -> String {
    let mut o = String::new();
    let mut in_num = false;
    for c in text.chars() {
        if c.is_ascii_digit() || (in_num && (c.is_ascii_hexdigit() || c == 'x' || c == '.')) {
            if !in_num {
                o.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            o.push(c);
        }
    }
    o.chars().take(70).collect()
}

/// Seconds per initcall (`initcall NAME`, from its "returned ... after N usecs") and per phase
/// outside initcalls (`before: MESSAGE`, the gap from the previous line to that line).
fn phases(log: &[String]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let mut prev: Option<f64> = None;
    let mut depth = 0usize;
    for l in log {
        let Some((t, text)) = line(l) else { continue };
        if let Some(rest) = text.strip_prefix("calling  ") {
            if depth == 0 {
                if let Some(p) = prev {
                    let name = rest.split('+').next().unwrap_or(rest);
                    *m.entry(format!("before: calling {name}")).or_insert(0.0) += t - p;
                }
            }
            depth += 1;
        } else if let Some(rest) = text.strip_prefix("initcall ") {
            let name = rest.split('+').next().unwrap_or(rest);
            let us: Option<f64> = rest
                .split_once(" after ")
                .and_then(|(_, a)| a.split_whitespace().next()?.parse().ok());
            if let Some(us) = us {
                *m.entry(format!("initcall {name}")).or_insert(0.0) += us / 1e6;
            }
            depth = depth.saturating_sub(1);
        } else if depth == 0 {
            if let Some(p) = prev {
                *m.entry(format!("before: {}", normalize(text)))
                    .or_insert(0.0) += t - p;
            }
        }
        prev = Some(t);
    }
    m
}

/// The `n` keys with the largest `a - b` (a key missing on one side counts 0 there).
fn top_differences(
    a: &BTreeMap<String, f64>,
    b: &BTreeMap<String, f64>,
    n: usize,
) -> Vec<(String, f64, f64)> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut v: Vec<(String, f64, f64)> = keys
        .into_iter()
        .map(|k| {
            let x = a.get(k).copied().unwrap_or(0.0);
            let y = b.get(k).copied().unwrap_or(0.0);
            (k.clone(), x, y)
        })
        .collect();
    v.sort_by(|p, q| (q.1 - q.2).total_cmp(&(p.1 - p.2)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn initcalls_and_gaps_outside_them_are_timed() {
        let l = log("[    0.000000] Linux version 6.1\n\
                     [    0.500000] tsc: Detected 2994.372 MHz processor\n\
                     [    1.000000] calling  pci_subsys_init+0x0/0x80 @ 1\n\
                     [    1.100000] PCI: probing\n\
                     [    1.300000] initcall pci_subsys_init+0x0/0x80 returned 0 after 300000 usecs\n\
                     [    1.400000] calling  foo+0x0/0x10 [mod] @ 1\n\
                     [    1.400100] initcall foo+0x0/0x10 [mod] returned 0 after 100 usecs\n\
                     [    2.000000] Run /init as init process\n");
        let p = phases(&l);
        let get = |k: &str| p.get(k).copied().unwrap_or(f64::NAN);
        assert!((get("before: tsc: Detected # MHz processor") - 0.5).abs() < 1e-9);
        assert!((get("initcall pci_subsys_init") - 0.3).abs() < 1e-9);
        assert!((get("before: calling pci_subsys_init") - 0.5).abs() < 1e-9);
        assert!((get("initcall foo") - 0.0001).abs() < 1e-9);
        assert!((get("before: Run /init as init process") - 0.5999).abs() < 1e-9);
        // Lines printed inside an initcall are part of it, not a phase of their own.
        assert!(!p.keys().any(|k| k.contains("PCI: probing")));
    }

    #[test]
    fn the_largest_differences_come_first_and_one_sided_keys_count() {
        let a = BTreeMap::from([("x".to_string(), 1.0), ("y".to_string(), 0.2)]);
        let b = BTreeMap::from([("x".to_string(), 0.5), ("z".to_string(), 0.3)]);
        let top = top_differences(&a, &b, 2);
        assert_eq!(
            top,
            [("x".to_string(), 1.0, 0.5), ("y".to_string(), 0.2, 0.0)]
        );
    }

    #[test]
    fn the_kernel_log_is_cut_from_the_console_of_its_vmm() {
        let out = "LOG tandem [ 0.1] boot\r\nLOG tandem DMESG-BEGIN\r\nLOG tandem [ 0.2] a\r\n\
                   LOG firecracker [ 9.0] other\nLOG tandem DMESG-END\nLOG tandem [ 3.0] late\n";
        assert_eq!(dmesg_of(out, "tandem"), ["[ 0.2] a"]);
        assert!(dmesg_of(out, "firecracker").is_empty());
    }

    #[test]
    fn the_log_filter_cannot_match_the_command_line_that_carries_it() {
        // The kernel logs its command line, which holds the filter: the filter's patterns must
        // only match log lines whose text starts with "calling" or "initcall".
        assert!(EXEC.contains("/^.[ 0-9.]*] calling  /"));
        assert!(EXEC.contains("/^.[ 0-9.]*] initcall .* after /"));
    }

    #[test]
    fn the_guest_command_fits_the_init_and_the_kernel() {
        // The guest's init takes `tandem.exec="..."` up to the next double quote; the kernel's
        // command line is at most 2048 bytes.
        assert!(!EXEC.contains('"'));
        assert!(cmdline(true).len() < 1024);
    }
}
