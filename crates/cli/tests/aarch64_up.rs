//! `tandem up` with two arm64 partitions from one config in the aarch64 nested testbed (issue
//! 12): a realtime VM on CPU 1 counting every 10 ms and a general VM on CPU 0. The general VM's
//! process is killed with SIGKILL and restarted by its policy, while the realtime VM runs on,
//! counting, in the same process; `tandem ps` shows the placement, `tandem down` ends it all.
//! (Channels between arm64 partitions: aarch64_pci.rs.)
//!
//! One test host session for the file; run it under the testbed lock like the other boot tests.

mod common;

use common::{case, exec_cmdline, run_script_on, Arch};

#[test]
fn killing_one_arm64_partition_leaves_the_other_running() {
    let rt = exec_cmdline(
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); read u r </proc/uptime; echo tick $i $u; usleep 10000; done",
    );
    let gp = exec_cmdline("echo gp-alive; sleep 600");
    let script = format!(
        r#"
cat >/tmp/p.toml <<'TOML'
[[vm]]
name = "rt"
role = "realtime"
kernel = "/guests/vmlinuz"
initrd = "/guests/initramfs.cpio.gz"
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
restart = "on-failure"
TOML
record check tandem check /tmp/p.toml
ST="--state-dir /tmp/st"
tandem up /tmp/p.toml $ST >/tmp/up.out 2>&1 &
sup=$!
alive() {{ grep -c gp-alive /tmp/up.out; }}
ticks() {{ grep -c 'rt | tick' /tmp/up.out; }}
i=0; while [ $i -lt 300 ] && {{ [ "$(alive)" -lt 1 ] || [ "$(ticks)" -lt 1 ]; }}; do sleep 0.5; i=$((i+1)); done
record ps1 tandem ps $ST
gppid=$(tandem ps $ST | awk '$1=="gp" {{print $4}}')
kill -KILL $gppid
i=0; while [ $i -lt 300 ] && [ "$(alive)" -lt 2 ]; do sleep 0.5; i=$((i+1)); done
# The realtime VM counts on after the general one is back.
n=$(ticks)
i=0; while [ $i -lt 300 ] && [ "$(ticks)" -lt $((n+50)) ]; do sleep 0.5; i=$((i+1)); done
record ps2 tandem ps $ST
record down tandem down $ST
wait $sup
echo "supervisor-status=$?" >>/tmp/up.out
record up cat /tmp/up.out
run_case exits --kernel /guests/vmlinuz --realtime --pin-cpus 1 --disable-exits hlt
"#
    );
    let (cases, all) = run_script_on(Arch::Aarch64, &script, &[]);
    let check = case(&cases, &all, "check");
    assert_eq!(check.rc, 0, "tandem check:\n{}", check.output);
    let up = &case(&cases, &all, "up").output;
    assert!(
        up.contains("vm 'gp' ended: killed by signal 9; restarting in "),
        "{up}"
    );
    assert_eq!(
        up.matches("gp | gp-alive").count(),
        2,
        "the general VM booted again after its SIGKILL:\n{up}"
    );
    assert!(
        !up.contains("vm 'rt' ended"),
        "the realtime VM ran on:\n{up}"
    );
    // The realtime VM's counter: every tick, in order, and 50 more after the general VM's
    // second boot.
    let ticks: Vec<(u64, f64)> = up
        .lines()
        .filter_map(|l| {
            let t = l.split("rt | tick ").nth(1)?;
            let mut w = t.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "a tick is missing after {}",
            pair[0].0
        );
    }
    let second_boot = up
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("gp | gp-alive"))
        .nth(1)
        .map(|(n, _)| n)
        .unwrap_or(usize::MAX);
    let after = up
        .lines()
        .skip(second_boot)
        .filter(|l| l.contains("rt | tick "))
        .count();
    assert!(
        after >= 50,
        "{after} ticks of the realtime VM after the general VM's second boot:\n{up}"
    );
    let worst = ticks
        .windows(2)
        .map(|p| p[1].1 - p[0].1)
        .fold(0.0f64, f64::max);
    eprintln!(
        "realtime VM: {} ticks, longest gap {worst:.2} s of guest time",
        ticks.len()
    );

    let row = |ps: &str, name: &str| {
        ps.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    let (ps1, ps2) = (
        &case(&cases, &all, "ps1").output,
        &case(&cases, &all, "ps2").output,
    );
    let pid = |r: &str| r.split_whitespace().nth(3).unwrap_or("").to_string();
    let rt_row = row(ps2, "rt ");
    assert!(
        rt_row.contains("realtime") && rt_row.contains(" running "),
        "{ps2}"
    );
    assert_eq!(
        pid(&rt_row),
        pid(&row(ps1, "rt ")),
        "the realtime VM's process is the same:\n{ps1}\n{ps2}"
    );
    assert!(
        rt_row.contains(" 1 ") && rt_row.contains("SCHED_FIFO 40") && rt_row.contains("yes"),
        "CPU 1, FIFO, locked:\n{ps2}"
    );
    let gp_row = row(ps2, "gp ");
    assert!(
        gp_row.contains(" running ") && gp_row.contains("SCHED_OTHER"),
        "{ps2}"
    );
    assert_ne!(
        pid(&gp_row),
        pid(&row(ps1, "gp ")),
        "the general VM runs in a new process:\n{ps1}\n{ps2}"
    );
    assert!(up.contains("supervisor-status=0"), "{up}");
    assert_eq!(case(&cases, &all, "down").rc, 0);

    // Arm has no exit-disabling capability: the realtime VM keeps WFI/WFE trapping as KVM sets
    // it, without a warning about an x86 capability or a kernel upgrade that would not help.
    assert!(
        !up.contains("X86_DISABLE_EXITS") && !up.contains("Linux 4.17"),
        "{up}"
    );
    assert!(
        rt_row.contains(" none "),
        "nothing is left to the guest:\n{ps2}"
    );
    // Asking for it anyway is refused in one line that says why.
    let exits = case(&cases, &all, "exits");
    assert_eq!(exits.rc, 2, "{}", exits.output);
    assert_eq!(exits.output.lines().count(), 1, "{}", exits.output);
    assert!(
        exits
            .output
            .starts_with("tandem: --disable-exits hlt: this host's KVM will not leave hlt")
            && exits
                .output
                .contains("Arm has no exit-disabling capability"),
        "{}",
        exits.output
    );
}
