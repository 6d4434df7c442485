//! The jail: what `tandem run --jail DIR --uid U --gid G` does to its own process once the
//! privileged setup is done (KVM, guest memory, TAP and nftables, forward listeners, files).
//!
//! In order, as Firecracker's jailer does before it executes the VMM:
//! 1. [`close_inherited`]: only stdio and the descriptors named on the command line survive;
//! 2. [`fork_into_pid_namespace`]: the VMM becomes PID 1 of a PID namespace of its own; its
//!    parent only waits, forwards signals and mirrors the child's end ([`wait_and_mirror`]);
//! 3. [`enter`], on the still single-threaded VMM: new mount, IPC and UTS namespaces (and an
//!    empty network namespace when the VM needs no host sockets any more), `pivot_root` into
//!    DIR mounted read-only, no device, no setuid, no exec; rlimits; every capability dropped,
//!    then the groups, gid and uid; no-new-privileges; not dumpable.
//!
//! The seccomp filters come after, per thread.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The uid and gid of "nobody" on Debian, `tandem up`'s default for its VMs.
pub const NOBODY: u32 = 65534;

/// Where and as whom a VM's process is jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The directory that becomes the process's `/` (owned by root, writable by nobody else).
    pub dir: PathBuf,
    /// The uid the process runs as (0 keeps root's uid, without any capability).
    pub uid: u32,
    /// The gid the process runs as.
    pub gid: u32,
}

/// What the jailed VM still needs from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JailNeeds {
    /// It opens host sockets after the jail (user networking that may go out): keep the
    /// host's network namespace. Otherwise it gets an empty one.
    pub host_network: bool,
    /// The SCHED_FIFO priority its vCPU threads take after the jail (0: none), allowed by
    /// RLIMIT_RTPRIO rather than a capability.
    pub rt_priority: u32,
}

/// Errors of the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Namespaces and id changes need root.
    #[error(
        "--jail needs root: it creates namespaces and changes ids (run as root, or drop --jail)"
    )]
    NotRoot,
    /// `--uid`/`--gid` without `--jail`.
    #[error("--uid and --gid need --jail DIR")]
    IdsWithoutJail,
    /// The directory is unusable.
    #[error("--jail {}: {reason}", .path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Threads were running: they would stay outside the jail.
    #[error("jail: {0} threads are running; the jail must be entered before any thread starts")]
    Threaded(usize),
    /// A step failed.
    #[error("jail: {step}: {source}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

impl JailError {
    /// Whether the user can fix it by changing the command line or the directory.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            JailError::NotRoot | JailError::IdsWithoutJail | JailError::Dir { .. }
        )
    }
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

/// `rc` of a libc call as a result (`errno` on -1).
fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the jail directory as a path-only descriptor, refusing links, and checks that root
/// owns it and nobody else may write it (or a local user could swap what it holds). Returns it
/// with its device and inode.
fn open_dir(path: &Path) -> Result<(OwnedFd, (u64, u64)), JailError> {
    let bad = |reason: String| JailError::Dir {
        path: path.to_path_buf(),
        reason,
    };
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| bad("contains a NUL".into()))?;
    // SAFETY: `c` is a valid C string; the flags open no file content.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(bad(match e.raw_os_error() {
            Some(libc::ENOTDIR) | Some(libc::ELOOP) => "not a directory (links are refused)".into(),
            _ => e.to_string(),
        }));
    }
    // SAFETY: open returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: stat is plain data, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer; the descriptor is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if st.st_uid != 0 {
        return Err(bad(format!("owned by uid {}, not root", st.st_uid)));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(bad(format!(
            "mode {:o}: group or others may write it",
            st.st_mode & 0o7777
        )));
    }
    Ok((fd, (st.st_dev, st.st_ino)))
}

/// Checks what can be checked before anything is set up: root, and the directory.
pub fn check_config(cfg: &JailConfig) -> Result<(), JailError> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    open_dir(&cfg.dir).map(drop)
}

/// Closes every descriptor above stderr but those in `keep` (a channel's doorbells, the CPU
/// locks a supervisor handed over): nothing the caller happened to leave open may follow the
/// VMM into its jail (a directory descriptor would lead out of it).
pub fn close_inherited(keep: &[RawFd]) -> io::Result<()> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            open.push(fd);
        }
    }
    // `open` lists read_dir's own descriptor too, closed by now: closing it again fails
    // harmlessly with EBADF.
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: closes a descriptor this process inherited and owns no Rust value for.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Threads of this process; a thread that has just been joined may still be listed for a
/// moment, so a count above one is checked again for a while.
fn threads() -> usize {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let n = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
        if n <= 1 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Which side of [`fork_into_pid_namespace`] the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The waiting parent, with the child's PID (in the parent's namespace).
    Parent(libc::pid_t),
    /// The child: PID 1 of the new namespace, killed if the parent dies.
    Child,
}

