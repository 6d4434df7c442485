//! `tandem stats`: a VM's exit accounting, read from its stats socket.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tandem_vmm::stats::{Snapshot, VcpuStats};

use crate::up::StateArgs;
use crate::EXIT_USAGE;

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The VM's name in the running `tandem up` (see --state-dir).
    #[arg(
        value_name = "NAME",
        required_unless_present = "socket",
        conflicts_with = "socket"
    )]
    vm: Option<String>,
    /// The stats socket of a `tandem run --stats-socket PATH`.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the snapshot as JSON (totals since the VM started, and its uptime) instead of the
    /// table; with --watch, one JSON line per second.
    #[arg(long)]
    json: bool,
    /// Refresh every second until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Show every counter KVM has, not only those about exits, halts and interrupts.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    state: StateArgs,
}

/// The largest answer read from a stats socket.
const MAX_ANSWER: u64 = 16 << 20;
/// How long a VM may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Between the two samples of a table (as `kvm_stat --once`), and between refreshes.
const INTERVAL: Duration = Duration::from_secs(1);

/// KVM's per-vCPU counters the table shows by default, in this order: exits by reason, then
/// halt-polling and interrupt delivery.
const KVM_ROWS: &[&str] = &[
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "request_irq_exits",
    "signal_exits",
    "insn_emulation",
    "hypercalls",
    "halt_wakeup",
    "halt_successful_poll",
    "halt_attempted_poll",
    "halt_poll_invalid",
    "irq_injections",
    "nmi_injections",
];

#[derive(Debug)]
pub(crate) enum StatsError {
    /// Nothing answers at the path: status 2.
    Unreachable(PathBuf, std::io::Error),
    /// Something answered, but not with a snapshot: status 1.
    BadAnswer(PathBuf, String),
}

impl std::fmt::Display for StatsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatsError::Unreachable(p, e) => {
                write!(f, "no VM answers on stats socket {}: {e}", p.display())
            }
            StatsError::BadAnswer(p, e) => {
                write!(f, "stats socket {}: not a stats snapshot: {e}", p.display())
            }
        }
    }
}

fn fail(e: StatsError) -> ExitCode {
    eprintln!("tandem: {e}");
    ExitCode::from(match e {
        StatsError::Unreachable(..) => EXIT_USAGE,
        StatsError::BadAnswer(..) => 1,
    })
}

/// One snapshot from the socket at `path`.
pub(crate) fn sample(path: &Path) -> Result<Snapshot, StatsError> {
    let unreachable = |e| StatsError::Unreachable(path.to_path_buf(), e);
    let stream = UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(unreachable)?;
    let mut text = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut text)
        .map_err(|e| StatsError::BadAnswer(path.to_path_buf(), e.to_string()))?;
    serde_json::from_slice(&text)
        .map_err(|e| StatsError::BadAnswer(path.to_path_buf(), e.to_string()))
}

