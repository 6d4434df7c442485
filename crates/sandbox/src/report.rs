//! The SIGSYS report: a filter that traps a forbidden syscall sends the thread SIGSYS; the
//! handler writes one line to stderr and ends the process by SIGSYS.

use std::io;

use crate::{ThreadKind, KIND};

/// A syscall number no filter allows (and no kernel has): made from the handler, while SIGSYS
/// is blocked there, it makes the kernel reset SIGSYS to its default action and deliver it, so
/// the process dies by SIGSYS as with SECCOMP_RET_KILL_PROCESS.
const NO_SUCH_SYSCALL: libc::c_long = 1023;

/// Installs the handler for the whole process.
pub(crate) fn install_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data; every field is set below or left zero (no flags).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t inside `act`.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is a valid sigaction whose handler has the SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Appends `s` to `buf` at `*len` (truncating), without allocating.
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    let n = s.len().min(buf.len() - *len);
    buf[*len..*len + n].copy_from_slice(&s[..n]);
    *len += n;
}

fn push_num(buf: &mut [u8], len: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The report line, formatted without allocating (it is written from a signal handler).
pub(crate) fn format_report(buf: &mut [u8], kind: Option<ThreadKind>, syscall: i64) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"tandem: seccomp: the ");
    push(
        buf,
        &mut len,
        kind.map_or("unnamed", ThreadKind::name).as_bytes(),
    );
    push(buf, &mut len, b" thread made system call ");
    push_num(buf, &mut len, syscall as u64);
    push(buf, &mut len, b" (");
    push(buf, &mut len, std::env::consts::ARCH.as_bytes());
    push(
        buf,
        &mut len,
        b"), which its filter forbids; the VMM is killed (SIGSYS). --seccomp log allows and logs such calls\n",
    );
    len
}

/// The syscall number of a SIGSYS from seccomp: `si_syscall`, after `si_call_addr` in the
/// `_sigsys` member of siginfo (offset 16 on 64-bit Linux).
///
/// # Safety
/// `info` must point to the siginfo_t the kernel passed to the handler.
unsafe fn syscall_number(info: *const libc::siginfo_t) -> i64 {
    const SI_SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<*const libc::c_void>();
    // SAFETY: siginfo_t is 128 bytes; the offset is inside it and the field is an aligned int.
    i64::from(unsafe {
        *(info
            .cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>())
    })
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let nr = unsafe { syscall_number(info) };
    let kind = KIND.with(|k| ThreadKind::from_code(k.get()));
    let mut buf = [0u8; 256];
    let len = format_report(&mut buf, kind, nr);
    // SAFETY: writes `len` initialised bytes of `buf` to stderr; write is async-signal-safe
    // and on every list.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
    // SAFETY: a syscall with no arguments that the filter traps again (see NO_SUCH_SYSCALL).
    unsafe { libc::syscall(NO_SUCH_SYSCALL) };
    // Only without a filter (the handler was raised by hand): end the same way a shell would
    // report it.
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}
