//! 10,000 round trips through a channel between two guests under `tandem up` complete, and
//! tandem's user-space exits do not grow with them: the shared memory is a KVM memory slot, so
//! the exchange never leaves the guests.

mod common;

use common::{case, guest_overlay, run_script_with, testkit_program};

const ROUNDS: u32 = 10_000;

fn config(name: &str, rounds: u32, bench: &str) -> String {
    let vm = |role: &str, cpu: u32| {
        format!(
            "[[vm]]\nname = \"{role}\"\nkernel = \"/guests/vmlinuz\"\ninitrd = \"/tmp/pp.gz\"\n\
             cmdline = \"console=ttyS0 reboot=k panic=-1 quiet tandem.exec=\\\"{bench} {role} poll {rounds} 0\\\"\"\n\
             memory = \"256M\"\ncpus = [{cpu}]\n"
        )
    };
    format!(
        "cat >/tmp/{name}.toml <<'TOML'\n{}{}[[channel]]\nname = \"c\"\nsize = \"64K\"\nmembers = [\"a\", \"b\"]\nTOML\n",
        vm("a", 0),
        vm("b", 1)
    )
}

#[test]
fn ten_thousand_round_trips_cost_no_exits() {
    let bench = testkit_program("chan-bench");
    // The guest gets chan-bench and its libraries in an initramfs appended to the usual one.
    let (overlay, with) = guest_overlay("pp", &[&bench]);
    let script = format!(
        r#"
{overlay}exits() {{ grep -o 'vcpu[0-9]*: [0-9]* exits' "$1" | awk '{{s+=$2}} END {{print s+0}}'; }}
{idle}{busy}
TANDEM_LOG=info timeout 300 tandem up /tmp/idle.toml --state-dir /tmp/s1 >/tmp/idle.out 2>&1
TANDEM_LOG=info timeout 300 tandem up /tmp/busy.toml --state-dir /tmp/s2 >/tmp/busy.out 2>&1
i=$(exits /tmp/idle.out); b=$(exits /tmp/busy.out)
record result sh -c "echo idle-exits=$i busy-exits=$b; grep -o 'chan-bench mode=.*' /tmp/busy.out"
"#,
        idle = config("idle", 0, &bench),
        busy = config("busy", ROUNDS, &bench),
    );
    let with: Vec<&str> = with.iter().map(String::as_str).collect();
    let (cases, all) = run_script_with(&script, &with);
    let r = &case(&cases, &all, "result").output;
    assert!(
        r.contains(&format!("chan-bench mode=poll rounds={ROUNDS} ")),
        "the round trips completed:\n{r}"
    );
    let num = |k: &str| -> f64 {
        r.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (idle, busy) = (num("idle-exits="), num("busy-exits="));
    assert!(idle > 0.0, "exit counts are logged:\n{r}");
    let per_round_trip = (busy - idle) / f64::from(ROUNDS);
    eprintln!(
        "exits: idle {idle}, with {ROUNDS} round trips {busy} ({per_round_trip:.3} per round trip)"
    );
    // Runs differ by about a hundred exits (boot, and a longer run's timer work); an exchange
    // that cost exits would cost at least one per round trip: 10,000.
    assert!(
        per_round_trip < 0.05,
        "exits grew with the round trips: idle {idle}, busy {busy}"
    );
}
