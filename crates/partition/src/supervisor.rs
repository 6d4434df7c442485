//! The supervisor of `tandem up`: one `tandem run` process per VM (so one VM's device emulation
//! can never touch another VM's memory), their output in per-VM logs and prefixed on the
//! terminal, restart policies with back-off, a control socket, and a clean shutdown on
//! SIGINT/SIGTERM/SIGHUP.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tandem_sandbox::{Sandbox, SandboxConfig, SeccompMode, ThreadKind};

use crate::config::Role;
use crate::control::{Request, Response, VmStatus};
use crate::output::{relay, Log, Terminal, LOG_LIMIT};
use crate::plan::{ChannelPlan, VmPlan};
use crate::restart::{Decision, Ending, Tracker};

/// How long a VM gets to stop after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

enum Event {
    Exited {
        vm: usize,
        generation: u64,
        status: std::process::ExitStatus,
    },
    Command(Request, Sender<Response>),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Running { pid: u32, since: Instant },
    Waiting(Instant),
    Stopped,
    CrashLoop,
}

struct Vm {
    plan: VmPlan,
    state: State,
    generation: u64,
    tracker: Tracker,
    /// Set when tandem asked it to stop: its exit is not a failure.
    stopping: Option<Instant>,
    /// Start it again as soon as it has stopped (`tandem restart`).
    restart_after_stop: bool,
    last_exit: Option<String>,
    log: PathBuf,
}

/// What the supervisor needs to run.
pub struct Supervisor {
    /// The tandem executable.
    pub exe: PathBuf,
    /// Where logs, channel files and the control socket live.
    pub state_dir: PathBuf,
    /// The VMs.
    pub vms: Vec<VmPlan>,
    /// The channels' files (removed at the end).
    pub channels: Vec<ChannelPlan>,
    /// The seccomp filters of the supervisor's own threads (control socket, relays, waiters);
    /// the thread that starts VMs stays unfiltered, as a filter would pass to each VM.
    pub seccomp: SeccompMode,
}

