//! `tandem up FILE` (the supervisor) and the commands that talk to it: `ps`, `stop`, `restart`,
//! `down`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;
use tandem_partition::control::{self, Request, Response};
use tandem_partition::host::Host;
use tandem_partition::plan::plan;
use tandem_partition::supervisor::{self, Supervisor};

use crate::EXIT_USAGE;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The partition config (TOML).
    file: PathBuf,
    /// Run the supervisor in the background (its messages and the VMs' output then go to
    /// DIR/supervisor.log); returns once every VM has started, or with the error that stopped it.
    #[arg(long)]
    detach: bool,
    /// The seccomp filters of the supervisor's threads (control socket, output relays, process
    /// waiters): enforce, log or off. Each VM has its own (the config's `seccomp` key).
    #[arg(long, value_name = "enforce|log|off", default_value = "enforce")]
    seccomp: tandem_sandbox::SeccompMode,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Args, Debug)]
pub struct StateArgs {
    /// The supervisor's directory: control socket, logs, channel memory. Default:
    /// $TANDEM_STATE_DIR, else /run/tandem for root, else $XDG_RUNTIME_DIR/tandem.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct VmArgs {
    /// The VM's name.
    vm: String,
    #[command(flatten)]
    state: StateArgs,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl StateArgs {
    pub(crate) fn dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("TANDEM_STATE_DIR") {
            return d.into();
        }
        if euid() == 0 {
            return "/run/tandem".into();
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) => PathBuf::from(d).join("tandem"),
            None => std::env::temp_dir().join(format!("tandem-{}", euid())),
        }
    }
}

/// Where the CPU claims of `tandem up`s meet: `$TANDEM_LOCK_DIR` (checked like any other),
/// else root's host-wide directory or the user's own (see [`tandem_partition::locks`]).
fn lock_dir() -> PathBuf {
    std::env::var_os("TANDEM_LOCK_DIR")
        .map_or_else(tandem_partition::locks::default_dir, Into::into)
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("tandem: {msg}");
    ExitCode::from(code)
}

/// Locked memory each VM asks for must be lockable: root, or a large enough RLIMIT_MEMLOCK.
fn check_memlock(config: &tandem_partition::Config) -> Result<(), String> {
    if euid() == 0 {
        return Ok(());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    for vm in config.vms.iter().filter(|v| v.lock_memory) {
        let need = vm.memory.get_ref().0;
        if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need {
            return Err(config
                .error(
                    vm.name.span(),
                    format!(
                        "vm '{}': lock_memory needs {} MiB locked, but the locked-memory limit is {} KiB; raise it (ulimit -l) or run as root",
                        vm.name.get_ref(),
                        need >> 20,
                        lim.rlim_cur >> 10
                    ),
                )
                .to_string());
        }
    }
    Ok(())
}

/// Creates the state directory, owner-only.
fn make_state_dir(state: &Path) -> Result<(), String> {
    std::fs::create_dir_all(state)
        .and_then(|()| std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("cannot use {}: {e}", state.display()))
}

/// Creates a VM's jail directory: empty, owned by root (the supervisor), writable by no one else.
fn make_jail_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot make the jail {}: {e}", dir.display()))
}

