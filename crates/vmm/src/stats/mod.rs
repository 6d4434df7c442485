//! Exit accounting: what takes each vCPU out of guest mode, from KVM's own statistics
//! ([`kvm`]), and which of tandem's devices handled the exits that reached user space
//! ([`crate::bus::DeviceBus`]), served as one JSON [`Snapshot`] per connection on a Unix socket
//! ([`server`]).

pub mod kvm;
pub mod server;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bus::DeviceBus;
use kvm::{KvmStats, KvmValues};

/// The snapshot format's version (a field added keeps it; one renamed or removed bumps it).
pub const FORMAT_VERSION: u32 = 1;

/// One sample of a VM's exit accounting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Milliseconds since the VM was created (the clock of every rate).
    pub uptime_ms: u64,
    /// The VM process's ID (in its own PID namespace when jailed: then 1).
    pub pid: u32,
    /// Settings in force that affect exits (the VM fills it: placement, exit controls, ...).
    pub settings: BTreeMap<String, String>,
    /// Whether KVM's binary statistics could be read; when not, why (`kvm_error`), and the
    /// `kvm` maps below are empty.
    pub kvm_available: bool,
    /// Why KVM's statistics are missing, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_error: Option<String>,
    /// VM-wide KVM statistics (MMU, TLB flushes), by KVM's names.
    pub vm: BTreeMap<String, u64>,
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuStats>,
    /// User-space exits by the device that handled them; the last entry, `unclaimed`, counts
    /// accesses no device claimed.
    pub devices: Vec<DeviceExits>,
}

/// One vCPU's KVM statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    /// Its index.
    pub index: usize,
    /// Single-valued statistics by KVM's names (`exits`, `io_exits`, `halt_exits`,
    /// `halt_wakeup`, `halt_successful_poll`, `irq_injections`, ...).
    pub kvm: BTreeMap<String, u64>,
    /// Histograms by KVM's names (e.g. `halt_wait_hist`), bucket values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub histograms: BTreeMap<String, Vec<u64>>,
}

/// The user-space exits one device handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceExits {
    /// Its name (`serial`, `pci-config`, `disk0`, ...).
    pub name: String,
    /// `pio` or `mmio` (`any` for `unclaimed`).
    pub space: String,
    /// First port or address.
    pub base: u64,
    /// Ports or bytes.
    pub len: u64,
    /// Guest reads (port in, MMIO read).
    pub reads: u64,
    /// Guest writes (port out, MMIO write).
    pub writes: u64,
}

/// Gathers a [`Snapshot`] from the VM's stats descriptors and its bus. Built in steps as the VM
/// is: [`Collector::new`] with the VM, then each vCPU and the bus.
pub struct Collector {
    start: Instant,
    settings: BTreeMap<String, String>,
    vm: Result<KvmStats, String>,
    vcpus: Vec<(usize, Result<KvmStats, String>)>,
    bus: Option<Arc<DeviceBus>>,
}

impl Collector {
    /// Opens the VM's statistics (`vm` is its KVM descriptor). A kernel without them is not an
    /// error: the snapshot then says so and carries tandem's own counts only.
    pub fn new(vm: &impl AsRawFd, settings: BTreeMap<String, String>) -> Self {
        let vm = KvmStats::open(vm).map_err(|e| e.to_string());
        if let Err(e) = &vm {
            tracing::warn!("exit accounting without KVM's counts: {e}");
        }
        Self {
            start: Instant::now(),
            settings,
            vm,
            vcpus: Vec::new(),
            bus: None,
        }
    }

    /// Adds a setting shown in every snapshot.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.settings.insert(key.into(), value.into());
    }

    /// Opens the statistics of vCPU `index` (`fd` is its KVM descriptor).
    pub fn add_vcpu(&mut self, index: usize, fd: &impl AsRawFd) {
        let stats = if self.vm.is_ok() {
            KvmStats::open(fd).map_err(|e| e.to_string())
        } else {
            Err("not read".into())
        };
        self.vcpus.push((index, stats));
    }

    /// The bus whose per-device counts are reported.
    pub fn set_bus(&mut self, bus: Arc<DeviceBus>) {
        self.bus = Some(bus);
    }

    /// Takes a sample now. Never fails: a statistic that cannot be read is reported missing.
    pub fn snapshot(&self) -> Snapshot {
        let mut error = self.vm.as_ref().err().cloned();
        let mut read = |s: &Result<KvmStats, String>| -> KvmValues {
            match s.as_ref().map(|s| s.read()) {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    error.get_or_insert(e.to_string());
                    KvmValues::default()
                }
                Err(e) => {
                    error.get_or_insert(e.clone());
                    KvmValues::default()
                }
            }
        };
        let vm = read(&self.vm).counters;
        let vcpus = self
            .vcpus
            .iter()
            .map(|(index, s)| {
                let v = read(s);
                VcpuStats {
                    index: *index,
                    kvm: v.counters,
                    histograms: v.histograms,
                }
            })
            .collect();
        Snapshot {
            version: FORMAT_VERSION,
            uptime_ms: self.start.elapsed().as_millis() as u64,
            pid: std::process::id(),
            settings: self.settings.clone(),
            kvm_available: error.is_none(),
            kvm_error: error,
            vm,
            vcpus,
            devices: self
                .bus
                .as_ref()
                .map(|b| b.exit_counts())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_kvm_stats_the_snapshot_says_so_and_keeps_tandems_counts() {
        // A descriptor that is no KVM VM: KVM_GET_STATS_FD fails as on an old kernel.
        let not_kvm = std::fs::File::open("/dev/null").unwrap();
        let mut c = Collector::new(&not_kvm, BTreeMap::from([("a".into(), "b".into())]));
        c.add_vcpu(0, &not_kvm);
        let mut bus = DeviceBus::new();
        bus.add_pio(
            "serial",
            0x3f8,
            8,
            tandem_devices::I8042::new(tandem_devices::EventFdTrigger::new().unwrap()),
        )
        .unwrap();
        let bus = Arc::new(bus);
        crate::exit::IoBus::pio_write(bus.as_ref(), 0x3f8, &[1]);
        c.set_bus(bus);
        c.set("halt-poll", "off");
        let s = c.snapshot();
        assert!(!s.kvm_available);
        assert!(
            s.kvm_error.as_deref().unwrap().contains("KVM_GET_STATS_FD"),
            "{s:?}"
        );
        assert_eq!(s.vcpus.len(), 1);
        assert!(s.vcpus[0].kvm.is_empty());
        assert_eq!(s.devices[0].name, "serial");
        assert_eq!(s.devices[0].writes, 1);
        assert_eq!(s.settings["halt-poll"], "off");
        assert_eq!(s.pid, std::process::id());
        // The JSON form reads back as it was.
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"kvm_available\":false"), "{text}");
        assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), s);
    }
}
