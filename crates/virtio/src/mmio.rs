//! The virtio-mmio transport (virtio 1.2 section 4.2, register layout version 2).

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Activation, DeviceError, Interrupt, VirtioDevice, INT_CONFIG};
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

/// Features the transport itself handles, offered on top of the device's.
const TRANSPORT_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Event data of host fds (queue notifications use the queue index).
const HOST_FD_DATA: u32 = 0x1_0000;

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Mem,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
    name: String,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is the line it raises, `name` names it in the log.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        interrupt: Interrupt,
        name: impl Into<String>,
    ) -> Result<Self, DeviceError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| DeviceError::Activate(e.to_string()))?);
            notify.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            notify,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
            name: name.into(),
        })
    }

    /// The eventfd KVM signals when the guest writes queue `index` to QueueNotify.
    pub fn notify_fds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device status register (virtio `VIRTIO_CONFIG_S_*` bits).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver has set DRIVER_OK and the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | TRANSPORT_FEATURES
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Puts the device in the failed state: it stops serving until the driver resets it.
    fn fail(&mut self, err: &DeviceError) {
        tracing::error!(device = %self.name, "virtio device failed: {err}");
        self.device.reset();
        self.activated = false;
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.trigger(INT_CONFIG);
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            tracing::debug!(device = %self.name, "reset by the driver");
            self.reset();
            return;
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!(device = %self.name, "the driver gave up on the device");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // Status bits are only ever added, in order (virtio 1.2, 3.1.1).
        if value & self.status != self.status & !VIRTIO_CONFIG_S_NEEDS_RESET {
            tracing::warn!(device = %self.name, old = self.status, new = value, "status bits cleared without a reset; ignored");
            return;
        }
        let added = value & !self.status;
        let order = [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ];
        for (i, bit) in order.iter().enumerate() {
            if added & bit != 0 && order[..i].iter().any(|b| value & b == 0) {
                tracing::warn!(device = %self.name, value, "status bit set out of order; ignored");
                return;
            }
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver the subset is not supported.
            self.status = value & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let extra = self.driver_features & !self.offered_features();
        if extra != 0 {
            tracing::warn!(device = %self.name, extra, "driver accepted features never offered");
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            tracing::warn!(device = %self.name, "legacy driver (no VIRTIO_F_VERSION_1) refused");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) {
                let err = DeviceError::bad_queue(i, "rings outside guest memory or misaligned");
                self.fail(&err);
                return;
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    self.fail(&DeviceError::bad_queue(i, e));
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(device = %self.name, features = self.driver_features, "activated");
                // Requests queued before DRIVER_OK (allowed by the spec) are served now.
                for i in 0..self.queues.len() {
                    self.notify_queue(i);
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    /// Serves a notification of queue `index` (its eventfd became readable).
    pub fn handle_notify(&mut self, index: usize) {
        if let Some(fd) = self.notify.get(index) {
            // Drain the counter; the event says only "look at the queue".
            let _ = fd.read();
            self.notify_queue(index);
        }
    }

    fn notify_queue(&mut self, index: usize) {
        if !self.activated {
            return;
        }
        if let Err(e) = self.device.queue_notify(index) {
            self.fail(&e);
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let name = &self.name;
        let locked = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            tracing::warn!(device = %name, "queue register written for a queue that does not exist");
            return;
        };
        // A queue's layout is fixed while it is ready or the device runs (virtio 1.2, 4.2.2.3).
        if (q.ready() || locked) && offset != REG_QUEUE_READY {
            tracing::warn!(device = %name, offset, "queue reconfigured while in use; ignored");
            return;
        }
        match offset {
            REG_QUEUE_NUM => q.set_size(value as u16),
            REG_QUEUE_READY => {
                if locked && value == 0 {
                    tracing::warn!(device = %name, "queue disabled while running; ignored");
                } else {
                    q.set_ready(value == 1)
                }
            }
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared-memory regions: length all ones means "none" (virtio 1.2, 4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(device = %self.name, offset, "read of a write-only or unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    tracing::warn!(device = %self.name, "features written after FEATURES_OK; ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {
                        if value != 0 {
                            tracing::warn!(device = %self.name, "unknown feature bits accepted");
                        }
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            REG_QUEUE_NOTIFY => {
                // Reaches here only when KVM has no ioeventfd for it: pass it on the same way.
                match self.notify.get(value as usize) {
                    Some(fd) => {
                        let _ = fd.write(1);
                    }
                    None => {
                        tracing::warn!(device = %self.name, value, "notify for a queue that does not exist")
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => {
                tracing::debug!(device = %self.name, offset, "write to a read-only or unknown register")
            }
        }
    }

    /// Handles a guest read at `offset` in the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = self.read_reg(offset);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            tracing::debug!(device = %self.name, offset, len = data.len(), "register read not 32-bit aligned");
            data.fill(0);
        }
    }

    /// Handles a guest write at `offset` in the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        } else {
            tracing::debug!(device = %self.name, offset, len = data.len(), "register write not 32-bit aligned");
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

impl MmioTransport {
    /// Lets the device serve its ready host descriptor `fd` (as the I/O thread does).
    pub fn serve_host_fd(&mut self, fd: RawFd) {
        if let Err(e) = self.device.host_event(fd) {
            if self.activated {
                self.fail(&e);
            }
        }
    }

    /// The device's host descriptors.
    pub fn host_fds(&self) -> Vec<RawFd> {
        self.device.host_fds()
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, fd) in self.notify.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                tracing::error!(device = %self.name, "cannot watch queue {i}: {e}");
            }
        }
        for (i, fd) in self.device.host_fds().into_iter().enumerate() {
            let ev = Events::with_data_raw(fd, HOST_FD_DATA + i as u32, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                tracing::error!(device = %self.name, "cannot watch host fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data >= HOST_FD_DATA {
            // Served even while the driver is not ready: host fds are level-triggered, and an
            // unserved one would spin the I/O thread.
            self.serve_host_fd(events.fd());
            return;
        }
        debug_assert!(self
            .notify
            .get(data as usize)
            .is_some_and(|fd| fd.as_raw_fd() == events.fd()));
        self.handle_notify(data as usize);
    }
}

#[cfg(test)]
mod tests;
