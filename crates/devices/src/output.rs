//! Console output that never blocks the guest: the device side appends to a bounded buffer and
//! returns at once; a thread of its own writes the buffer to the real destination (a terminal,
//! a pipe, a file). When the destination stalls (a terminal on hold, a pipe nobody reads), the
//! buffer fills and further output is dropped and counted, instead of stopping the vCPU that
//! wrote it and every vCPU waiting for the same device lock.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes held for a destination that is not keeping up.
pub const CAPACITY: usize = 1 << 20;
/// Most bytes handed to the destination in one write.
const BATCH: usize = 64 * 1024;

#[derive(Default)]
struct State {
    data: VecDeque<u8>,
    /// Bytes dropped since the writer last reported it.
    dropped: u64,
    /// Bytes dropped in all.
    dropped_total: u64,
    /// No more output will come; the writer ends once the buffer is empty.
    closed: bool,
    /// The writer has ended.
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The device side: a `Write` that takes every byte at once and never blocks.
#[derive(Clone)]
pub struct OutputQueue {
    shared: Arc<Shared>,
}

/// The owner's side: ends the writer thread.
pub struct OutputDrain {
    shared: Arc<Shared>,
}

/// A queue of `capacity` bytes for `dest`, and its writer thread, named `name`, which runs
/// `on_start` (e.g. to install its seccomp filter) and then writes what the queue takes.
/// The thread starts with [`PendingWriter::start`], so that a process that must stay
/// single-threaded for a while (to enter its jail) starts it later; the queue takes output at
/// once and holds it.
pub fn prepare(
    dest: Box<dyn Write + Send>,
    name: &str,
    capacity: usize,
    on_start: Box<dyn FnOnce() + Send>,
) -> (OutputQueue, OutputDrain, PendingWriter) {
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        changed: Condvar::new(),
        capacity,
    });
    (
        OutputQueue {
            shared: shared.clone(),
        },
        OutputDrain {
            shared: shared.clone(),
        },
        PendingWriter {
            shared,
            name: name.into(),
            run: Some((dest, on_start)),
        },
    )
}

/// The writer thread of a [`prepare`]d queue, not started yet. Dropped unstarted, it counts as
/// ended, so that its drain does not wait for it.
pub struct PendingWriter {
    shared: Arc<Shared>,
    name: String,
    run: Option<WriterRun>,
}

/// What a [`PendingWriter`] runs: its destination and its start hook.
type WriterRun = (Box<dyn Write + Send>, Box<dyn FnOnce() + Send>);

