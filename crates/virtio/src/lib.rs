//! tandem's virtio devices on the virtio-mmio transport (virtio 1.2, "modern" register layout).
//!
//! A device is a [`VirtioDevice`] (what the device does with its queues) inside an
//! [`MmioTransport`] (the register model the guest driver talks to: feature negotiation, status,
//! queue setup, reset). The transport sits on the VM's MMIO bus as a `vm-device` `MutDeviceMmio`
//! and on the VMM's I/O thread as an `event-manager` subscriber: queue notifications arrive on
//! eventfds that KVM signals directly (ioeventfd), and interrupts leave through an irqfd, so a
//! request costs the guest no exit to tandem's user space beyond the notification itself.
//!
//! Nothing a guest puts in a queue is trusted: descriptor chains are walked by `virtio-queue`
//! (bounded length, no loops, addresses checked against guest memory), requests are parsed with
//! explicit bounds, and a device that sees a malformed ring logs why and enters a failed state
//! (`DEVICE_NEEDS_RESET`) instead of panicking.
#![deny(missing_docs)]

pub mod blk;
pub mod console;
pub mod core;
pub mod device;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rng;
pub mod testing;

pub use blk::{Block, BlockConfig, CacheMode};
pub use console::{Console, ConsoleInput};
pub use device::{DeviceError, Interrupt, VirtioDevice};
pub use mmio::MmioTransport;
pub use net::Net;
pub use pci::VirtioPci;
pub use rng::Rng;

/// Guest memory as every tandem device sees it.
pub type Mem = vm_memory::GuestMemoryMmap;

/// Size of one virtio-mmio device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Offset of the QueueNotify register, where KVM's ioeventfds listen.
pub const NOTIFY_OFFSET: u64 = 0x50;
