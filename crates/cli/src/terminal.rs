//! Raw terminal mode for the serial console, restored on every exit path.

use std::sync::OnceLock;

static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Puts stdin's terminal in raw mode until dropped (and on SIGTERM/SIGINT/SIGHUP).
pub struct RawTerminal;

impl RawTerminal {
    /// Enters raw mode when stdin is a terminal; `None` when it is not.
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios we own.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let _ = SAVED.set(t);
        install_signal_restore();
        let mut raw = t;
        // SAFETY: cfmakeraw only edits the struct we pass.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side newlines stay sane.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: valid termios for fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        Some(RawTerminal)
    }
}

/// Restores the saved terminal settings, if any (async-signal-safe).
pub fn restore() {
    if let Some(t) = SAVED.get() {
        // SAFETY: tcsetattr is async-signal-safe; `t` is a valid saved termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    restore();
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + sig) };
}

fn install_signal_restore() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}
