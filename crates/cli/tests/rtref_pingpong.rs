//! MSI-X doorbells between two reference RT guests (guests/rtref, `pingpong=`) under `tandem up`:
//! 10,000 round trips cost no exit to tandem's user space. Each doorbell is the ringing VM's
//! ioeventfd wired to the other VM's irqfd, injected as the MSI the guest programmed.
//!
//! Two ways of counting: runs of 10,000 and 20,000 round trips end with the same user-space exit
//! counts (tandem's exit log line; the guests' output has the same length in both), and
//! `tandem stats --json` before and after a stretch of an endless exchange shows no device
//! access at all while KVM injects thousands of doorbells.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, rtref_guest, run_script_with, Case};
use tandem_vmm::stats::Snapshot;

const ROUNDS: u32 = 10_000;

type Session = (HashMap<String, Case>, String);

/// A partition config: `ping` (general, CPU 0) and `pong` (realtime, CPU 1), peers 0 and 1 of
/// one channel, so each rings the other's doorbell.
fn config(rt: &str, path: &str, rounds: u32) -> String {
    format!(
        r#"cat >{path} <<'TOML'
[[vm]]
name = "ping"
kernel = "{rt}"
cmdline = "pingpong=ping rounds={rounds} peer=1"
memory = "32M"
cpus = [0]

[[vm]]
name = "pong"
role = "realtime"
kernel = "{rt}"
cmdline = "pingpong=pong peer=0"
memory = "32M"
cpus = [1]

[[channel]]
name = "bell"
size = "4K"
members = ["ping", "pong"]
TOML
"#
    )
}

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let rt = rtref_guest();
        let script = format!(
            r#"
{c1}{c2}{endless}
for n in 1 2; do
  TANDEM_LOG=info timeout 600 tandem up /tmp/pp$n.toml --state-dir /tmp/pps$n >/tmp/pp$n.out 2>&1
  echo "status=$?" >>/tmp/pp$n.out
  record run$n cat /tmp/pp$n.out
done
# An exchange that does not end: snapshots of both VMs 2 s apart, once both are exchanging.
wait_for() {{ i=0; while [ $i -lt 240 ] && ! grep -q "$1" "$2" 2>/dev/null; do sleep 0.5; i=$((i+1)); done; }}
tandem up /tmp/ppe.toml --state-dir /tmp/ppse >/tmp/ppe.out 2>&1 &
sup=$!
wait_for "rtref: pingpong role=ping" /tmp/ppse/ping.log
wait_for "rtref: pingpong role=pong" /tmp/ppse/pong.log
for vm in ping pong; do record $vm-before tandem stats $vm --state-dir /tmp/ppse --json; done
sleep 2
for vm in ping pong; do record $vm-after tandem stats $vm --state-dir /tmp/ppse --json; done
record endless-done-yet grep -c "round_trips=" /tmp/ppse/ping.log
tandem down --state-dir /tmp/ppse
wait $sup
record endless-run cat /tmp/ppe.out
"#,
            c1 = config(&rt, "/tmp/pp1.toml", ROUNDS),
            c2 = config(&rt, "/tmp/pp2.toml", 2 * ROUNDS),
            endless = config(&rt, "/tmp/ppe.toml", u32::MAX),
        );
        run_script_with(&script, &[&rt])
    })
}

/// Exits to tandem's user space of VM `vm` in a `tandem up` run, from its info log line
/// `vcpu0: N exits (pio in A, pio out B, mmio C, interrupted D, other E)`, without the
/// `interrupted` ones (signals to the vCPU thread, not the guest's doing).
fn user_space_exits(out: &str, vm: &str) -> i64 {
    let prefix = format!("{vm} | ");
    let line = out
        .lines()
        .map(str::trim_start)
        .filter_map(|l| l.strip_prefix(&prefix))
        .find(|l| l.contains("vcpu0: ") && l.contains(" exits (pio in "))
        .unwrap_or_else(|| panic!("no exit counts of {vm} in the log:\n{out}"));
    common::user_space_exits_of(line)
}

