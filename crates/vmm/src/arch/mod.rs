//! What differs between host architectures, behind one interface; everything else in this
//! crate (devices, virtio, PCI, the vCPU run loop, placement, stats) is shared.
//!
//! Each architecture's module provides:
//! - `layout`: the guest-physical memory map (RAM regions, virtio-mmio slots, PCI window,
//!   interrupt numbers);
//! - `irq`: the interrupt controller's default routes and the first GSI free for MSIs;
//! - `REQUIRED_CAPS`, `ensure_vm_support`, `validate_boot`: the host and image checks;
//! - `Platform`, `create_platform`, `init_vcpus`, `add_platform_devices`, `load_boot_images`,
//!   `configure_vcpu`, `finish_platform`: the steps of building a VM that [`crate::run`]
//!   calls, in that order;
//! - `add_pci_root`: where the PCI bus's configuration space goes (x86_64: configuration
//!   mechanism #1's ports; aarch64: the ECAM window of the device tree's host bridge);
//! - `regs::dump_state`: a vCPU's registers for a failure report.
//!
//! `x86_64` and `aarch64` implement all of it.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("tandem runs on x86_64 and aarch64 hosts only");

/// The doctor's speed probe: timing and verdict, around each architecture's `probe`.
pub mod speed;
