//! Port forwards for the TAP backend: host ports mapped to the guest's address by an nftables
//! DNAT rule set that tandem installs when the VM starts and removes when it stops.
//!
//! Each tandem process owns one table, `ip tandem_fwd_<pid>`, so that removing it can never touch
//! anyone else's rules, and so that a table left behind by a tandem that was killed with SIGKILL
//! (the one exit no process can catch) is recognised and removed by the next tandem that maps
//! ports. The rules:
//! - `output` (priority -100, where prerouting has dstnat): connections from the host itself to HOSTADDR:HOSTPORT;
//! - `prerouting` (priority dstnat): connections from other machines, only when HOSTADDR is
//!   not a loopback address, so the default 127.0.0.1 is never reachable from outside;
//! - `postrouting` (priority srcnat): loopback sources leaving through the TAP interface are
//!   masqueraded to the interface's address, which the guest can answer;
//! - `loopback_guard` (filter, prerouting, priority raw): packets arriving on the TAP interface
//!   to or from 127.0.0.0/8 are dropped. Forwards from 127.0.0.1 need `route_localnet=1` on the
//!   interface, which would otherwise let the guest reach host services bound to 127.0.0.1 only
//!   (the CVE-2020-8558 pattern); the guest's replies to forwarded connections are addressed to
//!   the interface's own address (masqueraded), so they pass.
//!
//! The table's comment records its owner's start time (so that a reused PID is not taken for
//! the owner) and the interface's previous `route_localnet`, which the cleanup restores.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use crate::forward::{Forward, Protocol};

/// The nft command (`$TANDEM_NFT` overrides it, e.g. where nft is not on PATH).
fn nft_command() -> String {
    std::env::var("TANDEM_NFT").unwrap_or_else(|_| "nft".into())
}

const TABLE_PREFIX: &str = "tandem_fwd_";

/// Why port forwarding over TAP could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    /// No guest address to forward to.
    #[error("--forward with --net tap needs the guest's address: --net tap=NAME,guest-ip=ADDR")]
    NoGuestAddress,
    /// A forward's host address is IPv6 (the guest address is IPv4).
    #[error("--forward {0}: only IPv4 host addresses can be mapped over --net tap")]
    Ipv6(Forward),
    /// The nft command is missing.
    #[error("--forward with --net tap needs the nft command (Debian package nftables)")]
    NoNft,
    /// nft refused the rules.
    #[error("--forward with --net tap: nft failed: {0}")]
    Nft(String),
    /// Privilege is missing.
    #[error("--forward with --net tap installs nftables rules: run as root (CAP_NET_ADMIN)")]
    Permission,
    /// The interface name could change the rules' meaning.
    #[error(transparent)]
    Interface(#[from] crate::tap::TapError),
}

/// What a table's comment records about its owner, for the cleanup after a SIGKILL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// The owner's start time (field 22 of /proc/PID/stat, in clock ticks since boot).
    pub start: Option<u64>,
    /// The interface whose `route_localnet` the owner set, and its value before.
    pub localnet: Option<(String, u8)>,
}

impl Owner {
    /// The table comment that records this owner.
    pub fn comment(&self) -> String {
        let mut c = String::from("tandem");
        if let Some(t) = self.start {
            c.push_str(&format!(" start={t}"));
        }
        if let Some((iface, old)) = &self.localnet {
            c.push_str(&format!(" localnet={iface}:{old}"));
        }
        c
    }

    /// Reads a comment written by [`Owner::comment`]; what it does not recognise is ignored.
    pub fn parse(comment: &str) -> Owner {
        let mut o = Owner::default();
        for word in comment.split_whitespace() {
            if let Some(t) = word.strip_prefix("start=") {
                o.start = t.parse().ok();
            } else if let Some(l) = word.strip_prefix("localnet=") {
                o.localnet = l
                    .rsplit_once(':')
                    .filter(|(iface, _)| crate::tap::Tap::check_name(iface).is_ok())
                    .and_then(|(iface, v)| Some((iface.to_string(), v.parse().ok()?)));
            }
        }
        o
    }
}

