//! `--virtio-transport pci`: every virtio device on the PCI bus with MSI-X, driven by the stock
//! virtio-pci driver; each works and interrupts through its own MSI-X vectors.

mod common;

use common::{case, exec_cmdline, run_script};

#[test]
fn every_virtio_device_works_over_pci_with_msix() {
    let guest = exec_cmdline(
        "echo ids=$(cat /sys/bus/pci/devices/*/device | sort | xargs); \
         mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && head -c 1048576 /dev/urandom > /mnt/f && \
         sync && echo disk-ok=$(sha256sum < /mnt/f | cut -c1-16); \
         echo rng=$(cat /sys/class/misc/hw_random/rng_current) bytes=$(head -c 32 /dev/hwrng | wc -c); \
         ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; echo net=$(wget -q -O- http://10.0.2.2:8000/hello); \
         echo over-hvc > /dev/hvc0; \
         grep PCI-MSI /proc/interrupts",
    );
    let script = format!(
        r#"
mkdir -p /tmp/www && echo pci-net-ok > /tmp/www/hello
httpd -p 127.0.0.1:8000 -h /tmp/www
truncate -s 64M /tmp/pci.img
run_case pci --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --virtio-transport pci --rng on --disk path=/tmp/pci.img --net user --console file:/tmp/hvc.log --cmdline '{guest}'
record hvc cat /tmp/hvc.log
"#
    );
    let (cases, all) = run_script(&script);
    let c = case(&cases, &all, "pci");
    let out = &c.output;
    assert_eq!(c.rc, 0, "{out}");
    assert!(
        out.contains("ids=0x0008 0x1041 0x1042 0x1043 0x1044\n"),
        "host bridge, net, blk, console, rng on PCI:\n{out}"
    );
    assert!(out.contains("disk-ok="), "{out}");
    assert!(out.contains("rng=virtio_rng.0 bytes=32"), "{out}");
    assert!(out.contains("net=pci-net-ok"), "{out}");
    assert_eq!(case(&cases, &all, "hvc").output.trim(), "over-hvc");
    // Queues interrupt through their own MSI-X vectors: blk's requests, net's receive and
    // transmit, rng's requests ("-input"), the console's output ("-output"). The most any
    // vector with that name took:
    let msi_count = |name: &str| -> u64 {
        out.lines()
            .filter(|l| l.contains("PCI-MSI") && l.trim_end().ends_with(name))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    for q in ["-req.0", "-input", "-output", "-input.0", "-output.0"] {
        assert!(
            msi_count(q) > 0,
            "no MSI-X interrupts on a queue ending in {q}:\n{out}"
        );
    }
}
