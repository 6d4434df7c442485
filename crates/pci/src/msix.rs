//! MSI-X (PCI Local Bus 3.0, section 6.8.2): the capability, the vector table and the pending-bit
//! array, and delivery through one eventfd per vector that KVM turns into the message the guest
//! programmed (an irqfd on a GSI whose route tandem keeps in step with the table).
//!
//! The table is written by the guest on vCPU threads; vectors are triggered from the I/O thread.
//! Triggering needs no lock: masks and pending bits are atomics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConfigError, PciConfig};

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// The message a vector sends: what the guest wrote into its table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (the LAPIC's window and the destination).
    pub address: u64,
    /// Data (vector and delivery mode).
    pub data: u32,
}

/// Keeps the hypervisor's interrupt routes in step with the vectors: `gsi`, whose irqfd is the
/// vector's eventfd, must deliver `msg`.
pub trait MsiRouter: Send + Sync {
    /// Routes `gsi` to `msg`.
    fn route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String>;
}

/// One vector's delivery side.
pub struct Vector {
    /// The eventfd written to raise it (KVM's irqfd for `gsi`).
    pub eventfd: EventFd,
    /// The GSI the hypervisor routes to the vector's message.
    pub gsi: u32,
    masked: AtomicBool,
    pending: AtomicBool,
}

impl Vector {
    /// A vector raised through `eventfd`, which is the irqfd of `gsi`.
    pub fn new(eventfd: EventFd, gsi: u32) -> Self {
        Vector {
            eventfd,
            gsi,
            masked: AtomicBool::new(true),
            pending: AtomicBool::new(false),
        }
    }
}

/// The delivery side of a function's vectors, shared with whatever raises them.
pub struct MsixVectors {
    vectors: Vec<Vector>,
    enabled: AtomicBool,
    function_masked: AtomicBool,
}

