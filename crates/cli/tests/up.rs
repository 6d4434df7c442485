//! `tandem up`: two partitions from one config. The general VM panics and is restarted by its
//! policy, then its process is killed with SIGKILL and restarted again, while the realtime VM's
//! once-per-10-ms counter runs on without a hole; `tandem ps` shows the placement applied and
//! `tandem down` ends it all.

mod common;

use common::{case, exec_cmdline, run_script, FIND_IVSHMEM};

#[test]
fn a_crashing_partition_is_restarted_and_its_peer_never_stops() {
    let rt = exec_cmdline(
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); read u r </proc/uptime; echo tick $i $u; usleep 10000; done",
    );
    // The channel outlives the general VM's restarts: it remembers how many lives it had.
    let gp = exec_cmdline(&format!(
        "{FIND_IVSHMEM} v=$(devmem $shm 32); echo gp-life v=$v; \
         if [ $v = 0x00000000 ]; then devmem $shm 32 1; echo c > /proc/sysrq-trigger; fi; \
         devmem $shm 32 2; echo gp-alive; sleep 600"
    ));
    let script = format!(
        r#"
cat >/tmp/p.toml <<'TOML'
[[vm]]
name = "rt"
role = "realtime"
kernel = "/guests/vmlinuz-rt"
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

[[channel]]
name = "state"
size = "64K"
members = ["gp", "rt"]
TOML
ST="--state-dir /tmp/st"
tandem up /tmp/p.toml $ST >/tmp/up.out 2>&1 &
sup=$!
alive() {{ grep -c gp-alive /tmp/up.out; }}
i=0; while [ $i -lt 300 ] && [ "$(alive)" -lt 1 ]; do sleep 0.5; i=$((i+1)); done
record ps1 tandem ps $ST
gppid=$(tandem ps $ST | awk '$1=="gp" {{print $4}}')
kill -KILL $gppid
i=0; while [ $i -lt 300 ] && [ "$(alive)" -lt 2 ]; do sleep 0.5; i=$((i+1)); done
record ps2 tandem ps $ST
record down tandem down $ST
wait $sup
echo "supervisor-status=$?" >>/tmp/up.out
record up cat /tmp/up.out
record logs sh -c 'ls /tmp/st; grep -c tick /tmp/st/rt.log'
"#
    );
    let (cases, all) = run_script(&script);
    let up = &case(&cases, &all, "up").output;
    // The general VM: panic, restart by policy, SIGKILL, restart again. (A restarted boot that
    // fails is restarted once more by the same policy, so the restart count is not fixed.)
    assert!(
        up.contains(
            "vm 'gp' ended: guest kernel panic (status 3); restarting in 0.5 s (restart 1)"
        ),
        "{up}"
    );
    assert!(
        up.contains("vm 'gp' ended: killed by signal 9; restarting in "),
        "{up}"
    );
    for life in ["v=0x00000000", "v=0x00000001", "v=0x00000002"] {
        assert!(
            up.contains(&format!("gp | gp-life {life}")),
            "life {life}:\n{up}"
        );
    }
    assert!(
        !up.contains("vm 'rt' ended"),
        "the realtime VM ran on:\n{up}"
    );
    // The realtime VM's counter: every tick there, in order, and no long gap in guest time.
    let ticks: Vec<(u64, f64)> = up
        .lines()
        .filter_map(|l| {
            let t = l.split("rt | tick ").nth(1)?;
            let mut w = t.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    assert!(ticks.len() > 100, "{} ticks:\n{up}", ticks.len());
    let mut worst = 0.0f64;
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "a tick is missing after {}",
            pair[0].0
        );
        worst = worst.max(pair[1].1 - pair[0].1);
    }
    eprintln!(
        "realtime VM: {} ticks, longest gap {:.2} s of guest time",
        ticks.len(),
        worst
    );
    // The bound, for this nested and emulated testbed: 0.5 s (measured: 0.05 s, as with no
    // neighbour at all; each tick forks usleep in the guest).
    assert!(worst < 0.5, "longest gap {worst} s");
    let ps = &case(&cases, &all, "ps2").output;
    let row = |name: &str| {
        ps.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    let rt_row = row("rt ");
    assert!(
        rt_row.contains("realtime") && rt_row.contains(" running "),
        "{ps}"
    );
    assert!(
        rt_row.contains(" 1 ") && rt_row.contains("SCHED_FIFO 40") && rt_row.contains("yes"),
        "CPU 1, FIFO, locked:\n{ps}"
    );
    // What the VM reports in force: the test host's KVM leaves at least HLT and PAUSE to it.
    assert!(
        rt_row.contains(" hlt,pause"),
        "exits left to the guest:\n{ps}"
    );
    let gp_row = row("gp ");
    assert!(
        gp_row.contains(" running ") && gp_row.contains("SCHED_OTHER"),
        "{ps}"
    );
    assert!(
        !gp_row.contains("hlt"),
        "a general VM keeps its exits:\n{ps}"
    );
    assert!(up.contains("supervisor-status=0"), "{up}");
    assert!(case(&cases, &all, "logs").output.contains("rt.log"));
}

