//! The supervisor with `sh` scripts for VMs: what their processes inherit, and how they live and
//! die with it.

use super::*;
use crate::config::Restart;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-sup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A "VM" that is a shell script.
fn sh_vm(name: &str, script: &str, inherit: Vec<i32>) -> VmPlan {
    VmPlan {
        name: name.into(),
        args: vec!["-c".into(), script.into()],
        role: Role::General,
        cpus: Vec::new(),
        restart: Restart::Never,
        lock_memory: false,
        hugepages: false,
        inherit,
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd makes a new descriptor, owned by the OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Lists the shell's own descriptors (`ls` runs as its child, so nothing of the listing's own
/// is open in the shell).
const LIST_FDS: &str = "ls -l /proc/$$/fd";

/// The descriptors in a VM's log: (number, what it is).
fn listed(log: &str) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = log
        .lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            Some((left.split_whitespace().last()?.parse().ok()?, target.into()))
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn each_vm_process_holds_only_its_own_channels_doorbells() {
    let dir = scratch("fds");
    let (e1, e2, e3, other) = (eventfd(), eventfd(), eventfd(), eventfd());
    // A descriptor the supervisor itself inherited without close-on-exec stays out too.
    // SAFETY: F_SETFD on a descriptor this test owns.
    unsafe { libc::fcntl(other.as_raw_fd(), libc::F_SETFD, 0) };
    let (a, b) = (vec![e1.as_raw_fd(), e2.as_raw_fd()], vec![e3.as_raw_fd()]);
    let status = Supervisor {
        exe: "/bin/sh".into(),
        state_dir: dir.clone(),
        vms: vec![
            sh_vm("a", LIST_FDS, a.clone()),
            sh_vm("b", LIST_FDS, b.clone()),
        ],
        channels: Vec::new(),
    }
    .run();
    assert_eq!(status, 0);
    for (name, own) in [("a", a), ("b", b)] {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
        let fds = listed(&log);
        let numbers: Vec<i32> = fds.iter().map(|f| f.0).collect();
        let mut want = vec![0, 1, 2];
        want.extend(&own);
        want.sort_unstable();
        assert_eq!(numbers, want, "vm {name}:\n{log}");
        for (fd, what) in &fds {
            if *fd > 2 {
                assert_eq!(what, "anon_inode:[eventfd]", "vm {name}:\n{log}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exit_statuses_read_as_people_say_them() {
    use std::os::unix::process::ExitStatusExt;
    let s = |raw: i32| std::process::ExitStatus::from_raw(raw);
    assert_eq!(describe(s(0)), "powered off");
    assert_eq!(describe(s(3 << 8)), "guest kernel panic (status 3)");
    assert_eq!(describe(s(143 << 8)), "stopped by signal 15 (status 143)");
    assert_eq!(describe(s(9)), "killed by signal 9");
}
