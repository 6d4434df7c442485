//! What the host offers for sandboxing, for `tandem doctor` and before filters are installed.

use std::io;

/// Whether seccomp filter mode works, with the actions tandem uses (trap and log).
pub fn seccomp() -> Result<(), String> {
    // SAFETY: PR_GET_SECCOMP takes no pointer.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode < 0 {
        return Err(format!(
            "the kernel has no seccomp ({})",
            io::Error::last_os_error()
        ));
    }
    for (action, name) in [
        (libc::SECCOMP_RET_TRAP, "trap"),
        (libc::SECCOMP_RET_LOG, "log"),
    ] {
        // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 from the pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_ACTION_AVAIL,
                0,
                &action as *const u32,
            )
        };
        if rc != 0 {
            return Err(format!(
                "the seccomp action {name} is not available ({})",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// `landlock_create_ruleset` flag that asks for the ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;

/// The Landlock ABI version, or why there is none (ENOSYS: not built in; EOPNOTSUPP: built
/// but not enabled at boot).
pub fn landlock() -> Result<i64, io::Error> {
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call only returns
    // the ABI version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Whether a new user namespace can be created: tried in a short-lived child, so this
/// process's namespaces stay as they are.
pub fn user_namespaces() -> Result<(), io::Error> {
    in_child(|| {
        // SAFETY: unshare with a valid flag.
        unsafe { libc::unshare(libc::CLONE_NEWUSER) == 0 }
    })
}

/// Whether `tandem run --jail` can work here: root, the namespaces it creates, and
/// `open_tree` (Linux 5.2), tried in a short-lived child.
pub fn jail() -> Result<(), io::Error> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "needs root",
        ));
    }
    in_child(|| {
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET;
        let root = c"/";
        // SAFETY: unshare with valid flags; open_tree of "/" returns a descriptor (or an
        // error), which the child's exit closes.
        unsafe {
            libc::unshare(flags) == 0
                && libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, root.as_ptr(), 1u32) >= 0
        }
    })
}

/// Runs `probe` in a forked child; its errno when it returns false.
fn in_child(probe: impl FnOnce() -> bool) -> Result<(), io::Error> {
    // SAFETY: the child only runs `probe` (system calls) and _exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let code = if probe() {
                0
            } else {
                io::Error::last_os_error().raw_os_error().unwrap_or(1)
            };
            // SAFETY: ends the child.
            unsafe { libc::_exit(code.clamp(0, 255)) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waits for the child forked above.
            if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 0) => Ok(()),
                (true, errno) => Err(io::Error::from_raw_os_error(errno)),
                _ => Err(io::Error::other("the probe process died")),
            }
        }
    }
}
