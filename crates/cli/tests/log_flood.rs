//! A guest that repeats a bad device access in a loop cannot grow tandem's log without bound:
//! it notifies a virtio queue that does not exist 100,000 times (each a warning, each a VM exit
//! to tandem), and tandem's log stays under 64 KiB, saying how many messages it dropped.

mod common;

use common::{case, exec_cmdline, guest_overlay, run_script_with, testkit_program};

/// Notifications sent; each costs a user-space exit, slow in the emulated test host, and the
/// rate limit makes the log's size independent of the count beyond its burst.
const NOTIFIES: u32 = 100_000;

#[test]
fn a_guest_notifying_a_missing_queue_in_a_loop_leaves_a_bounded_log() {
    let poke = testkit_program("mmio-poke");
    let (overlay, with) = guest_overlay("flood", &[&poke]);
    // The virtio-blk PCI function (1af4:1042), freed from its driver so that its BAR can be
    // mapped (the kernel refuses to map a region a driver holds); queue 7 does not exist: its
    // doorbell at NOTIFY (0x3000) + 4 * 7 is no ioeventfd, so each write reaches tandem.
    let guest = exec_cmdline(&format!(
        "for d in /sys/bus/pci/devices/*; do \
         [ $(cat $d/vendor):$(cat $d/device) = 0x1af4:0x1042 ] && blk=$d; done; \
         echo ${{blk##*/}} >/sys/bus/pci/drivers/virtio-pci/unbind; \
         {poke} $blk/resource0 0x301c 0 {NOTIFIES}"
    ));
    let script = format!(
        r#"
{overlay}dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
flood() {{
  timeout 200 tandem run --kernel /guests/vmlinuz --initrd /tmp/flood.gz --memory 256M \
    --disk path=/tmp/disk.img --cmdline '{guest}' </dev/null 2>/tmp/flood.err
  echo status=$?
  echo log-bytes=$(wc -c </tmp/flood.err)
  grep 'rate limit' /tmp/flood.err | tail -2
}}
record flood flood
"#
    );
    let with: Vec<&str> = with.iter().map(String::as_str).collect();
    let (cases, all) = run_script_with(&script, &with);
    let out = &case(&cases, &all, "flood").output;
    assert!(
        out.contains(&format!("mmio-poke wrote {NOTIFIES}")),
        "the guest sent its notifies:\n{out}"
    );
    assert!(out.contains("status=0"), "{out}");
    let bytes: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("log-bytes=")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no log size:\n{out}"));
    eprintln!("{NOTIFIES} notifies of a missing queue left {bytes} bytes of log");
    assert!(bytes > 0, "the bad notifies are logged:\n{out}");
    assert!(
        bytes < 64 * 1024,
        "{NOTIFIES} bad notifies left {bytes} bytes of log:\n{out}"
    );
    assert!(out.contains("were dropped (rate limit)"), "{out}");
}
