//! The KVM implementation of [`Vcpu`].

use std::cell::Cell;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{HypervisorError, Vcpu, VmExit};

thread_local! {
    /// The `immediate_exit` flag in the `kvm_run` page of the vCPU this thread runs (null when
    /// none), for the kick signal's handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Called from the kick signal's handler on a vCPU thread: makes its `KVM_RUN` return at once,
/// whether the signal came while the vCPU was in the guest (the signal alone ends that run) or
/// just before it entered (`immediate_exit` makes that entry return), so one kick is enough.
/// Only a plain store to memory: async-signal-safe.
pub fn request_immediate_exit() {
    set_immediate_exit(1);
}

/// Points this thread's kick at `flag` instead of a vCPU's `kvm_run` (null: none), for tests.
#[cfg(test)]
pub(crate) fn watch_flag_for_test(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|f| f.set(flag));
}

fn set_immediate_exit(value: u8) {
    let _ = IMMEDIATE_EXIT.try_with(|flag| {
        let p = flag.get();
        if !p.is_null() {
            // SAFETY: `p` points into the `kvm_run` mapping of this thread's live `KvmVcpu`
            // (it is reset to null before that is dropped); a byte store cannot tear.
            unsafe { p.write_volatile(value) };
        }
    });
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
}

impl KvmVcpu {
    /// Wraps a configured KVM vCPU. Call it on the thread that runs the vCPU: a kick signal sent
    /// to that thread then ends its current or next `KVM_RUN` ([`request_immediate_exit`]).
    pub fn new(mut fd: VcpuFd) -> Self {
        let flag: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|f| f.set(flag));
        Self { fd }
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let _ = IMMEDIATE_EXIT.try_with(|f| f.set(std::ptr::null_mut()));
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn(port, data),
                VcpuExit::IoOut(port, data) => VmExit::IoOut(port, data),
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead(addr, data),
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite(addr, data),
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(kind),
                VcpuExit::InternalError => VmExit::InternalError(0),
                VcpuExit::FailEntry(reason, _) => VmExit::FailEntry(reason),
                VcpuExit::Intr => {
                    set_immediate_exit(0);
                    VmExit::Interrupted
                }
                VcpuExit::Exception => VmExit::Other("exception"),
                VcpuExit::Debug(_) => VmExit::Other("debug"),
                VcpuExit::IrqWindowOpen => VmExit::Other("irq window open"),
                VcpuExit::IoapicEoi(_) => VmExit::Other("ioapic eoi"),
                VcpuExit::Hypercall(_) => VmExit::Other("hypercall"),
                _ => VmExit::Other("unhandled exit"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Re-armed only by the next kick; the run loop checks for a stop request first.
                set_immediate_exit(0);
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::Run(std::io::Error::from_raw_os_error(
                e.errno(),
            ))),
        }
    }

    fn dump_state(&self) -> String {
        crate::arch::regs::dump_state(&self.fd)
    }
}

impl KvmVcpu {
    /// Makes the next `KVM_RUN` return at once (set from the signal that kicks the vCPU).
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }
}
