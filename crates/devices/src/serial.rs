//! The 16550A UART (vm-superio's model): on the port-I/O bus as COM1 (x86_64), or on the MMIO
//! bus with byte registers and no shift (aarch64, `ns16550a` in the device tree).

use std::io;

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::console::ConsoleWriter;
use crate::trigger::EventFdTrigger;

/// COM1's base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's legacy IRQ line.
pub const COM1_IRQ: u32 = 4;
/// Number of ports a UART decodes.
pub const UART_PORTS: u16 = 8;

/// A UART whose interrupt line is an eventfd (registered as an irqfd by the VMM).
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// Creates a UART raising `irq` and writing the guest's output to `out`.
    pub fn new(irq: EventFdTrigger, out: ConsoleWriter) -> Self {
        Self {
            uart: Serial::new(irq, out),
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(&bytes[..n])
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

fn offset_u8(offset: PioAddressOffset) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|o| u16::from(*o) < UART_PORTS)
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (offset_u8(offset), data.len()) {
            (Some(off), 1) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(off), [value]) = (offset_u8(offset), data) {
            if let Err(e) = self.uart.write(off, *value) {
                tracing::warn!("serial: write failed: {e:?}");
            }
        }
    }
}

impl MutDeviceMmio for SerialDevice {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match u16::try_from(offset) {
            Ok(o) => self.pio_read(PioAddress(0), o, data),
            Err(_) => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Ok(o) = u16::try_from(offset) {
            self.pio_write(PioAddress(0), o, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::PanicRecord;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_writes_reach_the_output_and_input_reaches_the_guest() {
        let out = Shared::default();
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleWriter::new(Box::new(out.clone()), PanicRecord::default()),
        );
        for b in b"hi" {
            dev.pio_write(PioAddress(COM1_BASE), 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Enable the "received data available" interrupt, then feed a byte.
        dev.pio_write(PioAddress(COM1_BASE), 1, &[1]);
        assert_eq!(dev.enqueue_input(b"k").unwrap(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut d = [0u8];
        dev.pio_read(PioAddress(COM1_BASE), 0, &mut d);
        assert_eq!(d[0], b'k');
    }

    #[test]
    fn bad_access_sizes_and_offsets_are_ignored() {
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(
            irq,
            ConsoleWriter::new(Box::new(io::sink()), PanicRecord::default()),
        );
        let mut d = [0u8; 4];
        dev.pio_read(PioAddress(COM1_BASE), 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        dev.pio_write(PioAddress(COM1_BASE), 9, &[1]);
        dev.pio_write(PioAddress(COM1_BASE), 0, &[]);
    }

    #[test]
    fn on_the_mmio_bus_registers_are_bytes_at_their_offsets() {
        let out = Shared::default();
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(
            irq,
            ConsoleWriter::new(Box::new(out.clone()), PanicRecord::default()),
        );
        let base = MmioAddress(0x0900_0000);
        dev.mmio_write(base, 0, b"A");
        assert_eq!(&*out.0.lock().unwrap(), b"A");
        // The line status register (offset 5) says the transmitter is empty.
        let mut lsr = [0u8];
        dev.mmio_read(base, 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Beyond the eight registers, or wider than a byte: all ones, writes dropped.
        let mut d = [0u8; 4];
        dev.mmio_read(base, 0x800, &mut d[..1]);
        assert_eq!(d[0], 0xff);
        dev.mmio_read(base, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        dev.mmio_write(base, 1 << 40, b"B");
        dev.mmio_write(base, 0x10, b"B");
        assert_eq!(&*out.0.lock().unwrap(), b"A");
    }
}