/// The run of `n` × 10,000 round trips; its reports checked.
fn run(n: u32) -> &'static str {
    let (cases, all) = session();
    let out = &case(cases, all, &format!("run{n}")).output;
    assert!(out.contains("status=0"), "both VMs power off:\n{out}");
    assert!(!out.contains("rtref: error"), "{out}");
    let rounds = n * ROUNDS;
    assert!(
        out.contains(&format!(
            "rtref: pingpong role=ping round_trips={rounds} doorbells={rounds}"
        )),
        "every round trip completed:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "rtref: pingpong role=pong doorbells={}",
            rounds + 1
        )),
        "the pong side saw each ping and the last doorbell:\n{out}"
    );
    out
}

#[test]
fn msix_doorbell_round_trips_add_no_user_space_exits() {
    let (short, long) = (run(1), run(2));
    for vm in ["ping", "pong"] {
        let (a, b) = (user_space_exits(short, vm), user_space_exits(long, vm));
        eprintln!(
            "{vm}: user-space exits {a} with {ROUNDS} round trips, {b} with {}: {:.4} per round trip",
            2 * ROUNDS,
            (b - a) as f64 / f64::from(ROUNDS)
        );
        // Start-up (MSI-X table, console lines) and power-off are the same in both runs; a
        // doorbell that cost even one exit would add 10,000.
        assert!(
            (b - a).abs() <= 10,
            "{vm}: 10,000 more round trips must add no exit to user space ({a} then {b}):\n{short}\n{long}"
        );
    }
}

fn snapshot(c: &Case) -> Snapshot {
    assert_eq!(c.rc, 0, "tandem stats:\n{}", c.output);
    serde_json::from_str(c.output.trim()).unwrap_or_else(|e| panic!("{e}:\n{}", c.output))
}

/// A KVM counter of vCPU 0: how much it grew from `a` to `b`.
fn kvm_delta(a: &Snapshot, b: &Snapshot, name: &str) -> u64 {
    let get = |s: &Snapshot| s.vcpus[0].kvm.get(name).copied().unwrap_or(0);
    get(b) - get(a)
}

/// Exits to tandem's user space, all devices: how much they grew from `a` to `b`.
fn user_space_delta(a: &Snapshot, b: &Snapshot) -> u64 {
    let sum = |s: &Snapshot| s.devices.iter().map(|d| d.reads + d.writes).sum::<u64>();
    sum(b) - sum(a)
}

#[test]
fn tandem_stats_sees_doorbells_injected_and_no_user_space_exit() {
    let (cases, all) = session();
    let done_yet = case(cases, all, "endless-done-yet");
    assert_eq!(
        done_yet.output.trim(),
        "0",
        "the endless exchange ended:\n{}",
        case(cases, all, "endless-run").output
    );
    for vm in ["ping", "pong"] {
        let before = snapshot(case(cases, all, &format!("{vm}-before")));
        let after = snapshot(case(cases, all, &format!("{vm}-after")));
        assert!(after.kvm_available, "{:?}", after.kvm_error);
        let injected = kvm_delta(&before, &after, "irq_injections");
        let exits = kvm_delta(&before, &after, "exits");
        let user = user_space_delta(&before, &after);
        eprintln!(
            "{vm}: in 2 s, {injected} interrupts injected (each a doorbell), {exits} KVM exits \
             ({:.2} per doorbell), {user} user-space exits",
            exits as f64 / injected.max(1) as f64
        );
        let reasons: Vec<String> = after.vcpus[0]
            .kvm
            .keys()
            .filter(|k| k.ends_with("_exits"))
            .map(|k| format!("{k}={}", kvm_delta(&before, &after, k)))
            .collect();
        eprintln!("{vm}: KVM exits by reason: {}", reasons.join(" "));
        assert!(
            injected > 100,
            "{vm}: doorbells were injected between the snapshots:\n{before:?}\n{after:?}"
        );
        assert_eq!(
            user, 0,
            "{vm}: exits to tandem between two snapshots of the exchange:\n{before:?}\n{after:?}"
        );
    }
}