/// The filters of the supervisor's threads, compiled once by [`Supervisor::run`].
static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// Installs `kind`'s filter on the calling thread (nothing before [`Supervisor::run`] set
/// them up, as in unit tests of the parts).
fn filter(kind: ThreadKind) {
    if let Some(s) = SANDBOX.get() {
        s.apply_or_exit(kind);
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and the threads it starts), so
/// [`Supervisor::run`] can take them as events. Call it first thing.
pub fn block_signals() {
    // SAFETY: plain signal-mask manipulation of the calling thread with a set built here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Lets `cmd`'s process inherit `fds` (each VM's doorbells and CPU locks) and no other
/// descriptor above 2, not even one the supervisor itself inherited without close-on-exec.
pub fn inherit(cmd: &mut Command, fds: Vec<i32>) {
    // SAFETY: between fork and exec only close_range and fcntl (async-signal-safe system calls)
    // on the child's own descriptor table; the parent's flags are not touched.
    unsafe {
        cmd.pre_exec(move || {
            // Kernels before 5.11 lack the flag: then only tandem's own are close-on-exec.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "powered off".into(),
        (Some(3), _) => "guest kernel panic (status 3)".into(),
        (Some(4), _) => "guest reboot (status 4)".into(),
        (Some(5), _) => "vCPU failure (status 5)".into(),
        (Some(c), _) if c > 128 => format!("stopped by signal {} (status {c})", c - 128),
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "ended".into(),
    }
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects; pid is a child of this process.
    unsafe { libc::kill(pid as i32, sig) };
}

impl Supervisor {
    /// The control socket's path.
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    fn start(&self, vm: &mut Vm, index: usize, tx: &Sender<Event>) {
        vm.generation += 1;
        vm.stopping = None;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&vm.plan.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let supervisor = std::process::id() as i32;
        // SAFETY: between fork and exec only async-signal-safe calls: a process group of its
        // own (the terminal's Ctrl-C goes to the supervisor, which stops VMs in order); SIGTERM
        // when the supervisor dies, even by SIGKILL (a VM never runs on unsupervised; it shuts
        // down cleanly, and its CPU locks, which it inherits, go with it), unless it died
        // before that was set; and the supervisor's blocked signals unblocked.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != supervisor {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        inherit(&mut cmd, vm.plan.inherit.clone());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                crate::say!("tandem: vm '{}': cannot start: {e}", vm.plan.name);
                vm.state = State::Stopped;
                vm.last_exit = Some(format!("cannot start: {e}"));
                return;
            }
        };
        let pid = child.id();
        let log = Arc::new(Mutex::new(Log::open(&vm.log, LOG_LIMIT)));
        let name = vm.plan.name.clone();
        let mut readers = Vec::new();
        for (stream, is_err) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                false,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                true,
            ),
        ] {
            let (Some(stream), log) = (stream, log.clone()) else {
                continue;
            };
            let name = name.clone();
            readers.push(thread::spawn(move || {
                filter(ThreadKind::Relay);
                relay(stream, Some(&log), &name, is_err, terminal())
            }));
        }
        let generation = vm.generation;
        let tx = tx.clone();
        thread::spawn(move || {
            filter(ThreadKind::Relay);
            if let Ok(status) = child.wait() {
                for r in readers {
                    let _ = r.join();
                }
                let _ = tx.send(Event::Exited {
                    vm: index,
                    generation,
                    status,
                });
            }
        });
        crate::say!(
            "tandem: vm '{name}' started (pid {pid}, CPUs {})",
            vm.plan
                .cpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        vm.state = State::Running {
            pid,
            since: Instant::now(),
        };
    }

    fn stop(vm: &mut Vm) {
        if let State::Running { pid, .. } = vm.state {
            if vm.stopping.is_none() {
                vm.stopping = Some(Instant::now());
                send_signal(pid, libc::SIGTERM);
            }
        } else if matches!(vm.state, State::Waiting(_) | State::CrashLoop) {
            vm.state = State::Stopped;
        }
    }

    fn status(vm: &Vm) -> VmStatus {
        let (state, pid, uptime) = match &vm.state {
            State::Running { pid, since } => (
                if vm.stopping.is_some() {
                    "stopping"
                } else {
                    "running"
                }
                .to_string(),
                Some(*pid),
                Some(since.elapsed().as_secs()),
            ),
            State::Waiting(at) => (
                format!(
                    "restarting in {:.1}s",
                    at.saturating_duration_since(Instant::now()).as_secs_f64()
                ),
                None,
                None,
            ),
            State::Stopped => ("stopped".into(), None, None),
            State::CrashLoop => ("crash-loop".into(), None, None),
        };
        VmStatus {
            name: vm.plan.name.clone(),
            role: match vm.plan.role {
                Role::Realtime => "realtime".into(),
                Role::General => "general".into(),
            },
            state,
            pid,
            restarts: vm.tracker.restarts,
            cpus: vm
                .plan
                .cpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            policy: match vm.plan.role {
                Role::Realtime => "SCHED_FIFO 40".into(),
                Role::General => "SCHED_OTHER".into(),
            },
            locked: vm.plan.lock_memory,
            hugepages: vm.plan.hugepages,
            uptime_s: uptime,
            last_exit: vm.last_exit.clone(),
        }
    }

    /// Starts every VM and supervises them until `down`, a termination signal, or until none is
    /// left running or due to restart. Returns the exit status for the supervisor.
    ///
    /// Each VM gets SIGTERM when the thread that started it ends (`PR_SET_PDEATHSIG` follows
    /// the thread, not the process): this thread starts them all, so call this from the main
    /// thread, or one that lives as long as the supervisor.
    pub fn run(self) -> i32 {
        let sandbox = Sandbox::prepare(SandboxConfig {
            mode: self.seccomp,
            test_violation: None,
        });
        match sandbox {
            Ok(s) => {
                let _ = SANDBOX.set(s);
            }
            Err(e) => {
                crate::say!("tandem: {e}");
                return 1;
            }
        }
        let (tx, rx) = mpsc::channel();
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        match UnixListener::bind(&socket) {
            Ok(listener) => {
                let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
                let tx = tx.clone();
                thread::spawn(move || {
                    filter(ThreadKind::Control);
                    serve(listener, tx)
                });
            }
            Err(e) => crate::say!("tandem: no control socket at {}: {e}", socket.display()),
        }
        {
            let tx = tx.clone();
            thread::spawn(move || {
                filter(ThreadKind::Relay);
                wait_signals(tx)
            });
        }
        let mut vms: Vec<Vm> = self
            .vms
            .iter()
            .map(|p| Vm {
                plan: p.clone(),
                state: State::Stopped,
                generation: 0,
                tracker: Tracker::default(),
                stopping: None,
                restart_after_stop: false,
                last_exit: None,
                log: self.state_dir.join(format!("{}.log", p.name)),
            })
            .collect();
        for (i, vm) in vms.iter_mut().enumerate() {
            self.start(vm, i, &tx);
        }
        let status = self.supervise(&mut vms, &rx, &tx);
        let _ = std::fs::remove_file(&socket);
        for vm in &self.vms {
            let _ = std::fs::remove_file(crate::plan::stats_socket(&self.state_dir, &vm.name));
        }
        for c in &self.channels {
            let _ = std::fs::remove_file(&c.path);
        }
        status
    }

    fn supervise(&self, vms: &mut [Vm], rx: &Receiver<Event>, tx: &Sender<Event>) -> i32 {
        let mut shutting_down = false;
        let mut failed = false;
        loop {
            let now = Instant::now();
            // Due restarts and overdue stops.
            for (i, vm) in vms.iter_mut().enumerate() {
                if let State::Waiting(at) = vm.state {
                    if at <= now && !shutting_down {
                        self.start(vm, i, tx);
                    }
                }
                if let (State::Running { pid, .. }, Some(t)) = (&vm.state, vm.stopping) {
                    if now.duration_since(t) > STOP_GRACE {
                        send_signal(*pid, libc::SIGKILL);
                    }
                }
            }
            let active = vms
                .iter()
                .any(|v| matches!(v.state, State::Running { .. } | State::Waiting(_)));
            let held = vms
                .iter()
                .any(|v| v.last_exit.as_deref() == Some("stopped by request"));
            if shutting_down && !vms.iter().any(|v| matches!(v.state, State::Running { .. })) {
                crate::say!("tandem: every VM is stopped");
                return 0;
            }
            if !active && !held && !shutting_down {
                crate::say!("tandem: no VM is left running");
                return i32::from(failed);
            }
            let next = vms
                .iter()
                .filter_map(|v| match v.state {
                    State::Waiting(at) => Some(at),
                    _ => None,
                })
                .min()
                .map_or(Duration::from_millis(500), |at| {
                    at.saturating_duration_since(now)
                        .min(Duration::from_millis(500))
                });
            let event = match rx.recv_timeout(next) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return 1,
            };
            match event {
                Event::Signal(sig) => {
                    crate::say!("tandem: signal {sig}: stopping every VM");
                    shutting_down = true;
                    vms.iter_mut().for_each(Self::stop);
                }
                Event::Exited {
                    vm,
                    generation,
                    status,
                } => {
                    let Some(v) = vms.get_mut(vm) else { continue };
                    if v.generation != generation {
                        continue;
                    }
                    let requested = v.stopping.is_some();
                    let ending = if requested {
                        Ending::Requested
                    } else {
                        Ending::from_status(status.code())
                    };
                    v.last_exit = Some(if requested {
                        "stopped by request".into()
                    } else {
                        describe(status)
                    });
                    v.stopping = None;
                    v.state = State::Stopped;
                    if v.restart_after_stop && !shutting_down {
                        v.restart_after_stop = false;
                        v.tracker.reset();
                        v.last_exit = Some("restarted by request".into());
                        self.start(v, vm, tx);
                        continue;
                    }
                    if shutting_down {
                        continue;
                    }
                    let policy = v.plan.restart;
                    match v.tracker.decide(policy, ending, Instant::now()) {
                        Decision::Stay => {
                            if ending == Ending::Failure {
                                failed = true;
                            }
                            crate::say!(
                                "tandem: vm '{}' ended: {}",
                                v.plan.name,
                                v.last_exit.as_deref().unwrap_or("")
                            );
                        }
                        Decision::Restart(d) => {
                            crate::say!(
                                "tandem: vm '{}' ended: {}; restarting in {:.1} s (restart {})",
                                v.plan.name,
                                v.last_exit.as_deref().unwrap_or(""),
                                d.as_secs_f64(),
                                v.tracker.restarts
                            );
                            v.state = State::Waiting(Instant::now() + d);
                        }
                        Decision::CrashLoop => {
                            failed = true;
                            crate::say!(
                                "tandem: vm '{}' ended: {}; it keeps failing ({} restarts in {} s), so it is left stopped",
                                v.plan.name,
                                v.last_exit.as_deref().unwrap_or(""),
                                crate::restart::MAX_RESTARTS,
                                crate::restart::WINDOW.as_secs()
                            );
                            v.state = State::CrashLoop;
                        }
                    }
                }
                Event::Command(req, reply) => {
                    let mut resp = Response {
                        ok: true,
                        ..Default::default()
                    };
                    let find =
                        |vms: &mut [Vm], name: &str| vms.iter().position(|v| v.plan.name == name);
                    match &req {
                        Request::Ps => {}
                        Request::Down => {
                            shutting_down = true;
                            vms.iter_mut().for_each(Self::stop);
                        }
                        Request::Stop { vm } | Request::Restart { vm } => match find(vms, vm) {
                            None => {
                                resp.ok = false;
                                resp.error = Some(format!("no VM named '{vm}'"));
                            }
                            Some(i) => {
                                let v = &mut vms[i];
                                if matches!(req, Request::Restart { .. }) {
                                    if matches!(v.state, State::Running { .. }) {
                                        v.restart_after_stop = true;
                                        Self::stop(v);
                                    } else {
                                        v.tracker.reset();
                                        self.start(v, i, tx);
                                    }
                                } else {
                                    Self::stop(v);
                                    v.last_exit = Some("stopped by request".into());
                                }
                            }
                        },
                    }
                    resp.vms = vms.iter().map(Self::status).collect();
                    let _ = reply.send(resp);
                }
            }
        }
    }
}

