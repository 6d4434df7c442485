//! Channel doorbells under `tandem up --detach`: a process in one guest blocks on the channel's interrupt
//! (stock `uio_pci_generic`), the other guest writes a message into the shared memory and rings
//! the doorbell register, and the blocked process wakes and reads the message. The doorbell is a
//! KVM ioeventfd in the ringing VM wired to a KVM irqfd in the other: neither VMM sees it.

mod common;

use common::{case, channel_pair_config, exec_cmdline, run_script, FIND_IVSHMEM};

#[test]
fn a_doorbell_wakes_a_process_blocked_in_the_other_guest() {
    let waiter = exec_cmdline(&format!(
        "{FIND_IVSHMEM} modprobe uio_pci_generic; echo 1af4 1110 > /sys/bus/pci/drivers/uio_pci_generic/new_id; \
         i=0; while [ ! -e /dev/uio0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         exec 3<>/dev/uio0; \
         devmem $shm 32 0xb0b0b0b0; echo b-waiting; \
         n=$(dd bs=4 count=1 <&3 2>/dev/null | od -An -tu4); \
         echo b-woke count=$((n)) msg=$(devmem $((shm + 4)) 32); \
         devmem $shm 32 0xc0c0c0c0; i=0; \
         while [ $(devmem $shm 32) != 0xD0D0D0D0 ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; \
         echo b-masked-irqs=$(grep uio /proc/interrupts | awk '{{print $2}}'); \
         c=$(dd if=$dev/config bs=2 skip=2 count=1 2>/dev/null | od -An -tu2); c=$((c & ~1024)); \
         printf $(printf '\\\\%03o\\\\%03o' $((c & 255)) $((c >> 8))) | dd of=$dev/config bs=2 seek=2 count=1 conv=notrunc 2>/dev/null; \
         n=$(dd bs=4 count=1 <&3 2>/dev/null | od -An -tu4); \
         echo b-unmasked count=$((n)) irqs=$(grep uio /proc/interrupts | awk '{{print $2}}')"
    ));
    let ringer = exec_cmdline(&format!(
        "{FIND_IVSHMEM} echo a-ivpos=$(devmem $((regs + 8)) 32); i=0; \
         while [ $(devmem $shm 32) != 0xB0B0B0B0 ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; \
         devmem $((shm + 4)) 32 0x600dd00d; devmem $((regs + 12)) 32 0x10000; echo a-rang; i=0; \
         while [ $(devmem $shm 32) != 0xC0C0C0C0 ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; \
         j=0; while [ $j -lt 200 ]; do devmem $((regs + 12)) 32 0x10000; j=$((j+1)); done; \
         devmem $shm 32 0xd0d0d0d0; echo a-rang-200; sleep 3"
    ));
    let config = channel_pair_config("/tmp/d.toml", &ringer, &waiter);
    let script = format!(
        r#"
{config}# In the background: the command returns once the supervisor answers on its socket.
record detach tandem up /tmp/d.toml --detach --state-dir /tmp/dst
# The supervisor ends by itself when both VMs have powered off; its socket goes with it.
i=0; while [ $i -lt 400 ] && [ -e /tmp/dst/control.sock ]; do sleep 0.5; i=$((i+1)); done
record up cat /tmp/dst/supervisor.log
"#,
    );
    let (cases, all) = run_script(&script);
    let up = &case(&cases, &all, "up").output;
    assert!(up.contains("a | a-ivpos=0x00000000"), "{up}");
    assert!(up.contains("b | b-waiting"), "{up}");
    assert!(up.contains("a | a-rang"), "{up}");
    assert!(
        up.contains("b | b-woke count=1 msg=0x600DD00D"),
        "the blocked process woke with the message:\n{up}"
    );
    // uio_pci_generic's handler masks INTx and leaves it masked until user space unmasks it (by
    // clearing Interrupt Disable in the command register through sysfs):
    // 200 doorbells rung meanwhile must not interrupt the guest, and one is delivered on unmask.
    assert!(up.contains("a | a-rang-200"), "{up}");
    assert!(
        up.contains("b | b-masked-irqs=1\n"),
        "doorbells interrupted a guest with INTx disabled:\n{up}"
    );
    assert!(
        up.contains("b | b-unmasked count=2 irqs=2\n"),
        "the doorbells rung while masked arrive once unmasked:\n{up}"
    );
    assert!(up.contains("tandem: no VM is left running"), "{up}");
    let d = case(&cases, &all, "detach");
    assert_eq!(d.rc, 0, "{}", d.output);
    assert!(
        d.output
            .contains("tandem: supervisor running in the background (pid "),
        "{}",
        d.output
    );
}
