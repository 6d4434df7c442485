//! The aarch64 VM (issue 12) in the aarch64 nested testbed (`cargo xtask testbed --arch
//! aarch64`, which cross-builds tandem): Debian's stock arm64 kernel boots under `tandem run`
//! with 1, 2 and 4 vCPUs and the memory it was given (within 5 %), runs a command whose output
//! and the command line reach the host, seeds its random number generator from the device tree,
//! `poweroff` exits 0, a reboot 4 and a panic with the panic's status; a virtio-mmio disk
//! written by the guest holds the data afterwards; user networking gives a DHCP lease and
//! carries a TCP connection to the host. (virtio-pci and channels: aarch64_pci.rs.)
//!
//! One test host session for all of it (each costs tens of seconds of emulation). Until the
//! shared fixture (`common::run_script`) takes an architecture, this file starts the testbed
//! itself; run it under the testbed lock like the other boot tests.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

/// `tandem run` cases, each printed between markers: `@@@BEGIN name`, its output, `@@@END
/// name rc=N`.
const SCRIPT: &str = r#"
case_() {
  name=$1; shift
  timeout 150 tandem run "$@" </dev/null >/tmp/case.out 2>&1
  rc=$?
  echo "@@@BEGIN $name"; cat /tmp/case.out; echo "@@@END $name rc=$rc"
}
K="--kernel /guests/vmlinuz --initrd /guests/initramfs.cpio.gz --memory 256M --rng off"
C="console=ttyS0 panic=-1 quiet"
P="echo cpus=\$(nproc); grep -i system.ram /proc/iomem; cat /proc/cmdline; dmesg | grep -m2 -E 'crng ini[t] done|Kernel comman[d] line:'"
case_ one $K --cpus 1 --cmdline "$C tandem.exec=\"$P\""
case_ two $K --cpus 2 --cmdline "$C tandem.exec=\"$P\""
case_ four $K --cpus 4 --cmdline "$C tandem.exec=\"$P\""
case_ reboot $K --cmdline "$C tandem.exec=reboot"
case_ panic $K --cmdline "$C tandem.exec=\"echo c >/proc/sysrq-trigger\""
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
case_ disk $K --disk path=/tmp/disk.img --cmdline "$C tandem.exec=\"echo written-by-the-guest | dd of=/dev/vda conv=fsync\""
echo "@@@BEGIN image"; head -c 20 /tmp/disk.img; echo; echo "@@@END image rc=0"
nc -l -p 7777 >/tmp/got &
sleep 0.5
case_ net $K --net user --cmdline "$C tandem.exec=\"sleep 1; udhcpc -i eth0 -n -q -t 5; echo from-the-guest | nc 10.0.2.2 7777\""
sleep 0.5
echo "@@@BEGIN host"; cat /tmp/got; echo "@@@END host rc=0"
echo @@@DONE
"#;

/// Output and exit status of each case, by name.
fn cases(text: &str) -> HashMap<String, (String, i32)> {
    let mut out = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("@@@BEGIN ") {
            current = Some((name.to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix("@@@END ") {
            if let (Some((name, body)), Some((_, rc))) = (current.take(), rest.split_once(" rc=")) {
                out.insert(name, (body, rc.trim().parse().unwrap_or(-1)));
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[test]
fn stock_arm64_kernel_boots_powers_off_reboots_panics_and_uses_its_disk_and_network() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--package", "xtask", "--", "testbed"])
        .args(["--arch", "aarch64", "--", "sh", "-c", SCRIPT])
        .current_dir(&root)
        .output()
        .expect("cannot run cargo xtask testbed");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "")
        + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("@@@DONE"),
        "the test host failed ({:?}):\n{text}",
        out.status.code()
    );
    let c = cases(&text);
    let case = |name: &str| {
        c.get(name)
            .unwrap_or_else(|| panic!("no case {name} in:\n{text}"))
    };

    for (name, cpus) in [("one", 1), ("two", 2), ("four", 4)] {
        let (out, rc) = case(name);
        assert_eq!(*rc, 0, "{name}: poweroff exits 0:\n{out}");
        // Secondaries come up by PSCI CPU_ON, each named in the device tree by its MPIDR.
        assert!(out.contains(&format!("cpus={cpus}\n")), "{name}:\n{out}");
        assert!(
            out.contains("console=ttyS0 panic=-1 quiet tandem.exec="),
            "{name}: the command line reaches /proc/cmdline:\n{out}"
        );
        // The device tree's rng-seed: the guest's random number generator is ready while its
        // kernel still reads the device tree, before it prints its command line (a CPU's own
        // random number instruction, if any, is used only later).
        let first = out
            .lines()
            .find(|l| l.contains("crng init done") || l.contains("Kernel command line:"))
            .unwrap_or_default();
        assert!(
            first.contains("crng init done"),
            "{name}: the guest seeded from the device tree:\n{out}"
        );
        let ram = common::system_ram_bytes(out);
        let want = 256u64 << 20;
        let off = (ram as f64 - want as f64).abs() / want as f64;
        assert!(
            off <= 0.05,
            "{name}: guest RAM {ram} bytes, configured {want}:\n{out}"
        );
    }

    let (reboot, rc) = case("reboot");
    assert_eq!(*rc, 4, "a reboot exits 4:\n{reboot}");
    let (panic, rc) = case("panic");
    assert!(
        *rc != 0 && *rc != 4,
        "a panic is neither success nor reboot:\n{panic}"
    );
    assert!(
        panic.contains("tandem: the guest kernel panicked"),
        "{panic}"
    );

    let (disk, rc) = case("disk");
    assert_eq!(*rc, 0, "{disk}");
    let (image, _) = case("image");
    assert!(
        image.starts_with("written-by-the-guest"),
        "the guest's write reached the image through virtio-mmio: {image:?}\n{disk}"
    );

    let (net, rc) = case("net");
    assert_eq!(*rc, 0, "{net}");
    assert!(
        net.contains("lease of 10.0.2.15"),
        "DHCP on user networking:\n{net}"
    );
    let (host, _) = case("host");
    assert_eq!(host.trim(), "from-the-guest", "{net}");
}
