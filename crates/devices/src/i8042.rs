//! The i8042 keyboard controller, kept for its CPU-reset line (guests reboot through it).

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;

use crate::trigger::EventFdTrigger;

/// First port of the controller (data port 0x60; the command port is 0x64).
pub const I8042_BASE: u16 = 0x60;
/// Ports decoded, 0x60..=0x64.
pub const I8042_PORTS: u16 = 5;

/// The i8042 on the port bus; a reset command triggers `reset_evt`.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// Creates the controller; the reset pulse writes to `reset_evt`.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset_evt),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        tracing::debug!("i8042: write {data:?} at offset {offset}");
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *value) {
                tracing::warn!("i8042: reset notification failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_signals_reset() {
        let evt = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.pio_write(PioAddress(I8042_BASE), 4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
