//! `tandem stats` on running guests: a `tandem run --stats-socket` guest that idles, then writes
//! a known number of bytes to its serial console on cue, and a VM of `tandem up` (jailed, when
//! the test host is root) found by name. One test-host session for both.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, exec_cmdline, run_script, Case};
use tandem_vmm::stats::Snapshot;

type Session = (HashMap<String, Case>, String);

/// Lines of 50 bytes (49 digits and a newline) the guest writes on cue.
const LINES: usize = 40;
const BYTES: u64 = 50 * LINES as u64;

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let writer = exec_cmdline(&format!(
            "echo stats-ready; while read line; do [ x$line = xgo ] && break; done; \
             i=0; while [ $i -lt {LINES} ]; do echo 0123456789012345678901234567890123456789012345678; i=$((i+1)); done; \
             echo stats-wrote; sleep 600"
        ));
        let idle = exec_cmdline("echo idle-ready; sleep 600");
        let script = format!(
            r#"
wait_for() {{ i=0; while [ $i -lt 240 ] && ! grep -q "$1" "$2"; do sleep 0.5; i=$((i+1)); done; }}
mkfifo /tmp/in
exec 3<>/tmp/in
tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --cpus 2 \
  --stats-socket /tmp/vm.sock --cmdline '{writer}' <&3 >/tmp/run.out 2>&1 &
vm=$!
wait_for stats-ready /tmp/run.out
# Idle a while: the vCPUs halt and are woken.
sleep 2
record before tandem stats --socket /tmp/vm.sock --json
echo go >&3
wait_for stats-wrote /tmp/run.out
record after tandem stats --socket /tmp/vm.sock --json
record table tandem stats --socket /tmp/vm.sock
record watch timeout 3 tandem stats --socket /tmp/vm.sock --watch
kill $vm
wait $vm
record run cat /tmp/run.out
record gone tandem stats --socket /tmp/vm.sock

cat >/tmp/p.toml <<'TOML'
[[vm]]
name = "idle"
kernel = "/guests/vmlinuz"
initrd = "/guests/initramfs.cpio.gz"
cmdline = '{idle}'
memory = "256M"
cpus = [0]
TOML
tandem up /tmp/p.toml --state-dir /tmp/st >/tmp/up.out 2>&1 &
sup=$!
wait_for idle-ready /tmp/up.out
record up-json tandem stats idle --state-dir /tmp/st --json
record up-table tandem stats idle --state-dir /tmp/st
record up-ps tandem ps --state-dir /tmp/st
record down tandem down --state-dir /tmp/st
wait $sup
echo "supervisor-status=$?" >>/tmp/up.out
i=0; while [ $i -lt 100 ] && kill -0 $sup 2>/dev/null; do sleep 0.2; i=$((i+1)); done
record up-out cat /tmp/up.out
record up-left ls /tmp/st
"#
        );
        run_script(&script)
    })
}

fn snapshot(name: &str) -> Snapshot {
    let (cases, all) = session();
    let c = case(cases, all, name);
    assert_eq!(c.rc, 0, "{name}:\n{}\nsession:\n{all}", c.output);
    serde_json::from_str(c.output.trim()).unwrap_or_else(|e| panic!("{name}: {e}:\n{}", c.output))
}

fn kvm(s: &Snapshot, vcpu: usize, name: &str) -> u64 {
    *s.vcpus[vcpu]
        .kvm
        .get(name)
        .unwrap_or_else(|| panic!("no {name} for vcpu{vcpu}: {s:?}"))
}

fn serial_writes(s: &Snapshot) -> u64 {
    s.devices
        .iter()
        .find(|d| d.name == "serial")
        .unwrap_or_else(|| panic!("no serial device: {s:?}"))
        .writes
}

#[test]
fn kvm_counts_exits_and_halt_wakeups_per_vcpu() {
    let s = snapshot("after");
    assert!(s.kvm_available, "{:?}", s.kvm_error);
    assert_eq!(s.vcpus.len(), 2);
    assert!(kvm(&s, 0, "exits") > 0);
    // The guest printed through the UART's ports: port-I/O exits.
    assert!(kvm(&s, 0, "io_exits") > 0);
    // An idle guest halts, and is woken (by its timer).
    let before = snapshot("before");
    assert!(kvm(&before, 0, "halt_wakeup") > 0, "{before:?}");
    assert!(before.settings.contains_key("placement"), "{before:?}");
}

#[test]
fn each_byte_written_to_the_serial_port_is_one_exit_to_its_device() {
    let (before, after) = (snapshot("before"), snapshot("after"));
    let delta = serial_writes(&after) - serial_writes(&before);
    // The bytes, a carriage return per line (the tty's onlcr), the echoed cue and the marker,
    // and the driver's interrupt-enable writes around each burst.
    assert!(
        (BYTES..BYTES * 2).contains(&delta),
        "{BYTES} bytes written, {delta} serial write exits"
    );
    let io = kvm(&after, 0, "io_exits") + kvm(&after, 1, "io_exits")
        - kvm(&before, 0, "io_exits")
        - kvm(&before, 1, "io_exits");
    assert!(io >= delta, "KVM's io_exits {io} < serial writes {delta}");
    assert!(after.uptime_ms > before.uptime_ms);
}

#[test]
fn the_table_and_watch_show_every_vcpu_and_the_serial_device() {
    let (cases, all) = session();
    let t = case(cases, all, "table");
    eprintln!("tandem stats:\n{}", t.output);
    assert_eq!(t.rc, 0, "{}", t.output);
    for needle in ["vcpu0", "vcpu1", "halt_wakeup", "irq_injections", "serial "] {
        assert!(t.output.contains(needle), "{needle}:\n{}", t.output);
    }
    let w = case(cases, all, "watch");
    // Stopped by timeout's SIGTERM (busybox's timeout reports 128+15, coreutils' 124).
    assert!(
        [124, 143].contains(&w.rc),
        "watch runs until stopped (status {}):\n{}",
        w.rc,
        w.output
    );
    assert!(
        w.output.matches("user-space exits").count() >= 2,
        "{}",
        w.output
    );
    // Once the VM is gone, its socket answers no more: one line, status 2.
    let g = case(cases, all, "gone");
    assert_eq!(g.rc, 2, "{}", g.output);
    assert!(g
        .output
        .starts_with("tandem: no VM answers on stats socket /tmp/vm.sock"));
}

#[test]
fn a_vm_of_tandem_up_is_found_by_name() {
    let s = snapshot("up-json");
    assert!(s.kvm_available, "{:?}", s.kvm_error);
    assert_eq!(s.vcpus.len(), 1);
    assert!(kvm(&s, 0, "exits") > 0);
    assert!(serial_writes(&s) > 0, "the guest printed: {s:?}");
    let (cases, all) = session();
    let t = case(cases, all, "up-table");
    eprintln!("tandem stats idle:\n{}", t.output);
    assert_eq!(t.rc, 0, "{}", t.output);
    // tandem down removes the VM's stats socket with the rest.
    let left = &case(cases, all, "up-left").output;
    let up = &case(cases, all, "up-out").output;
    let down = &case(cases, all, "down").output;
    assert!(
        !left.contains("stats-idle.sock"),
        "{left}\ndown: {down}\nup:\n{up}"
    );
}
