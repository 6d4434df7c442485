//! The transport-independent half of a virtio transport (virtio 1.2, sections 2 and 3): feature
//! negotiation, the device status state machine, queue configuration, activation, reset and the
//! failed state. The MMIO and PCI transports decode their registers into calls on [`VirtioCore`].

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Activation, Cause, DeviceError, Interrupt, VirtioDevice};
use crate::Mem;

/// Features the transport itself handles, offered on top of the device's.
const TRANSPORT_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Event data of host fds (queue notifications use the queue index).
pub(crate) const HOST_FD_DATA: u32 = 0x1_0000;

/// A queue setting the driver writes while it configures the selected queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueField {
    /// Queue size.
    Size,
    /// Ready (1) or not (0).
    Ready,
    /// Descriptor table address, low or high half.
    Desc(Half),
    /// Driver (available) ring address.
    Driver(Half),
    /// Device (used) ring address.
    Device(Half),
}

/// Which 32-bit half of a 64-bit address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Bits 0-31.
    Low,
    /// Bits 32-63.
    High,
}

/// The state every virtio transport keeps for one device.
pub struct VirtioCore {
    pub(crate) device: Box<dyn VirtioDevice>,
    pub(crate) mem: Mem,
    pub(crate) interrupt: Interrupt,
    pub(crate) queues: Vec<Queue>,
    pub(crate) notify: Vec<EventFd>,
    pub(crate) queue_sel: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) status: u32,
    pub(crate) activated: bool,
    pub(crate) config_generation: u32,
    pub(crate) name: String,
}

impl VirtioCore {
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

    pub(crate) fn offered_features(&self) -> u64 {
        self.device.features() | TRANSPORT_FEATURES
    }

    /// The 32 bits of the offered features that DeviceFeaturesSel selects.
    pub(crate) fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        }
    }

    pub(crate) fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Puts the device in the failed state: it stops serving until the driver resets it.
    pub(crate) fn fail(&mut self, err: &DeviceError) {
        tracing::error!(device = %self.name, "virtio device failed: {err}");
        self.device.reset();
        self.activated = false;
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.raise(Cause::Config);
    }

    pub(crate) fn reset(&mut self) {
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

    pub(crate) fn write_status(&mut self, value: u32) {
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

    /// DriverFeatures: the 32 bits DriverFeaturesSel selects.
    pub(crate) fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            tracing::warn!(device = %self.name, "features written after FEATURES_OK; ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
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

    /// A setting of the selected queue.
    pub(crate) fn write_queue(&mut self, field: QueueField, value: u32) {
        let name = &self.name;
        let locked = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            tracing::warn!(device = %name, "queue register written for a queue that does not exist");
            return;
        };
        // A queue's layout is fixed while it is ready or the device runs (virtio 1.2, 4.2.2.3).
        if (q.ready() || locked) && field != QueueField::Ready {
            tracing::warn!(device = %name, ?field, "queue reconfigured while in use; ignored");
            return;
        }
        let lo = |h: Half| match h {
            Half::Low => (Some(value), None),
            Half::High => (None, Some(value)),
        };
        match field {
            QueueField::Size => q.set_size(value as u16),
            QueueField::Ready => {
                if locked && value == 0 {
                    tracing::warn!(device = %name, "queue disabled while running; ignored");
                } else {
                    q.set_ready(value == 1)
                }
            }
            QueueField::Desc(h) => {
                let (l, h) = lo(h);
                q.set_desc_table_address(l, h)
            }
            QueueField::Driver(h) => {
                let (l, h) = lo(h);
                q.set_avail_ring_address(l, h)
            }
            QueueField::Device(h) => {
                let (l, h) = lo(h);
                q.set_used_ring_address(l, h)
            }
        }
    }

    /// A notification written to the transport's register (when KVM has no ioeventfd for it):
    /// passed on the same way.
    pub(crate) fn notify_register(&mut self, queue: u32) {
        match self.notify.get(queue as usize) {
            Some(fd) => {
                let _ = fd.write(1);
            }
            None => {
                tracing::warn!(device = %self.name, queue, "notify for a queue that does not exist")
            }
        }
    }

    /// Lets the device serve its ready host descriptor `fd` (as the I/O thread does).
    pub fn serve_host_fd(&mut self, fd: std::os::fd::RawFd) {
        if let Err(e) = self.device.host_event(fd) {
            if self.activated {
                self.fail(&e);
            }
        }
    }

    /// Registers the queue eventfds and the device's host fds with the I/O thread.
    pub(crate) fn init_events(&mut self, ops: &mut EventOps) {
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

    /// Serves an event from the I/O thread: a queue notification or a host fd.
    pub(crate) fn process_event(&mut self, events: Events) {
        let data = events.data();
        if data >= HOST_FD_DATA {
            // Served even while the driver is not ready: host fds are level-triggered, and an
            // unserved one would spin the I/O thread.
            self.serve_host_fd(events.fd());
            return;
        }
        self.handle_notify(data as usize);
    }
}
