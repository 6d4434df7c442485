use super::*;

/// Firecracker's per-thread counts on x86_64 (vmm, API, vCPU): tandem's lists stay at or
/// below them (the I/O thread does what Firecracker's vmm thread does).
const FIRECRACKER_VMM: usize = 50;
const FIRECRACKER_VCPU: usize = 27;
/// Firecracker's API server thread, the peer of `tandem up`'s control socket.
const FIRECRACKER_API: usize = 31;

#[test]
fn every_filter_compiles_for_this_host_in_both_modes() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            let prog = compile(kind, mode).unwrap();
            assert!(!prog.is_empty(), "{kind} {mode}");
            // The kernel takes at most BPF_MAXINSNS (4096) instructions.
            assert!(prog.len() < 4096, "{kind}: {} instructions", prog.len());
        }
        assert!(compile(kind, SeccompMode::Off).unwrap().is_empty());
    }
}

#[test]
fn the_lists_stay_at_or_below_firecrackers() {
    let vmm = syscall_count(ThreadKind::Vmm).unwrap();
    let vcpu = syscall_count(ThreadKind::Vcpu).unwrap();
    let io = syscall_count(ThreadKind::Io).unwrap();
    assert!(vmm <= FIRECRACKER_VMM, "vmm thread: {vmm} syscalls");
    assert!(io <= FIRECRACKER_VMM, "I/O thread: {io} syscalls");
    assert!(vcpu <= FIRECRACKER_VCPU, "vCPU thread: {vcpu} syscalls");
    let control = syscall_count(ThreadKind::Control).unwrap();
    let relay = syscall_count(ThreadKind::Relay).unwrap();
    assert!(
        control <= FIRECRACKER_API,
        "control thread: {control} syscalls"
    );
    assert!(relay <= FIRECRACKER_API, "relay thread: {relay} syscalls");
    for kind in ThreadKind::ALL {
        println!("{kind}: {} syscalls", syscall_count(kind).unwrap());
    }
}

#[test]
fn no_thread_may_create_processes_or_open_files() {
    for kind in ThreadKind::ALL {
        let list = syscalls(kind).unwrap();
        // The supervisor's threads may start threads: `clone` with CLONE_THREAD only (see
        // `supervisor_threads_start_threads_but_no_process`).
        let starts_threads = matches!(kind, ThreadKind::Control | ThreadKind::Relay);
        assert_eq!(list.contains(&libc::SYS_clone), starts_threads, "{kind}");
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone3,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_fork,
            libc::SYS_openat,
            libc::SYS_openat2,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_open,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_init_module,
            libc::SYS_getppid,
        ] {
            assert!(!list.contains(&forbidden), "{kind} allows {forbidden}");
        }
    }
    // Only the I/O thread opens sockets (user net).
    assert!(!syscalls(ThreadKind::Vcpu)
        .unwrap()
        .contains(&libc::SYS_socket));
    assert!(!syscalls(ThreadKind::Vmm)
        .unwrap()
        .contains(&libc::SYS_socket));
}

#[test]
fn modes_and_kinds_parse() {
    assert_eq!("enforce".parse(), Ok(SeccompMode::Enforce));
    assert_eq!("log".parse(), Ok(SeccompMode::Log));
    assert_eq!("off".parse(), Ok(SeccompMode::Off));
    assert!("on".parse::<SeccompMode>().is_err());
    assert_eq!(SeccompMode::default(), SeccompMode::Enforce);
    for k in ThreadKind::ALL {
        assert_eq!(k.name().parse(), Ok(k));
    }
}

#[test]
fn the_report_is_one_line_naming_thread_and_syscall() {
    let mut buf = [0u8; 256];
    let n = report::format_report(&mut buf, Some(ThreadKind::Vcpu), 39);
    let s = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(s.starts_with("tandem: seccomp: the vcpu thread made system call 39 ("));
    assert!(s.ends_with('\n'));
    assert_eq!(s.lines().count(), 1);
}

/// Runs `f` in a forked child (filters are per thread and permanent); returns its wait status.
fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `f` (no locks taken by other threads are needed: the sandbox
    // is prepared before the fork) and _exits.
    match unsafe { libc::fork() } {
        0 => {
            let code = f();
            // SAFETY: ends the child.
            unsafe { libc::_exit(code) }
        }
        pid => {
            assert!(pid > 0);
            let mut status = 0;
            // SAFETY: waits for the child forked above.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            status
        }
    }
}

#[test]
fn a_filtered_thread_keeps_working_and_dies_by_sigsys_on_a_forbidden_call() {
    let sandbox = Sandbox::prepare(SandboxConfig::default()).unwrap();
    // Allowed: allocation, eventfd-style writes, a clean exit.
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Vcpu).unwrap();
        let v: Vec<u8> = vec![7; 1 << 20];
        // SAFETY: writes nothing to stderr (length 0).
        unsafe { libc::write(2, v.as_ptr().cast(), 0) };
        i32::from(v[12345])
    });
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 7);
    // Forbidden by number: getppid.
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Vcpu).unwrap();
        test_violation();
        0
    });
    assert!(libc::WIFSIGNALED(status), "status {status:#x}");
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    // Forbidden by argument: a vCPU thread may not make terminal ioctls.
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Vcpu).unwrap();
        // SAFETY: TCGETS on stdin writes into `t`, which is large enough.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        unsafe { libc::ioctl(0, libc::TCGETS, &mut t) };
        0
    });
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    // Opening a file fails (glibc's malloc tries once) but does not end the process.
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Io).unwrap();
        let r = std::fs::File::open("/proc/sys/vm/overcommit_memory");
        i32::from(r.err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES))
    });
    assert_eq!(
        (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
        (true, 1)
    );
    // Executable memory is refused.
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Io).unwrap();
        // SAFETY: an anonymous mapping; never touched.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        0
    });
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
}

