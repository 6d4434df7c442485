//! virtio-console: a second console for the guest (`/dev/hvc0`), next to the 8250 serial
//! (virtio 1.2, section 5.3). One port, no multiport; what the guest writes goes to a host sink,
//! and host input pushed into a [`ConsoleInput`] fills the guest's receive buffers.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{next_chain, Activation, DeviceError, Interrupt, VirtioDevice};
use crate::Mem;

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 64;
const RX: usize = 0;
const TX: usize = 1;
/// Most bytes taken from one transmit buffer.
const MAX_CHUNK: usize = 64 << 10;
/// Host input held for the guest; a producer is told how much fit and keeps the rest.
pub const INPUT_CAPACITY: usize = 4096;

/// Host input for the console: bytes pushed here reach the guest as its receive buffers allow.
/// Cloned handles share one bounded buffer.
#[derive(Clone)]
pub struct ConsoleInput {
    buf: Arc<Mutex<VecDeque<u8>>>,
    wake: Arc<EventFd>,
}

impl ConsoleInput {
    /// An empty input.
    pub fn new() -> std::io::Result<Self> {
        Ok(ConsoleInput {
            buf: Arc::default(),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Queues what fits of `bytes` (up to [`INPUT_CAPACITY`] held); returns how many were taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let Ok(mut buf) = self.buf.lock() else {
            return 0;
        };
        let n = bytes.len().min(INPUT_CAPACITY.saturating_sub(buf.len()));
        buf.extend(&bytes[..n]);
        drop(buf);
        if n > 0 {
            if let Err(e) = self.wake.write(1) {
                tracing::warn!("virtio-console: cannot wake the device: {e}");
            }
        }
        n
    }
}

struct Active {
    mem: Mem,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// A virtio console whose output goes to `sink`, with optional host input.
pub struct Console {
    sink: Box<dyn Write + Send>,
    input: Option<ConsoleInput>,
    active: Option<Active>,
}

impl Console {
    /// A console writing to `sink`, with no input.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Console {
            sink,
            input: None,
            active: None,
        }
    }

    /// A console writing to `sink` and reading what is pushed into `input`.
    pub fn with_input(sink: Box<dyn Write + Send>, input: ConsoleInput) -> Self {
        Console {
            sink,
            input: Some(input),
            active: None,
        }
    }

    /// Moves held input into the guest's receive buffers.
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        let (Some(a), Some(input)) = (self.active.as_mut(), self.input.as_ref()) else {
            return Ok(());
        };
        if !a.rx.ready() {
            return Ok(());
        }
        let Ok(mut held) = input.buf.lock() else {
            return Ok(());
        };
        let bad = |e: virtio_queue::Error| DeviceError::bad_queue(RX, e);
        let mut used = false;
        while !held.is_empty() {
            let Some(chain) = next_chain(&mut a.rx, &a.mem, RX)? else {
                break;
            };
            let head = chain.head_index();
            let mut w = chain
                .writer(&a.mem)
                .map_err(|e| DeviceError::bad_queue(RX, e))?;
            let n = w.available_bytes().min(held.len());
            let (front, back) = held.as_slices();
            let first = n.min(front.len());
            w.write_all(&front[..first])
                .and_then(|()| w.write_all(&back[..n - first]))
                .map_err(|e| DeviceError::bad_queue(RX, e))?;
            held.drain(..n);
            a.rx.add_used(&a.mem, head, n as u32).map_err(bad)?;
            used = true;
        }
        if used && a.rx.needs_notification(&a.mem).map_err(bad)? {
            a.interrupt.signal_used_queue(RX);
        }
        Ok(())
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
            a.interrupt.signal_used_queue(TX);
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
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(DeviceError::Activate("two queues expected".into()));
        };
        if !tx.ready() {
            return Err(DeviceError::Activate(
                "the transmit queue is not ready".into(),
            ));
        }
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
        });
        self.process_rx()
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_notify(&mut self, queue: usize) -> Result<(), DeviceError> {
        match queue {
            TX => self.process_tx(),
            _ => self.process_rx(),
        }
    }
    fn host_fds(&self) -> Vec<RawFd> {
        self.input.iter().map(|i| i.wake.as_raw_fd()).collect()
    }
    fn host_event(&mut self, _fd: RawFd) -> Result<(), DeviceError> {
        if let Some(input) = &self.input {
            // Consumes the readiness; what is held stays until there are buffers for it.
            let _ = input.wake.read();
        }
        self.process_rx()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Driver, DATA_BASE};
    use vm_memory::{Bytes, GuestAddress};

    fn driver(input: &ConsoleInput) -> Driver {
        let out: Box<dyn Write + Send> = Box::new(std::io::sink());
        let mut d = Driver::new(Box::new(Console::with_input(out, input.clone())));
        d.negotiate(1 << 32);
        d.setup_queue(RX, 8);
        d.setup_queue(TX, 8);
        d.driver_ok();
        d
    }

    fn read(d: &Driver, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        d.mem.read_slice(&mut b, GuestAddress(DATA_BASE)).unwrap();
        b
    }

    #[test]
    fn input_waits_for_a_receive_buffer_then_arrives_in_order() {
        let input = ConsoleInput::new().unwrap();
        let mut d = driver(&input);
        assert_eq!(input.push(b"hello "), 6);
        let fd = d.t.host_fds()[0];
        d.t.serve_host_fd(fd);
        assert!(
            d.take_used(RX).is_empty(),
            "no buffer yet: the input is held"
        );
        d.submit(RX, &[(DATA_BASE, 4, true)]);
        assert_eq!(d.take_used(RX), vec![(0, 4)]);
        assert_eq!(read(&d, 4), b"hell");
        input.push(b"world");
        d.t.serve_host_fd(fd);
        d.submit(RX, &[(DATA_BASE, 64, true)]);
        assert_eq!(d.take_used(RX), vec![(0, 7)]);
        assert_eq!(read(&d, 7), b"o world");
    }

    #[test]
    fn input_is_bounded() {
        let input = ConsoleInput::new().unwrap();
        assert_eq!(input.push(&vec![b'x'; INPUT_CAPACITY + 10]), INPUT_CAPACITY);
        assert_eq!(input.push(b"y"), 0, "full: the producer keeps the rest");
    }
}
