//! Guest networking backends for tandem's virtio-net device.
//!
//! A backend moves Ethernet frames between the guest and the host. [`user::UserNet`] needs no
//! privilege: it terminates the guest's TCP connections in a user-mode TCP/IP stack (smoltcp)
//! and relays them through ordinary host sockets (NAT), answers DHCP, forwards DNS to the host's
//! resolver, relays UDP, and maps host ports to guest ports ([`Forward`]). [`tap::Tap`] puts the
//! guest's frames on a host TAP interface, and [`portmap::PortMap`] maps host ports to the guest's
//! address on it with nftables DNAT rules.
#![deny(missing_docs)]

pub mod forward;
pub mod portmap;
pub mod tap;
pub mod user;

use std::os::fd::RawFd;

pub use forward::{Forward, ForwardError, Protocol};

/// Moves Ethernet frames between the guest and the host.
pub trait NetBackend: Send {
    /// A frame the guest sent (without the virtio-net header). It may only be queued: the
    /// device calls [`NetBackend::flush`] after each batch.
    fn send(&mut self, frame: &[u8]);
    /// Acts on the frames sent since the last flush.
    fn flush(&mut self) {}
    /// The MTU the guest should use (the device announces it).
    fn mtu(&self) -> u16 {
        1500
    }
    /// The next frame for the guest, if one is ready. The device calls this only when it has a
    /// receive buffer for it.
    fn recv(&mut self) -> Option<Vec<u8>>;
    /// The descriptor to wait on: readable when the backend has host work to do.
    fn fd(&self) -> RawFd;
    /// Does the host work that made [`NetBackend::fd`] readable (and anything that is due).
    fn process(&mut self);
}
