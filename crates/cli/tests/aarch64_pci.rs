//! PCI on aarch64 (issue 12) in the aarch64 nested testbed: a generic ECAM host bridge in the
//! device tree, MSI-X through the GICv3's ITS, and INTx through the bridge's interrupt-map.
//!
//! - `--virtio-transport pci`: Debian's stock arm64 kernel finds the disk, network card,
//!   console and entropy device on the PCI bus (at the BARs tandem placed), and every queue
//!   interrupts through its own MSI-X vector, which the ITS translates (`ITS-MSI` in
//!   `/proc/interrupts`).
//! - Two arm64 VMs of one `tandem up` config share a channel: one blocks on the channel's
//!   doorbell interrupt (stock `uio_pci_generic`, INTx), the other writes a message into the
//!   shared memory and rings; the first wakes and reads the message. The ringing VM is then
//!   killed with SIGKILL and the other runs on to its end.
//!
//! One test host session for both; run under the testbed lock:
//! `flock /tmp/tandem-testbed.lock cargo test -p tandem --test aarch64_pci`.

mod common;

use common::{case, channel_pair_config, exec_cmdline, run_script_on, Arch, FIND_IVSHMEM};

/// Interrupts of `/proc/interrupts` lines from `chip` whose name ends with `name`: the most any
/// one line took, summed over its CPUs' columns.
fn irq_count(out: &str, chip: &str, name: &str) -> u64 {
    out.lines()
        .filter(|l| l.contains(chip) && l.trim_end().ends_with(name))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|f| f.parse::<u64>().ok())
                .sum()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn virtio_pci_uses_msix_through_the_its_and_a_channel_doorbell_wakes_the_other_arm64_vm() {
    let pci_guest = exec_cmdline(
        "echo ids=$(cat /sys/bus/pci/devices/*/device | sort | xargs); \
         echo written-over-pci | dd of=/dev/vda conv=fsync 2>/dev/null && echo disk-written; \
         echo rng=$(cat /sys/class/misc/hw_random/rng_current) bytes=$(head -c 32 /dev/hwrng | wc -c); \
         ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; echo net=$(wget -q -O- http://10.0.2.2:8000/hello); \
         echo over-hvc > /dev/hvc0; \
         dmesg | grep -e ITS[@] -e [B]AR; \
         grep MSI /proc/interrupts",
    );
    let waiter = exec_cmdline(&format!(
        "{FIND_IVSHMEM} modprobe uio_pci_generic; echo 1af4 1110 > /sys/bus/pci/drivers/uio_pci_generic/new_id; \
         i=0; while [ ! -e /dev/uio0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         exec 3<>/dev/uio0; \
         devmem $shm 32 0xb0b0b0b0; echo b-waiting; \
         n=$(dd bs=4 count=1 <&3 2>/dev/null | od -An -tu4); \
         echo b-woke count=$((n)) msg=$(devmem $((shm + 4)) 32); \
         i=0; while [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); echo b-tick $i; done; \
         echo b-done irqs=$(grep uio /proc/interrupts | awk '{{print $2}}')"
    ));
    let ringer = exec_cmdline(&format!(
        "{FIND_IVSHMEM} echo a-ivpos=$(devmem $((regs + 8)) 32); i=0; \
         while [ $(devmem $shm 32) != 0xB0B0B0B0 ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; \
         devmem $((shm + 4)) 32 0x600dd00d; devmem $((regs + 12)) 32 0x10000; echo a-rang; sleep 600"
    ));
    let config = channel_pair_config("/tmp/c.toml", &ringer, &waiter);
    let script = format!(
        r#"
mkdir -p /tmp/www && echo pci-net-ok > /tmp/www/hello
httpd -p 127.0.0.1:8000 -h /tmp/www
truncate -s 64M /tmp/pci.img
run_case pci --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --cpus 2 --virtio-transport pci --rng on --disk path=/tmp/pci.img --net user --console file:/tmp/hvc.log --cmdline '{pci_guest}'
record hvc cat /tmp/hvc.log
record image sh -c 'head -c 16 /tmp/pci.img; echo'
{config}ST="--state-dir /tmp/st"
tandem up /tmp/c.toml $ST >/tmp/up.out 2>&1 &
sup=$!
i=0; while [ $i -lt 240 ] && ! grep -q b-woke /tmp/up.out; do sleep 0.5; i=$((i+1)); done
record ps1 tandem ps $ST
apid=$(tandem ps $ST | awk '$1=="a" {{print $4}}')
kill -KILL $apid
echo "@@@KILLED a"
i=0; while [ $i -lt 240 ] && kill -0 $sup 2>/dev/null; do sleep 0.5; i=$((i+1)); done
tandem down $ST >/dev/null 2>&1
wait $sup
record up cat /tmp/up.out
"#,
    );
    let (cases, all) = run_script_on(Arch::Aarch64, &script, &[]);

    let c = case(&cases, &all, "pci");
    let out = &c.output;
    assert_eq!(c.rc, 0, "{out}");
    assert!(
        out.contains("ids=0x0008 0x1041 0x1042 0x1043 0x1044\n"),
        "host bridge, net, blk, console, rng on PCI:\n{out}"
    );
    // (No file system: the arm64 guest's initramfs has no ext2/ext4 module.)
    assert!(out.contains("\ndisk-written\n"), "{out}");
    assert_eq!(
        case(&cases, &all, "image").output.trim(),
        "written-over-pci",
        "the guest's write reached the image through virtio-pci:\n{out}"
    );
    assert!(out.contains("rng=virtio_rng.0 bytes=32"), "{out}");
    assert!(out.contains("net=pci-net-ok"), "{out}");
    assert_eq!(case(&cases, &all, "hvc").output.trim(), "over-hvc");
    // Linux found the ITS the device tree names and kept the BARs where tandem put them (the
    // first device's BAR0 at the window's start).
    assert!(out.contains("ITS@0x0000000008080000: allocated"), "{out}");
    assert!(
        out.contains("pci 0000:00:01.0: BAR 0 [mem 0x10000000-0x10007fff]"),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.contains("BAR") && l.contains("assigned")),
        "the guest moved a BAR:\n{out}"
    );
    // Queues interrupt through their own MSI-X vectors, translated by the ITS: blk's requests,
    // net's receive and transmit, rng's requests, the console's output.
    for q in ["-req.0", "-input", "-output", "-input.0", "-output.0"] {
        assert!(
            irq_count(out, "ITS-MSI", q) > 0,
            "no MSI-X interrupts through the ITS on a queue ending in {q}:\n{out}"
        );
    }

    let up = &case(&cases, &all, "up").output;
    assert!(up.contains("a | a-ivpos=0x00000000"), "{up}");
    assert!(up.contains("b | b-waiting"), "{up}");
    assert!(up.contains("a | a-rang"), "{up}");
    assert!(
        up.contains("b | b-woke count=1 msg=0x600DD00D"),
        "the blocked process woke with the message:\n{up}"
    );
    // a was killed after b woke; b ran on to its end and powered off.
    let killed = up
        .find("vm 'a' ended: killed by signal 9")
        .unwrap_or_else(|| panic!("a was not killed:\n{up}\n{all}"));
    let done = up
        .find("b | b-done irqs=1\n")
        .unwrap_or_else(|| panic!("b did not run to its end:\n{up}"));
    assert!(killed < done, "b ended before a was killed:\n{up}");
    assert!(up.contains("vm 'b' ended: powered off"), "{up}");
}
