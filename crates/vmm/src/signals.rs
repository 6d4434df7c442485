//! Termination signals as events: SIGTERM, SIGINT and SIGHUP are blocked in every thread of
//! the VM and read from a signalfd by the event loop, so that they stop the VM through the same
//! path as a guest power-off, and everything tandem set up on the host (nftables rules, TAP
//! interfaces, the terminal mode) is undone on the way out.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals that stop the VM cleanly.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in STOP_SIGNALS {
        // SAFETY: as above; `sig` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// A signalfd for [`STOP_SIGNALS`]; the signals stay blocked in the calling thread (and so in
/// every thread it starts afterwards) until it is dropped.
pub struct StopSignals {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl StopSignals {
    /// Blocks the signals in the calling thread and opens the signalfd. Call it before any
    /// thread is started, so that no thread can take the signals with their default action.
    pub fn block() -> io::Result<StopSignals> {
        let set = stop_set();
        // SAFETY: sigset_t is plain data, filled by pthread_sigmask.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigset_t values we own.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; the flags are valid signalfd flags.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: restores the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(e);
        }
        Ok(StopSignals {
            // SAFETY: signalfd returned a new descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            old_mask,
        })
    }

    /// The signal that arrived, if one did.
    pub fn read(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        // Signals that arrived meanwhile stay pending and act (by default: end the process)
        // once unblocked, which is right: the user asked for it.
        // SAFETY: restores the mask saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// The signal's name, for messages.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_fd() {
        // Runs in its own thread: the mask is per thread, and the signal is sent to it alone.
        std::thread::spawn(|| {
            let s = StopSignals::block().unwrap();
            assert_eq!(s.read(), None);
            // SAFETY: sends SIGHUP to this thread, where it is blocked.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert_eq!(s.read(), Some(libc::SIGHUP));
            assert_eq!(s.read(), None);
        })
        .join()
        .unwrap();
    }
}
