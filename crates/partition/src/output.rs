//! The VMs' output under `tandem up`: each line goes to the VM's log, bounded by rotation, and to
//! the terminal through a bounded queue that is never waited for, so neither a guest that prints
//! without newlines nor a terminal that stops reading can grow the supervisor or stall a VM.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Longest line relayed as one: a longer one is split.
pub const MAX_LINE: usize = 4096;
/// A VM's log is rotated when it would grow past this: `NAME.log`'s content moves to
/// `NAME.log.1` (replacing the one before), so a VM's logs hold at most twice this.
pub const LOG_LIMIT: u64 = 16 << 20;
/// Lines waiting for the terminal; more are dropped and counted.
pub const TERMINAL_QUEUE: usize = 1024;

/// A log file with a size bound, kept by rotating it once.
#[derive(Debug)]
pub struct Log {
    file: Option<File>,
    /// `NAME.log.1`, opened with the log: rotating opens no file (the relay threads that
    /// rotate logs run under a seccomp filter that allows no open).
    old: Option<File>,
    written: u64,
    limit: u64,
}

/// Opens a log for appending, owner-only even if it existed with another mode.
fn open_log(path: &Path) -> Option<File> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .ok()?;
    Some(f)
}

/// Moves `from`'s content to `to` (replacing it) and empties `from`.
fn rotate(from: &mut File, to: &mut File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    to.set_len(0)?;
    to.seek(SeekFrom::Start(0))?;
    from.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
    }
    // Appending, the next write goes to offset 0.
    from.set_len(0)
}

impl Log {
    /// Opens (appending to) the log at `path`, rotated at `limit` bytes. A log that cannot be
    /// opened is skipped: the VM runs on without one.
    pub fn open(path: &Path, limit: u64) -> Self {
        let file = open_log(path);
        let written = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        Log {
            file,
            old: open_log(&Self::rotated(path)),
            written,
            limit,
        }
    }

    /// Where the previous part goes when the log is rotated.
    pub fn rotated(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        p.into()
    }

    /// Appends `line` (with its newline), rotating first when it would pass the limit.
    pub fn write_line(&mut self, line: &[u8]) {
        let len = line.len() as u64 + 1;
        if self.written > 0 && self.written + len > self.limit {
            match (self.file.as_mut(), self.old.as_mut()) {
                (Some(f), Some(old)) => {
                    // A log that cannot be rotated is dropped, not let grow.
                    if rotate(f, old).is_err() {
                        self.file = None;
                    }
                }
                _ => self.file = None,
            }
            self.written = 0;
        }
        if let Some(f) = self.file.as_mut() {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line);
            buf.push(b'\n');
            if f.write_all(&buf).is_ok() {
                self.written += len;
            }
        }
    }
}

/// A line for the terminal: (to stderr, text).
pub type TerminalLine = (bool, String);

/// The terminal as the relays see it: a bounded queue that never blocks them.
#[derive(Debug, Clone)]
pub struct Terminal {
    tx: SyncSender<TerminalLine>,
    dropped: Arc<AtomicU64>,
}

