//! A keeper process for host state that must be undone when tandem ends.
//!
//! Undoing some setup (deleting nftables rules) runs a program, which a filtered thread cannot
//! do: its filter would pass to the program. So such state is handed, before any filter is
//! installed, to a forked child that waits for tandem's word. Dropping the [`Keeper`] asks it
//! to undo the state and waits until it has; if tandem dies instead (SIGKILL, SIGSYS) the
//! keeper exits without undoing anything, as tandem itself would have (the next tandem removes
//! stale state).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The parent's end of a keeper process.
#[derive(Debug)]
pub struct Keeper {
    go: OwnedFd,
    done: OwnedFd,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Keeper {
    /// Hands `value` to a new keeper process, which drops it when the returned [`Keeper`] is
    /// dropped; this process forgets it. Call it before any thread is started; `value`'s drop
    /// must not need descriptors (the keeper closes all but stdin, stdout and stderr).
    pub fn spawn<T>(value: T) -> io::Result<Keeper> {
        let (go_read, go_write) = pipe()?;
        let (done_read, done_write) = pipe()?;
        // SAFETY: fork in a process that has no other thread yet (see above); the child only
        // waits on the pipe, drops `value` and exits.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => keep(value, go_read, done_write),
            _ => {
                std::mem::forget(value);
                Ok(Keeper {
                    go: go_write,
                    done: done_read,
                })
            }
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let byte = 1u8;
        // SAFETY: writes one byte from `byte`; reads at most one byte into it.
        unsafe {
            libc::write(self.go.as_raw_fd(), (&byte as *const u8).cast(), 1);
            // Until EOF: the keeper closes its end by exiting.
            let mut b = 0u8;
            while libc::read(self.done.as_raw_fd(), (&mut b as *mut u8).cast(), 1) != 0 {
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
        }
    }
}

fn keep<T>(value: T, go: OwnedFd, done: OwnedFd) -> ! {
    // Keep only stdio (for warnings) and the pipes, at 3 and 4: the VM's descriptors (KVM,
    // TAP, disks) must not live on in the keeper.
    let (g, d) = (go.as_raw_fd(), done.as_raw_fd());
    std::mem::forget(go);
    std::mem::forget(done);
    // SAFETY: moves the pipes to 3 and 4 (through 100 and 101, which may not collide with
    // either), then closes everything above.
    unsafe {
        libc::dup2(g, 100);
        libc::dup2(d, 101);
        libc::dup2(100, 3);
        libc::dup2(101, 4);
        if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) != 0 {
            for other in 5..1024 {
                libc::close(other);
            }
        }
    }
    // Ignore the terminal's signals: the keeper ends when tandem does, not before.
    // SAFETY: SIG_IGN for signals a terminal or a supervisor may send the process group.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut byte = 0u8;
    let asked = loop {
        // SAFETY: reads at most one byte into `byte`.
        let n = unsafe { libc::read(3, (&mut byte as *mut u8).cast(), 1) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n == 1;
        }
    };
    if asked {
        drop(value);
    } else {
        std::mem::forget(value);
    }
    // SAFETY: ends the keeper (closing 4 tells tandem it is done) without running the
    // parent's atexit handlers again.
    unsafe { libc::_exit(0) }
}
