//! The virtio-mmio transport (virtio 1.2 section 4.2, register layout version 2).

use std::os::fd::RawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::EventFd;

use virtio_queue::QueueT;

use crate::core::{Half, QueueField, VirtioCore};
use crate::device::{DeviceError, Interrupt, VirtioDevice};
use crate::Mem;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID reported to the guest ("TDM\0").
pub const VENDOR_ID: u32 = 0x004d_4454;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    core: VirtioCore,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is the line it raises, `name` names it in the log.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        interrupt: Interrupt,
        name: impl Into<String>,
    ) -> Result<Self, DeviceError> {
        Ok(Self {
            core: VirtioCore::new(device, mem, interrupt, name)?,
        })
    }

    /// The eventfd KVM signals when the guest writes queue `index` to QueueNotify.
    pub fn notify_fds(&self) -> &[EventFd] {
        &self.core.notify
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Interrupt {
        &self.core.interrupt
    }

    /// The device status register (virtio `VIRTIO_CONFIG_S_*` bits).
    pub fn status(&self) -> u32 {
        self.core.status
    }

    /// Whether the driver has set DRIVER_OK and the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.core.activated
    }

    /// Serves a notification of queue `index` (its eventfd became readable).
    pub fn handle_notify(&mut self, index: usize) {
        self.core.handle_notify(index);
    }

    /// Lets the device serve its ready host descriptor `fd` (as the I/O thread does).
    pub fn serve_host_fd(&mut self, fd: RawFd) {
        self.core.serve_host_fd(fd);
    }

    /// The device's host descriptors.
    pub fn host_fds(&self) -> Vec<RawFd> {
        self.core.device.host_fds()
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let c = &mut self.core;
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => c.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => c.device_features_word(),
            REG_QUEUE_NUM_MAX => c.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => c.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => c.interrupt.status(),
            REG_STATUS => c.status,
            // No shared-memory regions: length all ones means "none" (virtio 1.2, 4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => c.config_generation,
            _ => {
                tracing::debug!(device = %c.name, offset, "read of a write-only or unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let c = &mut self.core;
        match offset {
            REG_DEVICE_FEATURES_SEL => c.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => c.driver_features_sel = value,
            REG_DRIVER_FEATURES => c.write_driver_features(value),
            REG_QUEUE_SEL => c.queue_sel = value,
            REG_QUEUE_NUM => c.write_queue(QueueField::Size, value),
            REG_QUEUE_READY => c.write_queue(QueueField::Ready, value),
            REG_QUEUE_DESC_LOW => c.write_queue(QueueField::Desc(Half::Low), value),
            REG_QUEUE_DESC_HIGH => c.write_queue(QueueField::Desc(Half::High), value),
            REG_QUEUE_DRIVER_LOW => c.write_queue(QueueField::Driver(Half::Low), value),
            REG_QUEUE_DRIVER_HIGH => c.write_queue(QueueField::Driver(Half::High), value),
            REG_QUEUE_DEVICE_LOW => c.write_queue(QueueField::Device(Half::Low), value),
            REG_QUEUE_DEVICE_HIGH => c.write_queue(QueueField::Device(Half::High), value),
            REG_QUEUE_NOTIFY => c.notify_register(value),
            REG_INTERRUPT_ACK => c.interrupt.ack(value),
            REG_STATUS => c.write_status(value),
            REG_SHM_SEL => {}
            _ => {
                tracing::debug!(device = %c.name, offset, "write to a read-only or unknown register")
            }
        }
    }

    /// Handles a guest read at `offset` in the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.core.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = self.read_reg(offset);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            tracing::debug!(device = %self.core.name, offset, len = data.len(), "register read not 32-bit aligned");
            data.fill(0);
        }
    }

    /// Handles a guest write at `offset` in the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.core.device.write_config(offset - CONFIG_SPACE, data);
            self.core.config_generation = self.core.config_generation.wrapping_add(1);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        } else {
            tracing::debug!(device = %self.core.name, offset, len = data.len(), "register write not 32-bit aligned");
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }
    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.core.process_event(events);
    }
}

#[cfg(test)]
mod tests;
