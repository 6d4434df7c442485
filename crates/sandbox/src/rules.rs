//! The allow-lists: one per thread kind of `tandem run`, each syscall with who needs it.
//!
//! A syscall listed with no conditions is allowed with any arguments; one with conditions is
//! allowed when any one of its rules matches (all conditions of a rule must hold).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};

use crate::{SandboxError, ThreadKind};

/// Syscall number to its rules (empty: any arguments).
pub(crate) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `arg == value` (32-bit comparison: request numbers, flags and domains are `int`s).
fn eq(arg: u8, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(arg, Len::Dword, Op::Eq, value)?)
}

/// `arg & mask == value` on the low 32 bits.
fn masked(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(
        arg,
        Len::Dword,
        Op::MaskedEq(mask),
        value,
    )?)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    Ok(SeccompRule::new(conds)?)
}

/// One rule per value: `arg` equals one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    values.iter().map(|&v| rule(vec![eq(arg, v)?])).collect()
}

// ioctl request numbers (asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr).
const KVMIO: u64 = 0xAE;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
#[cfg(target_arch = "x86_64")]
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `KVM_RUN`.
pub const KVM_RUN: u64 = io(0x80);
/// `KVM_GET_REGS`.
#[cfg(target_arch = "x86_64")]
pub const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
/// `KVM_GET_SREGS`.
#[cfg(target_arch = "x86_64")]
pub const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
/// `KVM_SET_GSI_ROUTING` (the size is that of the header: the entries follow it).
pub const KVM_SET_GSI_ROUTING: u64 =
    iow(0x6a, std::mem::size_of::<kvm_bindings::kvm_irq_routing>());
/// `KVM_IRQFD` (connecting and disconnecting an irqfd).
pub const KVM_IRQFD: u64 = iow(0x76, std::mem::size_of::<kvm_bindings::kvm_irqfd>());
/// `KVM_GET_ONE_REG`.
#[cfg(not(target_arch = "x86_64"))]
pub const KVM_GET_ONE_REG: u64 = iow(0xab, std::mem::size_of::<kvm_bindings::kvm_one_reg>());

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// What every thread of tandem needs: the C library and Rust's runtime (allocation, locks,
/// thread exit, panic=abort), logging to stderr, and eventfds.
fn common(r: &mut Rules) -> Result<(), SandboxError> {
    // Allocation (glibc malloc): anonymous mappings, never executable.
    r.insert(libc::SYS_mmap, vec![rule(vec![masked(2, PROT_EXEC, 0)?])?]);
    // glibc malloc: growing a thread arena (PROT_NONE reservation made writable); never exec.
    r.insert(
        libc::SYS_mprotect,
        vec![rule(vec![masked(2, PROT_EXEC, 0)?])?],
    );
    // free(), dropped buffers and, in the joining thread, exited threads' stacks.
    r.insert(libc::SYS_munmap, vec![]);
    // glibc free() and thread exit (MADV_DONTNEED on the dead thread's stack).
    r.insert(libc::SYS_madvise, vec![]);
    // glibc malloc's main arena (any thread may free into it and trim it).
    r.insert(libc::SYS_brk, vec![]);
    // realloc() of large buffers (Vec growth past the mmap threshold).
    r.insert(libc::SYS_mremap, vec![]);
    // std Mutex/Condvar/Once, thread join, channel wake-ups.
    r.insert(libc::SYS_futex, vec![]);
    // stderr (tracing, panic messages), eventfd signalling, console output.
    r.insert(libc::SYS_write, vec![]);
    // eventfds, timerfd, signalfd, stdin, TAP frames.
    r.insert(libc::SYS_read, vec![]);
    // Descriptors dropped on the way (sockets, eventfds, files at exit).
    r.insert(libc::SYS_close, vec![]);
    // F_GETFD only: Rust's std checks that a descriptor is open before closing it (debug
    // builds).
    r.insert(libc::SYS_fcntl, one_of(1, &[libc::F_GETFD as u64])?);
    // glibc: pthread_kill/raise and thread exit block signals around their work.
    r.insert(libc::SYS_rt_sigprocmask, vec![]);
    // Return from a signal handler (the vCPU kick, the SIGSYS report).
    r.insert(libc::SYS_rt_sigreturn, vec![]);
    // Rust's std: a thread's stack-overflow guard stack is disabled at thread exit.
    r.insert(libc::SYS_sigaltstack, vec![]);
    // A thread's end.
    r.insert(libc::SYS_exit, vec![]);
    // The process's end (main), or abort() after a panic (panic=abort).
    r.insert(libc::SYS_exit_group, vec![]);
    // glibc raise()/pthread_kill() (abort after a panic; the main thread's vCPU kicks).
    r.insert(libc::SYS_getpid, vec![]);
    // The same: raise(SIGABRT) is tgkill to the calling thread.
    r.insert(libc::SYS_tgkill, vec![]);
    // Timestamps (tracing, Instant) where the vDSO falls back to the syscall (e.g. in a VM
    // whose clocksource the vDSO cannot read).
    r.insert(libc::SYS_clock_gettime, vec![]);
    // std's HashMap seeds its keys per thread on first use.
    r.insert(libc::SYS_getrandom, vec![]);
    Ok(())
}

