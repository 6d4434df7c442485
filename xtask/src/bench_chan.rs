//! `cargo xtask bench channel`: two Linux guests under `tandem up` exchange a 32-bit counter
//! 10,000 times (round trips per second) and then 64 MiB (MB/s): through a channel's shared
//! memory, polling (`poll`) or sleeping on doorbells (`bell`), and over the network through
//! tandem's user-mode NAT and a port forward (`tcp`), in one testbed run. A fourth run with no
//! exchange (`idle`) is the baseline for the VMs' user-space exits.

use std::path::Path;

use crate::bench_dev::{print_table, results, run_testbed, testkit_bench};

/// Round trips (`$TANDEM_BENCH_ROUNDS` overrides it, e.g. for a quick look).
fn rounds() -> u32 {
    std::env::var("TANDEM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
/// MiB of the bulk transfer (`$TANDEM_BENCH_MIB`).
fn mib() -> u32 {
    std::env::var("TANDEM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}
/// Modes to run (`$TANDEM_BENCH_MODES`, e.g. `poll,tcp`; idle always runs).
fn modes() -> Vec<String> {
    std::env::var("TANDEM_BENCH_MODES")
        .unwrap_or_else(|_| "poll,bell,tcp".into())
        .split(',')
        .map(str::to_string)
        .collect()
}

fn config(mode: &str, rounds: u32, mib: u32) -> String {
    let bench = if mode == "idle" { "poll" } else { mode };
    let setup = match mode {
        "bell" => "modprobe uio_pci_generic; echo 1af4 1110 > /sys/bus/pci/drivers/uio_pci_generic/new_id; sleep 1; ",
        "tcp" => "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; ",
        _ => "",
    };
    let vm = |name: &str, cpu: u32, net: &str, forward: &str| {
        format!(
            "[[vm]]\nname = \"{name}\"\nkernel = \"/guests/vmlinuz\"\ninitrd = \"/tmp/bench.gz\"\n\
             cmdline = \"console=ttyS0 reboot=k panic=-1 quiet tandem.exec=\\\"{setup}/usr/bin/chan-bench {name} {bench} {rounds} {mib}\\\"\"\n\
             memory = \"512M\"\ncpus = [{cpu}]\nnet = \"{net}\"\n{forward}\n"
        )
    };
    format!(
        "{}{}[[channel]]\nname = \"c\"\nsize = \"16M\"\nmembers = [\"a\", \"b\"]\n",
        // a reaches b's forward through the host's loopback, which a config must open by name.
        vm("a", 0, "user,host-loopback=7000", ""),
        vm("b", 1, "user", "forwards = [\"tcp:7000:7000\"]")
    )
}

/// `cargo xtask bench channel`.
pub fn channel(root: &Path) -> Result<i32, String> {
    let (mut s, carry) = testkit_bench(root, "chan-bench")?;
    s.push_str(
        r#"exits() { grep -o 'vcpu[0-9]*: [0-9]* exits' "$1" | awk '{s+=$2} END {print s+0}'; }
measure() {
  mode=$1
  TANDEM_LOG=info timeout 400 tandem up /tmp/$mode.toml --state-dir /tmp/st-$mode >/tmp/$mode.out 2>&1
  line=$(grep -o 'chan-bench mode=.*' /tmp/$mode.out | head -1)
  echo "RESULT $mode exits=$(exits /tmp/$mode.out) ${line#chan-bench mode=$mode }"
  [ -n "$line" ] || [ $mode = idle ] || tail -20 /tmp/$mode.out
}
"#,
    );
    let (rounds, mib) = (rounds(), mib());
    let mut runs = vec![("idle".to_string(), 0, 0)];
    runs.extend(modes().into_iter().map(|m| (m, rounds, mib)));
    for (mode, rounds, mib) in &runs {
        s.push_str(&format!(
            "cat >/tmp/{mode}.toml <<'TOML'\n{}TOML\nmeasure {mode}\n",
            config(mode, *rounds, *mib)
        ));
    }
    eprintln!("bench: channel ping-pong and bulk, poll / doorbell / TCP, in one testbed run (a few minutes)");
    let out = run_testbed(&s, &[carry], 850)?;
    for l in out.lines().filter(|l| !l.starts_with("RESULT")) {
        eprintln!("  {l}");
    }
    let mut rows = results(&out);
    if rows.is_empty() {
        return Err("no results".into());
    }
    let idle = rows
        .iter()
        .find(|(m, _)| m == "idle")
        .and_then(|(_, kv)| kv.iter().find(|(k, _)| k == "exits").map(|(_, v)| *v))
        .unwrap_or(0.0);
    for (mode, kv) in rows.iter_mut() {
        let exits = kv
            .iter()
            .find(|(k, _)| k == "exits")
            .map_or(0.0, |(_, v)| *v);
        if mode != "idle" {
            kv.push((
                "exits-per-rt".into(),
                ((exits - idle) / f64::from(rounds.max(1))).max(0.0),
            ));
        }
    }
    rows.retain(|(m, _)| m != "idle");
    println!(
        "two guests, {rounds} round trips of a 32-bit counter, then {mib} MiB from one to the other; \
         exits: the two VMs' user-space exits beyond an idle run's ({idle:.0}), per round trip\n"
    );
    print_table(&rows, &["rt-per-s", "mb-per-s", "exits-per-rt"], &["tcp"]);
    Ok(0)
}
