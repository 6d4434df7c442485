//! Stopping vCPU threads: a stop flag, then one signal per thread whose handler sets the vCPU's
//! `immediate_exit`, so a vCPU in the guest leaves it and one about to enter does not.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::thread;

/// The signal that interrupts `KVM_RUN` so a vCPU thread sees its stop request.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::hypervisor::kvm::request_immediate_exit();
}

/// Installs the kick signal's handler: it makes the thread's `KVM_RUN` return at once.
pub fn register_handler() -> io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Asks every vCPU to stop and kicks each once: the kick sets its `immediate_exit`, so a vCPU
/// in the guest leaves it and one about to enter returns at once, and the run loop sees the
/// stop request before entering again. Waits for them half a second at most.
pub fn stop_vcpus(
    handles: Vec<thread::JoinHandle<()>>,
    stop: &AtomicBool,
    finished: &VcpusFinished,
) {
    use vmm_sys_util::signal::Killable;
    stop.store(true, std::sync::atomic::Ordering::Release);
    for h in handles.iter().filter(|h| !h.is_finished()) {
        let _ = h.kill(kick_signal());
    }
    finished.wait_all(handles.len(), std::time::Duration::from_millis(500));
    for h in handles {
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!("a vCPU thread did not stop in time");
        }
    }
}

/// How many vCPU threads have returned from their run loop, with a wait for all of them.
#[derive(Default)]
pub struct VcpusFinished {
    count: Mutex<usize>,
    cond: std::sync::Condvar,
}

impl VcpusFinished {
    /// Counts one more vCPU thread that has left its run loop.
    pub fn one_more(&self) {
        if let Ok(mut n) = self.count.lock() {
            *n += 1;
            self.cond.notify_all();
        }
    }

    /// Waits until `all` have left, for `timeout` at most.
    pub fn wait_all(&self, all: usize, timeout: std::time::Duration) {
        if let Ok(n) = self.count.lock() {
            let _ = self.cond.wait_timeout_while(n, timeout, |n| *n < all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    #[test]
    fn one_kick_sets_the_threads_flag_and_stops_it() {
        register_handler().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(VcpusFinished::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let (seen_tx, seen_rx) = mpsc::channel();
        let handle = {
            let (stop, finished) = (stop.clone(), finished.clone());
            thread::spawn(move || {
                // Stands in for the kvm_run page: the handler must set it, as it would make the
                // next KVM_RUN return at once.
                let flag = Box::leak(Box::new(AtomicU8::new(0)));
                crate::hypervisor::kvm::watch_flag_for_test(flag.as_ptr());
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Acquire) || flag.load(Ordering::SeqCst) == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
                crate::hypervisor::kvm::watch_flag_for_test(std::ptr::null_mut());
                seen_tx.send(flag.load(Ordering::SeqCst)).unwrap();
                finished.one_more();
            })
        };
        ready_rx.recv().unwrap();
        stop_vcpus(vec![handle], &stop, &finished);
        assert_eq!(seen_rx.recv_timeout(Duration::from_secs(5)), Ok(1));
    }

    #[test]
    fn waiting_for_vcpus_ends_when_all_are_done_or_at_the_timeout() {
        let f = VcpusFinished::default();
        f.one_more();
        f.one_more();
        let t = std::time::Instant::now();
        f.wait_all(2, Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
        let t = std::time::Instant::now();
        f.wait_all(3, Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