/// Waiting on an epoll set (the event loop, the I/O thread's event manager, user-net's own
/// set).
fn epoll(r: &mut Rules) {
    #[cfg(target_arch = "x86_64")]
    r.insert(libc::SYS_epoll_wait, vec![]);
    r.insert(libc::SYS_epoll_pwait, vec![]);
    r.insert(libc::SYS_epoll_ctl, vec![]);
}

/// The main thread while the guest runs: the event loop (stdin, signalfd, power events), then
/// stopping the vCPUs and the I/O thread, restoring the terminal and exiting.
fn vmm() -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    common(&mut r)?;
    epoll(&mut r);
    // The event loop's own epoll set, made when the loop starts.
    r.insert(libc::SYS_epoll_create1, vec![]);
    // The terminal: isatty/tcgetattr (TCGETS) and restoring its mode at exit (TCSETS*).
    // Nothing else: the main thread makes no KVM ioctl once the guest runs.
    r.insert(
        libc::SYS_ioctl,
        one_of(
            1,
            &[libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF],
        )?,
    );
    // The stats socket (tandem run --stats-socket): accepting a client (accept4, non-blocking),
    // reading KVM's statistics (pread64 on the VM's and vCPUs' stats descriptors) and sending
    // the snapshot (send is sendto, MSG_NOSIGNAL|MSG_DONTWAIT).
    r.insert(libc::SYS_accept4, vec![]);
    r.insert(libc::SYS_pread64, vec![]);
    r.insert(libc::SYS_sendto, vec![]);
    // thread::sleep between vCPU kicks (glibc's nanosleep is clock_nanosleep).
    r.insert(libc::SYS_clock_nanosleep, vec![]);
    #[cfg(target_arch = "x86_64")]
    r.insert(libc::SYS_nanosleep, vec![]);
    Ok(r)
}

/// A vCPU thread: KVM_RUN and the device models it calls on exits (serial, i8042, ACPI PM,
/// virtio and PCI config space, MSI-X table writes that reprogram the GSI routes).
fn vcpu() -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    common(&mut r)?;
    // KVM_RUN; the registers for a failure report; MSI-X vector writes (virtio-pci); a channel
    // device's doorbell irqfd, disconnected while the guest has INTx disabled.
    #[cfg(target_arch = "x86_64")]
    let requests = [
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_SET_GSI_ROUTING,
        KVM_IRQFD,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let requests = [KVM_RUN, KVM_GET_ONE_REG, KVM_SET_GSI_ROUTING, KVM_IRQFD];
    r.insert(libc::SYS_ioctl, one_of(1, &requests)?);
    Ok(r)
}

/// The virtio I/O thread: the event manager serving every queue, disk I/O on the image files,
/// the user-mode network (smoltcp; host sockets, a timerfd) or a TAP device.
fn io_thread() -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    common(&mut r)?;
    epoll(&mut r);
    // virtio-blk: reads and writes between the image and guest memory (preadv/pwritev), small
    // unaligned pieces through a bounce buffer (pread64/pwrite64), and FLUSH (fdatasync).
    r.insert(libc::SYS_preadv, vec![]);
    r.insert(libc::SYS_pwritev, vec![]);
    r.insert(libc::SYS_pread64, vec![]);
    r.insert(libc::SYS_pwrite64, vec![]);
    r.insert(libc::SYS_fdatasync, vec![]);
    // User net: non-blocking mode on host sockets (std's set_nonblocking is FIONBIO).
    // No KVM or TUN request: the TAP is configured before the thread starts; MSI routes are
    // set from vCPU threads.
    r.insert(libc::SYS_ioctl, one_of(1, &[libc::FIONBIO])?);
    // User net: host sockets for the guest's flows, IPv4 only: TCP, UDP, ICMP echo
    // (SOCK_DGRAM/IPPROTO_ICMP).
    r.insert(libc::SYS_socket, one_of(0, &[libc::AF_INET as u64])?);
    // User net: outbound TCP (non-blocking connect), UDP flows bound to an ephemeral port,
    // accepted connections on forwarded ports.
    r.insert(libc::SYS_connect, vec![]);
    r.insert(libc::SYS_bind, vec![]);
    r.insert(libc::SYS_accept4, vec![]);
    // User net: TCP_NODELAY; SO_ERROR of a connect in progress.
    r.insert(libc::SYS_setsockopt, vec![]);
    r.insert(libc::SYS_getsockopt, vec![]);
    // User net: half-close when the guest closes its side.
    r.insert(libc::SYS_shutdown, vec![]);
    // User net: std's socket read/write and UDP send_to/recv_from.
    r.insert(libc::SYS_recvfrom, vec![]);
    r.insert(libc::SYS_sendto, vec![]);
    // User net: its timer (TCP/ARP/DHCP timeouts).
    r.insert(libc::SYS_timerfd_settime, vec![]);
    Ok(r)
}