impl PendingWriter {
    /// Starts the thread.
    pub fn start(mut self) -> io::Result<()> {
        let Some((dest, on_start)) = self.run.take() else {
            return Ok(());
        };
        let s = self.shared.clone();
        let started = thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                on_start();
                write_out(&s, dest)
            });
        if started.is_err() {
            self.end();
        }
        started.map(drop)
    }

    fn end(&self) {
        let mut st = self.shared.lock();
        st.done = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for PendingWriter {
    fn drop(&mut self) {
        if self.run.is_some() {
            self.end();
        }
    }
}

fn write_out(shared: &Shared, mut dest: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let dropped = {
            let mut st = shared.lock();
            while st.data.is_empty() && st.dropped == 0 && !st.closed {
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.data.is_empty() && st.dropped == 0 {
                st.done = true;
                shared.changed.notify_all();
                return;
            }
            let n = st.data.len().min(BATCH);
            batch.clear();
            batch.extend(st.data.drain(..n));
            shared.changed.notify_all();
            std::mem::take(&mut st.dropped)
        };
        // A destination that fails (closed stdout) just loses the output: the guest goes on.
        let _ = dest.write_all(&batch);
        if dropped > 0 {
            let _ = write!(
                dest,
                "\r\n[tandem: {dropped} bytes of console output dropped: the output did not keep up]\r\n"
            );
        }
        let _ = dest.flush();
    }
}

impl Write for OutputQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.shared.lock();
        let room = self.shared.capacity.saturating_sub(st.data.len());
        let n = buf.len().min(room);
        st.data.extend(&buf[..n]);
        let lost = (buf.len() - n) as u64;
        st.dropped += lost;
        st.dropped_total += lost;
        self.shared.changed.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl OutputDrain {
    /// Lets the writer finish what is buffered, waiting at most `timeout` (the destination may
    /// never take it); returns the bytes dropped in all, and whether everything was written.
    pub fn finish(&self, timeout: Duration) -> (u64, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.changed.notify_all();
        while !st.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        (st.dropped_total, st.done)
    }
}

impl Drop for OutputDrain {
    /// Output still buffered gets a short while to reach its destination, on every way out
    /// where [`OutputDrain::finish`] was not called (once is enough: a stalled destination
    /// must not hold up the exit twice).
    fn drop(&mut self) {
        if !self.shared.lock().closed {
            self.finish(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn spawn(
        dest: Box<dyn Write + Send>,
        name: &str,
        capacity: usize,
        on_start: Box<dyn FnOnce() + Send>,
    ) -> io::Result<(OutputQueue, OutputDrain)> {
        let (queue, drain, writer) = prepare(dest, name, capacity, on_start);
        writer.start()?;
        Ok((queue, drain))
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A destination that blocks until told to go on, as a terminal on hold does.
    struct Stalled(mpsc::Receiver<()>, Captured);
    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            self.1.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn everything_written_arrives_in_order_and_finish_waits_for_it() {
        let out = Captured::default();
        let (mut q, drain) =
            spawn(Box::new(out.clone()), "test-out", CAPACITY, Box::new(|| ())).unwrap();
        let mut want = Vec::new();
        for i in 0..10_000u32 {
            let line = format!("line {i}\n");
            q.write_all(line.as_bytes()).unwrap();
            want.extend_from_slice(line.as_bytes());
        }
        assert_eq!(drain.finish(Duration::from_secs(10)), (0, true));
        assert_eq!(*out.0.lock().unwrap(), want);
    }

    #[test]
    fn a_stalled_destination_never_blocks_the_writer_and_the_loss_is_reported() {
        let out = Captured::default();
        let (go, wait) = mpsc::channel();
        let (mut q, drain) = spawn(
            Box::new(Stalled(wait, out.clone())),
            "test-out",
            4096,
            Box::new(|| ()),
        )
        .unwrap();
        // 1 MiB into a destination that takes nothing: every write returns at once.
        for _ in 0..256 {
            assert_eq!(q.write(&[b'x'; 4096]).unwrap(), 4096);
        }
        let (dropped, done) = drain.finish(Duration::from_millis(100));
        assert!(!done, "the destination is still stalled");
        assert!(dropped >= 1_048_576 - 2 * 4096, "{dropped}");
        // Once the destination moves again, what was kept arrives with a note of the loss.
        drop(go);
        assert!(drain.finish(Duration::from_secs(10)).1);
        let text = String::from_utf8_lossy(&out.0.lock().unwrap()).to_string();
        assert!(text.starts_with("xxxx"), "{text}");
        assert!(text.contains("bytes of console output dropped"), "{text}");
        assert!(text.len() < 3 * 4096 + 200, "{} bytes", text.len());
    }

    #[test]
    fn a_prepared_writer_holds_output_until_it_starts_and_unstarted_does_not_hold_up_finish() {
        let out = Captured::default();
        let (mut q, drain, writer) =
            prepare(Box::new(out.clone()), "test-out", CAPACITY, Box::new(|| ()));
        q.write_all(b"before start\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(out.0.lock().unwrap().is_empty(), "no thread, no output yet");
        writer.start().unwrap();
        assert_eq!(drain.finish(Duration::from_secs(10)), (0, true));
        assert_eq!(*out.0.lock().unwrap(), b"before start\n");

        let (mut q, drain, writer) = prepare(
            Box::new(Captured::default()),
            "test-out",
            CAPACITY,
            Box::new(|| ()),
        );
        q.write_all(b"lost").unwrap();
        drop(writer);
        let t = Instant::now();
        assert!(drain.finish(Duration::from_secs(10)).1);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "finish waited for a writer never started"
        );
    }
}
