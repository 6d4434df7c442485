//! tandem's VM/vCPU core.
//!
//! - [`hypervisor`]: a thin [`hypervisor::Vcpu`] trait over KVM, so the run loop can be tested
//!   with scripted exits;
//! - [`exit`]: exit dispatch as a pure function; [`vcpu`]: the vCPU state machine; [`kick`]:
//!   stopping vCPU threads with one signal each;
//! - [`arch`]: what differs between host architectures; on x86_64 `layout`, `boot`, `acpi`,
//!   `cpuid`, `regs` (what the guest finds at boot, each a pure builder with unit tests) and the
//!   doctor's ring-0 `probe`, also re-exported here; on aarch64 `gic`, `regs`, `fdt`, `boot`;
//! - [`virtio`]: virtio-mmio devices wired to KVM (irqfd, ioeventfd) and their I/O thread;
//! - [`irq`]: the GSI routing table with the MSI routes of MSI-X vectors;
//! - [`pci`]: the PCI bus and the inter-VM channels (ivshmem) on it;
//! - [`placement`]: vCPU pinning, SCHED_FIFO, housekeeping CPUs, locked and huge-page memory;
//! - [`realtime`]: the exits a realtime VM leaves to the guest, and halt polling;
//! - [`stats`]: exit accounting (KVM's binary statistics, exits by device) on a stats socket;
//! - [`signals`]: SIGTERM/SIGINT/SIGHUP as events that stop the VM cleanly;
//! - [`vm`]: a VM's configuration ([`vm::VmConfig`]) and its checks; [`run()`]: builds and runs
//!   it.
#![deny(missing_docs)]

pub mod arch;
pub mod bus;
pub mod error;
pub mod event_loop;
pub mod exit;
pub mod hypervisor;
pub mod irq;
pub mod kick;
pub mod pci;
pub mod placement;
pub mod realtime;
pub mod signals;
pub mod stats;
pub mod vcpu;
pub mod virtio;
pub mod vm;

mod run;

pub use arch::layout;
#[cfg(target_arch = "x86_64")]
pub use arch::x86_64::{acpi, boot, cpuid, probe, regs};
pub use error::VmError;
pub use pci::ChannelConfig;
pub use run::run;
pub use vm::{
    BootProtocol, NetConfig, SerialOutput, TapConfig, VirtioTransport, VmConfig, VmOutcome,
};