/// Starts `tandem up` again in a new session with its output in DIR/supervisor.log, and waits
/// until its control socket answers (it runs) or it exits (it failed).
fn detach(args: &UpArgs) -> ExitCode {
    let state = args.state.dir();
    if let Err(e) = make_state_dir(&state) {
        return fail(e, 1);
    }
    let socket = state.join("control.sock");
    if control::send(&socket, &Request::Ps).is_ok() {
        return fail(
            format!(
                "another tandem up is running with state directory {} (use --state-dir)",
                state.display()
            ),
            EXIT_USAGE,
        );
    }
    let log_path = state.join("supervisor.log");
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot create {}: {e}", log_path.display()), 1),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find the tandem executable: {e}"), 1),
    };
    let mut cmd = Command::new(exe);
    cmd.arg("up")
        .arg(&args.file)
        .arg("--state-dir")
        .arg(&state)
        .arg("--seccomp")
        .arg(args.seccomp.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_or(std::process::Stdio::null(), Into::into),
        )
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the supervisor leaves the terminal's session.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the supervisor: {e}"), 1),
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let line = text
                .lines()
                .rev()
                .find(|l| l.starts_with("tandem: "))
                .unwrap_or("tandem: the supervisor ended")
                .to_string();
            eprintln!("{line}");
            return ExitCode::from(status.code().map_or(1, |c| c.clamp(1, 255) as u8));
        }
        if control::send(&socket, &Request::Ps).is_ok() {
            eprintln!(
                "tandem: supervisor running in the background (pid {}); log {}",
                child.id(),
                log_path.display()
            );
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn up(args: UpArgs) -> ExitCode {
    if args.detach {
        return detach(&args);
    }
    supervisor::block_signals();
    let config = match crate::check::load_and_check(&args.file) {
        Ok(c) => c,
        Err(e) => return fail(e, EXIT_USAGE),
    };
    if let Err(e) = check_memlock(&config) {
        return fail(e, EXIT_USAGE);
    }
    let state = args.state.dir();
    if let Err(e) = make_state_dir(&state) {
        return fail(e, 1);
    }
    let lock = match std::fs::File::create(state.join("supervisor.lock")) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot use {}: {e}", state.display()), 1),
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return fail(
            format!(
                "another tandem up is running with state directory {} (use --state-dir)",
                state.display()
            ),
            EXIT_USAGE,
        );
    }
    // One doorbell eventfd per channel member, inherited only by the channel's members (each
    // VM's process clears close-on-exec on its own); they live as long as the supervisor, so
    // restarted VMs find them again.
    let mut doorbells = Vec::new();
    for ch in &config.channels {
        let mut fds = Vec::new();
        for _ in ch.members.get_ref() {
            // SAFETY: eventfd creates a new descriptor, owned by this process until it exits.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if fd < 0 {
                return fail(format!("eventfd: {}", std::io::Error::last_os_error()), 1);
            }
            fds.push(fd);
        }
        doorbells.push(fds);
    }
    // As root, every VM not configured otherwise runs jailed (see `tandem run --jail`).
    // SAFETY: geteuid cannot fail.
    let jails = (unsafe { libc::geteuid() } == 0).then(|| state.join("jail"));
    let (mut vms, channels) = plan(
        &config,
        &state,
        &Host::current().cpus,
        &doorbells,
        jails.as_deref(),
    );
    for dir in vms.iter().filter_map(|v| v.jail.as_ref()) {
        if let Err(e) = make_jail_dir(dir) {
            return fail(e, 1);
        }
    }
    // Held here for the supervisor's life, and inherited by each VM's process for its own.
    let cpu_locks = match tandem_partition::locks::lock_cpus(&lock_dir(), &vms) {
        Ok(l) => l,
        Err(e) => return fail(e, EXIT_USAGE),
    };
    for (i, vm) in vms.iter_mut().enumerate() {
        for fd in cpu_locks.fds(i) {
            // A jailed VM closes what it inherited, but for what it is told to keep.
            vm.args.extend(["--keep-fd".into(), fd.to_string()]);
            vm.inherit.push(fd);
        }
    }
    let cleanup = |channels: &[tandem_partition::plan::ChannelPlan]| {
        for c in channels {
            let _ = std::fs::remove_file(&c.path);
        }
    };
    for c in &channels {
        let _ = std::fs::remove_file(&c.path);
        let cfg = tandem_vmm::ChannelConfig {
            path: c.path.clone(),
            size: c.size,
            peer_id: 0,
            doorbells: Vec::new(),
        };
        if let Err(e) = cfg.open() {
            cleanup(&channels);
            return fail(e, 1);
        }
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find the tandem executable: {e}"), 1),
    };
    // Every VM's own checks (images, disks, ports, KVM, placement) before any VM starts.
    for vm in &vms {
        let mut cmd = Command::new(&exe);
        cmd.args(&vm.args).arg("--dry-run");
        supervisor::inherit(&mut cmd, vm.inherit.clone());
        let out = cmd.output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                cleanup(&channels);
                let err = String::from_utf8_lossy(&o.stderr);
                let line = err
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("tandem: ");
                return fail(
                    format!("vm '{}': {line}; nothing was started", vm.name),
                    o.status.code().map_or(1, |c| c.clamp(1, 255) as u8),
                );
            }
            Err(e) => {
                cleanup(&channels);
                return fail(format!("cannot run {}: {e}", exe.display()), 1);
            }
        }
    }
    eprintln!(
        "tandem: {} VM(s) from {}; control socket {}",
        vms.len(),
        args.file.display(),
        state.join("control.sock").display()
    );
    let status = Supervisor {
        exe,
        state_dir: state,
        vms,
        channels,
        seccomp: args.seccomp,
    }
    .run();
    ExitCode::from(status.clamp(0, 255) as u8)
}

