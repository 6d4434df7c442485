//! What every virtio device implements, and the interrupt line it signals.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::Mem;

/// InterruptStatus bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// Why a device stopped serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver put something in a queue that breaks the virtio rules.
    #[error("malformed queue {queue}: {why}")]
    BadQueue {
        /// The queue index.
        queue: usize,
        /// What was wrong.
        why: String,
    },
    /// The device was activated with a configuration it cannot serve.
    #[error("cannot activate: {0}")]
    Activate(String),
    /// A host resource failed (file, socket, eventfd).
    #[error("host I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl DeviceError {
    /// A malformed-queue error for queue `queue`.
    pub fn bad_queue(queue: usize, why: impl std::fmt::Display) -> Self {
        DeviceError::BadQueue {
            queue,
            why: why.to_string(),
        }
    }
}

/// Why a device interrupts the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Queue `n` has new used buffers.
    Queue(usize),
    /// The configuration or the device status changed.
    Config,
}

/// Where a transport delivers a device's interrupts: one irqfd (virtio-mmio), or an MSI-X
/// vector per queue (virtio-pci).
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt for `cause`.
    fn raise(&self, cause: Cause);
}

/// One irqfd for every cause: the guest learns the cause from InterruptStatus.
pub struct IrqfdLine(pub EventFd);

impl InterruptLine for IrqfdLine {
    fn raise(&self, _cause: Cause) {
        if let Err(e) = self.0.write(1) {
            tracing::warn!("virtio interrupt lost: {e}");
        }
    }
}

/// The device's interrupt line: the InterruptStatus register it shares with the transport, and
/// where the interrupt goes.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn InterruptLine>,
}

impl Interrupt {
    /// An interrupt line that raises `irqfd` for every cause.
    pub fn new(irqfd: EventFd) -> Self {
        Self::with_line(Arc::new(IrqfdLine(irqfd)))
    }

    /// An interrupt line that delivers through `line`.
    pub fn with_line(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            status: Arc::default(),
            line,
        }
    }

    /// Marks `cause` pending in InterruptStatus and raises the interrupt.
    pub fn raise(&self, cause: Cause) {
        let bit = match cause {
            Cause::Queue(_) => INT_VRING,
            Cause::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.line.raise(cause);
    }

    /// Signals that queue `queue` has new used buffers.
    pub fn signal_used_queue(&self, queue: usize) {
        self.raise(Cause::Queue(queue));
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Reads InterruptStatus and clears it (virtio-pci's ISR register).
    pub fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::AcqRel)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// What the transport hands a device when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: Mem,
    /// The queues, configured and validated by the transport (all of them, ready or not).
    pub queues: Vec<Queue>,
    /// The device's interrupt line.
    pub interrupt: Interrupt,
    /// Features the driver accepted.
    pub features: u64,
}

/// What a single-queue device serves once active.
pub struct SingleQueue {
    /// Guest memory.
    pub mem: Mem,
    /// The queue.
    pub queue: Queue,
    /// The device's interrupt line.
    pub interrupt: Interrupt,
}

impl SingleQueue {
    /// Takes the one queue of `a`, which must be ready.
    pub fn take(mut a: Activation) -> Result<Self, DeviceError> {
        let queue = a
            .queues
            .pop()
            .filter(|q| q.ready())
            .ok_or_else(|| DeviceError::Activate("the request queue is not ready".into()))?;
        Ok(SingleQueue {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        })
    }
}

/// A virtio device behind a transport.
///
/// The transport owns the register model; the device sees only activation, queue
/// notifications, its configuration space and reset. Errors put the device in the failed state
/// (the transport sets `DEVICE_NEEDS_RESET`), which only a reset by the driver clears.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 block, 4 entropy, ...).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "write to read-only virtio config ignored"
        );
    }
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError>;
    /// Stops serving and forgets the queues, ready for a new activation.
    fn reset(&mut self);
    /// The driver notified queue `queue`.
    fn queue_notify(&mut self, queue: usize) -> Result<(), DeviceError>;
    /// Host file descriptors the device wants to be woken for (besides queue notifications).
    fn host_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of [`VirtioDevice::host_fds`] is ready; called whether or not the device is active,
    /// and it must consume the readiness.
    fn host_event(&mut self, _fd: RawFd) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// The next available chain of `queue`, or an error when the driver's avail index is not
/// believable (more new entries than the queue holds). Use this rather than
/// `pop_descriptor_chain`, which hides that error and would have the device spin.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m Mem,
    index: usize,
) -> Result<Option<DescriptorChain<&'m Mem>>, DeviceError> {
    let mut iter = queue
        .iter(mem)
        .map_err(|e| DeviceError::bad_queue(index, e))?;
    Ok(iter.next())
}