/// Two partitions under a supervisor whose stdout is a pipe nobody reads: the realtime guest's
/// output still reaches its log, far past what the pipe holds. Then the supervisor is killed
/// with SIGKILL: its VMs go with it, and a new `tandem up` of the same config takes their CPUs.
#[test]
fn a_stalled_terminal_stalls_no_vm_and_a_killed_supervisor_takes_its_vms_along() {
    let pad = ".".repeat(90);
    let rt = exec_cmdline(&format!(
        "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); echo tick $i {pad}; done"
    ));
    let gp = exec_cmdline("echo gp-alive; sleep 600");
    let script = format!(
        r#"
cat >/tmp/q.toml <<'TOML'
[[vm]]
name = "rt"
role = "realtime"
kernel = "/guests/vmlinuz-rt"
initrd = "/guests/initramfs.cpio.gz"
cmdline = '{rt}'
memory = "256M"
cpus = [1]

[[vm]]
name = "gp"
kernel = "/guests/vmlinuz"
initrd = "/guests/initramfs.cpio.gz"
cmdline = '{gp}'
memory = "256M"
cpus = [0]
TOML
# Held open here and never read: full after 64 KiB.
mkfifo /tmp/stall
exec 3<>/tmp/stall
tandem up /tmp/q.toml --state-dir /tmp/s1 >/tmp/stall 2>/tmp/s1.err &
sup=$!
ticks() {{ cat /tmp/s1/rt.log 2>/dev/null | grep -c '^tick'; }}
i=0; while [ $i -lt 600 ] && [ "$(ticks)" -lt 3000 ]; do sleep 0.5; i=$((i+1)); done
record ticks sh -c "cat /tmp/s1/rt.log | grep -c '^tick'; ls -l /tmp/s1; cat /tmp/s1.err"
pids=$(tandem ps --state-dir /tmp/s1 | awk 'NR > 1 {{print $4}}' | tr '\n' ' ')
kill -KILL $sup
alive() {{ for p in $pids; do [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status && echo $p; done; }}
i=0; while [ $i -lt 100 ] && [ -n "$(alive)" ]; do sleep 0.1; i=$((i+1)); done
record orphans sh -c "echo pids $pids; echo alive $(alive); echo waited $i tenths"
record again tandem up /tmp/q.toml --detach --state-dir /tmp/s2
record down tandem down --state-dir /tmp/s2
"#
    );
    let (cases, all) = run_script(&script);
    let ticks = &case(&cases, &all, "ticks").output;
    let n: u64 = ticks
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    // About 100 bytes a line: 3000 lines are four times what the pipe and the terminal queue
    // hold together.
    assert!(
        n >= 3000,
        "the guest's output stopped reaching its log:\n{ticks}"
    );
    eprintln!("{n} lines of the realtime guest reached its log while the terminal did not read");
    let orphans = &case(&cases, &all, "orphans").output;
    assert!(
        orphans
            .lines()
            .any(|l| l.starts_with("pids ") && l.len() > 8),
        "{orphans}"
    );
    assert!(
        orphans.lines().any(|l| l.trim() == "alive"),
        "VMs outlived their supervisor:\n{orphans}"
    );
    eprintln!("after the supervisor's SIGKILL: {orphans}");
    let again = case(&cases, &all, "again");
    assert_eq!(again.rc, 0, "{}", again.output);
    assert!(
        again
            .output
            .contains("supervisor running in the background"),
        "{}",
        again.output
    );
}