fn ask(state: &StateArgs, req: Request) -> Result<Response, ExitCode> {
    let socket = state.dir().join("control.sock");
    match control::send(&socket, &req) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => Err(fail(
            r.error.unwrap_or_else(|| "refused".into()),
            EXIT_USAGE,
        )),
        Err(e) => Err(fail(
            format!("no tandem up answers at {}: {e}", socket.display()),
            1,
        )),
    }
}

/// The exits a running VM leaves to its guest, as the VM itself reports them on its stats
/// socket (what is in force, not what the config asked for); `-` when it has none or does not
/// answer.
fn exits_in_guest(state: &StateArgs, name: &str) -> String {
    let socket = tandem_partition::plan::stats_socket(&state.dir(), name);
    crate::stats::sample(&socket)
        .ok()
        .and_then(|s| {
            let rt = s.settings.get("realtime")?.clone();
            let exits = rt.strip_prefix("exits left to the guest: ")?;
            Some(exits.split(';').next().unwrap_or("none").to_string())
        })
        .unwrap_or_else(|| "-".into())
}

fn table(r: &Response, state: &StateArgs) {
    println!(
        "{:<16} {:<9} {:<20} {:>7} {:>8} {:<8} {:<14} {:<6} {:<5} {:<22} LAST EXIT",
        "NAME", "ROLE", "STATE", "PID", "RESTARTS", "CPUS", "POLICY", "LOCKED", "HUGE", "IN GUEST"
    );
    for v in &r.vms {
        let in_guest = if v.pid.is_some() {
            exits_in_guest(state, &v.name)
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:<9} {:<20} {:>7} {:>8} {:<8} {:<14} {:<6} {:<5} {:<22} {}",
            v.name,
            v.role,
            v.state,
            v.pid.map_or("-".into(), |p| p.to_string()),
            v.restarts,
            v.cpus,
            v.policy,
            if v.locked { "yes" } else { "no" },
            if v.hugepages { "yes" } else { "no" },
            in_guest,
            v.last_exit.as_deref().unwrap_or("-")
        );
    }
}

pub fn ps(state: StateArgs) -> ExitCode {
    match ask(&state, Request::Ps) {
        Ok(r) => {
            table(&r, &state);
            ExitCode::SUCCESS
        }
        Err(c) => c,
    }
}

pub fn stop(a: VmArgs) -> ExitCode {
    ask(&a.state, Request::Stop { vm: a.vm }).map_or_else(|c| c, |_| ExitCode::SUCCESS)
}

pub fn restart(a: VmArgs) -> ExitCode {
    ask(&a.state, Request::Restart { vm: a.vm }).map_or_else(|c| c, |_| ExitCode::SUCCESS)
}

pub fn down(state: StateArgs) -> ExitCode {
    ask(&state, Request::Down).map_or_else(|c| c, |_| ExitCode::SUCCESS)
}
