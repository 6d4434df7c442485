//! The VM's PCI bus: the root (its configuration space where the architecture puts it: x86's
//! ports 0xcf8-0xcff, Arm's ECAM window), BAR placement in the PCI window,
//! and the devices on it: virtio devices on the virtio-pci transport (MSI-X vectors as irqfds,
//! doorbells as ioeventfds) and inter-VM channels (ivshmem: BAR0 registers on the MMIO bus,
//! BAR2 a KVM memory slot over the shared object, so data needs no exit at all).

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use tandem_pci::ivshmem::{DoorbellGate, DoorbellRoute, MSIX_BAR_SIZE, REGS_SIZE};
use tandem_pci::{Ivshmem, PciRoot};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use tandem_pci::msix::{MsiRouter, Vector};
use tandem_virtio::pci as virtio_pci;
use tandem_virtio::{Mem, VirtioDevice, VirtioPci};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::DeviceBus;
use crate::error::VmError;
use crate::irq::{requester_id, GsiRoutes};
use crate::layout::{PCI_MMIO_END, PCI_MMIO_START};

/// Smallest channel: one page.
pub const MIN_CHANNEL_SIZE: u64 = 4096;

/// An inter-VM channel: shared memory that appears in the guest as an ivshmem PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    /// The shared object (a file, typically under /dev/shm); created with `size` bytes when it
    /// does not exist.
    pub path: PathBuf,
    /// Bytes (a power of two, at least 4 KiB).
    pub size: u64,
    /// This VM's peer ID on the channel (the guest reads it from IVPosition).
    pub peer_id: u16,
    /// Doorbell eventfds (inherited descriptors), indexed by peer ID: this VM's own is its
    /// interrupt (an irqfd), the others' are rung by writes of `peer << 16` to the Doorbell
    /// register (ioeventfds). Empty: no doorbells, no interrupt pin.
    pub doorbells: Vec<i32>,
}

