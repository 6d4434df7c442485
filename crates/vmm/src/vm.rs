//! Building one VM from a [`VmConfig`] and running it to its end.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;

use kvm_bindings::{kvm_pit_config, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use tandem_devices::acpi_pm::ACPI_PM_PORT;
use tandem_devices::i8042::{I8042_BASE, I8042_PORTS};
use tandem_devices::output::{self, OutputDrain, PendingWriter};
use tandem_devices::serial::{COM1_BASE, COM1_IRQ, UART_PORTS};
use tandem_devices::{
    AcpiPmDevice, ConsoleWriter, EventFdTrigger, PanicRecord, SerialDevice, I8042,
};

use crate::boot::{self, params::BootInfo, Entry};
use crate::bus::DeviceBus;
use crate::error::VmError;
use crate::event_loop::{self, EventSources};
use crate::hypervisor::kvm::KvmVcpu;
use crate::irq::GsiRoutes;
use crate::layout;
use crate::pci::PciDevices;
use crate::signals::StopSignals;
use crate::vcpu::{run_loop, VcpuReport};
use crate::virtio::VirtioDevices;
use crate::{acpi, cpuid, regs};
use tandem_sandbox::{Keeper, Sandbox, SeccompMode, ThreadKind};

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
    pub boot: boot::BootProtocol,
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

/// KVM capabilities tandem cannot run without, with their names for messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Checks a configuration against the host before anything is built.
pub fn validate(cfg: &VmConfig, kvm: &Kvm) -> Result<(), VmError> {
    let max = check_kvm(kvm)?;
    if cfg.vcpus == 0 || usize::from(cfg.vcpus) > max.min(254) {
        return Err(VmError::VcpuCount {
            requested: cfg.vcpus.into(),
            max: max.min(254),
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
    boot::probe_kernel(&cfg.kernel)?;
    if let Some(initrd) = &cfg.initrd {
        File::open(initrd).map_err(|source| boot::BootError::InitrdRead {
            path: initrd.clone(),
            source,
        })?;
    }
    Ok(())
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

/// Loads kernel, initramfs, command line, ACPI tables and the boot protocol's structures (zero
/// page or PVH start info); returns where the boot vCPU starts.
fn load_boot_images(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    virtio: &[acpi::VirtioSlot],
    pci: bool,
) -> Result<Entry, VmError> {
    let kernel = boot::load_kernel(mem, &cfg.kernel)?;
    let entry = kernel.entry(cfg.boot, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(boot::load_initrd(mem, cfg.memory, &kernel, p)?),
        None => None,
    };
    let cmdline_len = boot::write_cmdline(mem, &cfg.cmdline)?;
    let tables = acpi::build(cfg.vcpus.into(), virtio, pci)?;
    mem.write_slice(&tables.blob, GuestAddress(tables.base))
        .map_err(boot::BootError::from)?;
    let e820 = layout::e820_map(cfg.memory);
    match entry {
        Entry::Linux64(_) => {
            let params = boot::params::build_boot_params(&BootInfo {
                header: kernel.header,
                cmdline_addr: layout::CMDLINE_ADDR,
                cmdline_len,
                initrd,
                e820: &e820,
                rsdp_addr: tables.rsdp_addr(),
            })
            .map_err(boot::BootError::from)?;
            mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
                .map_err(boot::BootError::from)?;
        }
        Entry::Pvh(_) => {
            let info = boot::pvh::build(layout::CMDLINE_ADDR, initrd, &e820, tables.rsdp_addr())?;
            boot::pvh::write(mem, &info)?;
        }
    }
    regs::write_boot_tables(mem).map_err(boot::BootError::from)?;
    boot::write_reset_stub(mem)?;
    tracing::info!(format = ?kernel.format, ?entry, "kernel loaded");
    Ok(entry)
}

fn configure_vcpu(
    kvm: &Kvm,
    fd: &VcpuFd,
    index: u8,
    cfg: &VmConfig,
    entry: Entry,
) -> Result<(), VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    cpuid::patch(cpuid.as_mut_slice(), index.into(), cfg.vcpus.into());
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    if tsc_deadline {
        cpuid::set_tsc_deadline(cpuid.as_mut_slice());
    }
    if cfg.placement.realtime && index == 0 {
        if !tsc_deadline {
            tracing::warn!("realtime: this host's KVM has no TSC-deadline timer for the guest");
        }
        if !cpuid::has_invariant_tsc(cpuid.as_slice()) {
            tracing::warn!(
                "realtime: the host's TSC is not invariant, so the guest is not told it is"
            );
        }
    }
    fd.set_cpuid2(&cpuid)
        .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&regs::boot_msrs())
        .map_err(|e| VmError::Memory(format!("MSR list: {e:?}")))?;
    fd.set_msrs(&msrs).map_err(VmError::kvm("KVM_SET_MSRS"))?;
    fd.set_fpu(&regs::boot_fpu())
        .map_err(VmError::kvm("KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(VmError::kvm("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    fd.set_lapic(&lapic)
        .map_err(VmError::kvm("KVM_SET_LAPIC"))?;
    if index == 0 {
        let mut sregs = fd.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        let regs = match entry {
            Entry::Linux64(addr) => {
                regs::long_mode_sregs(&mut sregs);
                regs::boot_regs(addr)
            }
            Entry::Pvh(addr) => {
                regs::protected_mode_sregs(&mut sregs);
                regs::pvh_regs(addr, boot::pvh::START_INFO_ADDR)
            }
        };
        fd.set_sregs(&sregs)
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&regs).map_err(VmError::kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output), LINT1 as NMI, as firmware leaves them.
fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[off..off + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
}

/// Where a console's output goes, behind a queue that never blocks the device (and so the vCPU
/// or I/O thread) writing it; the drain that empties the queue is kept in `drains`.
/// Its writer thread is started later, with the others in `writers`.
fn serial_sink(
    out: &SerialOutput,
    name: &str,
    drains: &mut Vec<(String, OutputDrain)>,
    writers: &mut Vec<PendingWriter>,
    sandbox: &Arc<Sandbox>,
) -> Result<Box<dyn Write + Send>, VmError> {
    let dest: Box<dyn Write + Send> = match out {
        // A descriptor of its own: a writer blocked on a stalled stdout must not hold the lock
        // of std's `Stdout`, which the rest of tandem (and its exit) would then wait for.
        SerialOutput::Stdout => Box::new(File::from(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(VmError::Device)?,
        )),
        SerialOutput::File(p) => {
            Box::new(File::create(p).map_err(|source| VmError::SerialFile {
                path: p.clone(),
                source,
            })?)
        }
        SerialOutput::None => return Ok(Box::new(io::sink())),
    };
    let sandbox = sandbox.clone();
    let (queue, drain, writer) = output::prepare(
        dest,
        &format!("{name}-out"),
        output::CAPACITY,
        Box::new(move || sandbox.apply_or_exit(ThreadKind::Output)),
    );
    drains.push((name.to_string(), drain));
    writers.push(writer);
    Ok(Box::new(queue))
}

/// Lets the consoles' writers finish (briefly: a stalled destination must not keep tandem from
/// exiting) and says what was lost.
fn finish_output(drains: Vec<(String, OutputDrain)>) {
    for (name, drain) in drains {
        let (dropped, done) = drain.finish(OUTPUT_GRACE);
        if dropped > 0 {
            tracing::warn!(
                "{name}: {dropped} bytes of output dropped: its destination did not keep up"
            );
        }
        if !done {
            tracing::warn!("{name}: output still buffered is lost: its destination stalled");
        }
    }
}

/// How long buffered console output may take to reach its destination once the VM has stopped.
const OUTPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps guest memory out of forked children (as QEMU does): a child has no use for it, and
/// pages shared copy-on-write would be copied on the guest's next write to them.
fn dont_fork(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    use vm_memory::GuestMemoryRegion;
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory(e.to_string()))?;
        // SAFETY: the range is a live mapping owned by `mem`; MADV_DONTFORK changes only what
        // fork copies.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTFORK) } != 0 {
            return Err(VmError::Device(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// What the VM still needs from the host once jailed: host sockets for user networking that
/// may go out (a restricted one only accepts on listeners bound already), and the vCPUs'
/// SCHED_FIFO priority.
fn jail_needs(cfg: &VmConfig) -> tandem_sandbox::jail::JailNeeds {
    tandem_sandbox::jail::JailNeeds {
        host_network: matches!(&cfg.net, Some(NetConfig::User(u)) if !u.policy.restrict),
        rt_priority: if cfg.placement.realtime {
            crate::placement::VCPU_RT_PRIORITY as u32
        } else {
            0
        },
    }
}

/// Builds the VM described by `cfg` and runs it until the guest powers off, resets or fails.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome, VmError> {
    tracing::info!("creating the VM");
    // First, so that every thread started below has the signals blocked, and last to be
    // dropped, so that everything else is undone before a second signal can act.
    let signals = StopSignals::block().map_err(VmError::Device)?;
    let kvm = open_kvm()?;
    validate(cfg, &kvm)?;
    // Compiled before anything is built; each thread installs its filter once its privileged
    // setup is done.
    let sandbox = Arc::new(Sandbox::prepare(cfg.sandbox)?);
    cfg.placement.check(cfg.vcpus.into())?;
    // Every thread started from here on inherits the housekeeping CPUs; vCPU threads then pin
    // themselves.
    let housekeeping = cfg.placement.housekeeping_cpus();
    if !housekeeping.is_empty() {
        crate::placement::set_affinity(&housekeeping).map_err(VmError::Device)?;
    }
    tracing::info!("placement: {}", cfg.placement.describe());
    // Disks are opened (and locked) before anything else, so a bad one fails fast.
    let mut disks = Vec::with_capacity(cfg.disks.len());
    for d in &cfg.disks {
        disks.push(tandem_virtio::Block::open(d)?);
    }
    let vm = Arc::new(kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?);
    // Before any vCPU exists: KVM refuses exit changes after the first.
    let exits = crate::realtime::decide(&cfg.exits, &crate::realtime::HostOffer::probe(&kvm))?;
    for w in &exits.warnings {
        tracing::warn!("{w}");
    }
    crate::realtime::apply(&vm, &exits)?;
    if cfg.placement.realtime {
        tracing::info!("realtime: {}", exits.describe());
    }
    // Exit accounting; `settings` is what each snapshot shows of the settings in force.
    let mut settings: std::collections::BTreeMap<String, String> =
        [("placement".to_string(), cfg.placement.describe())].into();
    if cfg.placement.realtime {
        settings.insert("realtime".into(), exits.describe());
    }
    let mut stats = crate::stats::Collector::new(vm.as_ref(), settings);
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(VmError::kvm("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(VmError::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(VmError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(VmError::kvm("KVM_CREATE_PIT2"))?;

    let mem = crate::placement::create_memory(&vm, cfg.memory, &cfg.placement)?;

    // Devices.
    let panic = PanicRecord::default();
    let serial_irq = EventFdTrigger::new().map_err(VmError::Device)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(VmError::kvm("KVM_IRQFD"))?;
    let poweroff = EventFdTrigger::new().map_err(VmError::Device)?;
    let reset = EventFdTrigger::new().map_err(VmError::Device)?;
    // No thread starts before the jail is entered: the consoles' writers wait in `writers`.
    let mut drains = Vec::new();
    let mut writers = Vec::new();
    let console = ConsoleWriter::new(
        serial_sink(&cfg.serial, "serial", &mut drains, &mut writers, &sandbox)?,
        panic.clone(),
    )
    .notify_panic_end(reset.try_clone().map_err(VmError::Device)?);
    let mut bus = DeviceBus::new();
    let serial = bus.add_pio(
        "serial",
        COM1_BASE,
        UART_PORTS,
        SerialDevice::new(serial_irq, console),
    )?;
    bus.add_pio(
        "i8042",
        I8042_BASE,
        I8042_PORTS,
        I8042::new(reset.try_clone().map_err(VmError::Device)?),
    )?;
    bus.add_pio(
        "acpi-pm",
        ACPI_PM_PORT,
        1,
        AcpiPmDevice::new(
            poweroff.try_clone().map_err(VmError::Device)?,
            reset.try_clone().map_err(VmError::Device)?,
        ),
    )?;
    // Every virtio device, in the order the guest finds them.
    let mut devices: Vec<(Box<dyn tandem_virtio::VirtioDevice>, String)> = Vec::new();
    for (i, disk) in disks.into_iter().enumerate() {
        devices.push((Box::new(disk), format!("disk{i}")));
    }
    let mut console_input = None;
    if let Some(out) = &cfg.console {
        let dev = if *out == SerialOutput::Stdout && cfg.stdin {
            let input = tandem_virtio::ConsoleInput::new().map_err(VmError::Device)?;
            console_input = Some(input.clone());
            tandem_virtio::Console::with_input(
                serial_sink(out, "console", &mut drains, &mut writers, &sandbox)?,
                input,
            )
        } else {
            tandem_virtio::Console::new(serial_sink(
                out,
                "console",
                &mut drains,
                &mut writers,
                &sandbox,
            )?)
        };
        devices.push((Box::new(dev), "console".into()));
    }
    // Removed (by drop) on every way out of this function, error or not: by a keeper process
    // when filters are on (removing it runs nft, which no filtered thread may start).
    let mut _port_map = None;
    let mut _port_map_keeper = None;
    if let Some(NetConfig::Tap(tap)) = &cfg.net {
        let backend = tandem_net::tap::Tap::open(&tap.name)?;
        if let Some(spec) = tap.port_map()? {
            let map = tandem_net::portmap::PortMap::install(&spec)?;
            if sandbox.mode() == SeccompMode::Off {
                _port_map = Some(map);
            } else {
                // The keeper needs no guest memory: not copied, no copy-on-write for the guest.
                dont_fork(&mem)?;
                _port_map_keeper = Some(Keeper::spawn(map).map_err(VmError::Device)?);
            }
        }
        let dev = tandem_virtio::Net::new(Box::new(backend), tandem_net::user::GUEST_MAC.0);
        devices.push((Box::new(dev), "net0".into()));
    }
    if let Some(NetConfig::User(u)) = &cfg.net {
        let backend = tandem_net::user::UserNet::new(u)?;
        let mac = tandem_net::user::GUEST_MAC.0;
        for f in &u.forwards {
            tracing::info!("forwarding {f} (host:guest)");
        }
        let dev = tandem_virtio::Net::new(Box::new(backend), mac);
        devices.push((Box::new(dev), "net0".into()));
    }
    if cfg.rng {
        devices.push((Box::new(tandem_virtio::Rng::new()), "rng".into()));
    }
    let pci_virtio = cfg.virtio_transport == VirtioTransport::Pci && !devices.is_empty();
    let has_pci = pci_virtio || !cfg.channels.is_empty();
    let mut virtio = VirtioDevices::default();
    let mut keep_mapped = Vec::new();
    if has_pci {
        let routes = Arc::new(GsiRoutes::new(vm.clone()));
        let mut pci = PciDevices::new(mem.num_regions() as u32, routes);
        for (dev, name) in devices {
            if pci_virtio {
                virtio.add_subscriber(pci.attach_virtio(&vm, &mut bus, &mem, dev, &name)?);
            } else {
                virtio.attach(&vm, &mut bus, &mem, dev, &name)?;
            }
        }
        for c in &cfg.channels {
            pci.attach_channel(&vm, &mut bus, c)?;
        }
        keep_mapped = pci.finish(&mut bus)?;
    } else {
        for (dev, name) in devices {
            virtio.attach(&vm, &mut bus, &mem, dev, &name)?;
        }
    }
    let entry = load_boot_images(cfg, &mem, virtio.slots(), has_pci)?;
    let mut stats_server = cfg
        .stats_socket
        .as_deref()
        .map(crate::stats::server::StatsServer::bind)
        .transpose()?;
    // Everything that needs privilege or the host's files is done: the jail, then threads.
    if let Some(jail) = &cfg.jail {
        tandem_sandbox::jail::enter(jail, jail_needs(cfg))?;
        tracing::info!("jailed in {jail}");
    }
    for w in writers {
        w.start().map_err(VmError::Device)?;
    }
    let io_thread = virtio.start(sandbox.clone())?;
    let bus = Arc::new(bus);
    stats.set_bus(bus.clone());

    // vCPUs.
    let vcpu_done = EventFdTrigger::new().map_err(VmError::Device)?;
    let reports: Arc<Mutex<Vec<VcpuReport>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(crate::kick::VcpusFinished::default());
    crate::kick::register_handler().map_err(VmError::Device)?;
    let mut handles = Vec::with_capacity(cfg.vcpus.into());
    for index in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(index.into())
            .map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
        configure_vcpu(&kvm, &fd, index, cfg, entry)?;
        stats.add_vcpu(index.into(), &fd);
        let (bus, reports, stop) = (bus.clone(), reports.clone(), stop.clone());
        let finished = finished.clone();
        let placement = cfg.placement.clone();
        let done = vcpu_done.try_clone().map_err(VmError::Device)?;
        // Guest RAM must outlive every vCPU: `run` returns while vCPU threads may still be in
        // the guest, so each thread keeps the mapping alive.
        let guest_memory = (mem.clone(), keep_mapped.clone());
        let sandbox = sandbox.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _guest_memory = guest_memory;
                if let Err(e) = placement.apply_to_vcpu(index.into()) {
                    tracing::error!("vcpu{index}: cannot apply its placement: {e}");
                }
                sandbox.apply_or_exit(ThreadKind::Vcpu);
                let mut vcpu = KvmVcpu::new(fd);
                let report = run_loop(index.into(), &mut vcpu, bus.as_ref(), &stop);
                drop(vcpu);
                if let Ok(mut r) = reports.lock() {
                    r.push(report);
                }
                finished.one_more(index.into());
                let _ = done.write(1);
            })
            .map_err(VmError::Device)?;
        handles.push(handle);
    }

    tracing::info!("{} vCPUs started", cfg.vcpus);
    // Every thread is started: the main thread's own filter is not inherited by any.
    sandbox.apply(ThreadKind::Vmm)?;
    tracing::info!("seccomp filters: {}", sandbox.mode());
    let event = event_loop::run(EventSources {
        poweroff: &poweroff,
        reset: &reset,
        vcpu_done: &vcpu_done,
        signals: &signals,
        input: match &console_input {
            Some(c) => c,
            None => serial.as_ref(),
        },
        stdin: cfg.stdin,
        escape: cfg.escape,
        stats: stats_server.as_mut().map(|s| (s, &stats)),
    })?;
    tracing::info!("guest stopped: {event:?}");
    let _ = crate::kick::stop_vcpus(handles, &stop, &finished);
    if let Some(io) = io_thread {
        io.stop();
    }
    finish_output(drains);
    if let Ok(reports) = reports.lock() {
        for r in reports.iter() {
            tracing::info!("vcpu{}: {}", r.index, r.exits);
        }
    }
    Ok(match event {
        event_loop::LoopEnd::PowerOff => VmOutcome::PowerOff,
        event_loop::LoopEnd::Reset => match panic.reason() {
            Some(reason) => VmOutcome::Panic(reason),
            None => VmOutcome::Reboot,
        },
        event_loop::LoopEnd::UserQuit => VmOutcome::UserQuit,
        event_loop::LoopEnd::Signal(sig) => VmOutcome::Signal(sig),
        event_loop::LoopEnd::VcpuDone => {
            let r = reports.lock().ok().and_then(|r| {
                r.iter()
                    .find(|r| matches!(r.state, crate::vcpu::VcpuState::Failed(_)))
                    .cloned()
            });
            match (panic.reason(), r) {
                (Some(reason), _) => VmOutcome::Panic(reason),
                (None, Some(r)) => VmOutcome::VcpuFailed {
                    vcpu: r.index,
                    reason: match r.state {
                        crate::vcpu::VcpuState::Failed(why) => why.to_string(),
                        other => format!("{other:?}"),
                    },
                    registers: r.registers,
                },
                (None, None) => VmOutcome::VcpuFailed {
                    vcpu: 0,
                    reason: "unknown".into(),
                    registers: String::new(),
                },
            }
        }
    })
}
