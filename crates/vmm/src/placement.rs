//! Where a VM runs on the host: vCPU threads pinned to host CPUs and, for real-time VMs, run
//! under SCHED_FIFO; the VMM's other threads kept on housekeeping CPUs; guest memory backed by
//! huge pages and prefaulted and locked.

use std::collections::BTreeSet;
use std::io;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::error::VmError;
use crate::layout;

/// SCHED_FIFO priority of a real-time VM's vCPU threads: above ordinary real-time work, below
/// the kernel's own threads (which run at 50 and 99 on PREEMPT_RT).
pub const VCPU_RT_PRIORITY: i32 = 40;

/// How a VM is placed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Host CPU of each vCPU (empty: not pinned).
    pub pin: Vec<u32>,
    /// Run vCPU threads under SCHED_FIFO at [`VCPU_RT_PRIORITY`].
    pub realtime: bool,
    /// CPUs for every other tandem thread (empty: not restricted).
    pub housekeeping: Vec<u32>,
    /// Prefault and lock guest memory.
    pub lock_memory: bool,
    /// Back guest memory with huge pages.
    pub hugepages: bool,
}

/// Why a placement cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The pin list does not match the vCPU count.
    #[error("--pin-cpus lists {listed} CPUs for {vcpus} vCPUs")]
    PinCount {
        /// CPUs listed.
        listed: usize,
        /// vCPUs.
        vcpus: usize,
    },
    /// A CPU the process may not run on.
    #[error("CPU {0} is not available to tandem (offline, or outside its allowed CPUs)")]
    Cpu(u32),
    /// SCHED_FIFO is not allowed.
    #[error("--realtime: real-time scheduling is not permitted: run as root, or give tandem CAP_SYS_NICE or an RLIMIT_RTPRIO of at least {VCPU_RT_PRIORITY}")]
    Realtime,
    /// mlock failed.
    #[error("--lock-memory: cannot lock {mib} MiB of guest memory: {why}")]
    Lock {
        /// Size.
        mib: u64,
        /// Why, with what to do.
        why: String,
    },
    /// No huge pages to back the memory.
    #[error("--hugepages: {need} huge pages of {page_kib} KiB are needed, {free} are free; reserve them with: echo {need} > /proc/sys/vm/nr_hugepages")]
    HugePages {
        /// Pages needed.
        need: u64,
        /// Pages free.
        free: u64,
        /// Page size.
        page_kib: u64,
    },
    /// Something else failed.
    #[error("placement: {0}")]
    Os(io::Error),
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> io::Result<BTreeSet<u32>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        // SAFETY: `set` is initialised and the index is in range.
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect())
}

/// Restricts the calling thread (and threads it starts later) to `cpus`.
pub fn set_affinity(cpus: &[u32]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET on a set we own; indexes at or beyond CPU_SETSIZE are skipped.
        if (c as usize) < libc::CPU_SETSIZE as usize {
            unsafe { libc::CPU_SET(c as usize, &mut set) };
        }
    }
    // SAFETY: valid pointer and size; 0 means the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread under SCHED_FIFO at `priority`.
pub fn set_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: valid parameter for the calling thread.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

impl Placement {
    /// Checks what can be checked before the VM is built: the pin list, the CPUs, and (in a
    /// throw-away thread) that SCHED_FIFO is permitted.
    pub fn check(&self, vcpus: usize) -> Result<(), PlacementError> {
        if !self.pin.is_empty() && self.pin.len() != vcpus {
            return Err(PlacementError::PinCount {
                listed: self.pin.len(),
                vcpus,
            });
        }
        let allowed = allowed_cpus().map_err(PlacementError::Os)?;
        if let Some(&c) = self
            .pin
            .iter()
            .chain(&self.housekeeping)
            .find(|c| !allowed.contains(c))
        {
            return Err(PlacementError::Cpu(c));
        }
        if self.realtime {
            let ok = std::thread::spawn(|| set_fifo(VCPU_RT_PRIORITY).is_ok())
                .join()
                .unwrap_or(false);
            if !ok {
                return Err(PlacementError::Realtime);
            }
        }
        Ok(())
    }

