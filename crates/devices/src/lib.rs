//! tandem's emulated platform devices.
//!
//! Every device here sits on the port-I/O bus of `vm-device` (`MutDevicePio`), wrapped in a
//! `Mutex` and registered with an [`vm_device::device_manager::IoManager`] at its base port.
//! Devices never interpret guest data beyond their register model: anything a guest writes is
//! validated, and unknown offsets are logged and ignored.
#![deny(missing_docs)]

pub mod acpi_pm;
pub mod console;
pub mod i8042;
pub mod output;
pub mod serial;
pub mod trigger;

pub use acpi_pm::AcpiPmDevice;
pub use console::{ConsoleWriter, PanicRecord};
pub use i8042::I8042;
pub use serial::SerialDevice;
pub use trigger::EventFdTrigger;

/// Why the guest asked the platform to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042 pulse).
    Reset,
}
