//! Entry points for tandem's fuzz targets (`fuzz/`, run with `cargo fuzz`), one per piece of code
//! that takes guest-controlled input. Each must return normally for any input: a panic is a bug.
//! The unit tests below also run them over pseudo-random inputs, so CI exercises them without
//! a fuzzer.
#![deny(missing_docs)]

mod ivshmem;
mod net;
mod pci;

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

pub use ivshmem::ivshmem;
pub use net::net_frames;
pub use pci::virtio_pci;

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
            "serial",
            COM1_BASE,
            UART_PORTS,
            SerialDevice::new(
                trig(),
                ConsoleWriter::new(Box::new(io::sink()), PanicRecord::default()),
            ),
        )
        .expect("serial");
    bus.add_pio("i8042", I8042_BASE, I8042_PORTS, I8042::new(trig()))
        .expect("i8042");
    bus.add_pio(
        "acpi-pm",
        ACPI_PM_PORT,
        1,
        AcpiPmDevice::new(trig(), trig()),
    )
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

/// A virtio device's queue as a hostile driver fills it: `data` is a sequence of 16-byte ops
/// that write descriptors (anywhere, any length, flags and next), offer heads, jump the avail
/// index, write registers (queue size after activation, status, reset), write request bytes and
/// notify. The device is virtio-blk over an in-memory disk when `data[0]` is even, else
/// virtio-rng or (`data[0] & 3 == 3`) virtio-console with host input waiting on its receive
/// queue. Covers virtio-queue's chain walking, the MMIO transport (device configuration
/// included), the blk request parser (its fast path too) and the console's receive and transmit
/// paths.
pub fn virtio_queue(data: &[u8]) {
    use tandem_virtio::testing::{Driver, DATA_BASE};
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let device: Box<dyn tandem_virtio::VirtioDevice> = if first & 1 == 0 {
        mem_disk(first & 2 != 0)
    } else if first & 2 == 0 {
        Box::new(tandem_virtio::Rng::new())
    } else {
        // The console's receive queue (0) gets host input through the guest's buffers.
        let input = tandem_virtio::ConsoleInput::new().expect("eventfd");
        input.push(&[b'i'; 3000]);
        Box::new(tandem_virtio::Console::with_input(
            Box::new(io::sink()),
            input,
        ))
    };
    let console = first & 3 == 3;
    let mut d = Driver::new(device);
    // VERSION_1, plus EVENT_IDX and INDIRECT_DESC when the input says so.
    let features = 1u64 << 32 | u64::from(first & 0x30) << 24;
    d.negotiate(features);
    let size = 1u16 << ((first >> 6).min(3) + 1);
    d.setup_queue(0, size);
    if console {
        d.setup_queue(1, size);
    }
    d.driver_ok();
    while rest.len() >= 16 {
        let (op, next) = rest.split_at(16);
        rest = next;
        let word = |i: usize| u32::from_le_bytes([op[i], op[i + 1], op[i + 2], op[i + 3]]);
        // The console's transmit queue (1) when the input says so; the other devices have one.
        let q = usize::from(console && op[13] & 1 == 1);
        // Buffers at the 16-byte slots that op 6 fills (so a request header is easy to place),
        // anywhere in the data area, or anywhere at all.
        let addr = match op[2] & 5 {
            0 => DATA_BASE + u64::from(op[3]) * 16,
            4 => DATA_BASE + u64::from(word(3) % (1 << 20)),
            _ => u64::from(word(3)) << ((op[2] >> 1) & 31),
        };
        // Small lengths (a 16-byte header, a 1-byte status) half the time.
        let len = if op[2] & 2 == 0 {
            word(7) % (1 << 18)
        } else {
            u32::from(op[7])
        };
        match op[0] % 8 {
            0 | 1 => d.put_desc(
                q,
                u16::from(op[1]) % (size * 2),
                addr,
                len,
                u16::from(op[11]) & 7,
                u16::from(op[12]) % (size * 2),
            ),
            2 => d.offer(q, u16::from(op[1]) % (size * 2)),
            3 => d.notify(q),
            4 if op[1] & 0x40 == 0 => d.write(u64::from(op[1] & 0x3f) * 4, word(4)),
            4 => {
                // Device configuration space, any width.
                let n = [1usize, 2, 4, 8][usize::from(op[2] & 3)];
                d.t.write(0x100 + u64::from(op[1] & 0x3f), &op[4..4 + n]);
            }
            5 => d.set_avail_idx(q, u16::from_le_bytes([op[1], op[2]])),
            6 => {
                let _ = vm_memory::Bytes::write_slice(
                    &d.mem,
                    &op[3..],
                    vm_memory::GuestAddress(DATA_BASE + u64::from(op[1]) * 16),
                );
            }
            _ => {
                let mut b = [0u8; 4];
                d.t.read(u64::from(op[1]) * 4, &mut b);
            }
        }
        d.take_used(0);
        if console {
            d.take_used(1);
        }
    }
}

/// virtio-blk over a 16 KiB in-memory disk, as the fuzz targets drive it.
pub(crate) fn mem_disk(readonly: bool) -> Box<dyn tandem_virtio::VirtioDevice> {
    use tandem_virtio::blk::{Block, BlockConfig, CacheMode, MemDisk};
    let cfg = BlockConfig {
        path: "fuzz".into(),
        readonly,
        cache: CacheMode::Writeback,
        serial: "fuzz".into(),
    };
    Box::new(Block::with_backend(
        Box::new(MemDisk(vec![0; 32 * 512])),
        &cfg,
    ))
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
    fn virtio_queues_take_any_driver_behaviour() {
        for data in inputs(3, 3000, 800) {
            virtio_queue(&data);
        }
    }

    #[test]
    fn the_pci_transport_takes_any_driver_behaviour() {
        for data in inputs(5, 3000, 800) {
            virtio_pci(&data);
        }
    }

    #[test]
    fn a_channel_function_takes_any_driver_behaviour() {
        for data in inputs(7, 3000, 600) {
            ivshmem(&data);
        }
        // The seed reaches MSI-X: enabled, the vector unmasked, masked, unmasked.
        let seed = include_bytes!("../../../fuzz/seeds/ivshmem/msix-enable-unmask-mask");
        assert_eq!(ivshmem(seed), 2);
    }

    #[test]
    fn the_network_takes_any_frames() {
        for data in inputs(4, 2000, 1600) {
            net_frames(&data);
        }
    }

    /// The open network and the host-side actions, with records whose headers are valid so that
    /// frames and actions alternate.
    #[test]
    fn the_open_network_takes_any_frames_and_host_actions() {
        for (i, mut data) in inputs(6, 1500, 1600).enumerate() {
            data.insert(0, (i as u8) & 0xfe);
            let mut at = 1;
            while at + 2 < data.len() {
                let len = (data[at + 1] as usize % 200).min(data.len() - at - 2);
                data[at] = (data[at] & 0xc0) | (len >> 8) as u8;
                data[at + 1] = len as u8;
                at += 2 + len;
            }
            net_frames(&data);
        }
    }

    #[test]
    fn platform_devices_take_any_port_access_sequence() {
        for data in inputs(2, 3000, 400) {
            platform_pio(&data);
        }
    }
}