impl MsixVectors {
    /// Raises vector `index`, or marks it pending while it is masked (or MSI-X is off).
    pub fn trigger(&self, index: u16) {
        let Some(v) = self.vectors.get(usize::from(index)) else {
            return;
        };
        let deliverable = self.enabled.load(Ordering::Acquire)
            && !self.function_masked.load(Ordering::Acquire)
            && !v.masked.load(Ordering::Acquire);
        if deliverable {
            if let Err(e) = v.eventfd.write(1) {
                tracing::warn!("MSI-X vector {index} lost: {e}");
            }
        } else {
            v.pending.store(true, Ordering::Release);
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Whether vector `index` would reach the guest now: MSI-X enabled, the function and the
    /// vector unmasked.
    pub fn deliverable(&self, index: u16) -> bool {
        self.active()
            && self
                .vectors
                .get(usize::from(index))
                .is_some_and(|v| !v.masked.load(Ordering::Acquire))
    }

    /// Whether the guest has enabled MSI-X (which turns INTx off, masked or not).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Whether MSI-X is enabled and not function-masked.
    pub fn active(&self) -> bool {
        self.enabled.load(Ordering::Acquire) && !self.function_masked.load(Ordering::Acquire)
    }
}

/// A function's MSI-X: capability, table and PBA.
pub struct Msix {
    vectors: Arc<MsixVectors>,
    table: Mutex<Vec<[u32; 4]>>,
    router: Arc<dyn MsiRouter>,
    cap: usize,
}

impl Msix {
    /// Adds the MSI-X capability to `config` for `vectors`, its table at `table_offset` and its
    /// PBA at `pba_offset` of BAR `bar`.
    pub fn new(
        config: &mut PciConfig,
        vectors: Vec<Vector>,
        router: Arc<dyn MsiRouter>,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Result<Self, ConfigError> {
        let n = vectors.len();
        if n == 0 || n > 2048 {
            return Err(ConfigError::CapabilitySpace);
        }
        let ctrl = (n as u16 - 1).to_le_bytes();
        let mut body = Vec::new();
        body.extend_from_slice(&ctrl);
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        // Only Enable and Function Mask are writable.
        let writable = [0, 0xc0];
        let cap = config.add_capability(CAP_ID, &body, &writable)?;
        let table = vec![[0, 0, 0, ENTRY_MASKED]; n];
        Ok(Msix {
            vectors: Arc::new(MsixVectors {
                vectors,
                enabled: AtomicBool::new(false),
                function_masked: AtomicBool::new(false),
            }),
            table: Mutex::new(table),
            router,
            cap,
        })
    }

    /// The delivery side, for the device.
    pub fn vectors(&self) -> Arc<MsixVectors> {
        self.vectors.clone()
    }

    /// Call after the guest wrote configuration space: picks up Enable and Function Mask.
    pub fn config_written(&self, config: &PciConfig) {
        let mut b = [0u8; 2];
        config.read(self.cap + 2, &mut b);
        let ctrl = u16::from_le_bytes(b);
        let enabled = ctrl & CTRL_ENABLE != 0;
        let fmask = ctrl & CTRL_FUNCTION_MASK != 0;
        let was = self.vectors.active();
        self.vectors.enabled.store(enabled, Ordering::Release);
        self.vectors.function_masked.store(fmask, Ordering::Release);
        if self.vectors.active() && !was {
            for i in 0..self.vectors.len() {
                self.update(i);
            }
        }
    }

    fn message(entry: &[u32; 4]) -> MsiMessage {
        MsiMessage {
            address: u64::from(entry[0]) | u64::from(entry[1]) << 32,
            data: entry[2],
        }
    }

    /// Re-routes vector `i` and delivers what is pending, if it can be delivered now.
    fn update(&self, i: usize) {
        let Some(entry) = self.table.lock().ok().and_then(|t| t.get(i).copied()) else {
            return;
        };
        let v = &self.vectors.vectors[i];
        let masked = entry[3] & ENTRY_MASKED != 0;
        v.masked.store(masked, Ordering::Release);
        if masked || !self.vectors.active() {
            return;
        }
        if let Err(e) = self.router.route(v.gsi, Self::message(&entry)) {
            tracing::error!("MSI-X vector {i}: cannot route GSI {}: {e}", v.gsi);
        }
        if v.pending.swap(false, Ordering::AcqRel) {
            let _ = v.eventfd.write(1);
        }
    }

    /// A read of the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (i, word) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE / 4) as usize,
        );
        let v = self
            .table
            .lock()
            .ok()
            .and_then(|t| t.get(i).map(|e| e[word]));
        match (v, data.len()) {
            (Some(v), 4) if offset.is_multiple_of(4) => data.copy_from_slice(&v.to_le_bytes()),
            (Some(_), 8) if offset.is_multiple_of(8) => {
                let mut lo = [0u8; 4];
                let mut hi = [0u8; 4];
                self.read_table(offset, &mut lo);
                self.read_table(offset + 4, &mut hi);
                data[..4].copy_from_slice(&lo);
                data[4..].copy_from_slice(&hi);
            }
            _ => data.fill(0),
        }
    }

    /// A write of the table at `offset`.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        if data.len() == 8 && offset.is_multiple_of(8) {
            self.write_table(offset, &data[..4]);
            self.write_table(offset + 4, &data[4..]);
            return;
        }
        let Ok(value) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let (i, word) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE / 4) as usize,
        );
        {
            let Ok(mut t) = self.table.lock() else {
                return;
            };
            let Some(e) = t.get_mut(i) else {
                return;
            };
            // Only the mask bit of Vector Control is writable.
            e[word] = if word == 3 {
                value & ENTRY_MASKED
            } else {
                value
            };
        }
        self.update(i);
    }

    /// A read of the pending-bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bits = 0u64;
        for bit in 0..64 {
            let i = (offset as usize / 8) * 64 + bit;
            if self
                .vectors
                .vectors
                .get(i)
                .is_some_and(|v| v.pending.load(Ordering::Acquire))
            {
                bits |= 1 << bit;
            }
        }
        let bytes = bits.to_le_bytes();
        let start = (offset % 8) as usize;
        match bytes.get(start..start + data.len()) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PciId;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, MsiMessage)>>);
    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, msg: MsiMessage) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn setup(n: usize) -> (PciConfig, Msix, Arc<Routes>) {
        let mut c = PciConfig::new(
            PciId {
                vendor: 1,
                device: 2,
                class: 0,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            },
            0,
        );
        let routes = Arc::new(Routes::default());
        let vectors = (0..n)
            .map(|i| Vector::new(EventFd::new(EFD_NONBLOCK).unwrap(), 24 + i as u32))
            .collect();
        let m = Msix::new(&mut c, vectors, routes.clone(), 0, 0x4000, 0x5000).unwrap();
        (c, m, routes)
    }

    fn program(m: &Msix, i: u64, addr: u32, data: u32) {
        m.write_table(i * 16, &addr.to_le_bytes());
        m.write_table(i * 16 + 4, &0u32.to_le_bytes());
        m.write_table(i * 16 + 8, &data.to_le_bytes());
        m.write_table(i * 16 + 12, &0u32.to_le_bytes());
    }

    fn enable(c: &mut PciConfig, m: &Msix, ctrl: u16) {
        c.write(m.cap + 2, &ctrl.to_le_bytes());
        m.config_written(c);
    }

    #[test]
    fn the_capability_describes_the_table_and_pba() {
        let (c, m, _) = setup(3);
        assert_eq!(c.read_u32(m.cap) & 0xff, u32::from(CAP_ID));
        assert_eq!(c.read_u32(m.cap) >> 16, 2, "table size - 1");
        assert_eq!(c.read_u32(m.cap + 4), 0x4000);
        assert_eq!(c.read_u32(m.cap + 8), 0x5000);
    }

    #[test]
    fn a_vector_fires_only_when_enabled_and_unmasked_and_pending_ones_fire_on_unmask() {
        let (mut c, m, routes) = setup(2);
        let v = m.vectors();
        v.trigger(1);
        assert!(
            v.vectors[1].eventfd.read().is_err(),
            "MSI-X is off: nothing delivered"
        );
        program(&m, 1, 0xfee0_0000, 0x41);
        enable(&mut c, &m, CTRL_ENABLE);
        assert_eq!(
            routes.0.lock().unwrap().last(),
            Some(&(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            ))
        );
        assert_eq!(
            v.vectors[1].eventfd.read().unwrap(),
            1,
            "the pending one on enable"
        );
        v.trigger(1);
        assert_eq!(v.vectors[1].eventfd.read().unwrap(), 1);
        // Masked: pending bit instead, visible in the PBA, delivered on unmask.
        m.write_table(16 + 12, &1u32.to_le_bytes());
        v.trigger(1);
        assert!(v.vectors[1].eventfd.read().is_err());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(v.vectors[1].eventfd.read().unwrap(), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        // Function mask.
        enable(&mut c, &m, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        v.trigger(1);
        assert!(v.vectors[1].eventfd.read().is_err());
        // Vector 0 was never unmasked.
        enable(&mut c, &m, CTRL_ENABLE);
        v.trigger(0);
        assert!(v.vectors[0].eventfd.read().is_err());
    }

    #[test]
    fn table_reads_back_and_out_of_range_accesses_are_harmless() {
        let (_c, m, _) = setup(1);
        program(&m, 0, 0xfee0_1000, 0x30);
        let mut d = [0u8; 8];
        m.read_table(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0xfee0_1000);
        let mut w = [0u8; 4];
        m.read_table(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0);
        m.write_table(12, &0xffff_fffeu32.to_le_bytes());
        m.read_table(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0, "reserved bits stay clear");
        m.write_table(16 * 5, &[1, 2, 3, 4]);
        m.read_table(16 * 5, &mut w);
        assert_eq!(w, [0; 4]);
        m.write_table(2, &[1, 2]);
        let mut pba = [0u8; 8];
        m.read_pba(4096, &mut pba);
        assert_eq!(pba, [0; 8]);
    }
}
