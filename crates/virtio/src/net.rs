//! virtio-net: Ethernet frames between the guest and a [`NetBackend`] (virtio 1.2, section 5.1).

use std::io::{Read, Write};
use std::os::fd::RawFd;

use tandem_net::NetBackend;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};

use crate::blk::read_config_bytes;
use crate::device::{next_chain, Activation, DeviceError, Interrupt, VirtioDevice};
use crate::Mem;

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: flags, gso type, header length, gso size, checksum start and
/// offset, number of buffers.
pub const HEADER_LEN: usize = 12;
/// Ethernet header plus a VLAN tag: a frame's size beyond its MTU.
const FRAME_OVERHEAD: usize = 14 + 4;
const RX: usize = 0;
const TX: usize = 1;
/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;

struct Active {
    mem: Mem,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// A virtio network device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    active: Option<Active>,
    /// A frame taken from the backend that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    tx_buf: Vec<u8>,
    mtu: u16,
}

impl Net {
    /// A device with MAC address `mac` on `backend`.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let mtu = backend.mtu();
        Net {
            backend,
            mac,
            active: None,
            pending: None,
            tx_buf: Vec::with_capacity(HEADER_LEN + usize::from(mtu) + FRAME_OVERHEAD),
            mtu,
        }
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn process_tx(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let bad = |e: virtio_queue::Error| DeviceError::bad_queue(TX, e);
        let mut used = false;
        loop {
            a.tx.disable_notification(&a.mem).map_err(bad)?;
            while let Some(chain) = next_chain(&mut a.tx, &a.mem, TX)? {
                let head = chain.head_index();
                let mut r = chain
                    .reader(&a.mem)
                    .map_err(|e| DeviceError::bad_queue(TX, e))?;
                let len = r.available_bytes();
                let max = HEADER_LEN + usize::from(self.mtu) + FRAME_OVERHEAD;
                if !(HEADER_LEN..=max).contains(&len) {
                    tracing::debug!(len, "virtio-net: transmit buffer of a bad size dropped");
                } else {
                    self.tx_buf.resize(len, 0);
                    r.read_exact(&mut self.tx_buf)
                        .map_err(|e| DeviceError::bad_queue(TX, e))?;
                    self.backend.send(&self.tx_buf[HEADER_LEN..]);
                }
                a.tx.add_used(&a.mem, head, 0).map_err(bad)?;
                used = true;
            }
            if !a.tx.enable_notification(&a.mem).map_err(bad)? {
                break;
            }
        }
        if used {
            self.backend.flush();
        }
        if used && a.tx.needs_notification(&a.mem).map_err(bad)? {
            a.interrupt.signal_used_queue(TX);
        }
        Ok(())
    }

    /// Hands the backend's frames to the guest while it has receive buffers.
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            // Not running: frames for the guest are dropped, as on an unplugged cable.
            while self.backend.recv().is_some() {}
            return Ok(());
        };
        let bad = |e: virtio_queue::Error| DeviceError::bad_queue(RX, e);
        let mut used = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.backend.recv() {
                    Some(f) => f,
                    None => break,
                },
            };
            let chain = match next_chain(&mut a.rx, &a.mem, RX)? {
                Some(c) => c,
                None => {
                    self.pending = Some(frame);
                    // Ask to be told when buffers come; re-check in case they just did.
                    if a.rx.enable_notification(&a.mem).map_err(bad)? {
                        continue;
                    }
                    break;
                }
            };
            let head = chain.head_index();
            let mut w = chain
                .writer(&a.mem)
                .map_err(|e| DeviceError::bad_queue(RX, e))?;
            let mut written = 0;
            if w.available_bytes() < HEADER_LEN + frame.len() {
                tracing::debug!("virtio-net: receive buffer too small; frame dropped");
            } else {
                let mut hdr = [0u8; HEADER_LEN];
                hdr[10] = 1; // num_buffers
                w.write_all(&hdr)
                    .and_then(|()| w.write_all(&frame))
                    .map_err(|e| DeviceError::bad_queue(RX, e))?;
                written = HEADER_LEN + frame.len();
            }
            a.rx.add_used(&a.mem, head, written as u32).map_err(bad)?;
            used = true;
        }
        if used && a.rx.needs_notification(&a.mem).map_err(bad)? {
            a.interrupt.signal_used_queue(RX);
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(DeviceError::Activate("two queues expected".into()));
        };
        if !rx.ready() || !tx.ready() {
            return Err(DeviceError::Activate("the queues are not ready".into()));
        }
        self.pending = None;
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.pending = None;
    }
    fn queue_notify(&mut self, queue: usize) -> Result<(), DeviceError> {
        if queue == TX {
            self.process_tx()?;
        }
        self.process_rx()
    }
    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.backend.fd()]
    }
    fn host_event(&mut self, _fd: RawFd) -> Result<(), DeviceError> {
        self.backend.process();
        self.process_rx()
    }
}
