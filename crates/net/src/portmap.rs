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
//!   masqueraded to the interface's address, which the guest can answer.

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

/// The nft script that (re)creates `table` for `spec` atomically.
pub fn ruleset(table: &str, spec: &PortMapSpec) -> Result<String, PortMapError> {
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
    let mut s = format!(
        "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n\
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

/// The pids of tandem tables whose owner is no longer a running tandem.
fn stale_tables(listing: &str, alive: impl Fn(u32) -> bool) -> Vec<u32> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter_map(|t| t.trim().strip_prefix(TABLE_PREFIX))
        .filter_map(|pid| pid.parse().ok())
        .filter(|&pid| !alive(pid))
        .collect()
}

fn tandem_is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "tandem")
        .unwrap_or(false)
}

/// Removes tables left behind by tandem processes that no longer run.
fn remove_stale() {
    let Ok(out) = Command::new(nft_command())
        .args(["list", "tables", "ip"])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in stale_tables(&String::from_utf8_lossy(&out.stdout), tandem_is_running) {
        let table = table_name(pid);
        match nft(&format!("delete table ip {table}\n")) {
            Ok(()) => tracing::info!("removed {table}, left by a tandem that no longer runs"),
            Err(e) => tracing::warn!("cannot remove the stale table {table}: {e}"),
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
        let script = ruleset(&table, spec)?;
        remove_stale();
        nft(&script)?;
        let mut map = PortMap {
            table,
            interface: spec.interface.clone(),
            localnet: None,
        };
        // Packets from 127.0.0.1 may only leave through a non-loopback interface that allows
        // it; only this interface is changed, and back on exit.
        let loopback = spec
            .forwards
            .iter()
            .any(|f| f.host.ip().is_loopback() || f.host.ip().is_unspecified());
        if loopback {
            let path = map.localnet_path();
            match std::fs::read_to_string(&path) {
                Ok(old) => match std::fs::write(&path, "1") {
                    Ok(()) => map.localnet = Some(old.trim().to_string()),
                    Err(e) => tracing::warn!(
                        "cannot set {path}: {e}; forwards from 127.0.0.1 will not work"
                    ),
                },
                Err(e) => tracing::warn!("cannot read {path}: {e}"),
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

    fn localnet_path(&self) -> String {
        format!("/proc/sys/net/ipv4/conf/{}/route_localnet", self.interface)
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
            let _ = std::fs::write(self.localnet_path(), old);
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
        let s = ruleset("tandem_fwd_7", &spec(&["tcp:2222:22"])).unwrap();
        assert!(s.contains(
            "chain output {\n\t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr 127.0.0.1 tcp dport 2222 dnat to 192.168.100.2:22\n"
        ));
        assert!(
            !s.contains("prerouting"),
            "127.0.0.1 must not be reachable from outside:\n{s}"
        );
        assert!(s.contains("oifname \"tap0\" ip saddr 127.0.0.0/8 masquerade"));
    }

    #[test]
    fn an_explicit_address_is_mapped_for_other_hosts_too() {
        let s = ruleset(
            "tandem_fwd_7",
            &spec(&["udp:192.0.2.1:5353:53", "0.0.0.0:8080:80"]),
        )
        .unwrap();
        let pre = s.split("chain prerouting").nth(1).unwrap();
        assert!(pre.contains("ip daddr 192.0.2.1 udp dport 5353 dnat to 192.168.100.2:53"));
        assert!(pre.contains("fib daddr type local tcp dport 8080 dnat to 192.168.100.2:80"));
    }

    #[test]
    fn the_script_replaces_the_table_atomically() {
        let s = ruleset("tandem_fwd_7", &spec(&["1:2"])).unwrap();
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
            ruleset("t", &spec(&["[::1]:2222:22"])),
            Err(PortMapError::Ipv6(_))
        ));
    }

    #[test]
    fn only_tables_of_dead_tandems_are_stale() {
        let listing = "table ip filter\ntable ip tandem_fwd_10\ntable ip tandem_fwd_11\ntable ip tandem_fwd_x\n";
        assert_eq!(stale_tables(listing, |pid| pid == 11), vec![10]);
    }
}
