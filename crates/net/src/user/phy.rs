//! The smoltcp device: two bounded frame queues between the stack and the guest.

use std::collections::VecDeque;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Frames waiting for the guest (beyond this the stack is told to wait; other frames dropped).
pub const MAX_TO_GUEST: usize = 256;
/// Guest frames waiting for the stack (beyond this, dropped; TCP retransmits).
pub const MAX_TO_STACK: usize = 256;
/// Largest Ethernet frame: the MTU plus the 14-byte header.
pub const MAX_FRAME: usize = super::MTU as usize + 14;

/// Frames in flight between the guest and the stack.
#[derive(Default)]
pub struct Queues {
    to_stack: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    dropped: u64,
}

impl Queues {
    /// Queues a guest frame for the stack.
    pub fn push_to_stack(&mut self, frame: &[u8]) {
        if self.to_stack.len() >= MAX_TO_STACK || frame.len() > MAX_FRAME {
            self.drop_frame();
            return;
        }
        self.to_stack.push_back(frame.to_vec());
    }

    /// Queues a frame for the guest (built outside the stack).
    pub fn push_to_guest(&mut self, frame: Vec<u8>) {
        if self.to_guest.len() >= MAX_TO_GUEST {
            self.drop_frame();
            return;
        }
        self.to_guest.push_back(frame);
    }

    /// The next frame for the guest.
    pub fn pop_to_guest(&mut self) -> Option<Vec<u8>> {
        self.to_guest.pop_front()
    }

    /// Frames waiting: (for the stack, for the guest).
    #[cfg(test)]
    pub fn queued(&self) -> (usize, usize) {
        (self.to_stack.len(), self.to_guest.len())
    }

    /// Whether the stack may queue more for the guest.
    pub fn to_guest_has_room(&self) -> bool {
        self.to_guest.len() < MAX_TO_GUEST
    }

    fn drop_frame(&mut self) {
        self.dropped += 1;
        if self.dropped.is_power_of_two() {
            tracing::debug!("user network: {} frames dropped (queue full)", self.dropped);
        }
    }
}

/// A frame handed to the stack.
pub struct Rx(Vec<u8>);

/// Room for one frame to the guest.
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        if self.to_guest.len() >= MAX_TO_GUEST {
            return None;
        }
        let frame = self.to_stack.pop_front()?;
        Some((Rx(frame), Tx(&mut self.to_guest)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        (self.to_guest.len() < MAX_TO_GUEST).then_some(Tx(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MAX_FRAME;
        c
    }
}