/// Why a channel could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The size is not a power of two of at least 4 KiB.
    #[error("channel {}: size {size} is not a power of two of at least 4 KiB", .path.display())]
    Size {
        /// The object.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file exists with another size.
    #[error("channel {}: the file holds {actual} bytes, not {size}", .path.display())]
    Mismatch {
        /// The object.
        path: PathBuf,
        /// The size asked for.
        size: u64,
        /// The file's size.
        actual: u64,
    },
    /// The file could not be opened, created or mapped.
    #[error("channel {}: {source}", .path.display())]
    Open {
        /// The object.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The doorbell descriptors do not fit the peer ID, or are not open.
    #[error("channel {}: doorbells: {why}", .path.display())]
    Doorbells {
        /// The object.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The PCI devices' BARs (channels' shared memory, virtio registers) do not fit the window.
    #[error("the PCI devices need more than the {} MiB of PCI address space (a BAR of {} KiB did not fit); use smaller channels or fewer devices", (PCI_MMIO_END - PCI_MMIO_START) >> 20, .size >> 10)]
    NoSpace {
        /// The BAR that did not fit.
        size: u64,
    },
}

/// What `/proc/self/fd/N` reads for an eventfd.
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// Doorbell descriptors this process has taken ownership of: each exactly once.
static CLAIMED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Checks every channel's doorbells (see [`ChannelConfig::check_doorbells`]) and that no
/// descriptor serves two channels.
pub fn check_channels(channels: &[ChannelConfig]) -> Result<(), ChannelError> {
    let mut seen = Vec::new();
    for c in channels {
        c.check_doorbells()?;
        for &fd in &c.doorbells {
            if seen.contains(&fd) {
                return Err(ChannelError::Doorbells {
                    path: c.path.clone(),
                    why: format!("descriptor {fd} is given to another channel too"),
                });
            }
            seen.push(fd);
        }
    }
    Ok(())
}

impl ChannelConfig {
    /// Checks that the doorbell descriptors cover this VM's peer ID, are distinct, are not the
    /// standard streams and are open eventfds; marks them close-on-exec, so that no program
    /// tandem starts (nft) inherits them.
    pub fn check_doorbells(&self) -> Result<(), ChannelError> {
        if self.doorbells.is_empty() {
            return Ok(());
        }
        let bad = |why: String| ChannelError::Doorbells {
            path: self.path.clone(),
            why,
        };
        if usize::from(self.peer_id) >= self.doorbells.len() {
            return Err(bad(format!(
                "{} given, none for peer {}",
                self.doorbells.len(),
                self.peer_id
            )));
        }
        for (i, &fd) in self.doorbells.iter().enumerate() {
            if fd < 3 {
                return Err(bad(format!(
                    "descriptor {fd} is a standard stream, not an eventfd"
                )));
            }
            if self.doorbells[..i].contains(&fd) {
                return Err(bad(format!("descriptor {fd} is given twice")));
            }
            match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                Err(_) => return Err(bad(format!("descriptor {fd} is not open"))),
                Ok(l) if l.as_os_str() != EVENTFD_LINK => {
                    return Err(bad(format!(
                        "descriptor {fd} is not an eventfd ({})",
                        l.display()
                    )))
                }
                Ok(_) => {}
            }
            // SAFETY: F_SETFD on a descriptor checked open above; it changes only its flags.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Ok(())
    }

    /// Takes ownership of doorbell `fd` (checked by [`Self::check_doorbells`]); a descriptor
    /// is taken at most once in a process, so it is closed exactly once.
    fn claim(&self, fd: i32) -> Result<EventFd, ChannelError> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        if claimed.contains(&fd) {
            return Err(ChannelError::Doorbells {
                path: self.path.clone(),
                why: format!("descriptor {fd} is already in use"),
            });
        }
        claimed.push(fd);
        // SAFETY: the descriptor is an open eventfd (checked), handed to this process for the
        // VM's lifetime, and the registry above lets only this one EventFd own it.
        Ok(unsafe { EventFd::from_raw_fd(fd) })
    }

    /// Opens the shared object without following a symbolic link: a missing one is created,
    /// mode 0600, with `size` bytes (`O_EXCL`: never someone else's file that appeared
    /// meanwhile); an existing one must be a plain file of this user's, of that size.
    pub fn open(&self) -> Result<File, ChannelError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        if !self.size.is_power_of_two() || self.size < MIN_CHANNEL_SIZE {
            return Err(ChannelError::Size {
                path: self.path.clone(),
                size: self.size,
            });
        }
        let open_err = |source| ChannelError::Open {
            path: self.path.clone(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = match opts.clone().create_new(true).mode(0o600).open(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => opts.open(&self.path),
            other => other,
        }
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                open_err(std::io::Error::other("it is a symbolic link"))
            } else {
                open_err(e)
            }
        })?;
        let meta = file.metadata().map_err(open_err)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() {
            return Err(open_err(std::io::Error::other("not a plain file")));
        }
        if meta.uid() != euid {
            return Err(open_err(std::io::Error::other(format!(
                "it belongs to uid {}, not to uid {euid} running tandem",
                meta.uid()
            ))));
        }
        let actual = meta.len();
        if actual == 0 {
            file.set_len(self.size).map_err(open_err)?;
        } else if actual != self.size {
            return Err(ChannelError::Mismatch {
                path: self.path.clone(),
                size: self.size,
                actual,
            });
        }
        Ok(file)
    }
}

/// Hands out naturally aligned ranges of the PCI window for BARs.
#[derive(Debug)]
struct BarWindow {
    next: u64,
}

impl Default for BarWindow {
    fn default() -> Self {
        BarWindow {
            next: PCI_MMIO_START,
        }
    }
}

impl BarWindow {
    /// A naturally aligned range of `size` bytes.
    fn place(&mut self, size: u64) -> Result<u64, ChannelError> {
        let addr = self.next.next_multiple_of(size);
        if addr + size > PCI_MMIO_END {
            return Err(ChannelError::NoSpace { size });
        }
        self.next = addr + size;
        Ok(addr)
    }
}

