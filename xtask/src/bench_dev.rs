//! `cargo xtask bench net` and `cargo xtask bench blk`: device throughput, tandem against QEMU,
//! each in one testbed run.
//!
//! The guest gets the usual initramfs plus an overlay with the benchmark tools (iperf3, or
//! tandem's `bench-io`) and their libraries, built inside the test host with busybox `cpio`.
//! - net: iperf3 from the test host to the guest's iperf3 server through a forwarded port, both
//!   directions: tandem `--net user --forward`, QEMU `-nic user,hostfwd=`, QEMU with passt.
//! - blk: `bench-io` on /dev/vda (O_DIRECT: sequential MB/s, 4 KiB random IOPS at queue depth 1),
//!   tandem virtio-blk (on virtio-pci, the default, and on virtio-mmio) against QEMU
//!   virtio-blk-pci (its default thread-pool I/O, and io_uring, which spares each request the hand-off
//!   to a pool thread), same raw image on the test host's tmpfs, all with the host page cache
//!   (`cache=writeback`). A QEMU row with the device in an I/O thread of its own
//!   (`-object iothread`) was tried and dropped: in the one-CPU test host it was the slowest QEMU
//!   on every metric (0.77-0.92× QEMU's default, 2026-12-01).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::testbed::shared_libs;
use crate::{assets, tasks, Arch};

const MEM: &str = "512M";
const QEMU: &str = "qemu-system-x86_64 -M pc -accel kvm -cpu host -m 512M -smp 1 -display none -nodefaults -no-user-config -no-reboot -kernel /guests/vmlinuz -initrd /tmp/bench.gz";

/// The start shared by the benches of testkit program `bin` (`bench-io`, `chan-bench`): host
/// packages, release builds of tandem and the testkit, the testbed's assets. Returns the script's
/// first lines, which pack `/usr/bin/BIN` into the guest initramfs, and the `--with` entry that
/// carries the program into the test host.
pub(crate) fn testkit_bench(root: &Path, bin: &str) -> Result<(String, PathBuf), String> {
    tasks::ensure_host_packages()?;
    tasks::cargo(
        root,
        &["build", "--release", "-p", "tandem", "-p", "tandem-testkit"],
    )?;
    assets::ensure(&assets::cache_root()?)?;
    let tool = root.join("target/release").join(bin);
    let in_host = PathBuf::from("/usr/bin").join(bin);
    let mut s = String::from("set -u\nmkdir -p /usr/bin\n");
    s.push_str(&overlay(&[(in_host.clone(), tool.clone())]));
    let carry = PathBuf::from(format!("{}:{}", tool.display(), in_host.display()));
    Ok((s, carry))
}

/// Shell lines that pack `files` (paths in the test host, each with the host file whose
/// libraries it needs) into /tmp/bench.gz: the guest initramfs plus an overlay.
pub(crate) fn overlay(files: &[(PathBuf, PathBuf)]) -> String {
    let mut all = BTreeSet::new();
    for (guest, host) in files {
        all.insert(guest.clone());
        all.extend(shared_libs(host));
    }
    // The kernel's unpacker creates no missing parents: list every directory, parents first.
    let mut entries = BTreeSet::new();
    for f in &all {
        let mut p = f.as_path();
        while let Some(parent) = p.parent().filter(|d| *d != Path::new("/")) {
            entries.insert(parent.to_path_buf());
            p = parent;
        }
        entries.insert(f.clone());
    }
    let list: Vec<String> = entries
        .iter()
        .filter_map(|p| p.to_str())
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    format!(
        "(cd / && printf '%s\\n' {} | cpio -o -H newc 2>/dev/null | gzip -1 > /tmp/overlay.gz)\n\
         cat /guests/initramfs.cpio.gz /tmp/overlay.gz > /tmp/bench.gz\n",
        list.join(" ")
    )
}

