//! The partition config: `[[vm]]` tables, one per VM, and `[[channel]]` tables joining them.
//!
//! ```toml
//! [[vm]]
//! name = "control"
//! role = "realtime"
//! kernel = "/guests/vmlinuz-rt"
//! memory = "256M"
//! cpus = [1]
//!
//! [[vm]]
//! name = "ui"
//! kernel = "/guests/vmlinuz"
//! memory = "1G"
//! cpus = [0]
//!
//! [[channel]]
//! name = "ctl"
//! size = "1M"
//! members = ["control", "ui"]
//! ```
//!
//! Parsing refuses unknown keys; [`Config::validate`] checks the config against the host. Every
//! error names the file and the line it is about.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::host::Host;
use crate::size::parse_size;

/// Smallest VM memory (as `tandem run` requires).
pub const MIN_MEMORY: u64 = 32 << 20;

/// A config error: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line (0 when the error is about the whole file).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.message),
            n => write!(f, "{}:{n}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A size in bytes: `"512M"`, `"2G"`, or a bare number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"512M\" or \"2G\" (a bare number is MiB)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .ok()
                    .and_then(|n| n.checked_mul(1 << 20))
                    .map(Size)
                    .ok_or_else(|| E::custom(format!("{n} MiB is not a size")))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a VM is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Real time: its CPUs are its own, its vCPUs run at real-time priority.
    Realtime,
    /// Everything else.
    #[default]
    General,
}

/// When the supervisor restarts a VM that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Never.
    #[default]
    Never,
    /// When it ended with a failure (panic, crash, non-zero status), not on power-off.
    OnFailure,
    /// Whenever it ends.
    Always,
}

/// One `[[vm]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name.
    pub name: Spanned<String>,
    /// `realtime` or `general` (default).
    #[serde(default)]
    pub role: Role,
    /// Kernel image.
    pub kernel: Spanned<PathBuf>,
    /// Initramfs.
    #[serde(default)]
    pub initrd: Option<Spanned<PathBuf>>,
    /// Kernel command line (tandem's default when absent).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Guest memory.
    pub memory: Spanned<Size>,
    /// Host CPUs, one vCPU on each.
    pub cpus: Spanned<Vec<u32>>,
    /// Disks, as `--disk` specs.
    #[serde(default)]
    pub disks: Vec<Spanned<String>>,
    /// The network, as `--net`.
    #[serde(default)]
    pub net: Option<Spanned<String>>,
    /// Port forwards, as `--forward`.
    #[serde(default)]
    pub forwards: Vec<Spanned<String>>,
    /// Restart policy.
    #[serde(default)]
    pub restart: Restart,
    /// Prefault and lock guest memory.
    #[serde(default)]
    pub lock_memory: bool,
    /// Back guest memory with huge pages.
    #[serde(default)]
    pub hugepages: bool,
    /// Jail the VM's process when the supervisor runs as root (default: true).
    #[serde(default)]
    pub jail: Option<Spanned<bool>>,
    /// The uid of the jailed VM's process (default: 65534, nobody).
    #[serde(default)]
    pub uid: Option<Spanned<u32>>,
    /// The gid of the jailed VM's process (default: 65534, nogroup).
    #[serde(default)]
    pub gid: Option<Spanned<u32>>,
    /// Its seccomp filters, as `--seccomp`: enforce (default), log or off.
    #[serde(default)]
    pub seccomp: Option<Spanned<String>>,
    /// Exits a realtime VM leaves to the guest, as `--disable-exits` (default `hlt,pause`).
    #[serde(default)]
    pub disable_exits: Option<Spanned<String>>,
    /// Exits left to the guest where the host offers them, as `--disable-exits-optional`
    /// (default `mwait,cstate`).
    #[serde(default)]
    pub disable_exits_optional: Option<Spanned<String>>,
    /// Halt polling in nanoseconds, as `--halt-poll-ns`.
    #[serde(default)]
    pub halt_poll_ns: Option<Spanned<u32>>,
}

