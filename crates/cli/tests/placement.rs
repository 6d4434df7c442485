//! Placement as the host sees it: a pinned real-time VM's vCPU thread runs under SCHED_FIFO on
//! its CPU alone while tandem's other threads stay off it, locked memory is locked, and huge
//! pages back guest memory.

mod common;

use common::{case, exec_cmdline, run_script};

#[test]
fn pinning_realtime_locking_and_huge_pages_are_applied() {
    let guest = exec_cmdline(
        "echo rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null); echo guest-ready; sleep 600",
    );
    let script = format!(
        r#"
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 128M"
wait_ready() {{ i=0; while [ $i -lt 150 ] && ! grep -q guest-ready $1 2>/dev/null; do sleep 1; i=$((i+1)); done; }}
tandem run $BOOT --pin-cpus 1 --realtime --lock-memory --serial file:/tmp/rt.log --cmdline '{guest}' </dev/null 2>/tmp/rt.err &
pid=$!
wait_ready /tmp/rt.log
record threads sh -c "for t in /proc/$pid/task/*; do echo thread \$(cat \$t/comm) cpus=\$(grep Cpus_allowed_list \$t/status | cut -f2) policy=\$(awk '/^policy/ {{print \$3}}' \$t/sched); done; grep VmLck /proc/$pid/status"
kill -TERM $pid
wait $pid
record rt-exits sh -c "echo status=$?; grep rng= /tmp/rt.log"
echo 80 >/proc/sys/vm/nr_hugepages
before=$(awk '/HugePages_Free/ {{print $2}}' /proc/meminfo)
tandem run $BOOT --hugepages --serial file:/tmp/hp.log --cmdline '{guest}' </dev/null 2>/tmp/hp.err &
pid=$!
wait_ready /tmp/hp.log
during=$(awk '/HugePages_Free/ {{print $2}}' /proc/meminfo)
record huge echo "before=$before during=$during"
kill -TERM $pid
wait $pid
record huge-guest cat /tmp/hp.log /tmp/hp.err
"#
    );
    let (cases, all) = run_script(&script);
    let t = case(&cases, &all, "threads");
    let threads: Vec<&str> = t
        .output
        .lines()
        .filter(|l| l.starts_with("thread "))
        .collect();
    assert!(
        threads.contains(&"thread vcpu0 cpus=1 policy=1"),
        "the vCPU on CPU 1 under SCHED_FIFO (policy 1):\n{}",
        t.output
    );
    let others: Vec<&&str> = threads.iter().filter(|l| !l.contains("vcpu")).collect();
    assert!(!others.is_empty(), "{}", t.output);
    for l in others {
        assert!(
            l.contains("cpus=0 policy=0"),
            "every other thread on CPU 0 only, SCHED_OTHER:\n{}",
            t.output
        );
    }
    let locked_kib: u64 = t
        .output
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    assert!(
        locked_kib >= 128 << 10,
        "guest memory locked:\n{}",
        t.output
    );
    // The realtime VM's vCPU halts in the guest (realtime.rs checks that with KVM's counts);
    // a stop request still ends it, and it got no device it did not ask for.
    let e = case(&cases, &all, "rt-exits");
    assert!(
        e.output.contains("rng=") && !e.output.contains("rng=virtio"),
        "a realtime VM gets no entropy device unless it asks:\n{}",
        e.output
    );
    assert!(
        e.output.contains("status=143"),
        "SIGTERM stopped the VM with its status:\n{}",
        e.output
    );
    let h = case(&cases, &all, "huge");
    let num = |k: &str| -> u64 {
        h.output
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        num("before=") - num("during="),
        64,
        "128 MiB of guest memory in 2 MiB huge pages:\n{}\n{}",
        h.output,
        case(&cases, &all, "huge-guest").output
    );
}
