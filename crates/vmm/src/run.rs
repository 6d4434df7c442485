//! Building one VM from a [`VmConfig`] and running it to its end: the shared assembly of
//! memory, devices, virtio, PCI and vCPU threads, with the architecture's parts from
//! [`crate::arch`].

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use tandem_devices::output::{self, OutputDrain, PendingWriter};
use tandem_devices::{ConsoleWriter, EventFdTrigger, PanicRecord};

use crate::arch;
use crate::bus::DeviceBus;
use crate::error::VmError;
use crate::event_loop::{self, EventSources};
use crate::hypervisor::kvm::KvmVcpu;
use crate::irq::GsiRoutes;
use crate::pci::PciDevices;
use crate::signals::StopSignals;
use crate::vcpu::{run_loop, PowerEvents, VcpuReport};
use crate::virtio::VirtioDevices;
use crate::vm::{
    open_kvm, validate, NetConfig, SerialOutput, VirtioTransport, VmConfig, VmOutcome,
};
use tandem_sandbox::{Keeper, Sandbox, SeccompMode, ThreadKind};

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
    // Kept until the vCPUs are configured (aarch64's GIC is initialised then).
    let platform = arch::create_platform(&vm, cfg)?;

    let mem = crate::placement::create_memory(&vm, cfg.memory, &cfg.placement)?;

    // Every vCPU exists before any device: on aarch64 the GIC is initialised once every vCPU
    // is, and KVM takes no irqfd before. They are configured once the boot images are loaded.
    let mut fds = Vec::with_capacity(cfg.vcpus.into());
    for index in 0..cfg.vcpus {
        fds.push(
            vm.create_vcpu(index.into())
                .map_err(VmError::kvm("KVM_CREATE_VCPU"))?,
        );
    }
    arch::init_vcpus(&platform, &vm, &fds)?;

    // Devices.
    let panic = PanicRecord::default();
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
    let serial = arch::add_platform_devices(&vm, &mut bus, console, &poweroff, &reset)?;
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
    let virtio_slots = virtio.slots().to_vec();
    let entry = arch::load_boot_images(cfg, &mem, &virtio_slots, has_pci)?;
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
    let power = PowerEvents {
        poweroff: poweroff.try_clone().map_err(VmError::Device)?,
        reset: reset.try_clone().map_err(VmError::Device)?,
    };
    // Every vCPU is configured before any runs: on aarch64 the device tree (with each vCPU's
    // MPIDR) is written only then.
    for (index, fd) in (0..cfg.vcpus).zip(&fds) {
        arch::configure_vcpu(&kvm, fd, index, cfg, entry)?;
        stats.add_vcpu(index.into(), fd);
    }
    arch::finish_platform(&platform, &fds, cfg, &mem, &virtio_slots, entry)?;
    let mut handles = Vec::with_capacity(cfg.vcpus.into());
    for (index, fd) in (0..cfg.vcpus).zip(fds) {
        let (bus, reports, stop) = (bus.clone(), reports.clone(), stop.clone());
        let power = power.try_clone().map_err(VmError::Device)?;
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
                let report = run_loop(index.into(), &mut vcpu, bus.as_ref(), &power, &stop);
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
