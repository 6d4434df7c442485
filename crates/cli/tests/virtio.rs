//! virtio devices seen from real guests: the disk keeps what the guest synced even when tandem is
//! killed, read-only disks stay unwritten, the entropy device feeds the guest's hwrng, and the
//! virtio console carries what the guest writes to /dev/hvc0 and, on stdio, what the host types.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, exec_cmdline, run_script, Case};

type Session = (HashMap<String, Case>, String);

const BOOT: &str = "--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M";

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let write = exec_cmdline(
            "mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && \
             head -c 4194304 /dev/urandom > /mnt/data && sha256sum /mnt/data && \
             echo serial=$(cat /sys/block/vda/serial) && sync && echo disk-synced; sleep 1000",
        );
        let verify = exec_cmdline(
            "mkdir -p /mnt && mount -o ro /dev/vda /mnt && sha256sum /mnt/data; \
             echo ro=$(cat /sys/block/vda/ro); dd if=/dev/zero of=/dev/vda count=1 2>/dev/null; \
             echo dd=$?",
        );
        let rng = exec_cmdline(
            "echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
             echo bytes=$(head -c 64 /dev/hwrng | wc -c); \
             echo random=$(head -c 16 /dev/random | wc -c)",
        );
        let hvc = exec_cmdline("echo hello-from-hvc-$((6*7)) > /dev/hvc0");
        let hvc_in = exec_cmdline(
            "exec 3<>/dev/hvc0; stty -F /dev/hvc0 -echo; echo hvc-open; read -r line <&3; \
             echo got=$line; echo console-echo=$line >&3",
        );
        let script = format!(
            r#"
truncate -s 64M /tmp/disk.img
timeout 150 tandem run {BOOT} --disk path=/tmp/disk.img --serial file:/tmp/write.log --cmdline '{write}' </dev/null &
pid=$!
i=0
while [ $i -lt 120 ] && ! grep -q disk-synced /tmp/write.log 2>/dev/null; do sleep 1; i=$((i+1)); done
run_case locked {BOOT} --disk path=/tmp/disk.img
kill -9 $pid
wait $pid
record write cat /tmp/write.log
run_case verify {BOOT} --disk path=/tmp/disk.img,readonly=on --cmdline '{verify}'
run_case rng {BOOT} --rng on --cmdline '{rng}'
run_case no-rng {BOOT} --cmdline '{rng}'
run_case hvc {BOOT} --console file:/tmp/hvc.log --cmdline '{hvc}'
record hvc-out cat /tmp/hvc.log
mkfifo /tmp/in
timeout 150 tandem run {BOOT} --serial file:/tmp/hvcin.log --console stdio --cmdline '{hvc_in}' </tmp/in >/tmp/hvcin.out 2>&1 &
pid=$!
exec 4>/tmp/in
i=0
while [ $i -lt 120 ] && ! grep -q hvc-open /tmp/hvcin.log 2>/dev/null; do sleep 1; i=$((i+1)); done
echo typed-on-the-host-42 >&4
wait $pid
echo "status=$?" >>/tmp/hvcin.out
exec 4>&-
record hvc-in-serial cat /tmp/hvcin.log
record hvc-in-stdout cat /tmp/hvcin.out
"#
        );
        run_script(&script)
    })
}

fn sha256_of_data(output: &str) -> Option<&str> {
    output
        .lines()
        .find(|l| l.trim_end().ends_with("/mnt/data"))
        .and_then(|l| l.split_whitespace().next())
        .filter(|h| h.len() == 64)
}

#[test]
fn synced_data_survives_sigkill_and_reads_back_from_a_read_only_disk() {
    let (cases, all) = session();
    let w = case(cases, all, "write");
    assert!(w.output.contains("disk-synced"), "write:\n{}", w.output);
    assert!(
        w.output.contains("serial=tandem-disk0"),
        "GET_ID serial; write:\n{}",
        w.output
    );
    let written = sha256_of_data(&w.output).expect("the guest printed the file's sha256");
    let v = case(cases, all, "verify");
    assert_eq!(v.rc, 0, "verify:\n{}", v.output);
    assert_eq!(
        sha256_of_data(&v.output),
        Some(written),
        "the file read back after SIGKILL differs; verify:\n{}",
        v.output
    );
    assert!(v.output.contains("ro=1"), "verify:\n{}", v.output);
    assert!(
        v.output.contains("dd=1"),
        "a write to the read-only disk must fail; verify:\n{}",
        v.output
    );
}

#[test]
fn a_disk_in_use_is_refused_by_a_second_tandem() {
    let (cases, all) = session();
    let c = case(cases, all, "locked");
    assert_eq!(c.rc, 2, "output:\n{}", c.output);
    assert!(
        c.output.contains("locked by another process"),
        "output:\n{}",
        c.output
    );
}

#[test]
fn the_entropy_device_feeds_the_guest_hwrng_when_asked_for_and_random_works_without_it() {
    let (cases, all) = session();
    let c = case(cases, all, "rng");
    assert_eq!(c.rc, 0, "output:\n{}", c.output);
    assert!(
        c.output.contains("rng=virtio_rng.0"),
        "output:\n{}",
        c.output
    );
    assert!(c.output.contains("bytes=64"), "output:\n{}", c.output);
    // Off by default: the guest's /dev/random still answers at once (its kernel seeds from
    // the CPU's RDRAND/RDSEED), where a blocked read would hang the case to its timeout.
    let c = case(cases, all, "no-rng");
    assert_eq!(c.rc, 0, "output:\n{}", c.output);
    assert!(!c.output.contains("rng=virtio"), "output:\n{}", c.output);
    assert!(c.output.contains("random=16"), "output:\n{}", c.output);
}

#[test]
fn the_virtio_console_carries_guest_output_to_its_file() {
    let (cases, all) = session();
    let c = case(cases, all, "hvc");
    assert_eq!(c.rc, 0, "output:\n{}", c.output);
    let out = case(cases, all, "hvc-out");
    assert_eq!(
        out.output.trim(),
        "hello-from-hvc-42",
        "file:\n{}",
        out.output
    );
    assert!(
        !c.output.contains("hello-from-hvc-42"),
        "the line belongs to hvc0, not the serial console"
    );
}

#[test]
fn the_virtio_console_on_stdio_takes_host_input() {
    let (cases, all) = session();
    let serial = case(cases, all, "hvc-in-serial");
    assert!(
        serial.output.contains("got=typed-on-the-host-42"),
        "the guest read the host's line from /dev/hvc0; serial:\n{}",
        serial.output
    );
    let stdout = case(cases, all, "hvc-in-stdout");
    assert!(
        stdout.output.contains("console-echo=typed-on-the-host-42"),
        "the guest's hvc0 output reaches stdout:\n{}",
        stdout.output
    );
    assert!(stdout.output.contains("status=0"), "{}", stdout.output);
}
