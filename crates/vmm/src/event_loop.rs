//! The VMM thread's event loop: host stdin to the serial or virtio console, the guest's power events,
//! termination signals, and the stats socket's clients.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use tandem_devices::{EventFdTrigger, SerialDevice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::error::VmError;
use crate::signals::StopSignals;

const TOK_STDIN: u64 = 0;
const TOK_POWEROFF: u64 = 1;
const TOK_RESET: u64 = 2;
const TOK_VCPU: u64 = 3;
const TOK_SIGNAL: u64 = 4;
const TOK_STATS: u64 = 5;
/// Ctrl-A, then 'x', quits (as in QEMU) when stdin is a raw terminal.
const ESCAPE: u8 = 0x01;
/// Host input held back while the guest's receive FIFO is full.
const MAX_PENDING: usize = 4096;

/// What the loop watches.
pub struct EventSources<'a> {
    /// Signalled by the ACPI device on S5.
    pub poweroff: &'a EventFdTrigger,
    /// Signalled by the ACPI device or the i8042 on reset.
    pub reset: &'a EventFdTrigger,
    /// Signalled by a vCPU thread that stopped.
    pub vcpu_done: &'a EventFdTrigger,
    /// SIGTERM, SIGINT and SIGHUP.
    pub signals: &'a StopSignals,
    /// The console that receives stdin (the UART, or the virtio console).
    pub input: &'a dyn InputSink,
    /// Whether to forward stdin.
    pub stdin: bool,
    /// Whether the Ctrl-A x escape is active.
    pub escape: bool,
    /// The stats socket and what it reports, if there is one.
    pub stats: Option<(
        &'a mut crate::stats::server::StatsServer,
        &'a crate::stats::Collector,
    )>,
}

/// A console that takes host input.
pub trait InputSink {
    /// Takes what fits of `bytes`; returns how many were taken (the rest is offered again).
    fn enqueue(&self, bytes: &[u8]) -> usize;
}

impl InputSink for Mutex<SerialDevice> {
    fn enqueue(&self, bytes: &[u8]) -> usize {
        let Ok(mut s) = self.lock() else {
            return 0;
        };
        s.enqueue_input(bytes).unwrap_or_else(|e| {
            tracing::warn!("serial input dropped: {e}");
            bytes.len()
        })
    }
}

impl InputSink for tandem_virtio::ConsoleInput {
    fn enqueue(&self, bytes: &[u8]) -> usize {
        self.push(bytes)
    }
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// The guest powered off.
    PowerOff,
    /// The guest reset.
    Reset,
    /// A vCPU stopped.
    VcpuDone,
    /// The user typed Ctrl-A x.
    UserQuit,
    /// A termination signal arrived.
    Signal(i32),
}

struct Stdin {
    pending: Vec<u8>,
    after_escape: bool,
    watching: bool,
    eof: bool,
}

/// Runs until the guest stops.
pub fn run(mut src: EventSources<'_>) -> Result<LoopEnd, VmError> {
    let epoll = Epoll::new().map_err(VmError::Device)?;
    let add = |fd: i32, tok: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, tok),
        )
    };
    add(src.poweroff.as_raw_fd(), TOK_POWEROFF).map_err(VmError::Device)?;
    add(src.reset.as_raw_fd(), TOK_RESET).map_err(VmError::Device)?;
    add(src.vcpu_done.as_raw_fd(), TOK_VCPU).map_err(VmError::Device)?;
    add(src.signals.as_raw_fd(), TOK_SIGNAL).map_err(VmError::Device)?;
    if let Some((server, _)) = &src.stats {
        add(server.as_raw_fd(), TOK_STATS).map_err(VmError::Device)?;
    }
    // Regular files and /dev/null cannot be polled: then there is simply no input.
    let mut stdin = Stdin {
        pending: Vec::new(),
        after_escape: false,
        eof: false,
        watching: src.stdin && add(0, TOK_STDIN).is_ok(),
    };
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let timeout = if stdin.pending.is_empty() { -1 } else { 10 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VmError::Device(e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOK_POWEROFF => return Ok(LoopEnd::PowerOff),
                TOK_RESET => return Ok(LoopEnd::Reset),
                TOK_VCPU => return Ok(LoopEnd::VcpuDone),
                TOK_SIGNAL => {
                    if let Some(sig) = src.signals.read() {
                        return Ok(LoopEnd::Signal(sig));
                    }
                }
                TOK_STATS => {
                    if let Some((server, collector)) = src.stats.as_mut() {
                        server.serve(collector);
                    }
                }
                TOK_STDIN => {
                    if read_stdin(&mut stdin, src.escape) {
                        return Ok(LoopEnd::UserQuit);
                    }
                    if !stdin.watching {
                        let _ = epoll.ctl(ControlOperation::Delete, 0, EpollEvent::default());
                    }
                }
                _ => {}
            }
        }
        flush_pending(&mut stdin, src.input, &epoll);
    }
}

/// Reads what stdin has; returns true when the quit escape was typed.
fn read_stdin(stdin: &mut Stdin, escape: bool) -> bool {
    let mut buf = [0u8; 256];
    // SAFETY: reads at most buf.len() bytes into a buffer we own, from fd 0.
    let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        // EOF or error: stop reading, the guest keeps running.
        stdin.watching = false;
        stdin.eof = true;
        return false;
    }
    for &b in &buf[..n as usize] {
        if escape && stdin.after_escape {
            stdin.after_escape = false;
            match b {
                b'x' | b'X' => return true,
                ESCAPE => stdin.pending.push(ESCAPE),
                other => stdin.pending.extend_from_slice(&[ESCAPE, other]),
            }
        } else if escape && b == ESCAPE {
            stdin.after_escape = true;
        } else {
            stdin.pending.push(b);
        }
    }
    false
}

fn flush_pending(stdin: &mut Stdin, input: &dyn InputSink, epoll: &Epoll) {
    if stdin.pending.is_empty() {
        return;
    }
    let n = input.enqueue(&stdin.pending);
    stdin.pending.drain(..n);
    // Back-pressure: stop reading stdin while too much is held back.
    let ev = EpollEvent::new(EventSet::IN, TOK_STDIN);
    if stdin.watching && stdin.pending.len() >= MAX_PENDING {
        let _ = epoll.ctl(ControlOperation::Delete, 0, ev);
        stdin.watching = false;
    } else if !stdin.watching && !stdin.eof && stdin.pending.is_empty() {
        stdin.watching = epoll.ctl(ControlOperation::Add, 0, ev).is_ok();
    }
}