/// Forks the calling (single-threaded) process into a new PID namespace. The child is its
/// PID 1: it sees no other process and can signal none outside, and every process it starts
/// ends with it. The parent should call [`wait_and_mirror`]. The child starts with the
/// signals the parent forwards blocked: as PID 1 it would lose, not die of, those it has no
/// handler for, so it must take them from a signalfd (as tandem's event loop does).
pub fn fork_into_pid_namespace() -> Result<Forked, JailError> {
    match threads() {
        1 => {}
        n => return Err(JailError::Threaded(n)),
    }
    // SAFETY: unshare with a flag and no pointers; it affects this process's future children.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }.into())
        .map_err(step("new PID namespace"))?;
    // Blocked before the fork: a signal sent to the parent before it waits must be passed on,
    // not end it (and the child with it, by its parent-death signal).
    let mut waited = forwarded();
    // SAFETY: `waited` is a valid sigset_t; the mask is this single thread's own.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `old` receives the previous mask.
    unsafe {
        libc::sigaddset(&mut waited, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &waited, &mut old);
    }
    // SAFETY: fork in a single-threaded process (checked above).
    match unsafe { libc::fork() } {
        -1 => {
            let e = io::Error::last_os_error();
            // SAFETY: restores the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
            Err(step("fork")(e))
        }
        0 => {
            // The child keeps the forwarded signals blocked, SIGCHLD as it was.
            // SAFETY: prctl with integer arguments; the masks are valid sigset_t values.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut mask = old;
                for sig in FORWARDED {
                    libc::sigaddset(&mut mask, sig);
                }
                libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            }
            Ok(Forked::Child)
        }
        pid => Ok(Forked::Parent(pid)),
    }
}

/// The signals the waiting parent passes on to the jailed child.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn forwarded() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

/// The parent's part: passes the termination signals on to `child` and ends as it ended, with
/// its exit status or by its signal.
pub fn wait_and_mirror(child: libc::pid_t) -> ! {
    // Blocked already by fork_into_pid_namespace; blocking again does no harm.
    let mut set = forwarded();
    // SAFETY: `set` is a valid sigset_t; the mask is this (single-threaded) process's own.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // The parent needs none of the descriptors the child uses.
    // SAFETY: close_range with integer arguments.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child without blocking; `status` is a valid int.
        let rc = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if rc == child {
            mirror(status);
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit ends the process.
            unsafe { libc::_exit(1) };
        }
        // SAFETY: `set` is valid; siginfo is not asked for.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// Ends this process as a child that ended with `status` did.
fn mirror(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: no core file (the child's death was reported by the child); the default
        // action for `sig`, unblocked, then raised: the process dies by it.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
            libc::_exit(128 + sig);
        }
    }
    // SAFETY: _exit ends the process.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// `open_tree(2)` flag: a detached copy of the tree.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount(2)` flags: the source and the target are the descriptors themselves.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

fn mount(target: &str, flags: libc::c_ulong) -> io::Result<()> {
    let t = CString::new(target).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a flags-only mount call on a valid path; the other pointers may be null.
    check(
        unsafe {
            libc::mount(
                std::ptr::null(),
                t.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        }
        .into(),
    )
    .map(drop)
}

/// Mounts the jail directory over itself and makes it `/`. Every step works on descriptors:
/// the path was only used to open the directory.
fn pivot_into(dir: &OwnedFd) -> io::Result<()> {
    let empty = c"";
    // SAFETY: open_tree on our descriptor with an empty path; it returns a new descriptor.
    let tree = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE
                | libc::AT_EMPTY_PATH as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint,
        )
    })?;
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    // SAFETY: attaches the detached tree over the directory itself, both by descriptor.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            dir.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })?;
    // SAFETY: fchdir to the root of the mount just attached.
    check(unsafe { libc::fchdir(tree.as_raw_fd()) }.into())?;
    let dot = c".";
    // SAFETY: pivot_root(".", "."): the old root ends up on top of the new one, and is
    // detached next.
    match check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) }) {
        Ok(_) => {
            // SAFETY: detaches the old root, stacked on ".", with its whole tree.
            check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }.into())?;
        }
        // The root is the initramfs (rootfs), which cannot be pivoted away: move the jail over
        // it and chroot, as runc does there. Getting out of a chroot takes CAP_SYS_CHROOT,
        // which the process is about to lose with every other capability.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let root = c"/";
            // SAFETY: moves the mount at "." (the jail) onto "/"; valid strings, no data.
            check(
                unsafe {
                    libc::mount(
                        dot.as_ptr(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_MOVE,
                        std::ptr::null(),
                    )
                }
                .into(),
            )?;
            // SAFETY: chroot to the current directory, the jail.
            check(unsafe { libc::chroot(dot.as_ptr()) }.into())?;
        }
        Err(e) => return Err(e),
    }
    let root = c"/";
    // SAFETY: chdir to a valid path.
    check(unsafe { libc::chdir(root.as_ptr()) }.into())?;
    mount(
        "/",
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
    )
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit.
    check(unsafe { libc::setrlimit(resource, &lim) }.into()).map(drop)
}

