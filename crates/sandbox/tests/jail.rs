//! The jail on this host (needs root and namespaces; says "skipped" otherwise). Without
//! libtest's harness: the test forks, and a child of a single-threaded process may do anything.
//!
//! Each case runs in a forked child that enters the jail and reports what it can still see and
//! do as one line on a pipe; the parent checks the line.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tandem_sandbox::jail::{self, Forked, JailConfig, JailNeeds, NOBODY};

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: new descriptors nothing else owns.
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// Runs `f` in a forked child; returns what it wrote and its wait status.
fn in_child(f: impl FnOnce(&mut std::fs::File)) -> (String, i32) {
    let (mut r, mut w) = pipe();
    // SAFETY: this process has one thread (no harness).
    match unsafe { libc::fork() } {
        0 => {
            drop(r);
            f(&mut w);
            // SAFETY: ends the child without the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        pid => {
            drop(w);
            let mut out = String::new();
            r.read_to_string(&mut out).unwrap();
            let mut status = 0;
            // SAFETY: waits for our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            (out, status)
        }
    }
}

fn jail_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-jail-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.join("marker"), "inside").unwrap();
    d
}

fn errno_of<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno{}", e.raw_os_error().unwrap_or(0)),
    }
}

/// What a jailed process sees: only the jail, read-only; no other process; no capability; the
/// uid and gid asked for; no-new-privileges; no way back to root; no network but loopback.
fn a_jailed_process_sees_only_its_jail() {
    let dir = jail_dir("view");
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = probe.local_addr().unwrap().port();
    let cfg = JailConfig {
        dir: dir.clone(),
        uid: NOBODY,
        gid: NOBODY,
    };
    let (out, status) = in_child(|w| {
        let forked = jail::fork_into_pid_namespace().unwrap();
        if let Forked::Parent(child) = forked {
            jail::wait_and_mirror(child);
        }
        jail::enter(&cfg, JailNeeds::default()).unwrap();
        let mut line = String::new();
        line += &format!("pid={} ", std::process::id());
        line += &format!(
            "marker={} ",
            std::fs::read_to_string("/marker").unwrap_or_default()
        );
        line += &format!("etc={} ", Path::new("/etc/passwd").exists());
        line += &format!("proc={} ", Path::new("/proc/self").exists());
        line += &format!("write={} ", errno_of(std::fs::write("/new", "x")));
        // SAFETY: plain id getters; setuid is expected to fail.
        let (uid, gid, back) = unsafe { (libc::getuid(), libc::getgid(), libc::setuid(0) == 0) };
        line += &format!("uid={uid} gid={gid} setuid0={back} ");
        line += &format!("caps={} ", jail::permitted_capabilities().unwrap());
        // SAFETY: prctl getters with integer arguments.
        let (nnp, dumpable) = unsafe {
            (
                libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
                libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0),
            )
        };
        line += &format!("nnp={nnp} dumpable={dumpable} ");
        let connect = std::net::TcpStream::connect(("127.0.0.1", host_port));
        line += &format!("host-port={} ", errno_of(connect));
        // SAFETY: kill with signal 0 only checks: PID 1 of the host is not in this namespace.
        line += &format!("kill-init={}", unsafe { libc::kill(1, 0) });
        w.write_all(line.as_bytes()).unwrap();
        w.flush().unwrap();
    });
    drop(probe);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{out} {status}"
    );
    for want in [
        "pid=1 ",
        "marker=inside ",
        "etc=false ",
        "proc=false ",
        &format!("write=errno{} ", libc::EROFS),
        &format!("uid={NOBODY} gid={NOBODY} setuid0=false "),
        "caps=0 ",
        "nnp=1 dumpable=0 ",
        // No route: the new network namespace has only a loopback interface, down.
        &format!("host-port=errno{} ", libc::ENETUNREACH),
        // PID 1 is the process itself: it may signal itself.
        "kill-init=0",
    ] {
        assert!(out.contains(want), "{want:?} in {out:?}");
    }
}

