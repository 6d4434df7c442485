//! Inter-VM channels (`--channel`): two guests running at once share memory through an ivshmem
//! PCI device, found and used with stock means only (sysfs and /dev/mem).

mod common;

use common::{case, exec_cmdline, run_script_with, FIND_IVSHMEM};

/// Finds the device, then prints what the guest sees of it.
const SHOW: &str = "echo dev=${dev##*/} class=$(cat $dev/class) size=$(( $2 - $1 + 1 )) ivpos=$(devmem $((regs + 8)) 32); ";

#[test]
fn two_running_guests_share_a_channel() {
    // A writes a ping, waits for B's reply; B waits for the ping, replies. Both run at once.
    let a = exec_cmdline(&format!(
        "{FIND_IVSHMEM}{SHOW} devmem $shm 32 0x7a4d3e11; i=0; \
         while [ $(devmem $((shm + 4)) 32) != 0x22C0FFEE ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         echo a-got=$(devmem $((shm + 4)) 32)"
    ));
    let b = exec_cmdline(&format!(
        "{FIND_IVSHMEM}{SHOW} i=0; \
         while [ $(devmem $shm 32) != 0x7A4D3E11 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         echo b-got=$(devmem $shm 32); devmem $((shm + 4)) 32 0x22c0ffee"
    ));
    // The shipped example is valid where its images are: in the test host.
    let example = std::fs::canonicalize(format!(
        "{}/../../examples/two-partitions.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .display()
    .to_string();
    let script = format!(
        r#"
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --serial stdio"
timeout 150 tandem run $BOOT --channel path=/tmp/chan,size=1M,id=0 --cmdline '{a}' </dev/null >/tmp/a.log 2>&1 &
pa=$!
timeout 150 tandem run $BOOT --channel path=/tmp/chan,size=1M,id=1 --cmdline '{b}' </dev/null >/tmp/b.log 2>&1 &
pb=$!
wait $pa
echo "status=$?" >>/tmp/a.log
wait $pb
echo "status=$?" >>/tmp/b.log
record a cat /tmp/a.log
record b cat /tmp/b.log
record file sh -c 'ls -l /tmp/chan; od -A x -t x4 -N 8 /tmp/chan'
record mismatch timeout 60 tandem run $BOOT --channel path=/tmp/chan,size=2M
record example tandem check {example}
"#
    );
    let (cases, all) = run_script_with(&script, &[example.as_str()]);
    let a = case(&cases, &all, "a");
    let b = case(&cases, &all, "b");
    for (c, id) in [(a, 0), (b, 1)] {
        assert!(
            c.output
                .contains(&format!("class=0x050000 size=1048576 ivpos=0x{id:08X}")),
            "the guest finds the ivshmem device, its 1 MiB BAR2 and its peer ID:\n{}",
            c.output
        );
        assert!(c.output.contains("status=0"), "{}", c.output);
    }
    assert!(
        a.output.contains("a-got=0x22C0FFEE"),
        "A sees B's reply:\n{}",
        a.output
    );
    assert!(
        b.output.contains("b-got=0x7A4D3E11"),
        "B sees A's ping:\n{}",
        b.output
    );
    let file = case(&cases, &all, "file");
    assert!(
        file.output.contains("7a4d3e11 22c0ffee"),
        "the host's file holds what the guests wrote:\n{}",
        file.output
    );
    let ex = case(&cases, &all, "example");
    assert_eq!(ex.rc, 0, "{}", ex.output);
    assert!(
        ex.output.contains("ok, 2 VM(s), 1 channel(s)"),
        "{}",
        ex.output
    );
    let m = case(&cases, &all, "mismatch");
    assert_eq!(m.rc, 2, "{}", m.output);
    assert!(
        m.output
            .contains("the file holds 1048576 bytes, not 2097152"),
        "{}",
        m.output
    );
}