pub fn main(args: StatsArgs) -> ExitCode {
    let path = match (&args.socket, &args.vm) {
        (Some(p), _) => p.clone(),
        (None, Some(name)) => {
            if !tandem_partition::config::valid_name(name) {
                eprintln!("tandem: '{name}' is not a VM name (1-32 letters, digits, - or _)");
                return ExitCode::from(EXIT_USAGE);
            }
            let dir = args.state.dir();
            let path = tandem_partition::plan::stats_socket(&dir, name);
            if !path.exists() {
                eprintln!(
                    "tandem: no VM '{name}' in a tandem up with state directory {} (no {})",
                    dir.display(),
                    path.display()
                );
                return ExitCode::from(EXIT_USAGE);
            }
            path
        }
        (None, None) => unreachable!("clap requires NAME or --socket"),
    };
    let mut before = match sample(&path) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if args.json && !args.watch {
        println!("{}", serde_json::to_string(&before).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    loop {
        std::thread::sleep(INTERVAL);
        let now = match sample(&path) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        if args.json {
            println!("{}", serde_json::to_string(&now).unwrap_or_default());
        } else {
            if args.watch {
                // Home and clear, as watch(1) does.
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", table(&before, &now, args.all));
        }
        if !args.watch {
            return ExitCode::SUCCESS;
        }
        before = now;
    }
}

/// Per second, from two samples `secs` apart (0 when the counter went back: a restarted VM).
fn rate(before: u64, now: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{:.1}", now.saturating_sub(before) as f64 / secs)
}

/// The table: totals of `now`, rates between `before` and `now`.
fn table(before: &Snapshot, now: &Snapshot, all: bool) -> String {
    use std::fmt::Write;
    let secs = now.uptime_ms.saturating_sub(before.uptime_ms) as f64 / 1000.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "VM up {:.1} s; totals since it started, rates over the last {secs:.1} s",
        now.uptime_ms as f64 / 1000.0
    );
    for (k, v) in &now.settings {
        let _ = writeln!(out, "  {k}: {v}");
    }
    if let Some(e) = &now.kvm_error {
        let _ = writeln!(out, "KVM's counts unavailable: {e}");
    }
    // KVM's counters: one row per counter, two columns (total, /s) per vCPU, 4 vCPUs a block.
    let rows: Vec<String> = if all {
        let mut names: Vec<String> = now
            .vcpus
            .iter()
            .flat_map(|v| v.kvm.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    } else {
        KVM_ROWS
            .iter()
            .filter(|r| now.vcpus.iter().any(|v| v.kvm.contains_key(**r)))
            .map(|r| r.to_string())
            .collect()
    };
    let prev = |v: &VcpuStats, name: &str| {
        before
            .vcpus
            .iter()
            .find(|b| b.index == v.index)
            .and_then(|b| b.kvm.get(name))
            .copied()
            .unwrap_or(0)
    };
    if !rows.is_empty() {
        for block in now.vcpus.chunks(4) {
            let _ = write!(out, "\n{:<22}", "KVM");
            for v in block {
                let _ = write!(out, "{:>24}", format!("vcpu{}", v.index));
            }
            let _ = write!(out, "\n{:<22}", "");
            for _ in block {
                let _ = write!(out, "{:>14}{:>10}", "total", "/s");
            }
            out.push('\n');
            for r in &rows {
                let _ = write!(out, "{r:<22}");
                for v in block {
                    let n = v.kvm.get(r).copied().unwrap_or(0);
                    let _ = write!(out, "{n:>14}{:>10}", rate(prev(v, r), n, secs));
                }
                out.push('\n');
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{:<22}{:<22}{:>12}{:>10}{:>12}{:>10}",
        "user-space exits", "where", "reads", "/s", "writes", "/s"
    );
    for d in &now.devices {
        let old = before.devices.iter().find(|b| b.name == d.name);
        let where_ = if d.space == "any" {
            "-".to_string()
        } else {
            format!("{} {:#x}+{:#x}", d.space, d.base, d.len)
        };
        let _ = writeln!(
            out,
            "{:<22}{:<22}{:>12}{:>10}{:>12}{:>10}",
            d.name,
            where_,
            d.reads,
            rate(old.map_or(0, |o| o.reads), d.reads, secs),
            d.writes,
            rate(old.map_or(0, |o| o.writes), d.writes, secs)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_vmm::stats::DeviceExits;

    fn snap(uptime_ms: u64, exits: u64, serial_writes: u64) -> Snapshot {
        Snapshot {
            version: 1,
            uptime_ms,
            pid: 42,
            settings: [("placement".into(), "pinned".into())].into(),
            kvm_available: true,
            kvm_error: None,
            vm: Default::default(),
            vcpus: vec![VcpuStats {
                index: 0,
                kvm: [("exits".into(), exits), ("halt_wakeup".into(), 3)].into(),
                histograms: Default::default(),
            }],
            devices: vec![DeviceExits {
                name: "serial".into(),
                space: "pio".into(),
                base: 0x3f8,
                len: 8,
                reads: 0,
                writes: serial_writes,
            }],
        }
    }

    #[test]
    fn the_table_shows_totals_and_rates_over_the_interval() {
        let t = table(&snap(1000, 100, 10), &snap(3000, 300, 50), false);
        assert!(t.contains("rates over the last 2.0 s"), "{t}");
        assert!(t.contains("placement: pinned"), "{t}");
        let exits = t.lines().find(|l| l.starts_with("exits ")).unwrap();
        assert_eq!(
            exits.split_whitespace().collect::<Vec<_>>(),
            ["exits", "300", "100.0"]
        );
        let serial = t.lines().find(|l| l.starts_with("serial ")).unwrap();
        assert_eq!(
            serial.split_whitespace().collect::<Vec<_>>(),
            ["serial", "pio", "0x3f8+0x8", "0", "0.0", "50", "20.0"]
        );
        // Counters KVM does not have are not shown.
        assert!(!t.contains("mmio_exits"), "{t}");
    }
}