/// A console's output writer: it waits on its queue and writes to the terminal, pipe or file;
/// what every thread needs is all it needs.
fn output() -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    common(&mut r)?;
    Ok(r)
}

/// Starting threads, for the supervisor's threads that do (a control client's thread, the
/// terminal writer): `clone` with `CLONE_THREAD` only, never a process; `clone3`, whose flags a
/// filter cannot read, is refused with ENOSYS (see [`refused`]) and glibc falls back to `clone`.
fn threads(r: &mut Rules) -> Result<(), SandboxError> {
    let thread = libc::CLONE_THREAD as u64;
    r.insert(
        libc::SYS_clone,
        vec![rule(vec![masked(0, thread, thread)?])?],
    );
    // A new thread's robust futex list and restartable sequences (glibc's thread start).
    r.insert(libc::SYS_set_robust_list, vec![]);
    // Rust's std sizes a new thread's stack guard from the CPU set it may run on.
    r.insert(libc::SYS_sched_getaffinity, vec![]);
    // The same: its own thread ID, for that query.
    r.insert(libc::SYS_gettid, vec![]);
    r.insert(libc::SYS_rseq, vec![]);
    Ok(())
}

/// `tandem up`'s control socket: the listener accepts a client and starts its thread, which
/// reads one request line (with timeouts), hands it to the supervising loop and writes the
/// answer. It opens nothing and starts no process.
fn control() -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    common(&mut r)?;
    threads(&mut r)?;
    r.insert(libc::SYS_accept4, vec![]);
    // std's socket reads and writes are recv and send (MSG_NOSIGNAL).
    r.insert(libc::SYS_recvfrom, vec![]);
    r.insert(libc::SYS_sendto, vec![]);
    // Read and write timeouts (SO_RCVTIMEO, SO_SNDTIMEO).
    r.insert(libc::SYS_setsockopt, vec![]);
    // A refused client is answered without waiting for it (set_nonblocking is FIONBIO).
    r.insert(libc::SYS_ioctl, one_of(1, &[libc::FIONBIO])?);
    // The pause after a failed accept (glibc's nanosleep is clock_nanosleep).
    r.insert(libc::SYS_clock_nanosleep, vec![]);
    Ok(r)
}

/// `tandem up`'s relays (a VM's output into its log, rotated in place, and to the terminal
/// queue), the terminal writer, the waiter of each VM process and the signal waiter.
fn relay() -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    common(&mut r)?;
    threads(&mut r)?;
    // Log rotation: the log's content copied to NAME.log.1 (both open already), then emptied.
    r.insert(libc::SYS_lseek, vec![]);
    r.insert(libc::SYS_ftruncate, vec![]);
    // The terminal writer checks once whether stdout is a file (`up --detach`): glibc's fstat
    // is newfstatat(fd, "", AT_EMPTY_PATH).
    r.insert(libc::SYS_newfstatat, vec![]);
    // A VM process's end (std's Child::wait).
    r.insert(libc::SYS_wait4, vec![]);
    // SIGINT/SIGTERM/SIGHUP, blocked everywhere, taken by sigwait.
    r.insert(libc::SYS_rt_sigtimedwait, vec![]);
    Ok(r)
}

/// Syscalls that fail with an errno instead of ending the process, per kind. In every thread of
/// `tandem run`: `openat`, EACCES (glibc's `free()` reads `/proc/sys/vm/overcommit_memory` once
/// when it first shrinks a thread's heap, and takes a failed open as "no"; no file is opened
/// either way). In the supervisor's threads that start threads: `clone3`, ENOSYS.
pub(crate) fn refused(kind: ThreadKind) -> Vec<(i32, Rules)> {
    let mut open = Rules::new();
    open.insert(libc::SYS_openat, vec![]);
    let mut out = vec![(libc::EACCES, open)];
    if matches!(kind, ThreadKind::Control | ThreadKind::Relay) {
        let mut clone3 = Rules::new();
        clone3.insert(libc::SYS_clone3, vec![]);
        out.push((libc::ENOSYS, clone3));
    }
    out
}

/// The allow-list of `kind`.
pub(crate) fn rules(kind: ThreadKind) -> Result<Rules, SandboxError> {
    match kind {
        ThreadKind::Vmm => vmm(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Io => io_thread(),
        ThreadKind::Output => output(),
        ThreadKind::Control => control(),
        ThreadKind::Relay => relay(),
    }
}
