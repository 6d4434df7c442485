//! The vCPU run loop: an explicit state machine driven by [`crate::exit::handle_exit`].

use std::sync::atomic::{AtomicBool, Ordering};

use tandem_devices::EventFdTrigger;

use crate::exit::{handle_exit, ExitAction, ExitCounts, IoBus, VcpuStop};
use crate::hypervisor::{HypervisorError, Vcpu};

/// Where a vCPU passes on the guest's power requests made by exits (PSCI on aarch64): the
/// eventfds of the VMM's event loop, which device models (x86's ACPI PM, i8042) signal too.
pub struct PowerEvents {
    /// Power off.
    pub poweroff: EventFdTrigger,
    /// Reset.
    pub reset: EventFdTrigger,
}

impl PowerEvents {
    /// Other handles to the same eventfds.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            poweroff: self.poweroff.try_clone()?,
            reset: self.reset.try_clone()?,
        })
    }
}

/// Signals `trigger`; the vCPU goes on (the VMM stops it), or stops if the VMM cannot be told.
fn request(trigger: &EventFdTrigger, event: u32) -> VcpuState {
    match trigger.write(1) {
        Ok(()) => VcpuState::Running,
        Err(e) => {
            tracing::error!("cannot pass on the guest's power request: {e}");
            VcpuState::Failed(VcpuStop::SystemEvent(event))
        }
    }
}

/// Where a vCPU is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    /// Configured, not yet entered.
    Ready,
    /// Entering the guest and handling exits.
    Running,
    /// Stopped because the VMM asked it to.
    Stopped,
    /// Stopped for good because the guest or the hypervisor failed.
    Failed(VcpuStop),
}

/// The final report of a vCPU.
#[derive(Debug, Clone)]
pub struct VcpuReport {
    /// Its index.
    pub index: usize,
    /// How it ended.
    pub state: VcpuState,
    /// Its registers at the end, for logs.
    pub registers: String,
    /// The exits it handled, by kind.
    pub exits: ExitCounts,
}

/// Runs `vcpu` until it fails or `stop` is set (the VMM sets it, then interrupts `KVM_RUN`);
/// power requests go to `power`.
pub fn run_loop(
    index: usize,
    vcpu: &mut dyn Vcpu,
    bus: &dyn IoBus,
    power: &PowerEvents,
    stop: &AtomicBool,
) -> VcpuReport {
    let mut state = VcpuState::Ready;
    let mut exits = ExitCounts::default();
    loop {
        state = match state {
            VcpuState::Ready | VcpuState::Running if stop.load(Ordering::Acquire) => {
                VcpuState::Stopped
            }
            VcpuState::Ready | VcpuState::Running => match vcpu.run() {
                Ok(exit) => {
                    exits.record(&exit);
                    match handle_exit(exit, bus) {
                        ExitAction::Resume | ExitAction::CheckRequests => VcpuState::Running,
                        ExitAction::PowerOff => {
                            request(&power.poweroff, kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN)
                        }
                        ExitAction::Reset => {
                            request(&power.reset, kvm_bindings::KVM_SYSTEM_EVENT_RESET)
                        }
                        ExitAction::Stop(reason) => VcpuState::Failed(reason),
                    }
                }
                Err(HypervisorError::Run(e)) => VcpuState::Failed(VcpuStop::Unhandled(
                    if e.raw_os_error() == Some(libc::EFAULT) {
                        "KVM_RUN: bad address"
                    } else {
                        "KVM_RUN failed"
                    },
                )),
            },
            done @ (VcpuState::Stopped | VcpuState::Failed(_)) => {
                return VcpuReport {
                    index,
                    registers: vcpu.dump_state(),
                    state: done,
                    exits,
                };
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::VmExit;
    use std::sync::Mutex;

    /// A vCPU that replays a script of exits.
    struct Scripted {
        script: Vec<&'static str>,
        buf: [u8; 4],
    }

    impl Vcpu for Scripted {
        fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
            Ok(match self.script.pop() {
                Some("out") => VmExit::IoOut(0x3f8, b"A"),
                Some("in") => VmExit::IoIn(0x3fd, &mut self.buf[..1]),
                Some("intr") => VmExit::Interrupted,
                Some("off") => VmExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN),
                Some("reset") => VmExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET),
                Some("shutdown") | None => VmExit::Shutdown,
                Some(other) => panic!("bad script entry {other}"),
            })
        }
        fn dump_state(&self) -> String {
            "rip=0x1234".into()
        }
    }

    #[derive(Default)]
    struct Bus(Mutex<Vec<u16>>);
    impl IoBus for Bus {
        fn pio_read(&self, port: u16, d: &mut [u8]) -> bool {
            self.0.lock().unwrap().push(port);
            d.fill(0x60);
            true
        }
        fn pio_write(&self, port: u16, _: &[u8]) -> bool {
            self.0.lock().unwrap().push(port);
            true
        }
        fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
            false
        }
        fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
            false
        }
    }

    fn power() -> PowerEvents {
        PowerEvents {
            poweroff: EventFdTrigger::new().unwrap(),
            reset: EventFdTrigger::new().unwrap(),
        }
    }

    #[test]
    fn power_requests_reach_the_vmm_and_the_vcpu_goes_on() {
        let mut v = Scripted {
            script: vec!["shutdown", "out", "reset", "off"],
            buf: [0; 4],
        };
        let bus = Bus::default();
        let p = power();
        let r = run_loop(0, &mut v, &bus, &p, &AtomicBool::new(false));
        assert_eq!(p.poweroff.read().unwrap(), 1);
        assert_eq!(p.reset.read().unwrap(), 1);
        // Not a failure: it ran on to the next exits.
        assert_eq!(r.exits.total(), 4);
        assert_eq!(*bus.0.lock().unwrap(), vec![0x3f8]);
    }

    #[test]
    fn runs_until_the_guest_fails_and_reports_registers() {
        let mut v = Scripted {
            script: vec!["shutdown", "intr", "in", "out"],
            buf: [0; 4],
        };
        let bus = Bus::default();
        let r = run_loop(1, &mut v, &bus, &power(), &AtomicBool::new(false));
        assert_eq!(r.state, VcpuState::Failed(VcpuStop::TripleFault));
        assert_eq!(r.exits.total(), 4);
        assert_eq!(
            (r.exits.pio_in, r.exits.pio_out, r.exits.interrupted),
            (1, 1, 1)
        );
        assert_eq!(r.index, 1);
        assert_eq!(r.registers, "rip=0x1234");
        assert_eq!(*bus.0.lock().unwrap(), vec![0x3f8, 0x3fd]);
    }

    #[test]
    fn a_stop_request_is_honoured_before_entering_the_guest() {
        let mut v = Scripted {
            script: vec!["out"],
            buf: [0; 4],
        };
        let r = run_loop(0, &mut v, &Bus::default(), &power(), &AtomicBool::new(true));
        assert_eq!(r.state, VcpuState::Stopped);
        assert_eq!(r.exits.total(), 0);
    }
}
