//! A realtime VM leaves HLT to the guest: KVM's own counters (`tandem stats`) show an idle
//! realtime vCPU that never exits on HLT, and the same VM with the exits kept shows HLT exits,
//! so the setting is what makes the difference.

mod common;

use common::{case, exec_cmdline, run_script, stats_snapshot};
use tandem_vmm::stats::Snapshot;

fn vcpu0(s: &Snapshot, counter: &str) -> u64 {
    *s.vcpus[0]
        .kvm
        .get(counter)
        .unwrap_or_else(|| panic!("no {counter}: {s:?}"))
}

#[test]
fn an_idle_realtime_vcpu_halts_without_exits_only_when_hlt_is_left_to_the_guest() {
    let guest = exec_cmdline("echo rt-ready; sleep 600");
    let script = format!(
        r#"
wait_for() {{ i=0; while [ $i -lt 240 ] && ! grep -q "$1" "$2"; do sleep 0.5; i=$((i+1)); done; }}
for mode in disabled kept; do
  extra=""
  [ $mode = kept ] && extra="--disable-exits-optional none"
  tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 128M --realtime \
    --pin-cpus 1 --stats-socket /tmp/$mode.sock $extra --serial file:/tmp/$mode.log \
    --cmdline '{guest}' </dev/null 2>/tmp/$mode.err &
  vm=$!
  wait_for rt-ready /tmp/$mode.log
  sleep 1
  record $mode-start tandem stats --socket /tmp/$mode.sock --json
  sleep 3
  record $mode-end tandem stats --socket /tmp/$mode.sock --json
  kill $vm
  wait $vm
  record $mode-log cat /tmp/$mode.err
done
"#
    );
    let (cases, all) = run_script(&script);
    let (start, end) = (
        stats_snapshot(&cases, &all, "disabled-start"),
        stats_snapshot(&cases, &all, "disabled-end"),
    );
    assert!(end.kvm_available, "{:?}", end.kvm_error);
    let realtime = end.settings.get("realtime").cloned().unwrap_or_default();
    assert!(
        realtime.starts_with("exits left to the guest: hlt,pause"),
        "settings in force: {:?}",
        end.settings
    );
    // Idle for 3 s: the guest's timer still wakes it (interrupts reach it), but it never exits
    // on HLT, from boot on.
    assert!(
        vcpu0(&end, "exits") > vcpu0(&start, "exits"),
        "the vCPU ran: {start:?}\n{end:?}"
    );
    assert_eq!(vcpu0(&end, "halt_exits"), 0, "{end:?}");
    let (kstart, kend) = (
        stats_snapshot(&cases, &all, "kept-start"),
        stats_snapshot(&cases, &all, "kept-end"),
    );
    assert_eq!(
        kend.settings.get("realtime").map(String::as_str),
        Some("exits left to the guest: none; halt polling: host default")
    );
    let idle_halts = vcpu0(&kend, "halt_exits") - vcpu0(&kstart, "halt_exits");
    assert!(
        idle_halts > 0,
        "with HLT exits kept, an idle vCPU exits on HLT: {kstart:?}\n{kend:?}"
    );
    eprintln!(
        "idle 3 s: halt exits {} with hlt left to the guest, {idle_halts} with it kept; exits {} and {}",
        vcpu0(&end, "halt_exits") - vcpu0(&start, "halt_exits"),
        vcpu0(&end, "exits") - vcpu0(&start, "exits"),
        vcpu0(&kend, "exits") - vcpu0(&kstart, "exits"),
    );
    let log = case(&cases, &all, "disabled-log");
    assert!(!log.output.contains("panicked"), "{}", log.output);
}