impl Terminal {
    /// A terminal whose lines wait in a queue of `capacity` for whoever reads `Receiver`.
    pub fn new(capacity: usize) -> (Self, Receiver<TerminalLine>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        (
            Terminal {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// The process's stdout and stderr, written by a thread of their own, which alone waits
    /// when the terminal does not read.
    pub fn stdio() -> Self {
        let (term, rx) = Self::new(TERMINAL_QUEUE);
        let dropped = term.dropped.clone();
        // A file (`up --detach`'s supervisor.log) takes VM output up to the log limit; the VMs'
        // own logs have the rest.
        let is_file = |fd| {
            // SAFETY: fstat fills a zeroed struct we own.
            let (rc, st) = unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                (libc::fstat(fd, &mut st), st)
            };
            rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG
        };
        let mut budget = (is_file(1) || is_file(2)).then_some(LOG_LIMIT);
        std::thread::spawn(move || {
            let mut reported = 0;
            for (is_err, text) in rx {
                if let Some(left) = budget.as_mut() {
                    let len = text.len() as u64 + 1;
                    if *left < len {
                        if *left > 0 {
                            crate::say!(
                                "tandem: VM output is no longer copied here ({} MiB); the VMs' logs have it",
                                LOG_LIMIT >> 20
                            );
                            *left = 0;
                        }
                        continue;
                    }
                    *left -= len;
                }
                let lost = dropped.load(Ordering::Relaxed);
                if lost != reported {
                    crate::say!(
                        "tandem: {} line(s) of VM output not shown: the terminal did not keep up (the logs have them)",
                        lost - reported
                    );
                    reported = lost;
                }
                let _ = if is_err {
                    write_line(&mut std::io::stderr().lock(), &text)
                } else {
                    write_line(&mut std::io::stdout().lock(), &text)
                };
            }
        });
        term
    }

    /// Queues `text`, or counts it as dropped when the queue is full.
    pub fn send(&self, is_err: bool, text: String) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send((is_err, text)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Copies a VM's output, line by line (a line longer than [`MAX_LINE`] in pieces), to its log
/// and, prefixed with its name, to the terminal, until the stream ends. Returns the largest
/// capacity its line buffer reached.
pub fn relay(
    stream: impl Read,
    log: Option<&Mutex<Log>>,
    name: &str,
    is_err: bool,
    term: &Terminal,
) -> usize {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(MAX_LINE + 1);
    let mut peak = line.capacity();
    loop {
        let room = (MAX_LINE + 1 - line.len()) as u64;
        let n = match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        peak = peak.max(line.capacity());
        let end = n == 0;
        if line.is_empty() {
            if end {
                break;
            }
            continue;
        }
        let newline = line.ends_with(b"\n");
        if !end && !newline && line.len() <= MAX_LINE {
            continue;
        }
        // A full buffer without a newline: its first MAX_LINE bytes go as one line.
        let split = !newline && line.len() > MAX_LINE;
        let piece = if split { &line[..MAX_LINE] } else { &line[..] };
        let text = String::from_utf8_lossy(piece);
        let text = text.trim_end_matches('\n').trim_end_matches('\r');
        if let Some(log) = log {
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_line(text.as_bytes());
        }
        term.send(is_err, format!("{name:>10} | {text}"));
        if split {
            line.drain(..MAX_LINE);
            continue;
        }
        line.clear();
        if end {
            break;
        }
    }
    peak
}

/// Writes `line` and a newline to `w` in one `write` (where the stream takes it whole). The
/// supervisor's messages (stderr) and the VMs' lines (stdout) come from different threads and
/// often share one file (`tandem up >log 2>&1`): `writeln!` and `eprintln!` issue one write per
/// formatted piece, and another thread's line could land between them, mid-line.
pub fn write_line(w: &mut impl Write, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    w.write_all(&buf)
}

/// `eprintln!` as one write ([`write_line`]): the supervisor's messages never split around
/// another thread's output.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = $crate::output::write_line(&mut std::io::stderr().lock(), &format!($($arg)*));
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that records each write call.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);
    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_reaches_the_stream_in_one_write() {
        let vm = "gp";
        // What the supervisor wrote before: a line in pieces, so that a VM line written to the
        // same file by the relay thread could land in the middle (seen in up.rs's output).
        let mut pieces = Calls::default();
        writeln!(pieces, "tandem: vm '{vm}' restarting in {:.1}s", 0.5).unwrap();
        assert!(pieces.0.len() > 1);
        let mut whole = Calls::default();
        write_line(
            &mut whole,
            &format!("tandem: vm '{vm}' restarting in {:.1}s", 0.5),
        )
        .unwrap();
        assert_eq!(
            whole.0,
            vec![b"tandem: vm 'gp' restarting in 0.5s\n".to_vec()]
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-out-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lines_are_relayed_and_long_ones_split() {
        let dir = scratch("lines");
        let log = Mutex::new(Log::open(&dir.join("v.log"), LOG_LIMIT));
        let (term, rx) = Terminal::new(100);
        let long = "y".repeat(MAX_LINE + 10);
        let input = format!("one\r\ntwo\n{long}\nlast without newline");
        relay(input.as_bytes(), Some(&log), "v", false, &term);
        let got: Vec<String> = rx.try_iter().map(|(_, t)| t).collect();
        let want = [
            "one".to_string(),
            "two".into(),
            "y".repeat(MAX_LINE),
            "y".repeat(10),
            "last without newline".into(),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|w| format!("{:>10} | {w}", "v"))
                .collect::<Vec<_>>()
        );
        let text = std::fs::read_to_string(dir.join("v.log")).unwrap();
        assert_eq!(text, want.join("\n") + "\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_gibibyte_without_newline_to_a_stalled_terminal_keeps_memory_and_logs_bounded() {
        let dir = scratch("gib");
        let path = dir.join("v.log");
        let limit = 1 << 20;
        let log = Mutex::new(Log::open(&path, limit));
        // Nobody reads this terminal: it stalls from the 16th line on.
        let (term, _rx) = Terminal::new(16);
        let (r, w) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![b'x'; 1 << 16];
            for _ in 0..(1 << 14) {
                w.write_all(&chunk).unwrap();
            }
            w.write_all(b"\nthe end\n").unwrap();
        });
        let peak = relay(r, Some(&log), "v", false, &term);
        writer.join().unwrap();
        assert!(peak <= 2 * MAX_LINE, "the line buffer grew to {peak} bytes");
        let lines = (1u64 << 30).div_ceil(MAX_LINE as u64) + 1;
        assert_eq!(term.dropped(), lines - 16);
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&path) <= limit && size(&Log::rotated(&path)) <= limit);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("\nthe end\n"),
            "{}",
            &text[text.len() - 20..]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_is_rotated_once_at_its_limit() {
        let dir = scratch("rotate");
        let path = dir.join("v.log");
        std::fs::write(&path, "old\n").unwrap();
        let mut log = Log::open(&path, 10);
        log.write_line(b"12345"); // 4 + 6 = 10: still fits
        log.write_line(b"abc"); // would pass 10: rotated first
        log.write_line(b"defgh");
        log.write_line(b"ij"); // rotated again, the oldest part dropped
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "ij\n");
        assert_eq!(
            std::fs::read_to_string(Log::rotated(&path)).unwrap(),
            "abc\ndefgh\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
