//! `tandem run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tandem_net::user::UserNetConfig;
use tandem_net::Forward;
use tandem_vmm::BootProtocol;
use tandem_vmm::{NetConfig, SerialOutput, TapConfig, VmConfig, VmError, VmOutcome};

use tandem_virtio::BlockConfig;

use tandem_sandbox::jail::{Forked, JailConfig, JailError};

use crate::spec;
use crate::terminal::RawTerminal;
use crate::EXIT_USAGE;
use tandem_partition::size::parse_size;

/// The command line used when `--cmdline` is not given.
/// `reboot=k`: the guest resets straight through the i8042 (every other method works too).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Exit status when the guest kernel panicked.
pub const EXIT_GUEST_PANIC: u8 = 3;
/// Exit status when the guest rebooted.
pub const EXIT_GUEST_REBOOT: u8 = 4;
/// Exit status when a vCPU failed (triple fault, KVM internal error).
pub const EXIT_VCPU_FAILED: u8 = 5;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel image: bzImage or ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (default: as many as --pin-cpus lists, else 1).
    #[arg(long, value_name = "N", value_parser = parse_cpus)]
    cpus: Option<u8>,
    /// Pin vCPU i to the i-th host CPU of LIST (e.g. 2,3 or 2-3).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pin_cpus: Option<CpuList>,
    /// Run the vCPU threads under SCHED_FIFO (needs root or CAP_SYS_NICE); with --pin-cpus,
    /// tandem's other threads stay off the vCPUs' CPUs.
    #[arg(long)]
    realtime: bool,
    /// Exits that KVM leaves to the guest, so its vCPUs stay in the guest when they halt or
    /// spin (none, or a list of hlt, pause, mwait, cstate); tandem fails to start when the host
    /// refuses one. Needs --realtime and --pin-cpus; with both, the default is hlt,pause.
    #[arg(long, value_name = "LIST")]
    disable_exits: Option<tandem_vmm::realtime::ExitSet>,
    /// Exits left to the guest where the host offers them, with a warning where it does not
    /// (none, or a list as for --disable-exits). With --realtime and --pin-cpus, the default is
    /// mwait,cstate.
    #[arg(long, value_name = "LIST")]
    disable_exits_optional: Option<tandem_vmm::realtime::ExitSet>,
    /// How long a halted vCPU polls for a wake-up before it sleeps, in nanoseconds (0: it
    /// sleeps at once); default: the kvm module's halt_poll_ns.
    #[arg(long, value_name = "NS")]
    halt_poll_ns: Option<u32>,
    /// Host CPUs for tandem's threads other than vCPUs (I/O, event loop).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    housekeeping_cpus: Option<CpuList>,
    /// Prefault and lock guest memory (needs a large enough locked-memory limit, or root).
    #[arg(long)]
    lock_memory: bool,
    /// Back guest memory with huge pages (they must be reserved: /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    hugepages: bool,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// Kernel entry: auto (PVH for ELF kernels that have it, else Linux 64-bit), linux or pvh.
    #[arg(long, value_name = "PROTOCOL", default_value = "auto", value_parser = parse_boot)]
    boot: BootProtocol,
    /// Serial console: stdio, file:PATH or none.
    #[arg(long, value_name = "DEST", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialOutput,
    /// A virtio-blk disk (repeatable; the guest sees vda, vdb, ... in order):
    /// path=FILE[,readonly=on][,cache=writeback|unsafe][,serial=ID].
    #[arg(long, value_name = "SPEC", value_parser = parse_disk)]
    disk: Vec<BlockConfig>,
    /// The guest's network: user[,restrict=on][,host-loopback=off|PORT/...][,link-local=on]
    /// (NAT through host sockets, no privilege needed), tap=NAME[,guest-ip=ADDR] (a host TAP
    /// interface) or none. Default: user when a --forward is given, else none.
    #[arg(long, value_name = "BACKEND", value_parser = parse_net)]
    net: Option<NetChoice>,
    /// Map a host port to a guest port (repeatable): [tcp|udp:][HOSTADDR:]HOSTPORT:GUESTPORT.
    /// The host side listens on 127.0.0.1 unless HOSTADDR says otherwise. With --net tap the
    /// mapping is an nftables DNAT rule to guest-ip, installed while tandem runs (needs root).
    #[arg(long, value_name = "SPEC", value_parser = parse_forward)]
    forward: Vec<Forward>,
    /// A virtio console (the guest's /dev/hvc0) besides the serial one: none, stdio or
    /// file:PATH. On stdio it also gets stdin (then --serial must not be stdio).
    #[arg(long, value_name = "DEST", default_value = "none", value_parser = parse_serial)]
    console: SerialOutput,
    /// An inter-VM channel (repeatable): shared memory that the guest sees as an ivshmem PCI
    /// device: path=FILE,size=SIZE[,id=N]. FILE (e.g. under /dev/shm) is created when missing;
    /// VMs given the same FILE share its memory. id is this VM's peer ID on it.
    #[arg(long, value_name = "SPEC", value_parser = parse_channel)]
    channel: Vec<tandem_vmm::ChannelConfig>,
    /// How virtio devices reach the guest: pci (virtio-pci with MSI-X: interrupts cost the
    /// guest no exit) or mmio (virtio-mmio, announced in ACPI or the device tree; no PCI bus).
    /// Default: pci on x86_64; mmio on aarch64 (where virtio-pci needs the GICv3's ITS).
    #[arg(long, value_name = "pci|mmio", default_value = DEFAULT_TRANSPORT, value_parser = parse_transport)]
    virtio_transport: tandem_vmm::VirtioTransport,
    /// Check the arguments and the host (images, disks, ports, KVM, placement), then exit 0
    /// without booting.
    #[arg(long)]
    dry_run: bool,
    /// The virtio entropy device: on or off (default: off; an x86_64 guest seeds its random
    /// numbers from the CPU's RDRAND/RDSEED, and each device costs a modular guest a driver load
    /// at boot).
    #[arg(long, value_name = "on|off", default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    rng: bool,
    /// Per-thread seccomp filters: enforce (a syscall outside a thread's allow-list ends
    /// tandem with SIGSYS and a one-line report), log (allowed, and logged by the kernel as
    /// audit type=1326: see dmesg) or off.
    #[arg(long, value_name = "enforce|log|off", default_value = "enforce")]
    seccomp: tandem_sandbox::SeccompMode,
    /// Jail the VM's process once its privileged setup is done: DIR (owned by root, writable
    /// by nobody else) becomes its read-only root, in new mount, PID, IPC and UTS namespaces
    /// (and an empty network namespace unless user networking may go out); every capability
    /// is dropped. Needs root.
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// With --jail: the uid the VM's process runs as (default: 0, without capabilities).
    #[arg(long, value_name = "UID")]
    uid: Option<u32>,
    /// With --jail: the gid the VM's process runs as (default: 0).
    #[arg(long, value_name = "GID")]
    gid: Option<u32>,
    /// A descriptor this process inherited that --jail must keep open (a CPU lock handed over
    /// by `tandem up`); repeatable.
    #[arg(long, value_name = "FD", hide = true)]
    keep_fd: Vec<i32>,
    /// Serve exit accounting (KVM's counts per vCPU, user-space exits per device) on a Unix
    /// socket at PATH, for `tandem stats --socket PATH`.
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
    /// Test hook: threads of this kind (vmm, vcpu or io) make a forbidden syscall right after
    /// installing their filter.
    #[arg(long, value_name = "KIND", hide = true)]
    seccomp_test_violation: Option<tandem_sandbox::ThreadKind>,
}

fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    spec::parse_disk(s).map_err(|e| e.to_string())
}

/// The `--net` choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetChoice {
    /// User-mode NAT, and what the guest may reach through it.
    User(tandem_net::user::Policy),
    /// A host TAP interface, and the guest's address on it.
    Tap(String, Option<std::net::Ipv4Addr>),
    /// No network.
    None,
}

pub(crate) fn parse_net(s: &str) -> Result<NetChoice, String> {
    match s {
        "none" => Ok(NetChoice::None),
        _ if s == "user" || s.starts_with("user,") => spec::parse_user(s)
            .map(NetChoice::User)
            .map_err(|e| e.to_string()),
        _ if s.starts_with("tap=") => spec::parse_tap(s)
            .map(|(name, ip)| NetChoice::Tap(name, ip))
            .map_err(|e| e.to_string()),
        _ => Err(format!(
            "'{s}' is not user[,OPTIONS], tap=NAME[,guest-ip=ADDR] or none"
        )),
    }
}

pub(crate) fn parse_forward(s: &str) -> Result<Forward, String> {
    s.parse()
        .map_err(|e: tandem_net::ForwardError| e.to_string())
}

fn parse_channel(s: &str) -> Result<tandem_vmm::ChannelConfig, String> {
    spec::parse_channel(s).map_err(|e| e.to_string())
}

