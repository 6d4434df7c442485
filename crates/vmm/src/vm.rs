//! One VM's configuration ([`VmConfig`]) and its checks against the host; [`crate::run`]
//! builds and runs it.

use std::io;
use std::path::PathBuf;

use kvm_ioctls::Kvm;

use crate::arch;
use crate::error::VmError;
use crate::layout;

pub use crate::arch::REQUIRED_CAPS;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// tandem's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere.
    None,
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// Whether host stdin is forwarded to the guest: to the virtio console when its output is
    /// stdout too, else to the serial console.
    pub stdin: bool,
    /// Whether stdin is a terminal in raw mode (enables the Ctrl-A x escape).
    pub escape: bool,
    /// How to enter the kernel.
    pub boot: BootProtocol,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<tandem_virtio::BlockConfig>,
    /// Whether the guest gets a virtio entropy device.
    pub rng: bool,
    /// The guest's network, if it has one.
    pub net: Option<NetConfig>,
    /// Where the virtio console's output goes (`None`: no virtio console).
    pub console: Option<SerialOutput>,
    /// Inter-VM channels (ivshmem devices on a PCI bus, which exists only when there are some).
    pub channels: Vec<crate::pci::ChannelConfig>,
    /// How virtio devices are attached.
    pub virtio_transport: VirtioTransport,
    /// CPU pinning, scheduling and memory backing.
    pub placement: crate::placement::Placement,
    /// The exits a realtime VM leaves to the guest, and its halt polling.
    pub exits: crate::realtime::ExitPolicy,
    /// The per-thread seccomp filters.
    pub sandbox: tandem_sandbox::SandboxConfig,
    /// The jail the process enters once its privileged setup is done (`None`: none). The
    /// caller has closed inherited descriptors and forked into a PID namespace already.
    pub jail: Option<tandem_sandbox::jail::JailConfig>,
    /// Where the VM serves its exit accounting (`None`: nowhere; see [`crate::stats`]).
    pub stats_socket: Option<PathBuf>,
}

/// How the boot vCPU enters the kernel (x86_64; see [`crate::arch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH when the kernel has a PVH entry (ELF with `CONFIG_PVH`), else the Linux 64-bit protocol.
    #[default]
    Auto,
    /// The Linux boot protocol's 64-bit entry, with the zero page in RSI.
    Linux,
    /// The PVH 32-bit entry, with `hvm_start_info` in RBX.
    Pvh,
}

/// The transport of the VM's virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VirtioTransport {
    /// virtio-mmio, announced in the DSDT (no PCI bus needed).
    Mmio,
    /// virtio-pci with MSI-X: no exits for interrupts.
    #[default]
    Pci,
}

/// A guest network interface.
#[derive(Debug, Clone)]
pub enum NetConfig {
    /// User-mode NAT with port forwards (no privilege needed).
    User(tandem_net::user::UserNetConfig),
    /// A host TAP interface.
    Tap(TapConfig),
}

/// The TAP backend: an interface, and port forwards to the guest's address on it.
#[derive(Debug, Clone)]
pub struct TapConfig {
    /// The interface (created when missing, which needs CAP_NET_ADMIN).
    pub name: String,
    /// The guest's IPv4 address on the interface's network (needed by forwards).
    pub guest_ip: Option<std::net::Ipv4Addr>,
    /// Host ports mapped to the guest by nftables DNAT rules.
    pub forwards: Vec<tandem_net::Forward>,
}

