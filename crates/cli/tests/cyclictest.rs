//! PREEMPT_RT Linux as a realtime partition: Debian's PREEMPT_RT kernel runs `cyclictest`
//! (Debian's rt-tests, from the realtime guest initramfs) to completion on its own CPU, beside a
//! general VM kept busy with a CPU hog and an HTTP server that the test host fetches from through
//! a forward all along. The latencies of this emulated testbed are printed, not judged.

mod common;

use common::{case, exec_cmdline, run_script, stats_snapshot, FIND_IVSHMEM};
use tandem_vmm::stats::Snapshot;

/// cyclictest's loop count and interval (µs): 10 s of 1 kHz wake-ups.
const LOOPS: u64 = 10_000;
const INTERVAL_US: u64 = 1_000;

/// cyclictest's summary line for one thread (`-q`): loops done and latencies in µs.
#[derive(Debug, PartialEq)]
struct Report {
    loops: u64,
    min: u64,
    avg: u64,
    max: u64,
}

/// Parses `T: 0 ( 123) P:80 I:1000 C:  10000 Min:      3 Act:    5 Avg:    4 Max:     30`.
fn parse_report(line: &str) -> Option<Report> {
    let rest = &line[line.find("T: 0 ")?..];
    let field = |key: &str| -> Option<u64> {
        let after = &rest[rest.find(key)? + key.len()..];
        after.split_whitespace().next()?.parse().ok()
    };
    Some(Report {
        loops: field("C:")?,
        min: field("Min:")?,
        avg: field("Avg:")?,
        max: field("Max:")?,
    })
}

#[test]
fn the_report_line_parses() {
    let line =
        "rt | T: 0 (  241) P:80 I:1000 C:  10000 Min:     26 Act:   26 Avg:   75 Max:     703";
    assert_eq!(
        parse_report(line),
        Some(Report {
            loops: 10_000,
            min: 26,
            avg: 75,
            max: 703
        })
    );
    assert_eq!(parse_report("rt | T: 0 ( 241) P:80 I:1000 C:"), None);
}

