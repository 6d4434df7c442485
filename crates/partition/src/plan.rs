//! From a validated config to the `tandem run` command line of each VM.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tandem_sandbox::jail::NOBODY;

use crate::config::{Config, Restart, Role};

/// One VM as the supervisor starts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    /// Its name.
    pub name: String,
    /// Arguments after `tandem`.
    pub args: Vec<String>,
    /// Role.
    pub role: Role,
    /// Host CPUs.
    pub cpus: Vec<u32>,
    /// Restart policy.
    pub restart: Restart,
    /// Locked memory.
    pub lock_memory: bool,
    /// Huge pages.
    pub hugepages: bool,
    /// Descriptors its process inherits: its channels' doorbells (and, added by `tandem up`,
    /// its CPU locks). All others are close-on-exec.
    pub inherit: Vec<i32>,
    /// The directory it is jailed in, if it is.
    pub jail: Option<PathBuf>,
}

/// A channel's shared memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    /// Channel name.
    pub name: String,
    /// The file the members share.
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
}

/// Where VM `name` of the `tandem up` in `state_dir` serves its exit accounting
/// (`tandem stats NAME`).
pub fn stats_socket(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("stats-{name}.sock"))
}

fn list(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The plan for every VM and channel of `config`; channel files go in `state_dir`, every VM's
/// non-vCPU threads stay off the CPUs of all realtime VMs (out of `host_cpus`), and channel `c`
/// gets the doorbell eventfds `doorbells[c]` (one per member, in member order) when given.
/// With `jails` (a supervisor running as root), each VM not configured otherwise is jailed in
/// `jails/NAME`.
pub fn plan(
    config: &Config,
    state_dir: &Path,
    host_cpus: &BTreeSet<u32>,
    doorbells: &[Vec<i32>],
    jails: Option<&Path>,
) -> (Vec<VmPlan>, Vec<ChannelPlan>) {
    let rt_cpus: BTreeSet<u32> = config
        .vms
        .iter()
        .filter(|v| v.role == Role::Realtime)
        .flat_map(|v| v.cpus.get_ref().iter().copied())
        .collect();
    let housekeeping: Vec<u32> = host_cpus.difference(&rt_cpus).copied().collect();
    let channels: Vec<ChannelPlan> = config
        .channels
        .iter()
        .map(|c| ChannelPlan {
            name: c.name.get_ref().clone(),
            path: state_dir.join(format!("channel-{}", c.name.get_ref())),
            size: c.size.get_ref().0,
        })
        .collect();
    let vms = config
        .vms
        .iter()
        .map(|vm| {
            let name = vm.name.get_ref();
            let cpus = vm.cpus.get_ref().clone();
            let mut a: Vec<String> = vec!["run".into(), "--kernel".into()];
            a.push(vm.kernel.get_ref().display().to_string());
            if let Some(i) = &vm.initrd {
                a.extend(["--initrd".into(), i.get_ref().display().to_string()]);
            }
            if let Some(c) = &vm.cmdline {
                a.extend(["--cmdline".into(), c.clone()]);
            }
            a.extend([
                "--memory".into(),
                format!("{}K", vm.memory.get_ref().0 >> 10),
                "--pin-cpus".into(),
                list(&cpus),
                "--serial".into(),
                "stdio".into(),
                "--stats-socket".into(),
                stats_socket(state_dir, name).display().to_string(),
            ]);
            if vm.role == Role::Realtime {
                a.push("--realtime".into());
            }
            if !rt_cpus.is_empty() && !housekeeping.is_empty() {
                a.extend(["--housekeeping-cpus".into(), list(&housekeeping)]);
            }
            if vm.lock_memory {
                a.push("--lock-memory".into());
            }
            if vm.hugepages {
                a.push("--hugepages".into());
            }
            for d in &vm.disks {
                a.extend(["--disk".into(), d.get_ref().clone()]);
            }
            if let Some(n) = net_arg(vm.net.as_ref().map(|n| n.get_ref().as_str()), &vm.forwards) {
                a.extend(["--net".into(), n]);
            }
            for f in &vm.forwards {
                a.extend(["--forward".into(), f.get_ref().clone()]);
            }
            if let Some(s) = &vm.seccomp {
                a.extend(["--seccomp".into(), s.get_ref().clone()]);
            }
            if let Some(l) = &vm.disable_exits {
                a.extend(["--disable-exits".into(), l.get_ref().clone()]);
            }
            if let Some(l) = &vm.disable_exits_optional {
                a.extend(["--disable-exits-optional".into(), l.get_ref().clone()]);
            }
            if let Some(ns) = &vm.halt_poll_ns {
                a.extend(["--halt-poll-ns".into(), ns.get_ref().to_string()]);
            }
            let jail = jails.filter(|_| vm.jailed()).map(|j| j.join(name));
            if let Some(dir) = &jail {
                let id = |v: &Option<toml::Spanned<u32>>| {
                    v.as_ref().map_or(NOBODY, |v| *v.get_ref()).to_string()
                };
                a.extend(["--jail".into(), dir.display().to_string()]);
                a.extend(["--uid".into(), id(&vm.uid), "--gid".into(), id(&vm.gid)]);
            }
            let mut inherit = Vec::new();
            for (c, (ch, spec)) in channels.iter().zip(&config.channels).enumerate() {
                if let Some(id) = spec.members.get_ref().iter().position(|m| m == name) {
                    let mut arg =
                        format!("path={},size={}K,id={id}", ch.path.display(), ch.size >> 10);
                    if let Some(fds) = doorbells.get(c).filter(|f| !f.is_empty()) {
                        let list: Vec<String> = fds.iter().map(i32::to_string).collect();
                        inherit.extend(fds);
                        arg.push_str(&format!(",doorbells={}", list.join("/")));
                    }
                    a.extend(["--channel".into(), arg]);
                }
            }
            VmPlan {
                name: name.clone(),
                args: a,
                role: vm.role,
                cpus,
                restart: vm.restart,
                lock_memory: vm.lock_memory,
                hugepages: vm.hugepages,
                inherit,
                jail,
            }
        })
        .collect();
    (vms, channels)
}

/// The `--net` argument of a VM in a config: user-mode networks do not map the host's
/// loopback unless the config says so (`host-loopback=on` or a list of ports), so that no
/// partition reaches another's forwarded ports by a path the config does not show.
fn net_arg(net: Option<&str>, forwards: &[toml::Spanned<String>]) -> Option<String> {
    let net = match net {
        Some(n) => n,
        None if !forwards.is_empty() => "user",
        None => return None,
    };
    let user = net == "user" || net.starts_with("user,");
    if user && !net.split(',').any(|kv| kv.starts_with("host-loopback=")) {
        Some(format!("{net},host-loopback=off"))
    } else {
        Some(net.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_carry_every_setting_and_channel_membership() {
        let text = r#"
[[vm]]
name = "rt"
role = "realtime"
kernel = "/k-rt"
initrd = "/i"
cmdline = "console=ttyS0 quiet"
memory = "256M"
cpus = [3]
lock_memory = true
disable_exits = "hlt"
disable_exits_optional = "none"
halt_poll_ns = 0

[[vm]]
name = "gp"
kernel = "/k"
memory = "1G"
cpus = [0, 1]
disks = ["path=/d.img,readonly=on"]
net = "user"
forwards = ["tcp:2222:22"]
hugepages = true

[[channel]]
name = "c"
size = "1M"
members = ["gp", "rt"]
"#;
        let c = Config::parse(Path::new("p.toml"), text.into()).unwrap();
        let (vms, chans) = plan(
            &c,
            Path::new("/run/t"),
            &(0..4).collect(),
            &[vec![7, 8]],
            None,
        );
        assert_eq!(chans[0].path, PathBuf::from("/run/t/channel-c"));
        // Each VM inherits its channels' doorbells, nothing else.
        assert_eq!(vms[0].inherit, [7, 8]);
        assert_eq!(vms[1].inherit, [7, 8]);
        assert_eq!(
            vms[0].args.join(" "),
            "run --kernel /k-rt --initrd /i --cmdline console=ttyS0 quiet --memory 262144K \
             --pin-cpus 3 --serial stdio --stats-socket /run/t/stats-rt.sock --realtime \
             --housekeeping-cpus 0,1,2 --lock-memory --disable-exits hlt \
             --disable-exits-optional none --halt-poll-ns 0 \
             --channel path=/run/t/channel-c,size=1024K,id=1,doorbells=7/8"
        );
        assert_eq!(
            vms[1].args.join(" "),
            "run --kernel /k --memory 1048576K --pin-cpus 0,1 --serial stdio \
             --stats-socket /run/t/stats-gp.sock --housekeeping-cpus 0,1,2 --hugepages --disk path=/d.img,readonly=on \
             --net user,host-loopback=off --forward tcp:2222:22 --channel path=/run/t/channel-c,size=1024K,id=0,doorbells=7/8"
        );
    }

    #[test]
    fn user_networks_in_configs_reach_the_hosts_loopback_only_where_they_say_so() {
        let fwd = vec![toml::Spanned::new(0..0, "tcp:2222:22".to_string())];
        assert_eq!(net_arg(None, &[]), None);
        assert_eq!(
            net_arg(None, &fwd).as_deref(),
            Some("user,host-loopback=off")
        );
        assert_eq!(
            net_arg(Some("user,restrict=on"), &[]).as_deref(),
            Some("user,restrict=on,host-loopback=off")
        );
        for kept in [
            "user,host-loopback=8000/8001",
            "user,host-loopback=on",
            "tap=tap0",
            "none",
        ] {
            assert_eq!(net_arg(Some(kept), &fwd).as_deref(), Some(kept));
        }
    }

    #[test]
    fn a_root_supervisor_jails_each_vm_as_configured_and_nobody_by_default() {
        let text = r#"
[[vm]]
name = "a"
kernel = "/k"
memory = "256M"
cpus = [0]

[[vm]]
name = "b"
kernel = "/k"
memory = "256M"
cpus = [1]
uid = 1000
gid = 100
seccomp = "log"

[[vm]]
name = "c"
kernel = "/k"
memory = "256M"
cpus = [2]
jail = false
"#;
        let c = Config::parse(Path::new("p.toml"), text.into()).unwrap();
        let jails = Path::new("/run/t/jail");
        let (vms, _) = plan(&c, Path::new("/run/t"), &(0..4).collect(), &[], Some(jails));
        let tail = |v: &VmPlan| v.args[v.args.len() - 6..].join(" ");
        assert_eq!(
            tail(&vms[0]),
            "--jail /run/t/jail/a --uid 65534 --gid 65534"
        );
        assert_eq!(vms[0].jail.as_deref(), Some(jails.join("a").as_path()));
        assert_eq!(
            vms[1].args[vms[1].args.len() - 8..].join(" "),
            "--seccomp log --jail /run/t/jail/b --uid 1000 --gid 100"
        );
        assert!(
            !vms[2].args.contains(&"--jail".to_string()),
            "{:?}",
            vms[2].args
        );
        assert_eq!(vms[2].jail, None);
        // Not root: nobody is jailed.
        let (vms, _) = plan(&c, Path::new("/run/t"), &(0..4).collect(), &[], None);
        assert!(vms
            .iter()
            .all(|v| v.jail.is_none() && !v.args.contains(&"--jail".into())));
    }
}