impl VmSpec {
    /// Whether the VM is jailed when the supervisor can jail it.
    pub fn jailed(&self) -> bool {
        self.jail.as_ref().is_none_or(|j| *j.get_ref())
    }
}

/// One `[[channel]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Unique name.
    pub name: Spanned<String>,
    /// Shared memory size (a power of two, at least 4 KiB).
    pub size: Spanned<Size>,
    /// The VMs that share it.
    pub members: Spanned<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    vm: Vec<VmSpec>,
    #[serde(default)]
    channel: Vec<ChannelSpec>,
}

/// A parsed config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub path: PathBuf,
    text: String,
    /// The VMs, in file order.
    pub vms: Vec<VmSpec>,
    /// The channels.
    pub channels: Vec<ChannelSpec>,
}

/// Whether `s` is a valid VM or channel name: 1-32 letters, digits, `-` or `_`.
pub fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.into(),
            line: 0,
            message: format!("cannot read the config: {e}"),
        })?;
        Config::parse(path, text)
    }

    /// Parses `text`, read from `path`.
    pub fn parse(path: &Path, text: String) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(&text, s.start));
            ConfigError {
                file: path.into(),
                line,
                message: e.message().trim().replace('\n', "; "),
            }
        })?;
        Ok(Config {
            path: path.into(),
            text,
            vms: file.vm,
            channels: file.channel,
        })
    }

    /// The 1-based line of byte `span`'s start.
    pub fn line(&self, span: Range<usize>) -> usize {
        line_of(&self.text, span.start)
    }

    /// An error about what starts at `span`.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: self.line(span),
            message: message.into(),
        }
    }

    /// Checks the partitions against each other and against `host`: unique names, CPUs that
    /// exist, realtime VMs alone on their CPUs, memory the host has, channels between VMs that
    /// exist.
    pub fn validate(&self, host: &Host) -> Result<(), ConfigError> {
        if self.vms.is_empty() {
            return Err(ConfigError {
                file: self.path.clone(),
                line: 0,
                message: "no [[vm]] declared".into(),
            });
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for vm in &self.vms {
            let name = vm.name.get_ref();
            if !valid_name(name) {
                return Err(self.error(
                    vm.name.span(),
                    format!("'{name}' is not a VM name (1-32 letters, digits, - or _)"),
                ));
            }
            if let Some(first) = names.insert(name, self.line(vm.name.span())) {
                return Err(self.error(
                    vm.name.span(),
                    format!("a VM named '{name}' is already declared on line {first}"),
                ));
            }
        }
        for vm in &self.vms {
            let name = vm.name.get_ref();
            if let Some(s) = &vm.seccomp {
                if let Err(e) = s.get_ref().parse::<tandem_sandbox::SeccompMode>() {
                    return Err(self.error(s.span(), format!("VM '{name}': seccomp {e}")));
                }
            }
            if vm.role != Role::Realtime {
                let given = [&vm.disable_exits, &vm.disable_exits_optional]
                    .into_iter()
                    .flatten()
                    .find(|l| l.get_ref() != "none");
                if let Some(l) = given {
                    return Err(self.error(
                        l.span(),
                        format!(
                            "VM '{name}': only a realtime VM can leave exits to the guest (its vCPUs need CPUs of their own)"
                        ),
                    ));
                }
            }
            if !vm.jailed() {
                if let Some(span) = vm
                    .uid
                    .as_ref()
                    .map(|u| u.span())
                    .or(vm.gid.as_ref().map(|g| g.span()))
                {
                    return Err(self.error(
                        span,
                        format!("VM '{name}': uid and gid apply to a jailed VM, but jail = false"),
                    ));
                }
            }
        }
        let online = cpu_list(&host.cpus);
        let mut owners: BTreeMap<u32, &VmSpec> = BTreeMap::new();
        let mut total = 0u64;
        for vm in &self.vms {
            let (name, cpus) = (vm.name.get_ref(), vm.cpus.get_ref());
            if cpus.is_empty() {
                return Err(self.error(vm.cpus.span(), format!("VM '{name}' has no CPUs")));
            }
            let mut seen = BTreeSet::new();
            for &cpu in cpus {
                if !seen.insert(cpu) {
                    return Err(
                        self.error(vm.cpus.span(), format!("VM '{name}' lists CPU {cpu} twice"))
                    );
                }
                if !host.cpus.contains(&cpu) {
                    return Err(self.error(
                        vm.cpus.span(),
                        format!("CPU {cpu} does not exist on this host (online: {online})"),
                    ));
                }
                if let Some(other) = owners.get(&cpu) {
                    let o = other.name.get_ref();
                    let oline = self.line(other.cpus.span());
                    let msg = match (other.role, vm.role) {
                        (Role::Realtime, Role::Realtime) => Some(format!(
                            "realtime VMs '{o}' (line {oline}) and '{name}' both claim CPU {cpu}"
                        )),
                        (Role::Realtime, Role::General) => Some(format!(
                            "CPU {cpu} belongs to realtime VM '{o}' (line {oline}); '{name}' cannot share it"
                        )),
                        (Role::General, Role::Realtime) => Some(format!(
                            "realtime VM '{name}' needs CPU {cpu} to itself, but '{o}' (line {oline}) uses it"
                        )),
                        (Role::General, Role::General) => None,
                    };
                    if let Some(msg) = msg {
                        return Err(self.error(vm.cpus.span(), msg));
                    }
                }
                if vm.role == Role::Realtime || !owners.contains_key(&cpu) {
                    owners.insert(cpu, vm);
                }
            }
            let mem = vm.memory.get_ref().0;
            if mem < MIN_MEMORY {
                return Err(self.error(
                    vm.memory.span(),
                    format!(
                        "VM '{name}': {} MiB of memory is less than the 32 MiB minimum",
                        mem >> 20
                    ),
                ));
            }
            total = total.saturating_add(mem);
            if total > host.memory {
                return Err(self.error(
                    vm.memory.span(),
                    format!(
                        "the VMs up to '{name}' need {} MiB of memory; this host has {} MiB",
                        total >> 20,
                        host.memory >> 20
                    ),
                ));
            }
        }
        let mut channels: BTreeMap<&str, usize> = BTreeMap::new();
        for ch in &self.channels {
            let name = ch.name.get_ref();
            if !valid_name(name) {
                return Err(self.error(
                    ch.name.span(),
                    format!("'{name}' is not a channel name (1-32 letters, digits, - or _)"),
                ));
            }
            if let Some(first) = channels.insert(name, self.line(ch.name.span())) {
                return Err(self.error(
                    ch.name.span(),
                    format!("a channel named '{name}' is already declared on line {first}"),
                ));
            }
            let size = ch.size.get_ref().0;
            if !size.is_power_of_two() || size < 4096 {
                return Err(self.error(
                    ch.size.span(),
                    format!(
                        "channel '{name}': size {size} is not a power of two of at least 4 KiB"
                    ),
                ));
            }
            let members = ch.members.get_ref();
            if members.len() < 2 {
                return Err(self.error(
                    ch.members.span(),
                    format!("channel '{name}' needs at least two members"),
                ));
            }
            let mut seen = BTreeSet::new();
            for m in members {
                if !names.contains_key(m.as_str()) {
                    return Err(self.error(
                        ch.members.span(),
                        format!("channel '{name}': no VM named '{m}'"),
                    ));
                }
                if !seen.insert(m) {
                    return Err(self.error(
                        ch.members.span(),
                        format!("channel '{name}' lists '{m}' twice"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn cpu_list(cpus: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let v: Vec<u32> = cpus.iter().copied().collect();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
