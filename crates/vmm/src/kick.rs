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
/// stop request before entering again. Waits half a second at most for every vCPU to leave its
/// run loop, joins those that did (`handles[i]` runs vCPU `i`), and returns the others.
pub fn stop_vcpus(
    handles: Vec<thread::JoinHandle<()>>,
    stop: &AtomicBool,
    finished: &VcpusFinished,
) -> Vec<usize> {
    use vmm_sys_util::signal::Killable;
    stop.store(true, std::sync::atomic::Ordering::Release);
    for h in handles.iter().filter(|h| !h.is_finished()) {
        let _ = h.kill(kick_signal());
    }
    let done = finished.wait_all(handles.len(), std::time::Duration::from_millis(500));
    let mut stragglers = Vec::new();
    for (index, h) in handles.into_iter().enumerate() {
        // A thread past its run loop only returns now: joining it does not wait on the guest.
        if done.contains(&index) || h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!("vCPU {index}'s thread did not stop in time");
            stragglers.push(index);
        }
    }
    stragglers
}

/// Which vCPU threads have returned from their run loop, with a wait for all of them.
#[derive(Default)]
pub struct VcpusFinished {
    done: Mutex<Vec<usize>>,
    cond: std::sync::Condvar,
}

impl VcpusFinished {
    /// Records that vCPU `index`'s thread has left its run loop.
    pub fn one_more(&self, index: usize) {
        if let Ok(mut d) = self.done.lock() {
            d.push(index);
            self.cond.notify_all();
        }
    }

    /// Waits until `all` have left, for `timeout` at most; returns those that have.
    pub fn wait_all(&self, all: usize, timeout: std::time::Duration) -> Vec<usize> {
        match self.done.lock() {
            Ok(d) => match self.cond.wait_timeout_while(d, timeout, |d| d.len() < all) {
                Ok((d, _)) => d.clone(),
                Err(_) => Vec::new(),
            },
            Err(_) => Vec::new(),
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
                finished.one_more(0);
            })
        };
        ready_rx.recv().unwrap();
        assert!(stop_vcpus(vec![handle], &stop, &finished).is_empty());
        assert_eq!(seen_rx.recv_timeout(Duration::from_secs(5)), Ok(1));
    }

    #[test]
    fn waiting_for_vcpus_ends_when_all_are_done_or_at_the_timeout() {
        let f = VcpusFinished::default();
        f.one_more(1);
        f.one_more(0);
        let t = std::time::Instant::now();
        assert_eq!(f.wait_all(2, Duration::from_secs(10)), vec![1, 0]);
        assert!(t.elapsed() < Duration::from_secs(5));
        let t = std::time::Instant::now();
        f.wait_all(3, Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    /// A vCPU that failed on its own (a triple fault) has left its run loop before the stop, but
    /// its thread may not have ended yet: it is joined, not reported as a straggler (it was, as
    /// "a vCPU thread did not stop in time", after guest failures and power-offs).
    #[test]
    fn a_vcpu_past_its_run_loop_is_joined_even_if_its_thread_has_not_ended() {
        // The kick goes to the thread while it still runs: without the handler, SIGRTMIN's
        // default action would end the test process.
        register_handler().unwrap();
        let stop = AtomicBool::new(false);
        let finished = Arc::new(VcpusFinished::default());
        let f = finished.clone();
        let handle = thread::spawn(move || {
            f.one_more(0);
            thread::sleep(Duration::from_millis(200));
        });
        while finished.wait_all(1, Duration::from_secs(5)).is_empty() {}
        assert!(!handle.is_finished());
        assert_eq!(
            stop_vcpus(vec![handle], &stop, &finished),
            Vec::<usize>::new()
        );
    }
}
