//! The virtio-mmio disk of an arm64 guest in the aarch64 nested testbed (issue 12): what the
//! guest wrote and synced is in the image after tandem is killed with SIGKILL, as the test host
//! reads it and as a next VM reads it from the same image made read-only; a second tandem is
//! refused the disk in use; and the aarch64 build refuses an x86 kernel in one line, status 2.
//!
//! One test host session for the file; run it under the testbed lock like the other boot tests.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, exec_cmdline, guests_dir, run_script_on, sha_after, Arch, Case};

type Session = (HashMap<String, Case>, String);

/// Where the x86 kernel is carried in the test host.
const X86_KERNEL: &str = "/x86/bzImage";

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        // 4 MiB of random bytes straight onto the disk, flushed (dd's fsync on the block device
        // is a virtio-blk flush), then the guest waits to be killed.
        let write = exec_cmdline(
            "head -c 4194304 /dev/urandom >/tmp/d && echo written: $(sha256sum /tmp/d) && \
             dd if=/tmp/d of=/dev/vda bs=1M conv=fsync 2>/dev/null && sync && \
             echo serial=$(cat /sys/block/vda/serial) && echo disk-synced; sleep 1000",
        );
        let verify = exec_cmdline(
            "echo read: $(head -c 4194304 /dev/vda | sha256sum); echo ro=$(cat /sys/block/vda/ro); \
             dd if=/dev/zero of=/dev/vda count=1 2>/dev/null; echo dd=$?",
        );
        let script = format!(
            r#"
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M"
truncate -s 64M /tmp/disk.img
timeout 150 tandem run $BOOT --disk path=/tmp/disk.img --serial file:/tmp/write.log --cmdline '{write}' </dev/null &
pid=$!
i=0
while [ $i -lt 120 ] && ! grep -q disk-synced /tmp/write.log 2>/dev/null; do sleep 1; i=$((i+1)); done
run_case locked $BOOT --disk path=/tmp/disk.img
kill -9 $pid
wait $pid
record write cat /tmp/write.log
record image sh -c 'echo image: $(head -c 4194304 /tmp/disk.img | sha256sum)'
run_case verify $BOOT --disk path=/tmp/disk.img,readonly=on --cmdline '{verify}'
run_case x86 --kernel {X86_KERNEL}
"#
        );
        // A real x86 kernel: Debian's, the x86_64 testbed's guest.
        let x86 = format!("{}:{X86_KERNEL}", guests_dir().join("vmlinuz-rt").display());
        run_script_on(Arch::Aarch64, &script, &[&x86])
    })
}

#[test]
fn data_an_arm64_guest_synced_survives_sigkill_of_tandem() {
    let (cases, all) = session();
    let w = case(cases, all, "write");
    assert!(w.output.contains("disk-synced"), "write:\n{}", w.output);
    assert!(
        w.output.contains("serial=tandem-disk0"),
        "GET_ID serial; write:\n{}",
        w.output
    );
    let written = sha_after(&w.output, "written: ").expect("the guest printed the data's sha256");
    let image = case(cases, all, "image");
    assert_eq!(
        sha_after(&image.output, "image: "),
        Some(written),
        "the image read on the test host after SIGKILL differs; write:\n{}",
        w.output
    );
    let v = case(cases, all, "verify");
    assert_eq!(v.rc, 0, "verify:\n{}", v.output);
    assert_eq!(
        sha_after(&v.output, "read: "),
        Some(written),
        "a next VM reads other data; verify:\n{}",
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
fn a_disk_in_use_is_refused_by_a_second_tandem_on_arm64() {
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
fn the_aarch64_build_refuses_an_x86_kernel_in_one_line() {
    let (cases, all) = session();
    let c = case(cases, all, "x86");
    assert_eq!(c.rc, 2, "output:\n{}", c.output);
    assert_eq!(
        c.output.trim_end(),
        format!(
            "tandem: {X86_KERNEL} is an x86 kernel (a bzImage); this tandem runs on aarch64 and \
             boots an arm64 Image"
        ),
        "one line, naming what the file is"
    );
}
