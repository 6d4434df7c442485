//! virtio-console: a second console for the guest (`/dev/hvc0`), next to the 8250 serial
//! (virtio 1.2, section 5.3). One port, no multiport; what the guest writes goes to a host sink.
//! Host input is not passed to it yet (the serial console has stdin).

use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};

use crate::device::{next_chain, Activation, DeviceError, Interrupt, VirtioDevice};
use crate::Mem;

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 64;
const TX: usize = 1;
/// Most bytes taken from one transmit buffer.
const MAX_CHUNK: usize = 64 << 10;

struct Active {
    mem: Mem,
    tx: Queue,
    interrupt: Interrupt,
}

/// A virtio console whose output goes to `sink`.
pub struct Console {
    sink: Box<dyn Write + Send>,
    active: Option<Active>,
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Console { sink, active: None }
    }

    fn process_tx(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let bad = |e: virtio_queue::Error| DeviceError::bad_queue(TX, e);
        let mut used = false;
        let mut buf = Vec::new();
        while let Some(chain) = next_chain(&mut a.tx, &a.mem, TX)? {
            let head = chain.head_index();
            let mut r = chain
                .reader(&a.mem)
                .map_err(|e| DeviceError::bad_queue(TX, e))?;
            let n = r.available_bytes().min(MAX_CHUNK);
            buf.resize(n, 0);
            r.read_exact(&mut buf)
                .map_err(|e| DeviceError::bad_queue(TX, e))?;
            if let Err(e) = self.sink.write_all(&buf).and_then(|()| self.sink.flush()) {
                tracing::warn!("virtio-console output lost: {e}");
            }
            a.tx.add_used(&a.mem, head, 0).map_err(bad)?;
            used = true;
        }
        if used && a.tx.needs_notification(&a.mem).map_err(bad)? {
            a.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        let mut queues = a.queues.into_iter();
        let (Some(_rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(DeviceError::Activate("two queues expected".into()));
        };
        if !tx.ready() {
            return Err(DeviceError::Activate(
                "the transmit queue is not ready".into(),
            ));
        }
        self.active = Some(Active {
            mem: a.mem,
            tx,
            interrupt: a.interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_notify(&mut self, queue: usize) -> Result<(), DeviceError> {
        if queue == TX {
            self.process_tx()?;
        }
        Ok(())
    }
}
