//! Entry points for tandem's fuzz targets (`fuzz/`, run with `cargo fuzz`), one per piece of code
//! that takes guest-controlled input. Each must return normally for any input: a panic is a bug.
//! The unit tests below also run them over pseudo-random inputs, so CI exercises them without
//! a fuzzer.
#![deny(missing_docs)]

use std::io;
use std::sync::Mutex;

use tandem_devices::acpi_pm::ACPI_PM_PORT;
use tandem_devices::i8042::{I8042_BASE, I8042_PORTS};
use tandem_devices::serial::{COM1_BASE, UART_PORTS};
use tandem_devices::{
    AcpiPmDevice, ConsoleWriter, EventFdTrigger, PanicRecord, SerialDevice, I8042,
};
use tandem_vmm::bus::DeviceBus;
use tandem_vmm::exit::{handle_exit, IoBus};
use tandem_vmm::hypervisor::VmExit;

/// The guest's console output: bytes into the panic-detecting console writer.
pub fn console(data: &[u8]) {
    let evt = EventFdTrigger::new().expect("eventfd");
    let mut w =
        ConsoleWriter::new(Box::new(io::sink()), PanicRecord::default()).notify_panic_end(evt);
    // Split where the input says, to vary write boundaries.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let _ = io::Write::write_all(&mut w, &data[..split]);
    let _ = io::Write::write_all(&mut w, &data[split..]);
}

/// The legacy platform devices as a guest drives them: a sequence of port accesses (any port,
/// size and value) through exit handling, interleaved with host input to the UART.
pub fn platform_pio(data: &[u8]) {
    let trig = || EventFdTrigger::new().expect("eventfd");
    let mut bus = DeviceBus::new();
    let serial = bus
        .add_pio(
            COM1_BASE,
            UART_PORTS,
            SerialDevice::new(
                trig(),
                ConsoleWriter::new(Box::new(io::sink()), PanicRecord::default()),
            ),
        )
        .expect("serial");
    bus.add_pio(I8042_BASE, I8042_PORTS, I8042::new(trig()))
        .expect("i8042");
    bus.add_pio(ACPI_PM_PORT, 1, AcpiPmDevice::new(trig(), trig()))
        .expect("acpi");
    let bus: &dyn IoBus = &bus;
    let serial: &Mutex<SerialDevice> = &serial;
    let mut rest = data;
    // Each op: [kind, port_lo, len, value...]; ports are folded onto the devices' ranges half
    // of the time so the fuzzer reaches them.
    while let [kind, port_lo, len, tail @ ..] = rest {
        let base = match kind & 0x3 {
            0 => COM1_BASE,
            1 => I8042_BASE,
            2 => ACPI_PM_PORT,
            _ => u16::from(*port_lo) << 8,
        };
        let port = base.wrapping_add(u16::from(*port_lo & 0x7));
        let len = usize::from(*len % 9).min(tail.len());
        let (value, next) = tail.split_at(len);
        let mut buf = value.to_vec();
        match (kind >> 2) & 0x3 {
            0 => {
                handle_exit(VmExit::IoIn(port, &mut buf), bus);
            }
            1 => {
                handle_exit(VmExit::IoOut(port, &buf), bus);
            }
            2 => {
                if let Ok(mut s) = serial.lock() {
                    let _ = s.enqueue_input(value);
                }
            }
            _ => {
                handle_exit(VmExit::MmioWrite(u64::from(port) << 12, &buf), bus);
            }
        }
        rest = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random inputs, no dependency.
    fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (0..count).map(move |_| {
            let len = (next() as usize) % max_len;
            (0..len).map(|_| next() as u8).collect()
        })
    }

    #[test]
    fn console_takes_any_bytes() {
        for data in inputs(1, 2000, 600) {
            console(&data);
        }
        console(b"\0Kernel panic - not syncing: x\n---[ end Kernel panic - not syncing: x ]---\n");
    }

    #[test]
    fn platform_devices_take_any_port_access_sequence() {
        for data in inputs(2, 3000, 400) {
            platform_pio(&data);
        }
    }
}
