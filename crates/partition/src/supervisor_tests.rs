//! The supervisor with `sh` scripts for VMs: what their processes inherit, and how they live and
//! die with it.

use super::*;
use crate::config::Restart;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

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
        jail: None,
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
        seccomp: SeccompMode::Enforce,
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

/// Where [`helper_supervisor`] keeps its state, when it is run by the test that kills it.
const HELPER_DIR: &str = "TANDEM_SUPERVISOR_TEST_DIR";

fn orphan_vms() -> Vec<VmPlan> {
    vec![
        VmPlan {
            role: Role::Realtime,
            cpus: vec![0],
            ..sh_vm("rt", "exec sleep 600", Vec::new())
        },
        VmPlan {
            cpus: vec![1],
            ..sh_vm("gp", "exec sleep 600", Vec::new())
        },
    ]
}

/// Set for [`helper_supervisor`] to run the [`FLOOD`] VM instead.
const HELPER_FLOOD: &str = "TANDEM_SUPERVISOR_TEST_FLOOD";

/// A VM that prints far more than a pipe holds, then says so.
const FLOOD: &str = r#"i=0; while [ $i -lt 20000 ]; do echo "line $i"; i=$((i+1)); done; echo done; exec sleep 600"#;

/// Runs [`helper_supervisor`] in a process of its own with `env`, its stdout and stderr as given.
fn spawn_helper(
    dir: &Path,
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "supervisor::tests::helper_supervisor",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_DIR, dir)
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Not a test of its own: the supervisor that the tests below run in a process of its own (as
/// `tandem up` would, CPU locks taken) and kills.
#[test]
#[ignore = "run by when_the_supervisor_is_killed_its_vms_die_and_free_their_cpus"]
fn helper_supervisor() {
    let Some(dir) = std::env::var_os(HELPER_DIR).map(PathBuf::from) else {
        return;
    };
    if std::env::var_os(HELPER_FLOOD).is_some() {
        let vms = vec![sh_vm("flood", FLOOD, Vec::new())];
        Supervisor {
            exe: "/bin/sh".into(),
            state_dir: dir,
            vms,
            channels: Vec::new(),
            seccomp: SeccompMode::Enforce,
        }
        .run();
        return;
    }
    let mut vms = orphan_vms();
    let locks = crate::locks::lock_cpus(&dir.join("locks"), &vms).unwrap();
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.inherit.extend(locks.fds(i));
    }
    Supervisor {
        exe: "/bin/sh".into(),
        state_dir: dir,
        vms,
        channels: Vec::new(),
        seccomp: SeccompMode::Enforce,
    }
    .run();
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

#[test]
fn when_the_supervisor_is_killed_its_vms_die_and_free_their_cpus() {
    let dir = scratch("orphans");
    let mut sup = spawn_helper(&dir, &[], Stdio::null(), Stdio::piped());
    let mut pids = Vec::new();
    let mut seen = String::new();
    for line in BufReader::new(sup.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        seen.push_str(&line);
        seen.push('\n');
        if let Some(pid) = line
            .split("started (pid ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.parse::<i32>().ok())
        {
            pids.push(pid);
            if pids.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(pids.len(), 2, "{seen}");
    // While the supervisor runs, its CPUs are taken, and each VM holds its own CPU's lock too
    // (had it outlived the supervisor, no new one could take its CPU).
    assert!(crate::locks::lock_cpus(&dir.join("locks"), &orphan_vms()).is_err());
    for (pid, cpu) in pids.iter().zip(["cpu0", "cpu1"]) {
        let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(
            held.contains(&dir.join("locks").join(cpu)),
            "{pid}: {held:?}"
        );
    }
    send_signal(sup.id(), libc::SIGKILL);
    sup.wait().unwrap();
    let killed = Instant::now();
    // Bounded, so that a failure ends the test; the VMs go in milliseconds.
    while pids.iter().any(|&p| alive(p)) && killed.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    for &p in &left {
        send_signal(p as u32, libc::SIGKILL);
    }
    assert!(left.is_empty(), "VMs {left:?} outlived their supervisor");
    eprintln!(
        "VMs gone {:?} after the supervisor's SIGKILL",
        killed.elapsed()
    );
    // A new supervisor of the same config takes the same CPUs.
    crate::locks::lock_cpus(&dir.join("locks"), &orphan_vms()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_terminal_that_does_not_read_stalls_no_vm() {
    let dir = scratch("stall");
    // The supervisor's stdout is a pipe nobody reads: it is full after 64 KiB.
    let mut sup = spawn_helper(&dir, &[(HELPER_FLOOD, "1")], Stdio::piped(), Stdio::null());
    let log = dir.join("flood.log");
    let done = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .ends_with("line 19999\ndone\n")
    };
    // Bounded, so that a failure ends the test; it takes a fraction of a second.
    let start = Instant::now();
    while !done() && start.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(50));
    }
    let finished = done();
    send_signal(sup.id(), libc::SIGKILL);
    sup.wait().unwrap();
    assert!(
        finished,
        "the VM's output stopped reaching its log: {} bytes",
        std::fs::metadata(&log).map_or(0, |m| m.len())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