/// The start time of process `pid` (field 22 of /proc/PID/stat).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What to map: the TAP interface, the guest's address on it, and the forwards.
#[derive(Debug, Clone)]
pub struct PortMapSpec {
    /// The TAP interface.
    pub interface: String,
    /// The guest's IPv4 address.
    pub guest: Ipv4Addr,
    /// The forwards.
    pub forwards: Vec<Forward>,
}

/// The name of the table owned by process `pid`.
pub fn table_name(pid: u32) -> String {
    format!("{TABLE_PREFIX}{pid}")
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// The nft script that (re)creates `table` for `spec` atomically, its comment recording `owner`.
pub fn ruleset(table: &str, spec: &PortMapSpec, owner: &Owner) -> Result<String, PortMapError> {
    crate::tap::Tap::check_name(&spec.interface)?;
    let mut output = String::new();
    let mut prerouting = String::new();
    for f in &spec.forwards {
        let IpAddr::V4(addr) = f.host.ip() else {
            return Err(PortMapError::Ipv6(*f));
        };
        let to = format!(
            "{} dport {} dnat to {}:{}",
            proto(f.proto),
            f.host.port(),
            spec.guest,
            f.guest_port
        );
        // 0.0.0.0 means every local address, as a listening socket bound to it would.
        let dst = if addr.is_unspecified() {
            "fib daddr type local".to_string()
        } else {
            format!("ip daddr {addr}")
        };
        output.push_str(&format!("\t\t{dst} {to}\n"));
        if !addr.is_loopback() {
            prerouting.push_str(&format!("\t\t{dst} {to}\n"));
        }
    }
    let iface = &spec.interface;
    let comment = owner.comment();
    let mut s = format!(
        "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n\
         \tcomment \"{comment}\"\n\
         \tchain loopback_guard {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{iface}\" ip daddr 127.0.0.0/8 drop\n\
         \t\tiifname \"{iface}\" ip saddr 127.0.0.0/8 drop\n\t}}\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n{output}\t}}\n"
    );
    if !prerouting.is_empty() {
        s.push_str(&format!(
            "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{prerouting}\t}}\n"
        ));
    }
    s.push_str(&format!(
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{iface}\" ip saddr 127.0.0.0/8 masquerade\n\t}}\n}}\n"
    ));
    Ok(s)
}

fn nft(script: &str) -> Result<(), PortMapError> {
    let mut child = Command::new(nft_command())
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PortMapError::NoNft,
            _ => PortMapError::Nft(e.to_string()),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| PortMapError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| PortMapError::Nft(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Operation not permitted") {
        return Err(PortMapError::Permission);
    }
    let line = err
        .lines()
        .find(|l| l.contains("Error"))
        .or_else(|| err.lines().next())
        .unwrap_or("unknown error");
    Err(PortMapError::Nft(line.trim().to_string()))
}

/// Checks that the nft command can be run (before anything is set up).
pub fn check_nft() -> Result<(), PortMapError> {
    match Command::new(nft_command())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(PortMapError::Nft("nft --version failed".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(PortMapError::NoNft),
        Err(e) => Err(PortMapError::Nft(e.to_string())),
    }
}

/// The pids in the names of tandem's tables in an `nft list tables ip` listing.
fn tandem_tables(listing: &str) -> Vec<u32> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter_map(|t| t.trim().strip_prefix(TABLE_PREFIX))
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// The comment of the table in an `nft list table` listing.
fn table_comment(listing: &str) -> &str {
    listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("comment \""))
        .and_then(|c| c.strip_suffix('"'))
        .unwrap_or("")
}

/// Whether the table's owner still runs: a process named tandem with the PID and, where the
/// table recorded it, the start time (a PID reused by a later tandem is not the owner).
fn owner_runs(owner: &Owner, comm: Option<String>, start: Option<u64>) -> bool {
    comm.is_some_and(|c| c.trim() == "tandem") && owner.start.is_none_or(|t| start == Some(t))
}

fn localnet_path(iface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/route_localnet")
}

/// Removes tables left behind by tandem processes that no longer run, and puts back the
/// `route_localnet` they changed.
fn remove_stale() {
    let Ok(out) = Command::new(nft_command())
        .args(["list", "tables", "ip"])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in tandem_tables(&String::from_utf8_lossy(&out.stdout)) {
        let table = table_name(pid);
        let Ok(listing) = Command::new(nft_command())
            .args(["list", "table", "ip", &table])
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        let owner = Owner::parse(table_comment(&String::from_utf8_lossy(&listing.stdout)));
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
        if owner_runs(&owner, comm, start_time(pid)) {
            continue;
        }
        match nft(&format!("delete table ip {table}\n")) {
            Ok(()) => tracing::info!("removed {table}, left by a tandem that no longer runs"),
            Err(e) => {
                tracing::warn!("cannot remove the stale table {table}: {e}");
                continue;
            }
        }
        if let Some((iface, old)) = owner.localnet {
            // Gone with its interface when that was the dead tandem's own TAP.
            let path = localnet_path(&iface);
            if std::path::Path::new(&path).exists() {
                match std::fs::write(&path, old.to_string()) {
                    Ok(()) => tracing::info!("restored {path} to {old}"),
                    Err(e) => tracing::warn!("cannot restore {path} to {old}: {e}"),
                }
            }
        }
    }
}

/// The installed rules; dropping it removes them.
#[derive(Debug)]
pub struct PortMap {
    table: String,
    interface: String,
    localnet: Option<String>,
}

impl PortMap {
    /// Installs the rules for `spec` (after removing any left by dead tandems).
    pub fn install(spec: &PortMapSpec) -> Result<PortMap, PortMapError> {
        let table = table_name(std::process::id());
        // First, so that the value read below is not one a dead tandem left.
        remove_stale();
        // Packets from 127.0.0.1 may only leave through a non-loopback interface that allows
        // it; only this interface is changed, back on exit, or by the next tandem after a
        // SIGKILL (the table records the old value).
        let loopback = spec
            .forwards
            .iter()
            .any(|f| f.host.ip().is_loopback() || f.host.ip().is_unspecified());
        let path = localnet_path(&spec.interface);
        let old = if loopback {
            match std::fs::read_to_string(&path).map(|v| v.trim().parse::<u8>()) {
                Ok(Ok(v)) => Some(v),
                Ok(Err(_)) => None,
                Err(e) => {
                    tracing::warn!("cannot read {path}: {e}");
                    None
                }
            }
        } else {
            None
        };
        let owner = Owner {
            start: start_time(std::process::id()),
            localnet: old.map(|v| (spec.interface.clone(), v)),
        };
        nft(&ruleset(&table, spec, &owner)?)?;
        let mut map = PortMap {
            table,
            interface: spec.interface.clone(),
            localnet: None,
        };
        if let Some(old) = old {
            match std::fs::write(&path, "1") {
                Ok(()) => map.localnet = Some(old.to_string()),
                Err(e) => {
                    tracing::warn!("cannot set {path}: {e}; forwards from 127.0.0.1 will not work")
                }
            }
        }
        let global = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        let remote = spec.forwards.iter().any(|f| !f.host.ip().is_loopback());
        if remote && global.trim() == "0" {
            tracing::warn!(
                "net.ipv4.ip_forward is 0: forwards reach the guest from this host only, not from others"
            );
        }
        for f in &spec.forwards {
            tracing::info!(
                "forwarding {f} to {}:{} (nftables table ip {})",
                spec.guest,
                f.guest_port,
                map.table
            );
        }
        Ok(map)
    }

    /// The nftables table holding the rules.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for PortMap {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table ip {}\n", self.table)) {
            tracing::warn!(
                "cannot remove the forwarding rules (table ip {}): {e}",
                self.table
            );
        }
        if let Some(old) = &self.localnet {
            // The interface may be gone already (tandem created it): nothing to restore then.
            let _ = std::fs::write(localnet_path(&self.interface), old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(forwards: &[&str]) -> PortMapSpec {
        PortMapSpec {
            interface: "tap0".into(),
            guest: Ipv4Addr::new(192, 168, 100, 2),
            forwards: forwards.iter().map(|f| f.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn the_default_host_address_is_mapped_for_local_connections_only() {
        let s = ruleset("tandem_fwd_7", &spec(&["tcp:2222:22"]), &Owner::default()).unwrap();
        assert!(s.contains(
            "chain output {\n\t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr 127.0.0.1 tcp dport 2222 dnat to 192.168.100.2:22\n"
        ));
        assert!(
            !s.contains("chain prerouting"),
            "127.0.0.1 must not be reachable from outside:\n{s}"
        );
        assert!(s.contains("oifname \"tap0\" ip saddr 127.0.0.0/8 masquerade"));
    }

    #[test]
    fn an_explicit_address_is_mapped_for_other_hosts_too() {
        let s = ruleset(
            "tandem_fwd_7",
            &spec(&["udp:192.0.2.1:5353:53", "0.0.0.0:8080:80"]),
            &Owner::default(),
        )
        .unwrap();
        let pre = s.split("chain prerouting").nth(1).unwrap();
        assert!(pre.contains("ip daddr 192.0.2.1 udp dport 5353 dnat to 192.168.100.2:53"));
        assert!(pre.contains("fib daddr type local tcp dport 8080 dnat to 192.168.100.2:80"));
    }

    #[test]
    fn the_script_replaces_the_table_atomically() {
        let s = ruleset("tandem_fwd_7", &spec(&["1:2"]), &Owner::default()).unwrap();
        // Declaring then deleting makes the script work whether or not the table exists.
        assert!(s.starts_with(
            "table ip tandem_fwd_7\ndelete table ip tandem_fwd_7\ntable ip tandem_fwd_7 {"
        ));
    }

    #[test]
    fn nft_accepts_the_rules() {
        // Where nft is installed (`cargo xtask test` installs it) and may talk to the kernel.
        if check_nft().is_err() || euid() != 0 {
            eprintln!("skipped: needs nft and root");
            return;
        }
        let s = ruleset(
            "tandem_fwd_check",
            &spec(&["2222:22", "udp:192.0.2.1:5353:53", "0.0.0.0:8080:80"]),
            &Owner {
                start: Some(12345),
                localnet: Some(("tap0".into(), 0)),
            },
        )
        .unwrap();
        let out = Command::new(nft_command())
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{s}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn ipv6_host_addresses_are_refused() {
        assert!(matches!(
            ruleset("t", &spec(&["[::1]:2222:22"]), &Owner::default()),
            Err(PortMapError::Ipv6(_))
        ));
    }

    #[test]
    fn tandem_tables_are_found_by_name() {
        let listing = "table ip filter\ntable ip tandem_fwd_10\ntable ip tandem_fwd_11\ntable ip tandem_fwd_x\n";
        assert_eq!(tandem_tables(listing), vec![10, 11]);
    }

    #[test]
    fn the_guest_cannot_reach_the_hosts_loopback_through_the_tap() {
        let s = ruleset("tandem_fwd_7", &spec(&["2222:22"]), &Owner::default()).unwrap();
        let guard = s.split("chain loopback_guard").nth(1).unwrap();
        let guard = &guard[..guard.find('}').unwrap()];
        assert!(guard.contains("type filter hook prerouting priority raw;"));
        assert!(guard.contains("iifname \"tap0\" ip daddr 127.0.0.0/8 drop"));
        assert!(guard.contains("iifname \"tap0\" ip saddr 127.0.0.0/8 drop"));
    }

    #[test]
    fn interface_names_that_nft_would_parse_are_refused() {
        for name in ["t\"; flush ruleset; \"", "t{", "a b", "t;x"] {
            let mut sp = spec(&["2222:22"]);
            sp.interface = name.into();
            assert!(
                matches!(
                    ruleset("t", &sp, &Owner::default()),
                    Err(PortMapError::Interface(_))
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn the_comment_records_the_owner_and_reads_back() {
        let o = Owner {
            start: Some(987654),
            localnet: Some(("tap-1.x".into(), 0)),
        };
        let s = ruleset("t", &spec(&["2222:22"]), &o).unwrap();
        assert!(s.contains("\tcomment \"tandem start=987654 localnet=tap-1.x:0\"\n"));
        let listing = "table ip t { # handle 3\n\tcomment \"tandem start=987654 localnet=tap-1.x:0\"\n\tchain output {\n";
        assert_eq!(Owner::parse(table_comment(listing)), o);
        assert_eq!(Owner::parse(""), Owner::default());
        let bad = Owner::parse("start=x localnet=a/b:1 localnet=t0:z");
        assert_eq!(
            bad,
            Owner::default(),
            "nothing unchecked reaches /proc paths"
        );
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_tables_owner() {
        let o = Owner {
            start: Some(100),
            localnet: None,
        };
        let tandem = || Some("tandem\n".to_string());
        assert!(owner_runs(&o, tandem(), Some(100)));
        assert!(
            !owner_runs(&o, tandem(), Some(200)),
            "a later tandem, same PID"
        );
        assert!(!owner_runs(&o, Some("bash\n".into()), Some(100)));
        assert!(!owner_runs(&o, None, None), "no such process");
        // Tables from before start times were recorded: judged by name.
        assert!(owner_runs(&Owner::default(), tandem(), Some(5)));
    }

    #[test]
    fn start_times_are_read_past_odd_command_names() {
        let me = start_time(std::process::id()).expect("own start time");
        assert!(me > 0);
        assert_eq!(start_time(std::process::id()), Some(me));
        assert_eq!(start_time(u32::MAX), None);
    }

    /// SIGKILL cannot be caught: the next tandem removes the dead one's table and writes back
    /// the `route_localnet` it recorded. Run in a network namespace of its own (needs root and
    /// nft).
    #[test]
    fn the_cleanup_restores_route_localnet_after_a_kill() {
        if check_nft().is_err() || euid() != 0 {
            eprintln!("skipped: needs nft and root");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare(2) with a flag and no pointers; it moves this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no network namespace");
                return;
            }
            // The new namespace's own loopback interface stands in for a TAP.
            let path = localnet_path("lo");
            assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "0");
            // A dead process's PID, and a table as a tandem would have left it.
            let mut child = Command::new("true").spawn().unwrap();
            let dead = child.id();
            child.wait().unwrap();
            let mut sp = spec(&["2222:22"]);
            sp.interface = "lo".into();
            let owner = Owner {
                start: Some(1),
                localnet: Some(("lo".into(), 0)),
            };
            nft(&ruleset(&table_name(dead), &sp, &owner).unwrap()).unwrap();
            std::fs::write(&path, "1").unwrap();
            // The next tandem.
            let map = PortMap::install(&sp).unwrap();
            let tables = Command::new(nft_command())
                .args(["list", "tables", "ip"])
                .output()
                .unwrap();
            let tables = String::from_utf8_lossy(&tables.stdout).to_string();
            assert!(!tables.contains(&table_name(dead)), "{tables}");
            assert!(tables.contains(map.table()), "{tables}");
            assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "1");
            drop(map);
            assert_eq!(
                std::fs::read_to_string(&path).unwrap().trim(),
                "0",
                "the old value is back"
            );
        })
        .join()
        .unwrap();
    }
}
