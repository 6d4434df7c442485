//! The hardware-reduced ACPI sleep-control and reset register (one I/O port).
//!
//! The FADT points both `SLEEP_CONTROL_REG` and `RESET_REG` at [`ACPI_PM_PORT`]. Linux powers off by
//! writing `SLP_EN | (SLP_TYP << 2)` with the `_S5_` type from the DSDT, and resets by writing
//! [`ACPI_RESET_VALUE`].

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::trigger::EventFdTrigger;
use crate::PlatformEvent;

/// The port of the sleep-control/reset register.
pub const ACPI_PM_PORT: u16 = 0x3c0;
/// The `SLP_TYP` value the DSDT's `_S5_` object announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The value written to the reset register to reset.
pub const ACPI_RESET_VALUE: u8 = 0xfe;
const SLP_EN: u8 = 1 << 5;

/// Decodes one byte written to the register into the platform event it requests, if any.
pub fn decode(value: u8) -> Option<PlatformEvent> {
    if value == ACPI_RESET_VALUE {
        Some(PlatformEvent::Reset)
    } else if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
        Some(PlatformEvent::PowerOff)
    } else {
        None
    }
}

/// The register; power-off and reset requests are signalled on two eventfds.
pub struct AcpiPmDevice {
    poweroff: EventFdTrigger,
    reset: EventFdTrigger,
}

impl AcpiPmDevice {
    /// Creates the device signalling `poweroff` and `reset`.
    pub fn new(poweroff: EventFdTrigger, reset: EventFdTrigger) -> Self {
        Self { poweroff, reset }
    }
}

impl MutDevicePio for AcpiPmDevice {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // Sleep status: never asleep.
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        tracing::debug!("acpi: write {data:?} at offset {offset}");
        let (0, [value]) = (offset, data) else { return };
        let evt = match decode(*value) {
            Some(PlatformEvent::PowerOff) => &self.poweroff,
            Some(PlatformEvent::Reset) => &self.reset,
            None => return,
        };
        if let Err(e) = evt.write(1) {
            tracing::error!("acpi: cannot signal {:?}: {e}", decode(*value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_s5_write_is_poweroff_and_reset_value_is_reset() {
        assert_eq!(
            decode(SLP_EN | (S5_SLEEP_TYPE << 2)),
            Some(PlatformEvent::PowerOff)
        );
        assert_eq!(decode(ACPI_RESET_VALUE), Some(PlatformEvent::Reset));
        assert_eq!(
            decode(S5_SLEEP_TYPE << 2),
            None,
            "without SLP_EN nothing happens"
        );
        assert_eq!(decode(SLP_EN | (3 << 2)), None, "S3 is not supported");
    }

    #[test]
    fn writes_signal_the_right_eventfd() {
        let (p, r) = (
            EventFdTrigger::new().unwrap(),
            EventFdTrigger::new().unwrap(),
        );
        let mut dev = AcpiPmDevice::new(p.try_clone().unwrap(), r.try_clone().unwrap());
        dev.pio_write(
            PioAddress(ACPI_PM_PORT),
            0,
            &[SLP_EN | (S5_SLEEP_TYPE << 2)],
        );
        assert_eq!(p.read().unwrap(), 1);
        assert!(r.read().is_err(), "reset must not fire");
        dev.pio_write(PioAddress(ACPI_PM_PORT), 0, &[ACPI_RESET_VALUE]);
        assert_eq!(r.read().unwrap(), 1);
    }
}