#[test]
fn cyclictest_in_a_preempt_rt_guest_completes_beside_a_busy_general_vm() {
    // The general VM: network up, a web server, and a CPU hog whose work counter the server
    // publishes; then it tells the realtime VM (over the channel) that it is busy.
    let gp = exec_cmdline(&format!(
        "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; mkdir -p /www; \
         echo 0 >/www/count; httpd -p 80 -h /www; \
         (i=0; while :; do i=$((i+1)); echo $i >/www/c; mv /www/c /www/count; done) & \
         {FIND_IVSHMEM} devmem $shm 32 1; echo gp-busy; sleep 600"
    ));
    // The realtime VM starts cyclictest once the general VM is busy.
    let rt = exec_cmdline(&format!(
        "mkdir -p /dev/shm; {FIND_IVSHMEM} echo rt-waiting; \
         while [ $(devmem $shm 32) != 0x00000001 ]; do sleep 0.2; done; \
         echo cyclictest-start; cyclictest -m -q -p 80 -i {INTERVAL_US} -l {LOOPS}; \
         echo cyclictest-done rc=$?; sleep 600"
    ));
    let script = format!(
        r#"
cat >/tmp/p.toml <<'TOML'
[[vm]]
name = "rt"
role = "realtime"
kernel = "/guests/vmlinuz-rt"
initrd = "/guests/initramfs-rt.cpio.gz"
cmdline = '{rt}'
memory = "256M"
cpus = [1]
lock_memory = true

[[vm]]
name = "gp"
kernel = "/guests/vmlinuz"
initrd = "/guests/initramfs.cpio.gz"
cmdline = '{gp}'
memory = "256M"
cpus = [0]
forwards = ["tcp:8080:80"]

[[channel]]
name = "go"
size = "4K"
members = ["gp", "rt"]
TOML
ST="--state-dir /tmp/st"
start=$(date +%s)
tandem up /tmp/p.toml $ST >/tmp/up.out 2>&1 &
sup=$!
seen() {{ grep -c "$1" /tmp/up.out; }}
i=0; while [ $i -lt 300 ] && [ "$(seen 'rt | cyclictest-start')" -lt 1 ]; do sleep 0.5; i=$((i+1)); done
echo "@@@ cyclictest started after $(( $(date +%s) - start )) s"
record stats-start tandem stats rt $ST --json
t0=$(date +%s)
ok=0; bad=0; : >/tmp/counts
while [ "$(seen 'rt | cyclictest-done')" -lt 1 ] && [ $(( $(date +%s) - t0 )) -lt 150 ]; do
  if timeout 10 wget -q -O /tmp/c http://127.0.0.1:8080/count 2>/tmp/wget.err; then
    ok=$((ok+1)); cat /tmp/c >>/tmp/counts
  else
    bad=$((bad+1)); cat /tmp/wget.err >>/tmp/fetch-errors
  fi
  sleep 0.2
done
record stats-end tandem stats rt $ST --json
echo "ok=$ok failed=$bad secs=$(( $(date +%s) - t0 ))" >/tmp/fetches
cat /tmp/counts >>/tmp/fetches
record fetches cat /tmp/fetches
record fetch-errors sh -c 'sort /tmp/fetch-errors 2>/dev/null | uniq -c'
record down tandem down $ST
wait $sup
echo "supervisor-status=$?" >>/tmp/up.out
record up cat /tmp/up.out
"#
    );
    let (cases, all) = run_script(&script);
    let up = &case(&cases, &all, "up").output;

    // cyclictest ran its whole loop count and said so.
    assert!(up.contains("rt | cyclictest-done rc=0"), "{up}");
    let report = up
        .lines()
        .find_map(parse_report)
        .unwrap_or_else(|| panic!("no cyclictest report:\n{up}"));
    assert_eq!(report.loops, LOOPS, "{up}");
    assert!(
        report.min <= report.avg && report.avg <= report.max,
        "{report:?}"
    );
    assert!(!up.contains("vm 'rt' ended"), "{up}");
    assert!(!up.contains("vm 'gp' ended"), "{up}");
    assert!(up.contains("supervisor-status=0"), "{up}");

    // The general VM was busy all along: every fetch through the forward succeeded, and the
    // work counter it served kept advancing.
    let fetches = &case(&cases, &all, "fetches").output;
    let mut lines = fetches.lines();
    let head = lines.next().unwrap_or_default();
    let field = |key: &str| -> u64 {
        head.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {head:?}"))
    };
    let (ok, failed, secs) = (field("ok="), field("failed="), field("secs="));
    let counts: Vec<u64> = lines.filter_map(|l| l.trim().parse().ok()).collect();
    let errors = &case(&cases, &all, "fetch-errors").output;
    assert_eq!(failed, 0, "{fetches}\nerrors:\n{errors}\n{up}");
    assert!(ok >= 5, "fetches during cyclictest: {fetches}\n{up}");
    assert_eq!(counts.len() as u64, ok, "{fetches}");
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]) && counts[counts.len() - 1] > counts[0],
        "the general VM's work counter advanced: {fetches}"
    );

    let (s0, s1) = (
        stats_snapshot(&cases, &all, "stats-start"),
        stats_snapshot(&cases, &all, "stats-end"),
    );
    let ms = s1.uptime_ms.saturating_sub(s0.uptime_ms).max(1) as f64;
    let rate = |name: &str| -> f64 {
        let get = |s: &Snapshot| s.vcpus[0].kvm.get(name).copied().unwrap_or(0);
        get(&s1).saturating_sub(get(&s0)) as f64 * 1000.0 / ms
    };
    let user_exits = |s: &Snapshot| s.devices.iter().map(|d| d.reads + d.writes).sum::<u64>();
    let user = user_exits(&s1).saturating_sub(user_exits(&s0));
    let by_device: Vec<String> = s1
        .devices
        .iter()
        .filter_map(|d| {
            let before = s0.devices.iter().find(|b| b.name == d.name);
            let n = (d.reads + d.writes).saturating_sub(before.map_or(0, |b| b.reads + b.writes));
            (n > 0).then(|| format!("{} {n}", d.name))
        })
        .collect();
    eprintln!(
        "cyclictest (emulated TCG testbed; latencies not meaningful for a real host): \
         {} loops of {INTERVAL_US} us, latency min {} us, avg {} us, max {} us",
        report.loops, report.min, report.avg, report.max
    );
    eprintln!(
        "general VM: {ok} fetches through the forward in {secs} s, none failed; work counter {} -> {}",
        counts[0],
        counts[counts.len() - 1]
    );
    eprintln!(
        "realtime VM over {:.1} s: exits {:.0}/s, halt exits {:.0}/s, IRQ injections {:.0}/s, \
         user-space exits {user} ({:.1}/s: {by_device:?}); settings {:?}",
        ms / 1000.0,
        rate("exits"),
        rate("halt_exits"),
        rate("irq_injections"),
        user as f64 * 1000.0 / ms,
        s1.settings.get("realtime")
    );
}
