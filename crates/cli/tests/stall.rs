//! A destination that stops taking console output (a terminal on hold, a pipe nobody reads)
//! must not stop the guest: the guest writes far more than a pipe holds to its serial console
//! and to its virtio console (the second finds the pipe already full), then powers off, and tandem exits with the power-off status
//! instead of hanging in a write.

mod common;

use common::{case, exec_cmdline, run_script};

#[test]
fn console_output_into_a_pipe_nobody_reads_does_not_stop_the_guest() {
    // 96 KiB to the serial console (one exit per byte), 128 KiB to hvc0; a pipe holds 64 KiB.
    // hvc0 is slow to emulate (the guest waits for each 16-byte chunk to come back): 256 KiB
    // took 255 s in the test host whether the pipe was read or not, past the timeout.
    let serial =
        exec_cmdline("yes serial-output | head -c 98304; echo; echo serial-done >/dev/hvc0");
    let hvc = exec_cmdline("yes hvc-output | head -c 131072 >/dev/hvc0; echo hvc-done");
    let script = format!(
        r#"
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M"
mkfifo /tmp/stuck
# Holds the pipe's read end open and never reads it.
sleep 600 </tmp/stuck &
stuck_run() {{ timeout 240 tandem run "$@" </dev/null >/tmp/stuck; }}
record serial stuck_run $BOOT --console file:/tmp/s-hvc.log --cmdline '{serial}'
record serial-hvc cat /tmp/s-hvc.log
record hvc stuck_run $BOOT --serial file:/tmp/h-serial.log --console stdio --cmdline '{hvc}'
record hvc-serial cat /tmp/h-serial.log
"#
    );
    let (cases, all) = run_script(&script);
    let s = case(&cases, &all, "serial");
    assert_eq!(
        s.rc, 0,
        "the guest powers off despite a stalled stdout:\n{}",
        s.output
    );
    assert!(
        s.output.contains("bytes of output dropped")
            || s.output.contains("output still buffered is lost"),
        "tandem says output was lost:\n{}",
        s.output
    );
    assert!(
        case(&cases, &all, "serial-hvc")
            .output
            .contains("serial-done"),
        "{all}"
    );
    let h = case(&cases, &all, "hvc");
    assert_eq!(
        h.rc, 0,
        "the guest powers off despite a stalled stdout:\n{}",
        h.output
    );
    assert!(
        case(&cases, &all, "hvc-serial").output.contains("hvc-done"),
        "{all}"
    );
}
