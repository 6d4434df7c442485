//! virtio-rng: entropy for the guest from the host's `getrandom` (virtio 1.2, section 5.4).
//!
//! Guests need entropy early (ssh host keys, TLS); without this device a guest without RDRAND
//! trust can block for a long time at boot.

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::QueueT;

use crate::device::{next_chain, Activation, DeviceError, SingleQueue, VirtioDevice};

/// The size of the one request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes given per request; a guest asking for more gets this much.
const MAX_PER_REQUEST: usize = 4096;

/// A virtio entropy device.
#[derive(Default)]
pub struct Rng {
    active: Option<SingleQueue>,
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    fn process(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let bad = |e: virtio_queue::Error| DeviceError::bad_queue(0, e);
        let mut buf = [0u8; MAX_PER_REQUEST];
        let mut used = false;
        while let Some(chain) = next_chain(&mut a.queue, &a.mem, 0)? {
            let head = chain.head_index();
            let mut w = chain
                .writer(&a.mem)
                .map_err(|e| DeviceError::bad_queue(0, e))?;
            let n = w.available_bytes().min(MAX_PER_REQUEST);
            fill_random(&mut buf[..n])?;
            w.write_all(&buf[..n])
                .map_err(|e| DeviceError::bad_queue(0, e))?;
            a.queue.add_used(&a.mem, head, n as u32).map_err(bad)?;
            used = true;
        }
        if used && a.queue.needs_notification(&a.mem).map_err(bad)? {
            a.interrupt.signal_used_queue(0);
        }
        Ok(())
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most rest.len() bytes into memory we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        self.active = Some(SingleQueue::take(a)?);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_notify(&mut self, _queue: usize) -> Result<(), DeviceError> {
        self.process()
    }
}