fn host_tool(name: &str) -> Result<PathBuf, String> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!("{name} not found (apt-get install it)"))
}

fn install(pkgs: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| host_tool(p).is_err())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    tasks::apt_install(&missing, None)
}

/// Runs `script` as /bench.sh in one test host, with `carry` and QEMU (binary and firmware)
/// carried in; returns its standard output.
pub fn run_testbed(script: &str, carry: &[PathBuf], timeout: u32) -> Result<String, String> {
    run_testbed_on(Arch::X86_64, script, carry, timeout)
}

/// [`run_testbed`] in the test host of `arch`; the aarch64 one gets no QEMU of this machine's.
pub fn run_testbed_on(
    arch: Arch,
    script: &str,
    carry: &[PathBuf],
    timeout: u32,
) -> Result<String, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let script_path = std::env::temp_dir().join(format!("tandem-bench-{}.sh", std::process::id()));
    std::fs::write(&script_path, script).map_err(|e| e.to_string())?;
    let mut tb = Command::new(&me);
    tb.args(["testbed", "--no-build", "--timeout", &timeout.to_string()]);
    if arch == Arch::Aarch64 {
        tb.args(["--arch", "aarch64"]);
    }
    tb.arg("--with")
        .arg(format!("{}:/bench.sh", script_path.display()));
    for p in carry {
        tb.arg("--with").arg(p);
    }
    if arch == Arch::X86_64 {
        for p in [
            "/usr/bin/qemu-system-x86_64",
            "/usr/share/qemu",
            "/usr/share/seabios",
        ] {
            tb.args(["--with", p]);
        }
    }
    tb.args(["--", "sh", "/bench.sh"]);
    let res = tb
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the testbed: {e}"));
    let _ = std::fs::remove_file(&script_path);
    let res = res?;
    let out = String::from_utf8_lossy(&res.stdout).into_owned();
    if !res.status.success() {
        eprintln!("{out}");
        return Err(format!("the testbed run failed ({})", res.status));
    }
    Ok(out)
}

/// `RESULT <vmm> <key>=<value>...` lines, by VMM, in order of appearance.
pub(crate) fn results(out: &str) -> Vec<(String, Vec<(String, f64)>)> {
    let mut rows: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for l in out.lines() {
        let mut w = l.split_whitespace();
        if w.next() != Some("RESULT") {
            continue;
        }
        let Some(vmm) = w.next() else { continue };
        let kv: Vec<(String, f64)> = w
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        match rows.iter_mut().find(|(n, _)| n == vmm) {
            Some((_, v)) => v.extend(kv),
            None => rows.push((vmm.to_string(), kv)),
        }
    }
    rows
}

/// Prints `rows` (VMM, key/value pairs) for `keys`, each value with its ratio to the best of
/// `peers` for that key: the highest, or the lowest for a cost (a key naming `cpu-ms`, `exits`
/// or `_us`). The best peer of each key is named under the table.
pub(crate) fn print_table(rows: &[(String, Vec<(String, f64)>)], keys: &[&str], peers: &[&str]) {
    let get = |vmm: &str, k: &str| {
        rows.iter()
            .find(|(n, _)| n == vmm)
            .and_then(|(_, kv)| kv.iter().find(|(kk, _)| kk == k).map(|(_, v)| *v))
    };
    let best: Vec<Option<(&str, f64)>> = keys
        .iter()
        .map(|k| {
            let cost = is_cost(k);
            peers
                .iter()
                .filter_map(|p| get(p, k).filter(|v| *v > 0.0).map(|v| (*p, v)))
                .reduce(|a, b| if (b.1 < a.1) == cost { b } else { a })
        })
        .collect();
    let ratio = match peers {
        [one] => format!("×{one}"),
        _ => "×best peer".to_string(),
    };
    let mut header = String::from("| VMM |");
    let mut line = String::from("| --- |");
    for k in keys {
        header.push_str(&format!(" {k} | {ratio} |"));
        line.push_str(" --- | --- |");
    }
    println!("{header}\n{line}");
    for (vmm, _) in rows {
        let mut r = format!("| {vmm} |");
        for (k, b) in keys.iter().zip(&best) {
            match (get(vmm, k), b) {
                (Some(v), Some((_, b))) => r.push_str(&format!(" {} | {:.2} |", number(v), v / b)),
                (Some(v), None) => r.push_str(&format!(" {} | n/a |", number(v))),
                (None, _) => r.push_str(" n/a | n/a |"),
            }
        }
        println!("{r}");
    }
    let named: Vec<String> = keys
        .iter()
        .zip(&best)
        .map(|(k, b)| format!("{k}: {}", b.map_or("none", |(p, _)| p)))
        .collect();
    println!("\nbest peer per column: {}", named.join(", "));
}