#[test]
fn supervisor_threads_start_threads_but_no_process() {
    let sandbox = Sandbox::prepare(SandboxConfig::default()).unwrap();
    for kind in [ThreadKind::Control, ThreadKind::Relay] {
        // A thread (glibc tries clone3, gets ENOSYS, falls back to clone with CLONE_THREAD).
        let status = in_child(|| {
            sandbox.apply(kind).unwrap();
            std::thread::spawn(|| 21).join().unwrap() * 2
        });
        assert_eq!(
            (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
            (true, 42),
            "{kind}: status {status:#x}"
        );
        // A process: clone without CLONE_THREAD.
        let status = in_child(|| {
            sandbox.apply(kind).unwrap();
            // SAFETY: fork; a child, if one were made, exits at once.
            if unsafe { libc::fork() } == 0 {
                unsafe { libc::_exit(0) };
            }
            0
        });
        assert!(libc::WIFSIGNALED(status), "{kind}: status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "{kind}");
        // No file is opened.
        let status = in_child(|| {
            sandbox.apply(kind).unwrap();
            let r = std::fs::File::open("/etc/hostname");
            i32::from(r.err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES))
        });
        assert_eq!(
            (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
            (true, 1),
            "{kind}"
        );
    }
}

#[test]
fn the_test_hook_fires_right_after_the_filter() {
    let sandbox = Sandbox::prepare(SandboxConfig {
        mode: SeccompMode::Enforce,
        test_violation: Some(ThreadKind::Io),
    })
    .unwrap();
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Vcpu).unwrap();
        0
    });
    assert_eq!(
        (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
        (true, 0)
    );
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Io).unwrap();
        0
    });
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let sandbox = Sandbox::prepare(SandboxConfig {
        mode: SeccompMode::Log,
        test_violation: None,
    })
    .unwrap();
    let status = in_child(|| {
        sandbox.apply(ThreadKind::Vcpu).unwrap();
        // SAFETY: getppid has no arguments.
        (unsafe { libc::syscall(libc::SYS_getppid) } > 0) as i32
    });
    assert_eq!(
        (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
        (true, 1)
    );
}

#[test]
fn the_keeper_undoes_when_asked_and_not_when_its_owner_dies() {
    struct Marker(std::path::PathBuf);
    impl Drop for Marker {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, "undone");
        }
    }
    let dir = std::env::temp_dir();
    let asked = dir.join(format!("tandem-keeper-asked-{}", std::process::id()));
    let died = dir.join(format!("tandem-keeper-died-{}", std::process::id()));
    let _ = std::fs::remove_file(&asked);
    let _ = std::fs::remove_file(&died);
    let status = in_child(|| {
        let keeper = Keeper::spawn(Marker(asked.clone())).unwrap();
        // This process forgot the value: nothing is undone until the keeper is told.
        let early = asked.exists();
        drop(keeper);
        // Dropping waits for the keeper's work.
        i32::from(early) + 2 * i32::from(!asked.exists())
    });
    assert_eq!(
        (libc::WIFEXITED(status), libc::WEXITSTATUS(status)),
        (true, 0)
    );
    assert_eq!(std::fs::read_to_string(&asked).unwrap(), "undone");
    // The keeper gets the child's stderr: a pipe whose EOF says that both have exited.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let status = in_child(|| {
        // SAFETY: makes the pipe's write end this process's stderr; closes the read end.
        unsafe {
            libc::dup2(fds[1], 2);
            libc::close(fds[0]);
        }
        let keeper = Keeper::spawn(Marker(died.clone())).unwrap();
        // SAFETY: the owner dies at once, as by SIGKILL, without dropping the keeper.
        unsafe { libc::raise(libc::SIGKILL) };
        drop(keeper);
        0
    });
    assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
    // SAFETY: closes our write end, then reads until every holder (the keeper) is gone.
    unsafe {
        libc::close(fds[1]);
        let mut b = [0u8; 64];
        while libc::read(fds[0], b.as_mut_ptr().cast(), b.len()) > 0 {}
        libc::close(fds[0]);
    }
    assert!(!died.exists(), "the keeper left the state as it was");
    let _ = std::fs::remove_file(&asked);
}

#[test]
fn probes_answer() {
    seccomp().unwrap();
    // Either answer is valid; neither may panic.
    let _ = probe::landlock();
    let _ = probe::user_namespaces();
}

use probe::seccomp;

#[test]
#[ignore = "prints the counts for docs/security.md"]
fn print_counts() {
    for kind in ThreadKind::ALL {
        println!("{kind}: {}", syscall_count(kind).unwrap());
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn kvm_request_numbers_are_the_kernels() {
    // From linux/kvm.h as compiled for x86_64 (e.g. strace shows them so).
    assert_eq!(rules::KVM_RUN, 0xae80);
    assert_eq!(rules::KVM_GET_REGS, 0x8090_ae81);
    assert_eq!(rules::KVM_GET_SREGS, 0x8138_ae83);
    assert_eq!(rules::KVM_SET_GSI_ROUTING, 0x4008_ae6a);
    assert_eq!(rules::KVM_IRQFD, 0x4020_ae76);
}
