//! Exit dispatch: a pure function from one vCPU exit to what the vCPU loop does next.

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};

use crate::hypervisor::VmExit;

/// The buses a vCPU exit can be routed to.
pub trait IoBus: Send + Sync {
    /// Handles a port read; unclaimed ports must read as all ones.
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool;
    /// Handles a port write; returns whether a device claimed it.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool;
    /// Handles a read of unbacked guest-physical memory.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// Handles a write to unbacked guest-physical memory.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
}

/// Why a vCPU stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// Triple fault (x86 shutdown).
    TripleFault,
    /// The hypervisor could not run the guest (emulation failure, internal error).
    InternalError(u32),
    /// The guest could not be entered; hardware reason.
    FailEntry(u64),
    /// A hypervisor system event (reset, shutdown, crash) of this type.
    SystemEvent(u32),
    /// An exit tandem does not handle.
    Unhandled(&'static str),
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::TripleFault => write!(f, "triple fault (the guest's CPU shut down)"),
            VcpuStop::InternalError(s) => write!(
                f,
                "KVM internal error (suberror {s}): the instruction could not be emulated"
            ),
            VcpuStop::FailEntry(r) => {
                write!(f, "KVM could not enter the guest (hardware reason {r:#x})")
            }
            VcpuStop::SystemEvent(t) => write!(f, "KVM system event {t}"),
            VcpuStop::Unhandled(what) => write!(f, "unhandled vCPU exit: {what}"),
        }
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Resume,
    /// The guest asked the machine to power off (PSCI `SYSTEM_OFF`): tell the VMM, which then
    /// stops every vCPU, and re-enter (KVM keeps a vCPU of a stopped machine asleep).
    PowerOff,
    /// The guest asked for a reset (PSCI `SYSTEM_RESET`; a panicking kernel with `panic=-1`):
    /// tell the VMM, as for [`ExitAction::PowerOff`].
    Reset,
    /// The run was interrupted; check for requests from the VMM, then re-enter.
    CheckRequests,
    /// Stop this vCPU and report why.
    Stop(VcpuStop),
}

/// Exits counted by kind, per vCPU: what keeps the guest out of guest mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port reads.
    pub pio_in: u64,
    /// Port writes.
    pub pio_out: u64,
    /// MMIO reads and writes.
    pub mmio: u64,
    /// Returns to the VMM because a signal interrupted the run.
    pub interrupted: u64,
    /// Everything else (HLT, shutdown, errors).
    pub other: u64,
}

impl ExitCounts {
    /// Counts `exit` under its kind.
    pub fn record(&mut self, exit: &VmExit<'_>) {
        let slot = match exit {
            VmExit::IoIn(..) => &mut self.pio_in,
            VmExit::IoOut(..) => &mut self.pio_out,
            VmExit::MmioRead(..) | VmExit::MmioWrite(..) => &mut self.mmio,
            VmExit::Interrupted => &mut self.interrupted,
            _ => &mut self.other,
        };
        *slot += 1;
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.pio_in + self.pio_out + self.mmio + self.interrupted + self.other
    }
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exits (pio in {}, pio out {}, mmio {}, interrupted {}, other {})",
            self.total(),
            self.pio_in,
            self.pio_out,
            self.mmio,
            self.interrupted,
            self.other
        )
    }
}