/// The virtio transport when `--virtio-transport` is not given.
#[cfg(target_arch = "x86_64")]
const DEFAULT_TRANSPORT: &str = "pci";
/// The virtio transport when `--virtio-transport` is not given: aarch64 has no PCI bus yet.
#[cfg(not(target_arch = "x86_64"))]
const DEFAULT_TRANSPORT: &str = "mmio";

fn parse_transport(s: &str) -> Result<tandem_vmm::VirtioTransport, String> {
    match s {
        "mmio" => Ok(tandem_vmm::VirtioTransport::Mmio),
        "pci" => Ok(tandem_vmm::VirtioTransport::Pci),
        _ => Err(format!("'{s}' is not mmio or pci")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}' is not on or off")),
    }
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) if n <= 254 => Ok(n as u8),
        Ok(n) => Err(format!("{n} is more than tandem's limit of 254")),
        Err(_) => Err(format!("'{s}' is not a number")),
    }
}

/// A host CPU list such as `2,3` or `2-5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<u32>);

fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let range = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>(), b.parse::<u32>()),
            None => (part.parse::<u32>(), part.parse::<u32>()),
        };
        match range {
            (Ok(a), Ok(b)) if a <= b && b - a < 4096 => out.extend(a..=b),
            _ => return Err(format!("'{s}' is not a CPU list (e.g. 2,3 or 2-5)")),
        }
    }
    Ok(CpuList(out))
}

fn parse_boot(s: &str) -> Result<BootProtocol, String> {
    match s {
        "auto" => Ok(BootProtocol::Auto),
        "linux" => Ok(BootProtocol::Linux),
        "pvh" => Ok(BootProtocol::Pvh),
        _ => Err(format!("'{s}' is not auto, linux or pvh")),
    }
}

fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdio" => Ok(SerialOutput::Stdout),
        "none" => Ok(SerialOutput::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(p.into())),
            _ => Err(format!("'{s}' is not stdio, none or file:PATH")),
        },
    }
}

/// Total host memory in bytes, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    crate::terminal::restore();
    eprintln!("tandem: {msg}");
    ExitCode::from(code)
}

