//! A thin trait over the hypervisor's vCPU, so that the run loop and exit handling can be tested
//! without `/dev/kvm`.

pub mod kvm;

/// One reason a vCPU left guest mode, reduced to what tandem acts on.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// The guest read from an I/O port; fill the buffer.
    IoIn(u16, &'a mut [u8]),
    /// The guest wrote to an I/O port.
    IoOut(u16, &'a [u8]),
    /// The guest read from unbacked guest-physical memory; fill the buffer.
    MmioRead(u64, &'a mut [u8]),
    /// The guest wrote to unbacked guest-physical memory.
    MmioWrite(u64, &'a [u8]),
    /// The vCPU executed HLT with no in-kernel interrupt controller to wake it.
    Hlt,
    /// The guest shut the vCPU down (on x86: a triple fault).
    Shutdown,
    /// The hypervisor reported a system event (reset, shutdown, crash) of the given type.
    SystemEvent(u32),
    /// The hypervisor could not emulate an instruction or otherwise failed internally.
    InternalError(u32),
    /// Entering the guest failed, with the hardware's reason code.
    FailEntry(u64),
    /// The run was interrupted by a signal before or while in the guest.
    Interrupted,
    /// Any other exit, named.
    Other(&'static str),
}

/// Errors from running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The run ioctl failed with an OS error.
    #[error("KVM_RUN failed: {0}")]
    Run(std::io::Error),
}

/// A virtual CPU that can be run until its next exit.
pub trait Vcpu: Send {
    /// Enters the guest and returns on the next exit that needs the VMM.
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError>;
    /// The vCPU's registers as one line of text, for logs after a crash.
    fn dump_state(&self) -> String;
}