/// With uid 0 kept, every capability is gone all the same.
fn root_in_the_jail_has_no_capability() {
    let dir = jail_dir("root");
    let cfg = JailConfig {
        dir: dir.clone(),
        uid: 0,
        gid: 0,
    };
    let (out, _) = in_child(|w| {
        let needs = JailNeeds {
            host_network: true,
            rt_priority: 0,
        };
        jail::enter(&cfg, needs).unwrap();
        let caps = jail::permitted_capabilities().unwrap();
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        // mknod needs CAP_MKNOD; the read-only jail refuses anyway, so try chroot (CAP_SYS_CHROOT).
        let chroot = std::os::unix::fs::chroot("/");
        write!(w, "uid={uid} caps={caps} chroot={}", errno_of(chroot)).unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out, format!("uid=0 caps=0 chroot=errno{}", libc::EPERM));
}

/// The waiting parent ends as the jailed child did (its status, or killed by the same signal
/// from outside: PID 1 cannot kill itself), and passes SIGTERM on.
fn the_parent_mirrors_the_child() {
    for (case, want) in [
        ("exit", "exit 7"),
        ("signal", "signal 9"),
        ("forward", "exit 15"),
    ] {
        let (mut r, mut w) = pipe();
        // SAFETY: single-threaded.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            drop(r);
            match jail::fork_into_pid_namespace().unwrap() {
                Forked::Parent(child) => {
                    drop(w);
                    jail::wait_and_mirror(child)
                }
                Forked::Child => {}
            }
            // SAFETY: plain libc calls in the child.
            unsafe {
                match case {
                    "exit" => libc::_exit(7),
                    "signal" => {
                        w.write_all(b"ready").unwrap();
                        drop(w);
                        loop {
                            libc::pause();
                        }
                    }
                    _ => {
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        libc::sigaddset(&mut set, libc::SIGTERM);
                        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                        w.write_all(b"ready").unwrap();
                        drop(w);
                        let sig = libc::sigwaitinfo(&set, std::ptr::null_mut());
                        libc::_exit(sig)
                    }
                }
            }
        }
        drop(w);
        if case != "exit" {
            let mut b = [0u8; 5];
            r.read_exact(&mut b).unwrap();
        }
        if case == "forward" {
            // SAFETY: signals our own child (the waiting parent).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if case == "signal" {
            let children = format!("/proc/{pid}/task/{pid}/children");
            let jailed: i32 = std::fs::read_to_string(children)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // SAFETY: kills our grandchild, the jailed process.
            unsafe { libc::kill(jailed, libc::SIGKILL) };
        }
        let mut status = 0;
        // SAFETY: waits for our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let got = if libc::WIFSIGNALED(status) {
            format!("signal {}", libc::WTERMSIG(status))
        } else {
            format!("exit {}", libc::WEXITSTATUS(status))
        };
        assert_eq!(got, want, "{case}");
        let _ = r.as_raw_fd();
    }
}

/// A directory that others may write, or a link, is refused before anything is done.
fn a_writable_or_linked_directory_is_refused() {
    let dir = jail_dir("bad");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg = |d: &Path| JailConfig {
        dir: d.to_path_buf(),
        uid: NOBODY,
        gid: NOBODY,
    };
    let e = jail::check_config(&cfg(&dir)).unwrap_err().to_string();
    assert!(e.contains("others may write"), "{e}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let e = jail::check_config(&cfg(&link)).unwrap_err().to_string();
    assert!(e.contains("links are refused"), "{e}");
    jail::check_config(&cfg(&dir)).unwrap();
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("jail tests skipped: they need root");
        return;
    }
    // SAFETY: unshare in a throw-away child only.
    let (_, status) = in_child(|_| unsafe {
        libc::_exit(i32::from(
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) != 0,
        ))
    });
    if libc::WEXITSTATUS(status) != 0 {
        println!("jail tests skipped: no namespaces here");
        return;
    }
    let tests: [(&str, fn()); 4] = [
        (
            "a_jailed_process_sees_only_its_jail",
            a_jailed_process_sees_only_its_jail,
        ),
        (
            "root_in_the_jail_has_no_capability",
            root_in_the_jail_has_no_capability,
        ),
        ("the_parent_mirrors_the_child", the_parent_mirrors_the_child),
        (
            "a_writable_or_linked_directory_is_refused",
            a_writable_or_linked_directory_is_refused,
        ),
    ];
    for (name, t) in tests {
        t();
        println!("test {name} ... ok");
    }
}
