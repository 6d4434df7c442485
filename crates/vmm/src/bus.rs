//! The VM's device buses: `vm-device`'s `IoManager` behind the [`IoBus`] trait, counting the
//! exits each device handles (one relaxed atomic add per exit: no lock on the vCPU path beyond
//! the device's own).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{
    MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset, PioRange,
};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio, MutDeviceMmio, MutDevicePio};

use crate::exit::IoBus;
use crate::stats::DeviceExits;

/// The user-space exits one device (or nobody) handled.
#[derive(Debug, Default)]
pub struct ExitCounter {
    name: String,
    space: &'static str,
    base: u64,
    len: u64,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl ExitCounter {
    fn new(name: &str, space: &'static str, base: u64, len: u64) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            space,
            base,
            len,
            ..Default::default()
        })
    }

    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn sample(&self) -> DeviceExits {
        DeviceExits {
            name: self.name.clone(),
            space: self.space.into(),
            base: self.base,
            len: self.len,
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }
}

/// A device on the bus with its counter.
struct Counted<T: ?Sized> {
    counter: Arc<ExitCounter>,
    dev: Arc<T>,
}

impl<T: DevicePio + ?Sized> DevicePio for Counted<T> {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.counter.read();
        self.dev.pio_read(base, offset, data)
    }
    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.counter.write();
        self.dev.pio_write(base, offset, data)
    }
}

impl<T: DeviceMmio + ?Sized> DeviceMmio for Counted<T> {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.counter.read();
        self.dev.mmio_read(base, offset, data)
    }
    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.counter.write();
        self.dev.mmio_write(base, offset, data)
    }
}

/// Port-I/O and MMIO buses of one VM.
pub struct DeviceBus {
    io: IoManager,
    counters: Vec<Arc<ExitCounter>>,
    unclaimed: Arc<ExitCounter>,
}

impl Default for DeviceBus {
    fn default() -> Self {
        Self {
            io: IoManager::default(),
            counters: Vec::new(),
            unclaimed: ExitCounter::new("unclaimed", "any", 0, 0),
        }
    }
}

impl DeviceBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev`, named `name` in the exit counts, at ports `base..base+len`.
    pub fn add_pio<D: MutDevicePio + Send + 'static>(
        &mut self,
        name: &str,
        base: u16,
        len: u16,
        dev: D,
    ) -> Result<Arc<Mutex<D>>, vm_device::bus::Error> {
        let dev = Arc::new(Mutex::new(dev));
        let counter = ExitCounter::new(name, "pio", base.into(), len.into());
        let counted = Counted {
            counter: counter.clone(),
            dev: dev.clone(),
        };
        self.io
            .register_pio(PioRange::new(PioAddress(base), len)?, Arc::new(counted))?;
        self.counters.push(counter);
        Ok(dev)
    }

    /// Registers an already shared MMIO device, named `name` in the exit counts, at
    /// `base..base+len`.
    pub fn add_mmio_shared<D: MutDeviceMmio + Send + 'static>(
        &mut self,
        name: &str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<D>>,
    ) -> Result<(), vm_device::bus::Error> {
        let counter = ExitCounter::new(name, "mmio", base, len);
        let counted = Counted {
            counter: counter.clone(),
            dev,
        };
        self.io
            .register_mmio(MmioRange::new(MmioAddress(base), len)?, Arc::new(counted))?;
        self.counters.push(counter);
        Ok(())
    }

    /// The user-space exits each device handled so far, in registration order, then the
    /// accesses no device claimed.
    pub fn exit_counts(&self) -> Vec<DeviceExits> {
        self.counters
            .iter()
            .chain(std::iter::once(&self.unclaimed))
            .map(|c| c.sample())
            .collect()
    }

    fn count_unclaimed(&self, ok: bool, write: bool) -> bool {
        if !ok {
            if write {
                self.unclaimed.write();
            } else {
                self.unclaimed.read();
            }
        }
        ok
    }
}

impl IoBus for DeviceBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let ok = self.io.pio_read(PioAddress(port), data).is_ok();
        self.count_unclaimed(ok, false)
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let ok = self.io.pio_write(PioAddress(port), data).is_ok();
        self.count_unclaimed(ok, true)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let ok = self.io.mmio_read(MmioAddress(addr), data).is_ok();
        self.count_unclaimed(ok, false)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let ok = self.io.mmio_write(MmioAddress(addr), data).is_ok();
        self.count_unclaimed(ok, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Port(u8);
    impl MutDevicePio for Port {
        fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, d: &[u8]) {
            self.0 = d[0];
        }
    }
    impl MutDeviceMmio for Port {
        fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn mmio_write(&mut self, _: MmioAddress, _: MmioAddressOffset, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn each_device_counts_the_exits_it_handles_and_strays_count_as_unclaimed() {
        let mut bus = DeviceBus::new();
        let serial = bus.add_pio("serial", 0x3f8, 8, Port::default()).unwrap();
        bus.add_pio("pm", 0x600, 1, Port::default()).unwrap();
        bus.add_mmio_shared("disk0", 0xd000_0000, 0x1000, Arc::new(Mutex::new(Port(0))))
            .unwrap();
        for b in b"hello" {
            assert!(bus.pio_write(0x3f8, &[*b]));
        }
        let mut d = [0u8; 1];
        assert!(bus.pio_read(0x3fd, &mut d));
        assert_eq!(d, [b'o']);
        assert_eq!(serial.lock().unwrap().0, b'o');
        assert!(bus.mmio_write(0xd000_0010, &[1, 0, 0, 0]));
        assert!(!bus.pio_write(0x80, &[0]));
        assert!(!bus.mmio_read(0xe000_0000, &mut d));
        let counts = bus.exit_counts();
        let by = |n: &str| counts.iter().find(|c| c.name == n).unwrap();
        assert_eq!((by("serial").reads, by("serial").writes), (1, 5));
        assert_eq!(
            (by("serial").space.as_str(), by("serial").base),
            ("pio", 0x3f8)
        );
        assert_eq!((by("pm").reads, by("pm").writes), (0, 0));
        assert_eq!((by("disk0").reads, by("disk0").writes), (0, 1));
        assert_eq!(by("disk0").space, "mmio");
        assert_eq!((by("unclaimed").reads, by("unclaimed").writes), (1, 1));
        assert_eq!(counts.last().unwrap().name, "unclaimed");
    }

    #[test]
    fn counts_from_several_vcpu_threads_all_land() {
        let mut bus = DeviceBus::new();
        bus.add_pio("serial", 0x3f8, 8, Port::default()).unwrap();
        let bus = Arc::new(bus);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        bus.pio_write(0x3f8, &[0]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(bus.exit_counts()[0].writes, 4000);
    }
}