/// Routes one exit to the buses and decides what happens next. Never panics on guest input:
/// accesses nobody claims read as all ones and writes are dropped.
pub fn handle_exit(exit: VmExit<'_>, bus: &dyn IoBus) -> ExitAction {
    match exit {
        VmExit::IoIn(port, data) => {
            if !bus.pio_read(port, data) {
                data.fill(0xff);
            }
            ExitAction::Resume
        }
        VmExit::IoOut(port, data) => {
            if !bus.pio_write(port, data) {
                tracing::trace!("unclaimed port write {port:#x} {data:?}");
            }
            ExitAction::Resume
        }
        VmExit::MmioRead(addr, data) => {
            if !bus.mmio_read(addr, data) {
                data.fill(0xff);
            }
            ExitAction::Resume
        }
        VmExit::MmioWrite(addr, data) => {
            if !bus.mmio_write(addr, data) {
                tracing::trace!("unclaimed mmio write {addr:#x}");
            }
            ExitAction::Resume
        }
        // With the in-kernel LAPIC, HLT does not exit; without it (probes) there is nothing to
        // wake the vCPU, so resuming is the only sensible choice for a normal guest.
        VmExit::Hlt => ExitAction::Resume,
        VmExit::Interrupted => ExitAction::CheckRequests,
        VmExit::Shutdown => ExitAction::Stop(VcpuStop::TripleFault),
        VmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => ExitAction::PowerOff,
        VmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET) => ExitAction::Reset,
        VmExit::SystemEvent(t) => ExitAction::Stop(VcpuStop::SystemEvent(t)),
        VmExit::InternalError(s) => ExitAction::Stop(VcpuStop::InternalError(s)),
        VmExit::FailEntry(r) => ExitAction::Stop(VcpuStop::FailEntry(r)),
        VmExit::Other(what) => ExitAction::Stop(VcpuStop::Unhandled(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u16, Vec<u8>)>>,
    }

    impl IoBus for Recorder {
        fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
            if port == 0x3f8 {
                data.fill(0x42);
                true
            } else {
                false
            }
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> bool {
            self.writes.lock().unwrap().push((port, data.to_vec()));
            true
        }
        fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
            false
        }
        fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
            false
        }
    }

    #[test]
    fn port_io_reaches_the_bus_and_unclaimed_reads_are_all_ones() {
        let bus = Recorder::default();
        let mut d = [0u8; 2];
        assert_eq!(
            handle_exit(VmExit::IoIn(0x3f8, &mut d), &bus),
            ExitAction::Resume
        );
        assert_eq!(d, [0x42, 0x42]);
        assert_eq!(
            handle_exit(VmExit::IoIn(0xcfc, &mut d), &bus),
            ExitAction::Resume
        );
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(
            handle_exit(VmExit::IoOut(0x80, &[7]), &bus),
            ExitAction::Resume
        );
        assert_eq!(bus.writes.lock().unwrap()[0], (0x80, vec![7]));
        let mut m = [0u8; 4];
        handle_exit(VmExit::MmioRead(0xd000_0000, &mut m), &bus);
        assert_eq!(m, [0xff; 4]);
    }

    #[test]
    fn exits_are_counted_by_kind() {
        let mut c = ExitCounts::default();
        let mut d = [0u8; 1];
        c.record(&VmExit::IoIn(0x3fd, &mut d));
        c.record(&VmExit::IoOut(0x3f8, &[1]));
        c.record(&VmExit::IoOut(0x3f8, &[2]));
        c.record(&VmExit::MmioWrite(0xd000_0000, &[0]));
        c.record(&VmExit::Interrupted);
        c.record(&VmExit::Hlt);
        assert_eq!(
            c,
            ExitCounts {
                pio_in: 1,
                pio_out: 2,
                mmio: 1,
                interrupted: 1,
                other: 1
            }
        );
        assert_eq!(c.total(), 6);
        assert!(c.to_string().starts_with("6 exits (pio in 1, pio out 2"));
    }

    #[test]
    fn fatal_exits_stop_the_vcpu_with_a_reason() {
        let bus = Recorder::default();
        assert_eq!(
            handle_exit(VmExit::Shutdown, &bus),
            ExitAction::Stop(VcpuStop::TripleFault)
        );
        assert_eq!(
            handle_exit(VmExit::InternalError(1), &bus),
            ExitAction::Stop(VcpuStop::InternalError(1))
        );
        assert_eq!(
            handle_exit(VmExit::FailEntry(0x80000021), &bus),
            ExitAction::Stop(VcpuStop::FailEntry(0x80000021))
        );
        assert_eq!(
            handle_exit(VmExit::Interrupted, &bus),
            ExitAction::CheckRequests
        );
        assert!(VcpuStop::TripleFault.to_string().contains("triple fault"));
    }

    // PSCI SYSTEM_OFF and SYSTEM_RESET reach tandem as KVM system events (aarch64): they take
    // the paths of x86's ACPI power-off and reset, not a vCPU failure.
    #[test]
    fn system_events_power_off_and_reset_and_others_stop_the_vcpu() {
        let bus = Recorder::default();
        assert_eq!(
            handle_exit(VmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN), &bus),
            ExitAction::PowerOff
        );
        assert_eq!(
            handle_exit(VmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET), &bus),
            ExitAction::Reset
        );
        // KVM_SYSTEM_EVENT_CRASH
        assert_eq!(
            handle_exit(VmExit::SystemEvent(3), &bus),
            ExitAction::Stop(VcpuStop::SystemEvent(3))
        );
    }
}
