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
    // SAFETY: the child only calls unshare and _exit.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: unshare with a valid flag; _exit ends the child.
            unsafe {
                let rc = libc::unshare(libc::CLONE_NEWUSER);
                let code = if rc == 0 {
                    0
                } else {
                    *libc::__errno_location()
                };
                libc::_exit(code.clamp(0, 255))
            }
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