/// Whether lower is better for `key`.
fn is_cost(key: &str) -> bool {
    key.contains("cpu-ms") || key.contains("exits") || key.ends_with("_us")
}

/// `v` with one decimal, or three significant digits below 1 (per-tick counts are fractions).
pub(crate) fn number(v: f64) -> String {
    if v == 0.0 || v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

/// `cargo xtask bench net`.
pub fn net(root: &Path) -> Result<i32, String> {
    tasks::ensure_host_packages()?;
    install(&["iperf3", "passt"])?;
    tasks::cargo(root, &["build", "--release", "-p", "tandem"])?;
    assets::ensure(&assets::cache_root()?)?;
    let iperf = host_tool("iperf3")?;
    let passt = host_tool("passt")?;
    let guest = "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; iperf3 -s -D; echo BENCH-READY; sleep 900";
    let mut common = String::from("set -u\nmount -t debugfs none /sys/kernel/debug 2>/dev/null\n");
    common.push_str(&overlay(&[(iperf.clone(), iperf.clone())]));
    common.push_str(&format!(
        r#"APPEND='console=ttyS0 reboot=k panic=-1 quiet tandem.exec="{guest}"'
# KVM's exit count of process $1's VM.
exits() {{ cat /sys/kernel/debug/kvm/$1-*/exits 2>/dev/null | awk '{{s+=$1}} END {{print s+0}}'; }}
measure() {{
  name=$1 vm=$2
  i=0
  while [ $i -lt 150 ] && ! grep -q BENCH-READY /tmp/$name.log 2>/dev/null; do sleep 1; i=$((i+1)); done
  grep -q BENCH-READY /tmp/$name.log || {{ echo "RESULT $name failed=1"; tail -5 /tmp/$name.log; return; }}
  sleep 1
  for dir in host-to-guest guest-to-host; do
    flag=; [ $dir = guest-to-host ] && flag=-R
    # The test host's busy CPU time over the run (all its CPUs: user, system, interrupts).
    b0=$(awk '/^cpu /{{print $2+$3+$4+$7+$8+$9}}' /proc/stat); e0=$(exits $vm)
    iperf3 -c 127.0.0.1 -p 5201 -t 8 -f m $flag >/tmp/iperf.out 2>&1
    b1=$(awk '/^cpu /{{print $2+$3+$4+$7+$8+$9}}' /proc/stat); e1=$(exits $vm)
    mbps=$(grep receiver /tmp/iperf.out | sed 's/.* \([0-9.]*\) Mbits\/sec.*/\1/')
    mb=$(grep receiver /tmp/iperf.out | sed 's/.* \([0-9.]*\) MBytes.*/\1/')
    [ -n "$mbps" ] || tail -3 /tmp/iperf.out
    # USER_HZ is 100: a jiffy is 10 ms.
    [ -n "$mb" ] && echo "RESULT $name $dir-cpu-ms-per-MB=$(echo "scale=1; ($b1 - $b0) * 10 / $mb" | bc) $dir-exits-per-MB=$(echo "scale=1; ($e1 - $e0) / $mb" | bc)"
    echo "RESULT $name $dir-Mbps=$mbps"
  done
}}
"#
    ));
    let per_vmm = [
        (
            "tandem",
            format!(
                r#"tandem run --kernel /guests/vmlinuz --initrd /tmp/bench.gz --memory {MEM} --forward tcp:5201:5201 --serial file:/tmp/tandem.log --cmdline "$APPEND" </dev/null >/dev/null 2>&1 &
pid=$!; measure tandem $pid; kill $pid; wait $pid
"#
            ),
        ),
        (
            "qemu-user",
            format!(
                r#"{QEMU} -serial file:/tmp/qemu-user.log -netdev user,id=n0,hostfwd=tcp:127.0.0.1:5201-:5201 -device virtio-net-pci,netdev=n0,romfile= -append "$APPEND" </dev/null >/dev/null 2>&1 &
pid=$!; measure qemu-user $pid; kill $pid; wait $pid
"#
            ),
        ),
        (
            "qemu-passt",
            format!(
                r#"# passt drops root privileges to nobody.
grep -q '^nobody:' /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534:nobody:/:/bin/false' >> /etc/passwd
grep -q '^nogroup:' /etc/group 2>/dev/null || echo 'nogroup:x:65534:' >> /etc/group
# passt copies the host's routable interface to the guest: give the test host one.
ip link add dummy0 type dummy 2>/dev/null
ip addr add 192.0.2.1/24 dev dummy0
ip link set dummy0 up
ip route add default via 192.0.2.254 dev dummy0
# passt sandboxes itself with pivot_root and a user namespace; both fail on the test host's
# initramfs root and in a chroot. So it runs in its own mount namespace whose root is a tmpfs
# moved over / (as switch_root does), holding bind mounts of what it needs.
unshare -m sh -c 'mkdir -p /pr && mount -t tmpfs tmpfs /pr && for d in usr lib lib64 etc tmp dev proc bin sbin; do mkdir -p /pr/$d; mount --bind /$d /pr/$d; done; cd /pr && mount --move . / && exec chroot . passt -f -q -t 5201 -s /tmp/passt.sock' >/tmp/passt.out 2>&1 &
ppid=$!
sleep 1
{QEMU} -serial file:/tmp/qemu-passt.log -netdev stream,id=n0,server=off,addr.type=unix,addr.path=/tmp/passt.sock -device virtio-net-pci,netdev=n0,romfile= -append "$APPEND" </dev/null >/dev/null 2>&1 &
pid=$!; measure qemu-passt $pid; kill $pid $ppid; wait $pid
"#
            ),
        ),
    ];
    eprintln!("bench: iperf3 through a forwarded port, 3 VMMs x 2 directions, one test host each");
    let mut rows = Vec::new();
    for (name, body) in &per_vmm {
        let script = format!("{common}{body}exit 0\n");
        match run_testbed(&script, &[iperf.clone(), passt.clone()], 400) {
            Ok(out) => {
                for l in out.lines().filter(|l| !l.starts_with("RESULT")) {
                    eprintln!("  {l}");
                }
                rows.extend(results(&out));
            }
            Err(e) => {
                eprintln!("bench: {name}: {e}");
                rows.push((name.to_string(), Vec::new()));
            }
        }
    }
    println!(
        "iperf3 through a forwarded port for 8 s: Mbit/s on the receiver side, and the test host's \
         CPU time (all CPUs busy, ms) and the VM's exits (KVM's count) per MB received\n"
    );
    print_table(
        &rows,
        &[
            "host-to-guest-Mbps",
            "guest-to-host-Mbps",
            "host-to-guest-cpu-ms-per-MB",
            "guest-to-host-cpu-ms-per-MB",
            "host-to-guest-exits-per-MB",
            "guest-to-host-exits-per-MB",
        ],
        &["qemu-user", "qemu-passt"],
    );
    Ok(0)
}

/// `cargo xtask bench blk`.
pub fn blk(root: &Path) -> Result<i32, String> {
    let (mut s, carry) = testkit_bench(root, "bench-io")?;
    let guest = "/usr/bin/bench-io /dev/vda 256 10";
    s.push_str(&format!(
        r#"APPEND='console=ttyS0 reboot=k panic=-1 quiet tandem.exec="{guest}"'
truncate -s 300M /tmp/disk.img
measure() {{
  name=$1; shift
  timeout 300 "$@" </dev/null 2>&1 | tr -d '\r' >/tmp/$name.out
  out=$(grep '^bench-io ' /tmp/$name.out)
  [ -n "$out" ] || {{ echo "RESULT $name failed=1"; tail -5 /tmp/$name.out; return; }}
  echo "RESULT $name ${{out#bench-io }}"
}}
for round in 1 2; do
measure tandem tandem run --kernel /guests/vmlinuz --initrd /tmp/bench.gz --memory {MEM} --virtio-transport pci --disk path=/tmp/disk.img,cache=writeback --rng off --cmdline "$APPEND"
measure tandem-mmio tandem run --kernel /guests/vmlinuz --initrd /tmp/bench.gz --memory {MEM} --virtio-transport mmio --disk path=/tmp/disk.img,cache=writeback --rng off --cmdline "$APPEND"
measure qemu sh -c "{QEMU} -serial stdio -drive file=/tmp/disk.img,if=virtio,format=raw,cache=writeback,aio=threads -append \"\$0\"" "$APPEND"
measure qemu-io_uring sh -c "{QEMU} -serial stdio -drive file=/tmp/disk.img,if=virtio,format=raw,cache=writeback,aio=io_uring -append \"\$0\"" "$APPEND"
done
"#
    ));
    eprintln!("bench: bench-io on virtio-blk, tandem (virtio-pci, and virtio-mmio) and QEMU (virtio-pci), 2 rounds each (a few minutes)");
    let out = run_testbed(&s, &[carry], 850)?;
    let rows = results(&out);
    for l in out.lines().filter(|l| !l.starts_with("RESULT")) {
        eprintln!("  {l}");
    }
    if rows.is_empty() {
        return Err("no results".into());
    }
    println!("bench-io on /dev/vda, O_DIRECT, 256 MiB sequential in 1 MiB requests, 4 KiB random at queue depth 1 for 10 s; best of 2 rounds kept per metric\n");
    let best: Vec<(String, Vec<(String, f64)>)> = rows
        .into_iter()
        .map(|(vmm, kv)| {
            let mut keys: Vec<String> = kv.iter().map(|(k, _)| k.clone()).collect();
            keys.dedup();
            let mut uniq: Vec<(String, f64)> = Vec::new();
            for (k, v) in kv {
                match uniq.iter_mut().find(|(kk, _)| *kk == k) {
                    Some((_, old)) => *old = old.max(v),
                    None => uniq.push((k, v)),
                }
            }
            (vmm, uniq)
        })
        .collect();
    print_table(
        &best,
        &[
            "seq-write-MBps",
            "seq-read-MBps",
            "rand-read-iops",
            "rand-write-iops",
        ],
        &["qemu", "qemu-io_uring"],
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_the_keys_where_lower_is_better() {
        assert!(is_cost("host-to-guest-cpu-ms-per-MB"));
        assert!(is_cost("exits-per-rt"));
        assert!(is_cost("p999_us"));
        assert!(!is_cost("rand-read-iops"));
        assert!(!is_cost("host-to-guest-Mbps"));
    }

    #[test]
    fn small_figures_keep_three_significant_digits() {
        assert_eq!(number(286.04), "286.0");
        assert_eq!(number(0.0), "0.0");
        assert_eq!(number(0.02381), "0.0238");
        assert_eq!(number(0.5), "0.500");
    }
}
