//! The seccomp sandbox of `tandem run`, in the test host: every thread of a running VM is
//! filtered with no-new-privileges set; a thread that makes a forbidden syscall ends tandem by
//! SIGSYS with one line; with `--seccomp log` a guest that uses its disk, network and entropy
//! device makes tandem call nothing outside its lists (the kernel would log it).

mod common;

use common::{case, exec_cmdline, run_script};

const BOOT: &str = "--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M";

#[test]
fn every_thread_is_filtered_and_a_forbidden_syscall_ends_tandem_by_sigsys() {
    let busy = exec_cmdline(
        "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; \
         wget -q -O /dev/null http://10.0.2.2:8000/hello; \
         mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && \
         head -c 1048576 /dev/urandom > /mnt/f && sync && head -c 64 /dev/hwrng | wc -c; \
         echo guest-running; sleep 8",
    );
    let quick = exec_cmdline("true");
    let script = format!(
        r#"
mkdir -p /tmp/www && echo ok > /tmp/www/hello
httpd -p 127.0.0.1:8000 -h /tmp/www
truncate -s 16M /tmp/disk.img
dmesg -c >/dev/null
timeout 150 tandem run {BOOT} --cpus 2 --rng on --disk path=/tmp/disk.img --net user --seccomp log --serial file:/tmp/s.log --cmdline '{busy}' </dev/null 2>/tmp/s.err &
pid=$!
i=0
while [ $i -lt 600 ] && ! grep -q guest-running /tmp/s.log 2>/dev/null; do sleep 0.2; i=$((i+1)); done
record threads sh -c "for t in /proc/$pid/task/*; do echo \"task \$(cat \$t/comm) \$(grep -E '^(Seccomp|NoNewPrivs):' \$t/status | tr -s '\t ' '  ' | tr '\n' ' ')\"; done"
wait $pid
echo "status=$?" >>/tmp/s.err
record log-run cat /tmp/s.log /tmp/s.err
record audit sh -c 'dmesg | grep "type=1326" | grep "tandem"; echo audit-listed'
timeout 150 tandem run {BOOT} --cpus 2 --serial file:/tmp/e.log --cmdline '{busy}' </dev/null 2>/tmp/e.err &
pid=$!
i=0
while [ $i -lt 600 ] && ! grep -q guest-running /tmp/e.log 2>/dev/null; do sleep 0.2; i=$((i+1)); done
record enforced sh -c "grep -h -E '^(Seccomp|NoNewPrivs):' /proc/$pid/task/*/status | sort | uniq -c"
wait $pid
run_case hook-vcpu {BOOT} --serial none --seccomp-test-violation vcpu --cmdline '{quick}'
run_case hook-io {BOOT} --serial none --rng on --seccomp-test-violation io --cmdline '{quick}'
run_case hook-vmm {BOOT} --serial none --seccomp-test-violation vmm --cmdline '{quick}'
run_case hook-log {BOOT} --serial none --seccomp log --seccomp-test-violation vcpu --cmdline '{quick}'
record hook-log-audit sh -c 'dmesg | grep "type=1326"; echo audit-listed'
run_case off {BOOT} --serial none --seccomp off --cmdline '{quick}'
"#
    );
    let (cases, all) = run_script(&script);

    let threads = case(&cases, &all, "threads");
    let tasks: Vec<&str> = threads
        .output
        .lines()
        .filter(|l| l.starts_with("task "))
        .collect();
    // main, two vCPUs, the virtio I/O thread.
    assert!(tasks.len() >= 4, "tasks:\n{}", threads.output);
    for t in &tasks {
        assert!(
            t.contains("Seccomp: 2") && t.contains("NoNewPrivs: 1"),
            "every thread filtered: {t}\n{}",
            threads.output
        );
    }
    for name in ["vcpu0", "vcpu1", "virtio-io", "tandem"] {
        assert!(
            tasks
                .iter()
                .any(|t| t.starts_with(&format!("task {name} "))),
            "{name} among:\n{}",
            threads.output
        );
    }
    let run = case(&cases, &all, "log-run");
    assert!(run.output.contains("status=0"), "{}", run.output);
    assert!(run.output.contains("64"), "entropy read: {}", run.output);
    let audit = case(&cases, &all, "audit");
    assert!(audit.output.contains("audit-listed"), "{}", audit.output);
    assert!(
        !audit.output.contains("type=1326"),
        "tandem called something outside its lists (syscall=N in each line):\n{}",
        audit.output
    );
    // Enforce is the default: "N Seccomp:\t2" and "N NoNewPrivs:\t1", nothing else.
    let enforced = case(&cases, &all, "enforced");
    let counts: Vec<&str> = enforced.output.lines().map(str::trim).collect();
    assert_eq!(counts.len(), 2, "{}", enforced.output);
    for l in counts {
        assert!(
            l.ends_with("Seccomp:\t2") || l.ends_with("NoNewPrivs:\t1"),
            "{}",
            enforced.output
        );
    }

    for kind in ["vcpu", "io", "vmm"] {
        let c = case(&cases, &all, &format!("hook-{kind}"));
        // 128 + SIGSYS (31): the shell's status for a process killed by SIGSYS.
        assert_eq!(c.rc, 159, "{kind}: {}", c.output);
        let lines: Vec<&str> = c
            .output
            .lines()
            .filter(|l| l.starts_with("tandem:"))
            .collect();
        assert_eq!(lines.len(), 1, "{kind}: one line:\n{}", c.output);
        assert!(
            lines[0].starts_with(&format!(
                "tandem: seccomp: the {kind} thread made system call 110 "
            )),
            "{kind}: {}",
            c.output
        );
    }
    let log = case(&cases, &all, "hook-log");
    assert_eq!(log.rc, 0, "log mode lets the call through: {}", log.output);
    // The kernel does log in this test host: the check for no audit line above can fail.
    let logged = case(&cases, &all, "hook-log-audit");
    assert!(
        logged.output.contains("type=1326") && logged.output.contains("syscall=110"),
        "{}",
        logged.output
    );
    let off = case(&cases, &all, "off");
    assert_eq!(off.rc, 0, "{}", off.output);
}
