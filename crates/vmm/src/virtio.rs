//! Attaching virtio devices to a VM: MMIO window on the bus, irqfd for the interrupt, one
//! ioeventfd per queue, and the I/O thread that serves the queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use tandem_virtio::{Interrupt, Mem, MmioTransport, VirtioDevice, MMIO_WINDOW, NOTIFY_OFFSET};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use tandem_sandbox::{Sandbox, ThreadKind};

use crate::bus::DeviceBus;
use crate::error::VmError;
use crate::layout;

/// A virtio-mmio device's window and interrupt, for the firmware tables that announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Guest-physical base of its registers.
    pub addr: u64,
    /// Window length.
    pub len: u64,
    /// Its GSI (on x86: an IOAPIC pin), edge-triggered, active high.
    pub gsi: u32,
}

/// What the I/O thread serves.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The VM's virtio devices, before the I/O thread starts.
#[derive(Default)]
pub struct VirtioDevices {
    slots: Vec<VirtioSlot>,
    subscribers: Vec<Subscriber>,
}

impl VirtioDevices {
    /// Where the next device will sit, or an error when all slots are taken.
    pub fn next_slot(&self) -> Result<VirtioSlot, VmError> {
        let (addr, gsi) = layout::virtio_slot(self.slots.len())
            .ok_or(VmError::TooManyDevices(layout::VIRTIO_MAX_DEVICES))?;
        Ok(VirtioSlot {
            addr,
            len: MMIO_WINDOW,
            gsi,
        })
    }

    /// The slots taken so far, for the ACPI tables.
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    /// Puts `device` in the next slot: registers its window on `bus`, its interrupt as an irqfd
    /// and its queue notifications as ioeventfds.
    pub fn attach(
        &mut self,
        vm: &VmFd,
        bus: &mut DeviceBus,
        mem: &Mem,
        device: Box<dyn VirtioDevice>,
        name: &str,
    ) -> Result<(), VmError> {
        let slot = self.next_slot()?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(VmError::Device)?;
        vm.register_irqfd(&irqfd, slot.gsi)
            .map_err(VmError::kvm("KVM_IRQFD"))?;
        let transport = MmioTransport::new(device, mem.clone(), Interrupt::new(irqfd), name)
            .map_err(|e| VmError::Device(std::io::Error::other(e.to_string())))?;
        for (i, fd) in transport.notify_fds().iter().enumerate() {
            vm.register_ioevent(
                fd,
                &IoEventAddress::Mmio(slot.addr + NOTIFY_OFFSET),
                i as u32,
            )
            .map_err(VmError::kvm("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.add_mmio_shared(name, slot.addr, slot.len, transport.clone())?;
        tracing::info!("{name}: virtio-mmio at {:#x}, GSI {}", slot.addr, slot.gsi);
        self.slots.push(slot);
        self.subscribers.push(transport);
        Ok(())
    }

    /// Has the I/O thread serve `subscriber` too (a device on another transport).
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.subscribers.push(subscriber);
    }

    /// Starts the I/O thread that serves every device's queues; `None` when there are no
    /// devices.
    pub fn start(self, sandbox: Arc<Sandbox>) -> Result<Option<IoThread>, VmError> {
        if self.subscribers.is_empty() {
            return Ok(None);
        }
        let stop = Arc::new(Stopper {
            fd: EventFd::new(EFD_NONBLOCK).map_err(VmError::Device)?,
            flag: AtomicBool::new(false),
        });
        let thread_stop = stop.clone();
        let subscribers = self.subscribers;
        let handle = thread::Builder::new()
            .name("virtio-io".into())
            .spawn(move || io_loop(subscribers, thread_stop, &sandbox))
            .map_err(VmError::Device)?;
        Ok(Some(IoThread { stop, handle }))
    }
}

struct Stopper {
    fd: EventFd,
    flag: AtomicBool,
}

struct StopSubscriber(Arc<Stopper>);

impl MutEventSubscriber for StopSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.fd, EventSet::IN)) {
            tracing::error!("virtio I/O thread cannot watch its stop event: {e}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.fd.read();
        self.0.flag.store(true, Ordering::Release);
    }
}

fn io_loop(subscribers: Vec<Subscriber>, stop: Arc<Stopper>, sandbox: &Sandbox) {
    let mut em = match EventManager::<Subscriber>::new() {
        Ok(em) => em,
        Err(e) => {
            tracing::error!("virtio I/O thread: {e:?}");
            return;
        }
    };
    em.add_subscriber(Arc::new(Mutex::new(StopSubscriber(stop.clone()))));
    for s in subscribers {
        em.add_subscriber(s);
    }
    sandbox.apply_or_exit(ThreadKind::Io);
    while !stop.flag.load(Ordering::Acquire) {
        if let Err(e) = em.run() {
            tracing::error!("virtio I/O thread: {e:?}");
            break;
        }
    }
}

/// The running I/O thread.
pub struct IoThread {
    stop: Arc<Stopper>,
    handle: JoinHandle<()>,
}

impl IoThread {
    /// Stops the thread and waits for it.
    pub fn stop(self) {
        let _ = self.stop.fd.write(1);
        let _ = self.handle.join();
    }
}
