//! The VM's device buses: `vm-device`'s `IoManager` behind the [`IoBus`] trait.

use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::exit::IoBus;

/// Port-I/O and MMIO buses of one VM.
#[derive(Default)]
pub struct DeviceBus {
    io: IoManager,
}

impl DeviceBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` at ports `base..base+len`.
    pub fn add_pio<D: MutDevicePio + Send + 'static>(
        &mut self,
        base: u16,
        len: u16,
        dev: D,
    ) -> Result<Arc<Mutex<D>>, vm_device::bus::Error> {
        let dev = Arc::new(Mutex::new(dev));
        self.io
            .register_pio(PioRange::new(PioAddress(base), len)?, dev.clone())?;
        Ok(dev)
    }

    /// Registers an already shared MMIO device at `base..base+len`.
    pub fn add_mmio_shared<D: MutDeviceMmio + Send + 'static>(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<D>>,
    ) -> Result<(), vm_device::bus::Error> {
        self.io
            .register_mmio(MmioRange::new(MmioAddress(base), len)?, dev)
    }
}

impl IoBus for DeviceBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        self.io.pio_read(PioAddress(port), data).is_ok()
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        self.io.pio_write(PioAddress(port), data).is_ok()
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.io.mmio_read(MmioAddress(addr), data).is_ok()
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.io.mmio_write(MmioAddress(addr), data).is_ok()
    }
}