impl TapConfig {
    /// What [`tandem_net::portmap::PortMap`] installs, if there are forwards.
    pub fn port_map(&self) -> Result<Option<tandem_net::portmap::PortMapSpec>, VmError> {
        if self.forwards.is_empty() {
            return Ok(None);
        }
        let guest = self
            .guest_ip
            .ok_or(tandem_net::portmap::PortMapError::NoGuestAddress)?;
        let spec = tandem_net::portmap::PortMapSpec {
            interface: self.name.clone(),
            guest,
            forwards: self.forwards.clone(),
        };
        // The rules are checked here, before anything is started.
        tandem_net::portmap::ruleset("check", &spec, &Default::default())?;
        Ok(Some(spec))
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset without a kernel panic on the console.
    Reboot,
    /// The guest kernel panicked (reason from the console), then reset or stopped.
    Panic(String),
    /// A vCPU failed: triple fault, KVM internal error, failed entry.
    VcpuFailed {
        /// Which vCPU.
        vcpu: usize,
        /// Why.
        reason: String,
        /// Its registers.
        registers: String,
    },
    /// The user typed the Ctrl-A x escape.
    UserQuit,
    /// tandem received SIGTERM, SIGINT or SIGHUP (the number) and stopped the VM.
    Signal(i32),
}

/// The KVM device: `/dev/kvm`, or `$TANDEM_KVM_DEVICE` where the host puts it elsewhere.
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("TANDEM_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/dev/kvm".into())
}

/// Opens the KVM device with errors a user can act on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = kvm_device_path();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::KvmMissing(path.clone()))?;
    Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT => VmError::KvmMissing(path.clone()),
        libc::EACCES | libc::EPERM => VmError::KvmPermission(path.clone()),
        _ => VmError::KvmOpen {
            path: path.clone(),
            source: io::Error::from_raw_os_error(e.errno()),
        },
    })
}

/// Checks the host's KVM for what tandem needs; returns the maximum vCPU count.
pub fn check_kvm(kvm: &Kvm) -> Result<usize, VmError> {
    let api = kvm.get_api_version();
    if api != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::KvmApi(api));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm.get_max_vcpus())
}

/// Checks a configuration against the host before anything is built.
pub fn validate(cfg: &VmConfig, kvm: &Kvm) -> Result<(), VmError> {
    let max = check_kvm(kvm)?;
    if cfg.vcpus == 0 || usize::from(cfg.vcpus) > max.min(layout::MAX_VCPUS) {
        return Err(VmError::VcpuCount {
            requested: cfg.vcpus.into(),
            max: max.min(layout::MAX_VCPUS),
        });
    }
    if cfg.memory < layout::MIN_MEMORY {
        return Err(VmError::MemoryTooSmall {
            requested: cfg.memory,
            min: layout::MIN_MEMORY,
        });
    }
    cfg.exits
        .check(cfg.placement.realtime, !cfg.placement.pin.is_empty())?;
    crate::realtime::decide(&cfg.exits, &crate::realtime::HostOffer::probe(kvm))?;
    arch::validate_boot(cfg)
}

/// Checks the device configuration without KVM: the device count, and that every disk image
/// can be opened and locked as asked (it is closed again at once).
pub fn validate_devices(cfg: &VmConfig) -> Result<(), VmError> {
    cfg.placement.check(cfg.vcpus.into())?;
    let devices = cfg.disks.len()
        + usize::from(cfg.rng)
        + usize::from(cfg.net.is_some())
        + usize::from(cfg.console.is_some());
    if devices > layout::VIRTIO_MAX_DEVICES {
        return Err(VmError::TooManyDevices(layout::VIRTIO_MAX_DEVICES));
    }
    for d in &cfg.disks {
        tandem_virtio::blk::FileDisk::open(&d.path, d.readonly)?;
    }
    for c in &cfg.channels {
        c.open()?;
    }
    crate::pci::check_channels(&cfg.channels)?;
    if let Some(path) = &cfg.stats_socket {
        crate::stats::server::check(path)?;
    }
    match &cfg.net {
        // Bound and released at once: a port in use fails here, before the guest starts.
        Some(NetConfig::User(u)) => drop(tandem_net::user::UserNet::new(u)?),
        // Not opened here: an interface tandem creates would vanish and come back.
        Some(NetConfig::Tap(tap)) => {
            tandem_net::tap::Tap::check_name(&tap.name)?;
            if tap.port_map()?.is_some() {
                tandem_net::portmap::check_nft()?;
            }
        }
        None => {}
    }
    Ok(())
}
