//! tandem's PCI bus (conventional PCI, bus 0 only).
//!
//! - [`config`]: one function's configuration space, with BAR sizing and capabilities, every
//!   guest write filtered through a write mask;
//! - [`ivshmem`]: inter-VM shared memory, compatible with QEMU's ivshmem;
//! - [`msix`]: MSI-X capability, table and pending bits, delivered through irqfds;
//! - [`root`]: bus 0 behind a host bridge, on configuration mechanism #1 (ports 0xcf8-0xcff,
//!   x86) or an ECAM window (Arm's device tree).
//!
//! BARs are placed by tandem before boot (Linux keeps placements that lie inside the host
//! bridge's windows, which the DSDT announces; on Arm the device tree asks it to probe only)
//! and do not move.
#![deny(missing_docs)]

pub mod config;
pub mod ivshmem;
pub mod msix;
pub mod root;

pub use config::{Bar, BarKind, PciConfig, PciId};
pub use ivshmem::Ivshmem;
pub use root::{PciDevice, PciRoot};
