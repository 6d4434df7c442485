//! The virtio-pci transport (virtio 1.2 section 4.1, modern devices only): the device's
//! registers in BAR0, announced by vendor capabilities, and one MSI-X vector per queue plus one
//! for configuration changes, so an interrupt costs the guest no exit at all (no ISR read, no
//! acknowledgement) and a notification only an ioeventfd.
//!
//! BAR0 (32 KiB, 32-bit memory):
//!
//! | offset | structure |
//! | --- | --- |
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status (read clears) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue n at 0x3000 + 4n (KVM ioeventfds) |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending bits |

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tandem_pci::config::{Bar, BarKind, ConfigError, PciConfig, PciId};
use tandem_pci::msix::{MsiRouter, Msix, MsixVectors, Vector};
use tandem_pci::PciDevice;
use virtio_queue::QueueT;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::EventFd;

use crate::core::{Half, QueueField, VirtioCore};
use crate::device::{Cause, DeviceError, Interrupt, InterruptLine, VirtioDevice};
use crate::Mem;

/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
/// Offset of the notification area in BAR0; queue n's doorbell is at `NOTIFY + 4 n`.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' doorbells.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
/// "No vector" in the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Delivers a device's causes to the MSI-X vectors the driver chose.
struct MsixLine {
    vectors: Arc<MsixVectors>,
    queue_vectors: Arc<Vec<AtomicU16>>,
    config_vector: Arc<AtomicU16>,
}

impl InterruptLine for MsixLine {
    fn raise(&self, cause: Cause) {
        let v = match cause {
            Cause::Queue(q) => self
                .queue_vectors
                .get(q)
                .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
            Cause::Config => self.config_vector.load(Ordering::Acquire),
        };
        if v != NO_VECTOR {
            self.vectors.trigger(v);
        }
    }
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network controller
        2 => 0x01_80_00, // mass storage
        3 => 0x07_80_00, // communication
        _ => 0x00_ff_00,
    }
}

/// One virtio device on the PCI bus.
pub struct VirtioPci {
    core: VirtioCore,
    config: PciConfig,
    msix: Msix,
    queue_vectors: Arc<Vec<AtomicU16>>,
    config_vector: Arc<AtomicU16>,
}

impl VirtioPci {
    /// Vectors this transport needs for `device`: one per queue and one for configuration.
    pub fn vectors_needed(device: &dyn VirtioDevice) -> usize {
        device.queue_max_sizes().len() + 1
    }

