//! A keeper process for host state that must be undone when tandem ends.
//!
//! Undoing some setup (deleting nftables rules) runs a program, which a filtered thread cannot
//! do: its filter would pass to the program. So such state is handed, before any filter is
//! installed, to a forked child that waits until tandem is gone (its end of a pipe closes:
//! exit, crash, SIGKILL or SIGSYS alike) and then drops it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The parent's end: dropping it (or tandem's end) makes the keeper undo its state and exit.
#[derive(Debug)]
pub struct Keeper {
    _pipe: OwnedFd,
}

impl Keeper {
    /// Hands `value` to a new keeper process, which drops it once this process is gone (or
    /// the returned [`Keeper`] is dropped); this process forgets it. Call it before any thread
    /// is started; `value`'s drop must not need descriptors (the keeper closes all but
    /// stdin, stdout and stderr).
    pub fn spawn<T>(value: T) -> io::Result<Keeper> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fork in a process that has no other thread yet (see above); the child only
        // waits on the pipe, drops `value` and exits.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => keep(value, read),
            _ => {
                std::mem::forget(value);
                drop(read);
                Ok(Keeper { _pipe: write })
            }
        }
    }
}

fn keep<T>(value: T, read: OwnedFd) -> ! {
    let fd = read.as_raw_fd();
    // Keep only stdio (for warnings) and the pipe: the VM's descriptors (KVM, TAP, disks)
    // must not live on in the keeper.
    // SAFETY: dup2 onto 3 then closing everything from 4 leaves the pipe at 3 and stdio.
    unsafe {
        if fd != 3 {
            libc::dup2(fd, 3);
        }
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            for other in 4..1024 {
                libc::close(other);
            }
        }
    }
    std::mem::forget(read);
    // Ignore the terminal's signals: the keeper ends when tandem does, not before.
    // SAFETY: SIG_IGN for SIGINT and SIGQUIT; the stop signals are blocked already.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into `byte`.
        let n = unsafe { libc::read(3, (&mut byte as *mut u8).cast(), 1) };
        if n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
            break;
        }
    }
    drop(value);
    // SAFETY: ends the keeper without running the parent's atexit handlers again.
    unsafe { libc::_exit(0) }
}
