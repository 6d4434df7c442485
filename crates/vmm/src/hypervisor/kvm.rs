//! The KVM implementation of [`Vcpu`].

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{HypervisorError, Vcpu, VmExit};

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
}

impl KvmVcpu {
    /// Wraps a configured KVM vCPU.
    pub fn new(fd: VcpuFd) -> Self {
        Self { fd }
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
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::Exception => VmExit::Other("exception"),
                VcpuExit::Debug(_) => VmExit::Other("debug"),
                VcpuExit::IrqWindowOpen => VmExit::Other("irq window open"),
                VcpuExit::IoapicEoi(_) => VmExit::Other("ioapic eoi"),
                VcpuExit::Hypercall(_) => VmExit::Other("hypercall"),
                _ => VmExit::Other("unhandled exit"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::Run(std::io::Error::from_raw_os_error(
                e.errno(),
            ))),
        }
    }

    fn dump_state(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            ),
            Err(e) => format!("regs unavailable: {e}"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                " cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            Err(_) => String::new(),
        };
        regs + &sregs
    }
}

impl KvmVcpu {
    /// Makes the next `KVM_RUN` return at once (set from the signal that kicks the vCPU).
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }
}