/// The terminal every VM's output goes to: never waited for (see [`crate::output`]).
fn terminal() -> &'static Terminal {
    static TERMINAL: OnceLock<Terminal> = OnceLock::new();
    TERMINAL.get_or_init(Terminal::stdio)
}

fn wait_signals(tx: Sender<Event>) {
    // SAFETY: sigwait on a set built here; the signals are blocked in every thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        loop {
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) == 0 && tx.send(Event::Signal(sig)).is_err() {
                return;
            }
        }
    }
}

/// Serves the control socket (see [`crate::control::serve`]): each request goes to the
/// supervising loop, which answers it.
fn serve(listener: UnixListener, tx: Sender<Event>) {
    let tx = Mutex::new(tx);
    crate::control::serve(
        listener,
        move |req| {
            let (rtx, rrx) = mpsc::channel();
            let sent = tx
                .lock()
                .map(|tx| tx.send(Event::Command(req, rtx)).is_ok())
                .unwrap_or(false);
            match sent.then(|| rrx.recv_timeout(STOP_GRACE)) {
                Some(Ok(resp)) => resp,
                _ => Response {
                    ok: false,
                    error: Some("the supervisor did not answer".into()),
                    vms: Vec::new(),
                },
            }
        },
        crate::control::CLIENT_TIMEOUT,
    );
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
