//! The sink for the guest's serial output, which also notices a kernel panic message.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use crate::trigger::EventFdTrigger;

/// Longest line kept while looking for a panic message; longer lines are cut (the guest controls
/// the data, so the buffer must stay bounded).
const MAX_LINE: usize = 512;
const PANIC_MARKER: &str = "Kernel panic - not syncing: ";
/// The last line Linux prints for a panic; the guest will do nothing useful after it.
const PANIC_END_MARKER: &str = "---[ end Kernel panic";

/// Shared record of the first kernel panic message seen on the console, if any.
#[derive(Debug, Default, Clone)]
pub struct PanicRecord(Arc<Mutex<Option<String>>>);

impl PanicRecord {
    /// The panic reason (the text after "Kernel panic - not syncing: "), if one was seen.
    pub fn reason(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }

    fn set_once(&self, reason: String) {
        if let Ok(mut g) = self.0.lock() {
            g.get_or_insert(reason);
        }
    }
}

/// Forwards guest console bytes to an output and scans whole lines for a kernel panic.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panic: PanicRecord,
    on_panic_end: Option<EventFdTrigger>,
}

impl ConsoleWriter {
    /// Wraps `out`; panics seen are stored in `panic`.
    pub fn new(out: Box<dyn Write + Send>, panic: PanicRecord) -> Self {
        Self {
            out,
            line: Vec::with_capacity(MAX_LINE),
            panic,
            on_panic_end: None,
        }
    }

    /// Also signals `evt` once the kernel has finished printing a panic, so the VMM can stop the
    /// guest even when the kernel was told to hang on panic.
    pub fn notify_panic_end(mut self, evt: EventFdTrigger) -> Self {
        self.on_panic_end = Some(evt);
        self
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            let text = String::from_utf8_lossy(&self.line);
            if text.contains(PANIC_END_MARKER) {
                if let (Some(evt), Some(_)) = (&self.on_panic_end, self.panic.reason()) {
                    let _ = evt.write(1);
                }
            } else if let Some(pos) = text.find(PANIC_MARKER) {
                let reason = text[pos + PANIC_MARKER.len()..].trim_end().to_string();
                self.panic.set_once(reason);
            }
            self.line.clear();
        } else if self.line.len() < MAX_LINE {
            self.line.push(byte);
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        // Console output must never stop the guest: a closed stdout just drops the bytes.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_reason_is_captured_from_the_line() {
        let rec = PanicRecord::default();
        let mut w = ConsoleWriter::new(Box::new(io::sink()), rec.clone());
        w.write_all(b"[ 1.0] booting\r\n[ 2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n")
            .unwrap();
        assert_eq!(
            rec.reason().as_deref(),
            Some("VFS: Unable to mount root fs")
        );
    }

    #[test]
    fn end_of_panic_is_signalled() {
        let rec = PanicRecord::default();
        let evt = EventFdTrigger::new().unwrap();
        let mut w = ConsoleWriter::new(Box::new(io::sink()), rec.clone())
            .notify_panic_end(evt.try_clone().unwrap());
        w.write_all(b"---[ end Kernel panic - not syncing: x ]---\n")
            .unwrap();
        assert!(evt.read().is_err(), "no panic seen yet: no signal");
        w.write_all(b"Kernel panic - not syncing: Attempted to kill init!\n---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n").unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(rec.reason().as_deref(), Some("Attempted to kill init!"));
    }

    #[test]
    fn no_panic_no_reason_and_long_lines_are_bounded() {
        let rec = PanicRecord::default();
        let mut w = ConsoleWriter::new(Box::new(io::sink()), rec.clone());
        w.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(w.line.len() <= MAX_LINE);
        w.write_all(b"\n").unwrap();
        assert_eq!(rec.reason(), None);
    }
}