/// Moves the irqfd of this VM's doorbell eventfd between the INTx line (`intx`), the MSI-X
/// vector's GSI (`msi`) and nothing, as the guest enables and masks them. KVM refuses one
/// eventfd on two irqfds, so it is deassigned from the old GSI before it is assigned to the new;
/// a doorbell rung meanwhile stays in the eventfd and KVM delivers it on assignment.
fn doorbell_gate(
    vm: Arc<VmFd>,
    efd: &EventFd,
    intx: u32,
    msi: u32,
) -> std::io::Result<DoorbellGate> {
    let efd = efd.try_clone()?;
    let mut bound = Some(intx);
    Ok(Box::new(move |route| {
        let want = match route {
            DoorbellRoute::Off => None,
            DoorbellRoute::Intx => Some(intx),
            DoorbellRoute::Msix => Some(msi),
        };
        if let Some(gsi) = bound.take() {
            if let Err(e) = vm.unregister_irqfd(&efd, gsi) {
                tracing::warn!("ivshmem: cannot detach the doorbell interrupt from GSI {gsi}: {e}");
            }
        }
        if let Some(gsi) = want {
            match vm.register_irqfd(&efd, gsi) {
                Ok(()) => bound = Some(gsi),
                Err(e) => tracing::warn!(
                    "ivshmem: cannot attach the doorbell interrupt to GSI {gsi}: {e}"
                ),
            }
        }
    }))
}

/// The PCI bus while the VM is built.
pub struct PciDevices {
    root: PciRoot,
    window: BarWindow,
    next_slot: u32,
    routes: Arc<GsiRoutes>,
    /// Shared mappings that must outlive every vCPU.
    mappings: Vec<Arc<MmapRegion>>,
    /// Doorbell eventfds registered with KVM.
    doorbells: Vec<EventFd>,
}

impl PciDevices {
    /// An empty bus; channel memory takes KVM memory slots from `first_free_slot` on, and MSI-X
    /// vectors take GSIs from `routes`.
    pub fn new(first_free_slot: u32, routes: Arc<GsiRoutes>) -> Self {
        PciDevices {
            root: PciRoot::new(),
            window: BarWindow::default(),
            next_slot: first_free_slot,
            routes,
            mappings: Vec::new(),
            doorbells: Vec::new(),
        }
    }

