//! tandem's sandbox: a seccomp-bpf allow-list for each kind of thread of `tandem run`, and the
//! [`jail`] (namespaces, pivot_root, ids and capabilities dropped) its process enters first.
//!
//! Each thread installs its own filter when it starts, after its privileged setup: the main
//! thread just before its event loop, each vCPU thread after its placement (pinning,
//! SCHED_FIFO), the virtio I/O thread after its event manager is set up. A syscall outside the
//! list ends the process with SIGSYS (after a one-line report on stderr), or with
//! [`SeccompMode::Log`] is allowed and logged by the kernel (audit `type=1326`).

#![deny(missing_docs)]

pub mod jail;
mod keeper;
pub mod probe;
mod report;
mod rules;

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use keeper::Keeper;
pub use rules::KVM_RUN;

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter could not be built (a bug in the lists, or an unsupported architecture).
    #[error("seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    /// The kernel refused a filter (no seccomp filter mode?).
    #[error("cannot install the seccomp filter of the {kind} thread: {source} (the kernel needs CONFIG_SECCOMP_FILTER; --seccomp off runs without it)")]
    Install {
        /// The thread.
        kind: ThreadKind,
        /// Why.
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// The host lacks what the mode needs.
    #[error("seccomp is not available on this host: {0} (--seccomp off runs without it)")]
    Unavailable(String),
}

/// What the filters do with a syscall outside their list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// The process ends with SIGSYS after a one-line report.
    #[default]
    Enforce,
    /// The syscall is allowed and the kernel logs it (audit `type=1326`, seen in `dmesg`).
    Log,
    /// No filter.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("'{s}' is not enforce, log or off")),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// The kinds of thread of `tandem run`, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the event loop, then the VM's teardown.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The virtio I/O thread (queues, disks, network).
    Io,
    /// A console's output writer (`serial-out`, `console-out`).
    Output,
    /// `tandem up`'s control socket: its listener and a thread per client.
    Control,
    /// `tandem up`'s other helper threads: the VMs' output relays and logs, the terminal
    /// writer, the VM process waiters, the signal waiter. (Its main thread, which starts VM
    /// processes, runs unfiltered: a filter would pass to every VM it executes.)
    Relay,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Io,
        ThreadKind::Output,
        ThreadKind::Control,
        ThreadKind::Relay,
    ];

    fn code(self) -> u8 {
        match self {
            ThreadKind::Vmm => 1,
            ThreadKind::Vcpu => 2,
            ThreadKind::Io => 3,
            ThreadKind::Output => 4,
            ThreadKind::Control => 5,
            ThreadKind::Relay => 6,
        }
    }

    fn from_code(c: u8) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| k.code() == c)
    }

    /// The name used in messages and on the command line (`vmm`, `vcpu`, `io`, `output`,
    /// `control`, `relay`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Io => "io",
            ThreadKind::Output => "output",
            ThreadKind::Control => "control",
            ThreadKind::Relay => "relay",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ThreadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("'{s}' is not vmm, vcpu, io, output, control or relay"))
    }
}

/// The sandbox settings of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    /// What the filters do.
    pub mode: SeccompMode,
    /// Test hook (`tandem run --seccomp-test-violation KIND`, hidden): the first thread of this
    /// kind makes a forbidden syscall right after installing its filter, to prove that the
    /// filter is on and ends the VMM.
    pub test_violation: Option<ThreadKind>,
}

/// The number of syscalls on `kind`'s allow-list.
pub fn syscall_count(kind: ThreadKind) -> Result<usize, SandboxError> {
    Ok(rules::rules(kind)?.len())
}

/// The syscall numbers on `kind`'s allow-list.
pub fn syscalls(kind: ThreadKind) -> Result<Vec<i64>, SandboxError> {
    Ok(rules::rules(kind)?.into_keys().collect())
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    std::env::consts::ARCH.try_into().map_err(|_| {
        SandboxError::Unavailable(format!("no filters for {}", std::env::consts::ARCH))
    })
}

/// Compiles `kind`'s filter with `mismatch` as the action for syscalls not on the list.
pub fn compile(kind: ThreadKind, mismatch: SeccompMode) -> Result<BpfProgram, SandboxError> {
    let action = match mismatch {
        // Trap, not kill: the SIGSYS handler reports the syscall, then the process dies by
        // SIGSYS all the same (see `report`).
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(Vec::new()),
    };
    // The refused syscalls pass this filter: the kernel takes the stricter answer of the
    // stacked filters, and a trap here would beat the refusal's EACCES.
    let mut rules = rules::rules(kind)?;
    for (_, refused) in rules::refused(kind) {
        rules.extend(refused);
    }
    let filter = SeccompFilter::new(rules, action, SeccompAction::Allow, target_arch()?)?;
    Ok(filter.try_into()?)
}

/// The filters that make `kind`'s [`rules::refused`] syscalls fail with their errno (and allow
/// the rest, which the thread's own filter, installed on top, decides: the kernel applies the
/// stricter answer of the two).
pub fn compile_refusals(kind: ThreadKind) -> Result<Vec<BpfProgram>, SandboxError> {
    rules::refused(kind)
        .into_iter()
        .map(|(errno, refused)| {
            let filter = SeccompFilter::new(
                refused,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                target_arch()?,
            )?;
            Ok(filter.try_into()?)
        })
        .collect()
}

/// The filters of one VM, compiled before any thread starts.
#[derive(Debug, Clone)]
pub struct Sandbox {
    config: SandboxConfig,
    /// Per kind: its refusals, then its allow-list, installed in that order.
    programs: Vec<(ThreadKind, Vec<BpfProgram>)>,
}

thread_local! {
    /// The kind of the calling thread once it installed its filter (0: none), for the report.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

impl Sandbox {
    /// Compiles every filter and, when enforcing, installs the process's SIGSYS handler.
    pub fn prepare(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let mut programs = Vec::new();
        if config.mode != SeccompMode::Off {
            probe::seccomp().map_err(SandboxError::Unavailable)?;
            for kind in ThreadKind::ALL {
                let mut p = compile_refusals(kind)?;
                p.push(compile(kind, config.mode)?);
                programs.push((kind, p));
            }
        }
        if config.mode == SeccompMode::Enforce {
            report::install_handler().map_err(SandboxError::Handler)?;
        }
        Ok(Sandbox { config, programs })
    }

    /// The mode.
    pub fn mode(&self) -> SeccompMode {
        self.config.mode
    }

    /// Installs `kind`'s filter on the calling thread (and sets its no-new-privileges flag).
    /// Call it once the thread's privileged setup is done. Does nothing with
    /// [`SeccompMode::Off`].
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        let Some((_, programs)) = self.programs.iter().find(|(k, _)| *k == kind) else {
            return Ok(());
        };
        for p in programs {
            seccompiler::apply_filter(p)
                .map_err(|source| SandboxError::Install { kind, source })?;
        }
        KIND.with(|k| k.set(kind.code()));
        if self.config.test_violation == Some(kind) {
            test_violation();
        }
        Ok(())
    }

    /// [`Sandbox::apply`], and on failure a one-line report and the end of the process: a
    /// thread that runs unfiltered when filters were asked for must not go on. For threads
    /// that cannot return an error to anyone.
    pub fn apply_or_exit(&self, kind: ThreadKind) {
        if let Err(e) = self.apply(kind) {
            eprintln!("tandem: {e}");
            std::process::exit(1);
        }
    }
}

/// Makes a syscall that no list allows (`getppid`).
fn test_violation() {
    // SAFETY: getppid has no arguments and no effect.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

#[cfg(test)]
mod tests;
