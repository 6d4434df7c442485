//! tandem's VM/vCPU core.
//!
//! - [`hypervisor`]: a thin [`hypervisor::Vcpu`] trait over KVM, so the run loop can be tested
//!   with scripted exits;
//! - [`exit`]: exit dispatch as a pure function; [`vcpu`]: the vCPU state machine; [`kick`]:
//!   stopping vCPU threads with one signal each;
//! - [`layout`], [`boot`], [`acpi`], [`cpuid`], [`regs`]: what the guest finds at boot, each a
//!   pure builder with unit tests;
//! - [`virtio`]: virtio-mmio devices wired to KVM (irqfd, ioeventfd) and their I/O thread;
//! - [`irq`]: the GSI routing table with the MSI routes of MSI-X vectors;
//! - [`pci`]: the PCI bus and the inter-VM channels (ivshmem) on it;
//! - [`placement`]: vCPU pinning, SCHED_FIFO, housekeeping CPUs, locked and huge-page memory;
//! - [`realtime`]: the exits a realtime VM leaves to the guest, and halt polling;
//! - [`stats`]: exit accounting (KVM's binary statistics, exits by device) on a stats socket;
//! - [`signals`]: SIGTERM/SIGINT/SIGHUP as events that stop the VM cleanly;
//! - [`vm`]: assembles a VM from a [`vm::VmConfig`] and runs it; [`probe`]: the doctor's checks.
#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod error;
pub mod event_loop;
pub mod exit;
pub mod hypervisor;
pub mod irq;
pub mod kick;
pub mod layout;
pub mod pci;
pub mod placement;
pub mod probe;
pub mod realtime;
pub mod regs;
pub mod signals;
pub mod stats;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use error::VmError;
pub use pci::ChannelConfig;
pub use vm::{run, NetConfig, SerialOutput, TapConfig, VirtioTransport, VmConfig, VmOutcome};