/// Descriptors a jailed VM may open: its own are open already; user networking's flows take
/// the rest (512 TCP flows and their listeners fit with room to spare).
pub const MAX_FILES: u64 = 4096;

/// The capability header and data of capget/capset, version 3 (two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAP_V3: u32 = 0x2008_0522;

/// Empties the bounding and ambient capability sets: no later exec or id change can bring a
/// capability back. Needs CAP_SETPCAP, so it comes before the uid change.
fn drop_bounding_capabilities() -> io::Result<()> {
    // Until the kernel says there is no such capability (the bounding set is dropped one by
    // one; this needs CAP_SETPCAP, so it comes before the rest).
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl with integer arguments.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        }
        .into(),
    )
    .map(drop)
}

/// Empties the permitted, effective and inheritable sets (a uid change away from 0 has done so
/// already; with uid 0 this is what takes root's power away).
fn drop_capabilities() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: a version-3 header and two data words, as capset expects.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) }).map(drop)
}

/// The capabilities this process holds (permitted set); 0 after [`enter`].
pub fn permitted_capabilities() -> io::Result<u64> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and room for two data words, as capget expects.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    Ok(u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32)
}

/// Jails the calling process (see the module's description). Call it once everything that
/// needs privilege is set up and before any thread starts.
pub fn enter(cfg: &JailConfig, needs: JailNeeds) -> Result<(), JailError> {
    let (_, id) = open_dir(&cfg.dir)?;
    match threads() {
        1 => {}
        n => return Err(JailError::Threaded(n)),
    }
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !needs.host_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare with flags and no pointers, in a single-threaded process.
    check(unsafe { libc::unshare(flags) }.into()).map_err(step("new namespaces"))?;
    // Nothing mounted or unmounted from here reaches the host's namespace.
    mount("/", libc::MS_REC | libc::MS_PRIVATE).map_err(step("private mounts"))?;
    // Opened again in the new namespace (open_tree clones only from the caller's own), and
    // it must be the same directory as the one checked.
    let (dir, again) = open_dir(&cfg.dir)?;
    if again != id {
        return Err(JailError::Dir {
            path: cfg.dir.clone(),
            reason: "was replaced while tandem started".into(),
        });
    }
    pivot_into(&dir).map_err(step("pivot_root into the jail"))?;
    drop(dir);
    set_limit(libc::RLIMIT_CORE, 0).map_err(step("RLIMIT_CORE"))?;
    set_limit(libc::RLIMIT_NOFILE, MAX_FILES).map_err(step("RLIMIT_NOFILE"))?;
    set_limit(libc::RLIMIT_RTPRIO, needs.rt_priority.into()).map_err(step("RLIMIT_RTPRIO"))?;
    drop_bounding_capabilities().map_err(step("dropping capabilities"))?;
    // SAFETY: prctl with integer arguments: capabilities are not kept across the uid change.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    // SAFETY: no supplementary groups: a null list of length 0. Then the ids, all three each.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()).into()).map_err(step("setgroups"))?;
        check(libc::setresgid(cfg.gid, cfg.gid, cfg.gid).into()).map_err(step("setresgid"))?;
    }
    // SAFETY: as above.
    check(unsafe { libc::setresuid(cfg.uid, cfg.uid, cfg.uid) }.into())
        .map_err(step("setresuid"))?;
    drop_capabilities().map_err(step("dropping capabilities"))?;
    // SAFETY: prctl with integer arguments. A credential change cleared the parent-death
    // signal: set it again. Not dumpable: no ptrace of guest memory by the same uid.
    unsafe {
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())
            .map_err(step("no-new-privileges"))?;
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
    }
    Ok(())
}

impl fmt::Display for JailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} as {}:{}", self.dir.display(), self.uid, self.gid)
    }
}
