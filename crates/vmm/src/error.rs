//! Errors from building and running a VM.

use std::io;
use std::path::PathBuf;

#[cfg(target_arch = "x86_64")]
use crate::boot::BootError;

/// Errors from building and running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device does not exist.
    #[error("{} does not exist: load the kvm module (kvm_intel or kvm_amd) or enable virtualization in the firmware", .0.display())]
    KvmMissing(PathBuf),
    /// The KVM device exists but may not be opened.
    #[error("permission denied opening {}: add your user to the 'kvm' group or run as root", .0.display())]
    KvmPermission(PathBuf),
    /// Any other failure opening the KVM device.
    #[error("cannot open {}: {source}", .path.display())]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Unexpected KVM API version.
    #[error("KVM API version {0} is not supported (expected 12)")]
    KvmApi(i32),
    /// A capability tandem needs is missing.
    #[error("the host's KVM lacks {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Too few or too many vCPUs.
    #[error("--cpus {requested} is out of range: this host's KVM allows 1 to {max}")]
    VcpuCount {
        /// Requested.
        requested: usize,
        /// Limit.
        max: usize,
    },
    /// Guest memory below the minimum.
    #[error("guest memory of {requested} bytes is too small: at least {} MiB is needed", min >> 20)]
    MemoryTooSmall {
        /// Requested bytes.
        requested: u64,
        /// Minimum bytes.
        min: u64,
    },
    /// Guest memory could not be allocated or registered.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Loading the boot images failed.
    #[cfg(target_arch = "x86_64")]
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Building the ACPI tables failed.
    #[cfg(target_arch = "x86_64")]
    #[error("ACPI tables: {0}")]
    Acpi(#[from] crate::acpi::AcpiError),
    /// Loading the boot images or building the device tree failed.
    #[cfg(target_arch = "aarch64")]
    #[error(transparent)]
    Boot(#[from] crate::arch::boot::BootError),
    /// Something asked for that this architecture does not have yet.
    #[error("{0} is not implemented on this architecture yet (tracked in issue 12)")]
    NotOnThisArch(&'static str),
    /// Something needs MSI-X, which the host's interrupt controller cannot deliver.
    #[error("{0} needs MSI-X, and this host's KVM has no GICv3 ITS to deliver it (see tandem doctor); use --virtio-transport mmio")]
    NoMsi(&'static str),
    /// This build's architecture cannot boot VMs yet (see [`crate::arch`]).
    #[error("booting VMs on {0} is not implemented yet (tracked in issue 12)")]
    ArchNotImplemented(&'static str),
    /// The serial output file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A device could not be set up (eventfd, epoll, thread).
    #[error("device setup: {0}")]
    Device(io::Error),
    /// More virtio devices than interrupt lines.
    #[error("too many devices: at most {0} virtio devices fit")]
    TooManyDevices(usize),
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] tandem_virtio::blk::BlockError),
    /// The network could not be set up (a forward's port in use, ...).
    #[error(transparent)]
    Net(#[from] tandem_net::user::NetError),
    /// The TAP interface could not be opened.
    #[error(transparent)]
    Tap(#[from] tandem_net::tap::TapError),
    /// The placement (pinning, scheduling, memory backing) cannot be applied.
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    /// A realtime setting the host refuses.
    #[error(transparent)]
    Realtime(#[from] crate::realtime::RealtimeError),
    /// An inter-VM channel could not be attached.
    #[error(transparent)]
    Channel(#[from] crate::pci::ChannelError),
    /// Port forwards over TAP could not be installed.
    #[error(transparent)]
    PortMap(#[from] tandem_net::portmap::PortMapError),
    /// The seccomp filters could not be prepared or installed.
    #[error(transparent)]
    Sandbox(#[from] tandem_sandbox::SandboxError),
    /// The jail could not be entered.
    #[error(transparent)]
    Jail(#[from] tandem_sandbox::jail::JailError),
    /// The stats socket could not be set up.
    #[error(transparent)]
    Stats(#[from] crate::stats::server::ServeError),
    /// Two devices claimed the same addresses.
    #[error("device bus: {0}")]
    Bus(#[from] vm_device::bus::Error),
}

impl VmError {
    /// Maps a kvm-ioctls error for `op`.
    pub fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
        move |e| VmError::Kvm {
            op,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }

    /// Whether the error comes from what the user asked for (bad input, host not set up), as
    /// opposed to a failure while running.
    pub fn is_user_error(&self) -> bool {
        match self {
            VmError::KvmMissing(_)
            | VmError::KvmPermission(_)
            | VmError::KvmOpen { .. }
            | VmError::VcpuCount { .. }
            | VmError::MemoryTooSmall { .. }
            | VmError::SerialFile { .. }
            | VmError::TooManyDevices(_)
            | VmError::Disk(_)
            | VmError::Net(_)
            | VmError::Tap(_)
            | VmError::PortMap(_)
            | VmError::Channel(_)
            | VmError::Sandbox(tandem_sandbox::SandboxError::Unavailable(_))
            | VmError::Placement(_)
            | VmError::NotOnThisArch(_)
            | VmError::NoMsi(_)
            | VmError::ArchNotImplemented(_) => true,
            VmError::Realtime(e) => !matches!(e, crate::realtime::RealtimeError::Enable { .. }),
            VmError::Jail(e) => e.is_user_error(),
            VmError::Stats(e) => e.is_user_error(),
            #[cfg(target_arch = "x86_64")]
            VmError::Boot(b) => !matches!(b, BootError::Memory(_)),
            #[cfg(target_arch = "aarch64")]
            VmError::Boot(b) => b.is_user_error(),
            _ => false,
        }
    }
}