    /// Wraps `device` with BAR0 at `bar0`; `vectors` (see [`VirtioPci::vectors_needed`]) are its
    /// MSI-X vectors, routed through `router`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        bar0: u64,
        vectors: Vec<Vector>,
        router: Arc<dyn MsiRouter>,
        name: impl Into<String>,
    ) -> Result<Self, DeviceError> {
        let cfg_err = |e: ConfigError| DeviceError::Activate(e.to_string());
        let kind = device.device_type();
        let mut config = PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1040 + kind as u16,
                class: class_of(kind),
                revision: 1,
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            },
            0,
        );
        config
            .add_bar(Bar {
                index: 0,
                kind: BarKind::Memory32,
                addr: bar0,
                size: BAR_SIZE,
            })
            .map_err(cfg_err)?;
        let queues = device.queue_max_sizes().len();
        let cap = |cfg_type: u8, offset: u64, length: u64| {
            let mut b = vec![16, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(length as u32).to_le_bytes());
            b
        };
        config
            .add_capability(CAP_VENDOR, &cap(CFG_COMMON, COMMON, 0x38), &[])
            .map_err(cfg_err)?;
        let mut notify = cap(
            CFG_NOTIFY,
            NOTIFY,
            u64::from(NOTIFY_MULTIPLIER) * queues as u64,
        );
        notify[0] = 20;
        notify.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config
            .add_capability(CAP_VENDOR, &notify, &[])
            .map_err(cfg_err)?;
        config
            .add_capability(CAP_VENDOR, &cap(CFG_ISR, ISR, 4), &[])
            .map_err(cfg_err)?;
        config
            .add_capability(CAP_VENDOR, &cap(CFG_DEVICE, DEVICE_CFG, 0x1000), &[])
            .map_err(cfg_err)?;
        let msix = Msix::new(
            &mut config,
            vectors,
            router,
            0,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
        )
        .map_err(cfg_err)?;
        let queue_vectors: Arc<Vec<AtomicU16>> =
            Arc::new((0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect());
        let config_vector = Arc::new(AtomicU16::new(NO_VECTOR));
        let line = MsixLine {
            vectors: msix.vectors(),
            queue_vectors: queue_vectors.clone(),
            config_vector: config_vector.clone(),
        };
        let interrupt = Interrupt::with_line(Arc::new(line));
        Ok(VirtioPci {
            core: VirtioCore::new(device, mem, interrupt, name)?,
            config,
            msix,
            queue_vectors,
            config_vector,
        })
    }

    /// The eventfd KVM signals when the guest rings queue `index`'s doorbell.
    pub fn notify_fds(&self) -> &[EventFd] {
        &self.core.notify
    }

    /// The device status (virtio `VIRTIO_CONFIG_S_*` bits).
    pub fn status(&self) -> u32 {
        self.core.status
    }

    /// Serves a notification of queue `index` (its eventfd became readable).
    pub fn handle_notify(&mut self, index: usize) {
        self.core.handle_notify(index);
    }

    fn vector_ok(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.vectors().len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn read_common(&mut self, offset: u64) -> u32 {
        let c = &mut self.core;
        let sel = c.queue_sel as usize;
        let q = c.queues.get(sel);
        match offset {
            0x00 => c.device_features_sel,
            0x04 => c.device_features_word(),
            0x08 => c.driver_features_sel,
            0x0c => match c.driver_features_sel {
                0 => c.driver_features as u32,
                1 => (c.driver_features >> 32) as u32,
                _ => 0,
            },
            0x10 => self.config_vector.load(Ordering::Acquire).into(),
            0x12 => c.queues.len() as u32,
            0x14 => c.status & 0xff,
            0x15 => c.config_generation & 0xff,
            0x16 => c.queue_sel,
            0x18 => q.map_or(0, |q| q.size().into()),
            0x1a => self
                .queue_vectors
                .get(sel)
                .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
                .into(),
            0x1c => q.map_or(0, |q| q.ready().into()),
            0x1e => sel as u32,
            0x20 => q.map_or(0, |q| q.desc_table() as u32),
            0x24 => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            0x28 => q.map_or(0, |q| q.avail_ring() as u32),
            0x2c => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            0x30 => q.map_or(0, |q| q.used_ring() as u32),
            0x34 => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, value: u32) {
        match offset {
            0x00 => self.core.device_features_sel = value,
            0x08 => self.core.driver_features_sel = value,
            0x0c => self.core.write_driver_features(value),
            0x10 => {
                let v = self.vector_ok(value as u16);
                self.config_vector.store(v, Ordering::Release);
            }
            0x14 => {
                self.core.write_status(value & 0xff);
                if value & 0xff == 0 {
                    self.config_vector.store(NO_VECTOR, Ordering::Release);
                    for v in self.queue_vectors.iter() {
                        v.store(NO_VECTOR, Ordering::Release);
                    }
                }
            }
            0x16 => self.core.queue_sel = value & 0xffff,
            0x18 => self.core.write_queue(QueueField::Size, value & 0xffff),
            0x1a => {
                let v = self.vector_ok(value as u16);
                if let Some(q) = self.queue_vectors.get(self.core.queue_sel as usize) {
                    q.store(v, Ordering::Release);
                }
            }
            0x1c => self.core.write_queue(QueueField::Ready, value & 0xffff),
            0x20 => self.core.write_queue(QueueField::Desc(Half::Low), value),
            0x24 => self.core.write_queue(QueueField::Desc(Half::High), value),
            0x28 => self.core.write_queue(QueueField::Driver(Half::Low), value),
            0x2c => self.core.write_queue(QueueField::Driver(Half::High), value),
            0x30 => self.core.write_queue(QueueField::Device(Half::Low), value),
            0x34 => self.core.write_queue(QueueField::Device(Half::High), value),
            _ => {
                tracing::debug!(device = %self.core.name, offset, "write to a read-only common register")
            }
        }
    }

    /// A guest read at `offset` in BAR0.
    pub fn read_bar(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..ISR if matches!(data.len(), 1 | 2 | 4) => {
                // Fields are read at their own offset and width (as drivers do).
                let field = self.read_common(offset);
                data.copy_from_slice(&field.to_le_bytes()[..data.len()]);
            }
            ISR..DEVICE_CFG => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = self.core.interrupt.take_status() as u8;
                }
            }
            DEVICE_CFG..NOTIFY => self.core.device.read_config(offset - DEVICE_CFG, data),
            MSIX_TABLE..MSIX_PBA => self.msix.read_table(offset - MSIX_TABLE, data),
            MSIX_PBA..BAR_SIZE => self.msix.read_pba(offset - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    /// A guest write at `offset` in BAR0.
    pub fn write_bar(&mut self, offset: u64, data: &[u8]) {
        let value = match data.len() {
            1 => u32::from(data[0]),
            2 => u32::from(u16::from_le_bytes([data[0], data[1]])),
            4 => u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            _ => {
                if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
                    self.msix.write_table(offset - MSIX_TABLE, data);
                }
                return;
            }
        };
        match offset {
            COMMON..ISR => self.write_common(offset, value),
            DEVICE_CFG..NOTIFY => {
                self.core.device.write_config(offset - DEVICE_CFG, data);
                self.core.config_generation = self.core.config_generation.wrapping_add(1);
            }
            NOTIFY..MSIX_TABLE => {
                // Reaches here only when KVM has no ioeventfd for it.
                self.core
                    .notify_register(((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as u32)
            }
            MSIX_TABLE..MSIX_PBA => self.msix.write_table(offset - MSIX_TABLE, data),
            _ => {}
        }
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, _offset: usize, _len: usize) {
        self.msix.config_written(&self.config);
    }
}

impl MutDeviceMmio for VirtioPci {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read_bar(offset, data);
    }
    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write_bar(offset, data);
    }
}

impl MutEventSubscriber for VirtioPci {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
    }
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.core.process_event(events);
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