    /// The CPUs for tandem's other threads: the housekeeping list, or for a pinned real-time VM
    /// every allowed CPU but the vCPUs' (when that leaves any).
    pub fn housekeeping_cpus(&self) -> Vec<u32> {
        if !self.housekeeping.is_empty() {
            return self.housekeeping.clone();
        }
        if self.realtime && !self.pin.is_empty() {
            let rest: Vec<u32> = allowed_cpus()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| !self.pin.contains(c))
                .collect();
            return rest;
        }
        Vec::new()
    }

    /// Applied by each vCPU thread to itself before it first enters the guest.
    pub fn apply_to_vcpu(&self, index: usize) -> io::Result<()> {
        if let Some(&cpu) = self.pin.get(index) {
            set_affinity(&[cpu])?;
        }
        if self.realtime {
            set_fifo(VCPU_RT_PRIORITY)?;
        }
        Ok(())
    }

    /// A one-line summary of what is applied, for the log and `tandem ps`.
    pub fn describe(&self) -> String {
        let pin = if self.pin.is_empty() {
            "unpinned".to_string()
        } else {
            format!(
                "vCPUs on CPUs {}",
                self.pin
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        format!(
            "{pin}, {}, memory {}{}",
            if self.realtime {
                format!("SCHED_FIFO {VCPU_RT_PRIORITY}")
            } else {
                "SCHED_OTHER".into()
            },
            if self.lock_memory {
                "locked"
            } else {
                "not locked"
            },
            if self.hugepages { ", huge pages" } else { "" }
        )
    }
}

fn meminfo(key: &str) -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = m.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Where guest RAM starts in tandem's address space: a multiple of a huge page (2 MiB on
/// x86_64 and on aarch64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

fn map(size: usize, hugepages: bool) -> Result<MmapRegion, VmError> {
    if !hugepages {
        return map_thp_aligned(size);
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_HUGETLB;
    MmapRegion::build(None, size, libc::PROT_READ | libc::PROT_WRITE, flags)
        .map_err(|_| hugepage_shortage(size as u64))
}

/// Anonymous guest RAM that starts on a huge-page boundary and asks for transparent huge pages,
/// as QEMU and Cloud Hypervisor map it. KVM maps a guest page as a 2 MiB page only where the
/// guest's physical address and tandem's address agree modulo 2 MiB; a mapping the kernel
/// placed anywhere (Linux before 6.7 does not align large anonymous mappings) left every guest
/// page a 4 KiB one, and booting Linux took 21,000 nested page faults instead of 50.
///
/// The mapping stays for the life of the process: a VM process ends with its VM.
fn map_thp_aligned(size: usize) -> Result<MmapRegion, VmError> {
    let page = page_size();
    let reserve = size
        .checked_add(HUGE_PAGE + page)
        .filter(|_| size > 0 && size.is_multiple_of(page))
        .ok_or_else(|| VmError::Memory(format!("{size} bytes of guest RAM cannot be mapped")))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping at an address the kernel picks; nothing refers to it yet.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(VmError::Memory(io::Error::last_os_error().to_string()));
    }
    let base = base as usize;
    let start = (base + page).next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - base, base + reserve - (start + size));
    // The head [base, start) stays as an inaccessible guard of at least a page. Unmapped, it
    // would let the kernel place the next mapping (a 2 MiB thread stack) to end exactly at
    // `start`, 2 MiB-aligned, where a host with THP `always` backs it with a whole huge page.
    // SAFETY: the head and the tail [start + size, base + reserve) are page-aligned parts of the
    // mapping just made, outside the range kept; nothing refers to them.
    unsafe {
        libc::mprotect(base as *mut libc::c_void, head, libc::PROT_NONE);
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: [start, start + size) is the part of the mapping kept. A kernel without
    // transparent huge pages refuses the advice, and the memory works as it is.
    unsafe { libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
    // SAFETY: [start, start + size) is a readable and writable mapping of this process that
    // nothing unmaps (see above), page-aligned.
    unsafe { MmapRegion::build_raw(start as *mut u8, size, prot, flags) }
        .map_err(|e| VmError::Memory(e.to_string()))
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// The error for `bytes` of guest memory that the reserved huge pages cannot back.
fn hugepage_shortage(bytes: u64) -> VmError {
    let page_kib = meminfo("Hugepagesize:").unwrap_or(2048);
    PlacementError::HugePages {
        need: (bytes >> 10).div_ceil(page_kib),
        free: meminfo("HugePages_Free:").unwrap_or(0),
        page_kib,
    }
    .into()
}

/// Allocates guest RAM as the placement says, registers it with KVM, and locks it when asked.
pub fn create_memory(vm: &VmFd, size: u64, p: &Placement) -> Result<GuestMemoryMmap, VmError> {
    let mut regions = Vec::new();
    for (addr, len) in layout::ram_regions(size) {
        let region = map(len as usize, p.hugepages)?;
        if p.hugepages {
            // MAP_NORESERVE with huge pages fails only on first touch (SIGBUS): reserve them now.
            // SAFETY: the range is the mapping just made.
            let rc = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    len as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(hugepage_shortage(len));
            }
        }
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(addr))
                .ok_or_else(|| VmError::Memory("region overflows the address space".into()))?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| VmError::Memory(e.to_string()))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory(e.to_string()))?;
        if p.lock_memory {
            // mlock faults every page in and keeps it resident.
            // SAFETY: the range is a live mapping owned by `mem`.
            if unsafe { libc::mlock(host.cast(), region.len() as usize) } != 0 {
                let e = io::Error::last_os_error();
                let why = match e.raw_os_error() {
                    Some(libc::ENOMEM) | Some(libc::EPERM) => format!(
                        "{e}; raise the locked-memory limit (ulimit -l, LimitMEMLOCK=) or run as root"
                    ),
                    _ => e.to_string(),
                };
                return Err(PlacementError::Lock {
                    mib: size >> 20,
                    why,
                }
                .into());
            }
        }
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`. Every vCPU thread holds a clone of
        // `mem` (see `run`), so the mapping stays in place as long as any vCPU can enter the guest.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_ram_starts_on_a_huge_page_boundary_and_is_usable() {
        for size in [2 << 20, 64 << 20, (256 << 20) + 4096] {
            let r = super::map(size, false).unwrap();
            assert_eq!(r.as_ptr() as usize % super::HUGE_PAGE, 0, "{size}");
            assert_eq!(r.size(), size);
            // SAFETY: the region is a writable mapping of `size` bytes.
            unsafe {
                r.as_ptr().write(1);
                r.as_ptr().add(size - 1).write(2);
                assert_eq!(r.as_ptr().add(size - 1).read(), 2);
            }
        }
        assert!(super::map_thp_aligned(0).is_err());
        assert!(super::map_thp_aligned(4095).is_err());
    }

    #[test]
    fn an_inaccessible_guard_lies_right_below_guest_ram() {
        let r = super::map(32 << 20, false).unwrap();
        let start = r.as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        // `lo-hi perms ...`: the mapping that ends where guest RAM starts.
        let below = maps.lines().find(|l| {
            l.split(['-', ' '])
                .nth(1)
                .and_then(|hi| usize::from_str_radix(hi, 16).ok())
                == Some(start)
        });
        let perms = below.and_then(|l| l.split_whitespace().nth(1));
        assert_eq!(perms, Some("---p"), "{below:?}");
    }

    use super::*;

    #[test]
    fn pin_lists_must_match_the_vcpus_and_the_allowed_cpus() {
        let p = Placement {
            pin: vec![0, 1],
            ..Default::default()
        };
        assert!(matches!(
            p.check(1),
            Err(PlacementError::PinCount {
                listed: 2,
                vcpus: 1
            })
        ));
        let p = Placement {
            pin: vec![100_000],
            ..Default::default()
        };
        assert!(matches!(p.check(1), Err(PlacementError::Cpu(100_000))));
        let first = *allowed_cpus().unwrap().iter().next().unwrap();
        let p = Placement {
            pin: vec![first],
            ..Default::default()
        };
        p.check(1).unwrap();
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let first = *allowed_cpus().unwrap().iter().next().unwrap();
        let p = Placement {
            pin: vec![first],
            ..Default::default()
        };
        let cpus = std::thread::spawn(move || {
            p.apply_to_vcpu(0).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(cpus.into_iter().collect::<Vec<_>>(), vec![first]);
    }

    #[test]
    fn realtime_vms_keep_housekeeping_off_their_cpus() {
        let all = allowed_cpus().unwrap();
        let first = *all.iter().next().unwrap();
        let p = Placement {
            pin: vec![first],
            realtime: true,
            ..Default::default()
        };
        let hk = p.housekeeping_cpus();
        assert!(!hk.contains(&first));
        assert_eq!(hk.len(), all.len() - 1);
        let given = Placement {
            housekeeping: vec![first],
            ..p
        };
        assert_eq!(given.housekeeping_cpus(), vec![first]);
    }

    #[test]
    fn the_summary_says_what_is_applied() {
        let p = Placement {
            pin: vec![2, 3],
            realtime: true,
            lock_memory: true,
            hugepages: true,
            housekeeping: vec![],
        };
        assert_eq!(
            p.describe(),
            "vCPUs on CPUs 2,3, SCHED_FIFO 40, memory locked, huge pages"
        );
    }
}