    /// Puts `device` on the bus behind the virtio-pci transport: BAR0 on the MMIO bus, an
    /// ioeventfd per queue doorbell, an irqfd per MSI-X vector. Returns the transport, which the
    /// I/O thread serves.
    pub fn attach_virtio(
        &mut self,
        vm: &VmFd,
        bus: &mut DeviceBus,
        mem: &Mem,
        device: Box<dyn VirtioDevice>,
        name: &str,
    ) -> Result<Arc<Mutex<VirtioPci>>, VmError> {
        let bar = self.place(virtio_pci::BAR_SIZE)?;
        let mut vectors = Vec::new();
        let mut gsis = Vec::new();
        for _ in 0..VirtioPci::vectors_needed(device.as_ref()) {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(VmError::Device)?;
            let gsi = self.routes.alloc();
            vm.register_irqfd(&fd, gsi)
                .map_err(VmError::kvm("KVM_IRQFD"))?;
            vectors.push(Vector::new(fd, gsi));
            gsis.push(gsi);
        }
        let routes: Arc<dyn MsiRouter> = self.routes.clone();
        let transport = VirtioPci::new(device, mem.clone(), bar, vectors, routes, name)
            .map_err(|e| VmError::Device(std::io::Error::other(e.to_string())))?;
        for (i, fd) in transport.notify_fds().iter().enumerate() {
            let addr =
                bar + virtio_pci::NOTIFY + u64::from(virtio_pci::NOTIFY_MULTIPLIER) * i as u64;
            vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(VmError::kvm("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.add_mmio_shared(name, bar, virtio_pci::BAR_SIZE, transport.clone())?;
        let slot = self
            .root
            .plug(transport.clone())
            .map_err(|e| VmError::Device(std::io::Error::other(e.to_string())))?;
        for gsi in gsis {
            self.routes.set_requester(gsi, requester_id(slot));
        }
        tracing::info!("{name}: virtio-pci at 00:{slot:02x}.0, BAR0 {bar:#x}");
        Ok(transport)
    }

    fn place(&mut self, size: u64) -> Result<u64, ChannelError> {
        self.window.place(size)
    }

    /// Adds an ivshmem device for `channel`.
    pub fn attach_channel(
        &mut self,
        vm: &Arc<VmFd>,
        bus: &mut DeviceBus,
        channel: &ChannelConfig,
    ) -> Result<(), VmError> {
        let file = channel.open()?;
        let shm = self.place(channel.size)?;
        let regs = self.place(REGS_SIZE.max(4096))?;
        let open_err = |e: vm_memory::mmap::MmapRegionError| ChannelError::Open {
            path: channel.path.clone(),
            source: std::io::Error::other(e.to_string()),
        };
        let region = Arc::new(
            MmapRegion::from_file(FileOffset::new(file, 0), channel.size as usize)
                .map_err(open_err)?,
        );
        let desc = kvm_userspace_memory_region {
            slot: self.next_slot,
            guest_phys_addr: shm,
            memory_size: channel.size,
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live shared mapping of `channel.size` bytes; it is kept in
        // `mappings`, which the VM hands to every vCPU thread, so it outlives guest access.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        self.next_slot += 1;
        self.mappings.push(region);
        channel.check_doorbells()?;
        let doorbell = !channel.doorbells.is_empty();
        let msix_bar = if doorbell {
            self.place(MSIX_BAR_SIZE)?
        } else {
            0
        };
        let dev = Ivshmem::new(channel.peer_id, regs, shm, channel.size, doorbell)
            .map_err(|e| VmError::Device(std::io::Error::other(e.to_string())))?;
        let dev = Arc::new(Mutex::new(dev));
        let name = channel
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        bus.add_mmio_shared(&name, regs, REGS_SIZE, dev.clone())?;
        let slot = self
            .root
            .plug(dev.clone())
            .map_err(|e| VmError::Device(std::io::Error::other(e.to_string())))?;
        if doorbell {
            let gsi = crate::layout::pci_intx_gsi(slot);
            for (peer, &fd) in channel.doorbells.iter().enumerate() {
                let efd = channel.claim(fd)?;
                if peer == usize::from(channel.peer_id) {
                    vm.register_irqfd(&efd, gsi)
                        .map_err(VmError::kvm("KVM_IRQFD"))?;
                    let msi = self.routes.alloc();
                    self.routes.set_requester(msi, requester_id(slot));
                    let vector = Vector::new(efd.try_clone().map_err(VmError::Device)?, msi);
                    let routes: Arc<dyn MsiRouter> = self.routes.clone();
                    let gate =
                        doorbell_gate(vm.clone(), &efd, gsi, msi).map_err(VmError::Device)?;
                    let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                    d.add_msix(msix_bar, vector, routes)
                        .map_err(|e| VmError::Device(std::io::Error::other(e.to_string())))?;
                    d.set_doorbell_gate(gate);
                } else {
                    vm.register_ioevent(
                        &efd,
                        &IoEventAddress::Mmio(regs + tandem_pci::ivshmem::DOORBELL),
                        (peer as u32) << 16,
                    )
                    .map_err(VmError::kvm("KVM_IOEVENTFD"))?;
                }
                self.doorbells.push(efd);
            }
            bus.add_mmio_shared(
                &format!("{name}-msix"),
                msix_bar,
                MSIX_BAR_SIZE,
                dev.clone(),
            )?;
            tracing::info!(
                "channel {}: doorbells, INTA on GSI {gsi}, MSI-X table at {msix_bar:#x}",
                channel.path.display()
            );
        }
        tracing::info!(
            "channel {} ({} KiB, peer {}): PCI 00:{slot:02x}.0, registers {regs:#x}, memory {shm:#x}",
            channel.path.display(),
            channel.size >> 10,
            channel.peer_id
        );
        Ok(())
    }

    /// Puts the root's configuration space on `bus` (where the architecture wants it); returns
    /// the mappings to keep alive.
    pub fn finish(self, bus: &mut DeviceBus) -> Result<Vec<Arc<MmapRegion>>, VmError> {
        crate::arch::add_pci_root(bus, self.root)?;
        Ok(self.mappings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tandem-chan-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_missing_channel_file_is_created_with_its_size_and_a_mismatch_is_refused() {
        let path = scratch("a");
        let c = ChannelConfig {
            path: path.clone(),
            size: 1 << 16,
            peer_id: 0,
            doorbells: Vec::new(),
        };
        c.open().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 16);
        c.open().unwrap();
        let other = ChannelConfig {
            size: 1 << 17,
            ..c.clone()
        };
        assert!(matches!(other.open(), Err(ChannelError::Mismatch { .. })));
        let odd = ChannelConfig { size: 5000, ..c };
        assert!(matches!(odd.open(), Err(ChannelError::Size { .. })));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_channel_file_is_created_owner_only_and_never_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let path = scratch("mode");
        let c = ChannelConfig {
            path: path.clone(),
            size: 4096,
            peer_id: 0,
            doorbells: Vec::new(),
        };
        c.open().unwrap();
        let mode = |p: &PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        // A link planted where the file goes: refused, its target untouched.
        let target = scratch("target");
        std::fs::write(&target, "").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = scratch("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ChannelConfig {
            path: link.clone(),
            ..c.clone()
        }
        .open()
        .unwrap_err();
        assert!(e.to_string().ends_with("it is a symbolic link"), "{e}");
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
        assert_eq!(mode(&target), 0o644);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Another user's file is not this VM's shared memory.
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let e = c.open().unwrap_err();
            assert!(
                e.to_string().contains("belongs to uid 65534, not to uid 0"),
                "{e}"
            );
        }
        for p in [path, target, link] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn doorbells_must_be_distinct_open_eventfds_and_not_the_standard_streams() {
        let e1 = EventFd::new(0).unwrap();
        let e2 = EventFd::new(0).unwrap();
        let file = File::open("/proc/self/status").unwrap();
        use std::os::fd::AsRawFd;
        let (a, b, f) = (e1.as_raw_fd(), e2.as_raw_fd(), file.as_raw_fd());
        let ch = |path: &str, doorbells: Vec<i32>| ChannelConfig {
            path: path.into(),
            size: 4096,
            peer_id: 0,
            doorbells,
        };
        let why = |c: &[ChannelConfig]| check_channels(c).unwrap_err().to_string();
        check_channels(&[ch("/x", vec![a, b])]).unwrap();
        assert!(why(&[ch("/x", vec![a, f])]).ends_with(&format!(
            "doorbells: descriptor {f} is not an eventfd (/proc/{}/status)",
            std::process::id()
        )));
        assert!(why(&[ch("/x", vec![0, a])])
            .ends_with("descriptor 0 is a standard stream, not an eventfd"));
        assert!(why(&[ch("/x", vec![a, a])]).ends_with(&format!("descriptor {a} is given twice")));
        assert!(why(&[ch("/x", vec![a, 999_999])]).ends_with("descriptor 999999 is not open"));
        assert!(
            why(&[ch("/x", vec![a, b]), ch("/y", vec![b])]).ends_with(&format!(
                "channel /y: doorbells: descriptor {b} is given to another channel too"
            ))
        );
        // Checked descriptors are close-on-exec: no program tandem starts inherits them.
        // SAFETY: F_GETFD only reads the descriptor's flags.
        assert_eq!(
            unsafe { libc::fcntl(a, libc::F_GETFD) } & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC
        );
        // Each is owned once: a second claim is refused (and nothing is closed twice).
        let c = ch("/x", vec![a]);
        let owned = c.claim(a).unwrap();
        assert!(c
            .claim(a)
            .unwrap_err()
            .to_string()
            .ends_with("is already in use"));
        std::mem::forget(owned);
    }

    #[test]
    fn bars_are_naturally_aligned_and_bounded_by_the_window() {
        let mut p = BarWindow::default();
        assert_eq!(p.place(4096).unwrap(), PCI_MMIO_START);
        assert_eq!(p.place(1 << 20).unwrap(), PCI_MMIO_START + (1 << 20));
        assert!(matches!(p.place(1 << 30), Err(ChannelError::NoSpace { size }) if size == 1 << 30));
    }
}
