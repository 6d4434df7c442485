//! With the console on a terminal, tandem puts it in raw mode and restores it on every way out:
//! here, being killed by SIGTERM while the guest runs.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the integers we pass; the other pointers
    // may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created by openpty and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn modes(t: &libc::termios) -> (u32, u32, u32, u32) {
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag)
}

/// Starts tandem on the Debian guest with the pty's slave as stdin and waits until it has put
/// the terminal in raw mode. No tandem.exec: the guest's init waits in a shell, so tandem keeps
/// running (slowly, on a host whose KVM emulates the guest, which is enough here).
fn start_in_raw_mode(slave: &OwnedFd) -> Child {
    let guests = common::guests_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", "--memory", "256M", "--kernel"])
        .arg(guests.join("vmlinuz"))
        .arg("--initrd")
        .arg(guests.join("initramfs.cpio.gz"))
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while termios(slave).c_lflag & libc::ICANON != 0 {
        assert!(
            Instant::now() < deadline,
            "tandem never put the terminal in raw mode"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "tandem exited before entering raw mode"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn sigterm_while_the_guest_runs_restores_the_terminal() {
    let (master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let mut child = start_in_raw_mode(&slave);
    let raw = termios(&slave);
    assert_eq!(
        raw.c_lflag & (libc::ECHO | libc::ISIG),
        0,
        "raw mode: no echo, no signals from keys"
    );
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert_eq!(
        modes(&termios(&slave)),
        modes(&before),
        "terminal settings restored"
    );
    drop(master);
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    let (master, slave) = openpty();
    let before = termios(&slave);
    let child = start_in_raw_mode(&slave);
    std::fs::File::from(master.try_clone().unwrap())
        .write_all(b"\x01x")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("tandem: stopped by the user (Ctrl-A x)"),
        "{err}"
    );
    assert_eq!(
        modes(&termios(&slave)),
        modes(&before),
        "terminal settings restored"
    );
    drop(master);
}