pub fn main(args: RunArgs) -> ExitCode {
    if let Some(host) = host_memory() {
        if args.memory > host {
            return fail(
                format!(
                    "--memory {} MiB is more than this host has ({} MiB)",
                    args.memory >> 20,
                    host >> 20
                ),
                EXIT_USAGE,
            );
        }
    }
    if args.serial == SerialOutput::Stdout && args.console == SerialOutput::Stdout {
        return fail(
            "--serial and --console cannot both be stdio: give one of them file:PATH or none",
            EXIT_USAGE,
        );
    }
    // Whichever console is on stdio gets stdin (and the terminal's raw mode).
    let interactive = args.serial == SerialOutput::Stdout || args.console == SerialOutput::Stdout;
    let jail = match (args.jail, args.uid.is_some() || args.gid.is_some()) {
        (None, true) => return fail(JailError::IdsWithoutJail, EXIT_USAGE),
        (None, false) => None,
        (Some(dir), _) => Some(JailConfig {
            dir,
            uid: args.uid.unwrap_or(0),
            gid: args.gid.unwrap_or(0),
        }),
    };
    if let Some(j) = &jail {
        if let Err(e) = tandem_sandbox::jail::check_config(j) {
            return fail(e, EXIT_USAGE);
        }
    }
    // Descriptors the jail keeps: the channels' doorbells, and what the caller names.
    let keep_fds: Vec<i32> = args
        .channel
        .iter()
        .flat_map(|c| c.doorbells.iter().copied())
        .chain(args.keep_fd.iter().copied())
        .collect();
    let cfg = VmConfig {
        jail,
        stats_socket: args.stats_socket,
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.cpus.unwrap_or_else(|| {
            args.pin_cpus
                .as_ref()
                .map_or(1, |p| p.0.len().clamp(1, 254) as u8)
        }),
        memory: args.memory,
        serial: args.serial,
        stdin: interactive,
        escape: false,
        boot: args.boot,
        disks: args
            .disk
            .into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                if d.serial.is_empty() {
                    d.serial = format!("tandem-disk{i}");
                }
                d
            })
            .collect(),
        rng: args.rng,
        channels: args.channel,
        virtio_transport: args.virtio_transport,
        exits: tandem_vmm::realtime::ExitPolicy::choose(
            args.realtime && args.pin_cpus.is_some(),
            args.disable_exits,
            args.disable_exits_optional,
            args.halt_poll_ns,
        ),
        placement: tandem_vmm::placement::Placement {
            pin: args.pin_cpus.map(|l| l.0).unwrap_or_default(),
            realtime: args.realtime,
            housekeeping: args.housekeeping_cpus.map(|l| l.0).unwrap_or_default(),
            lock_memory: args.lock_memory,
            hugepages: args.hugepages,
        },
        sandbox: tandem_sandbox::SandboxConfig {
            mode: args.seccomp,
            test_violation: args.seccomp_test_violation,
        },
        console: match args.console {
            SerialOutput::None => None,
            other => Some(other),
        },
        net: match (args.net, args.forward.is_empty()) {
            (Some(NetChoice::None), false) => {
                return fail("--forward needs a network: drop --net none", EXIT_USAGE)
            }
            (Some(NetChoice::None), true) | (None, true) => None,
            (Some(NetChoice::Tap(name, guest_ip)), _) => Some(NetConfig::Tap(TapConfig {
                name,
                guest_ip,
                forwards: args.forward,
            })),
            (Some(NetChoice::User(policy)), _) => Some(NetConfig::User(UserNetConfig {
                forwards: args.forward,
                policy,
                ..UserNetConfig::default()
            })),
            (None, false) => Some(NetConfig::User(UserNetConfig {
                forwards: args.forward,
                ..UserNetConfig::default()
            })),
        },
    };
    // Check everything that can be checked before touching the terminal.
    if let Err(e) = tandem_vmm::arch::ensure_vm_support()
        // The images first: a kernel for the other architecture is one clear line, before
        // any question to KVM.
        .and_then(|()| tandem_vmm::arch::validate_boot(&cfg))
        .and_then(|()| tandem_vmm::vm::validate_devices(&cfg))
        .and_then(|()| tandem_vmm::vm::open_kvm())
        .and_then(|kvm| tandem_vmm::vm::validate(&cfg, &kvm))
    {
        return fail(&e, exit_code(&e));
    }
    if args.dry_run {
        return ExitCode::SUCCESS;
    }
    if cfg.jail.is_some() {
        if let Err(e) = tandem_sandbox::jail::close_inherited(&keep_fds) {
            return fail(format!("jail: closing inherited descriptors: {e}"), 1);
        }
        // The VM runs in the child, PID 1 of its own namespace; this process only waits.
        match tandem_sandbox::jail::fork_into_pid_namespace() {
            Ok(Forked::Parent(child)) => tandem_sandbox::jail::wait_and_mirror(child),
            Ok(Forked::Child) => {}
            Err(e) => return fail(e, 1),
        }
    }
    let raw = if interactive {
        RawTerminal::enter()
    } else {
        None
    };
    let cfg = VmConfig {
        escape: raw.is_some(),
        ..cfg
    };
    let outcome = tandem_vmm::run(&cfg);
    drop(raw);
    match outcome {
        Ok(VmOutcome::PowerOff) => ExitCode::SUCCESS,
        Ok(VmOutcome::UserQuit) => {
            eprintln!("tandem: stopped by the user (Ctrl-A x)");
            ExitCode::SUCCESS
        }
        Ok(VmOutcome::Signal(sig)) => fail(
            format!(
                "stopped by {}; the VM was shut down",
                tandem_vmm::signals::name(sig)
            ),
            128 + sig as u8,
        ),
        Ok(VmOutcome::Reboot) => fail(
            "the guest rebooted; tandem exits on reboot (status 4)",
            EXIT_GUEST_REBOOT,
        ),
        Ok(VmOutcome::Panic(reason)) => fail(
            format!("the guest kernel panicked: {reason}"),
            EXIT_GUEST_PANIC,
        ),
        Ok(VmOutcome::VcpuFailed {
            vcpu,
            reason,
            registers,
        }) => fail(
            format!("vCPU {vcpu} stopped: {reason} [{registers}]"),
            EXIT_VCPU_FAILED,
        ),
        Err(e) => fail(&e, exit_code(&e)),
    }
}

fn exit_code(e: &VmError) -> u8 {
    if e.is_user_error() {
        EXIT_USAGE
    } else {
        1
    }
}
