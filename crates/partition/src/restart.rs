//! Restart policies with back-off: what the supervisor does when a VM's process ends.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Restart;

/// First restart delay; each restart in the window doubles it.
pub const FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Restarts within [`WINDOW`] after which the VM is left stopped as a crash loop.
pub const MAX_RESTARTS: usize = 5;
/// The window restarts are counted in.
pub const WINDOW: Duration = Duration::from_secs(120);

/// How a VM's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered off (status 0).
    PowerOff,
    /// Anything else: panic, reboot, crash, killed.
    Failure,
    /// Stopped on request (`tandem stop`, `down`, a signal to the supervisor).
    Requested,
}

impl Ending {
    /// Classifies an exit status (`None`: killed by a signal).
    pub fn from_status(code: Option<i32>) -> Ending {
        match code {
            Some(0) => Ending::PowerOff,
            _ => Ending::Failure,
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave it stopped (the policy says so).
    Stay,
    /// Start it again after the delay.
    Restart(Duration),
    /// It keeps failing: leave it stopped and report it.
    CrashLoop,
}

/// One VM's restart history.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    recent: VecDeque<Instant>,
    /// Restarts so far.
    pub restarts: u32,
}

impl Tracker {
    /// Decides what follows `ending` at `now` under `policy`, and records a restart if one is
    /// decided.
    pub fn decide(&mut self, policy: Restart, ending: Ending, now: Instant) -> Decision {
        let wanted = match (policy, ending) {
            (_, Ending::Requested) | (Restart::Never, _) => false,
            (Restart::OnFailure, e) => e == Ending::Failure,
            (Restart::Always, _) => true,
        };
        if !wanted {
            return Decision::Stay;
        }
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) > WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= MAX_RESTARTS {
            return Decision::CrashLoop;
        }
        let delay = FIRST_DELAY
            .saturating_mul(1 << self.recent.len().min(16))
            .min(MAX_DELAY);
        self.recent.push_back(now);
        self.restarts += 1;
        Decision::Restart(delay)
    }

    /// Forgets the history (after `tandem restart`).
    pub fn reset(&mut self) {
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let now = Instant::now();
        let mut t = Tracker::default();
        assert_eq!(
            t.decide(Restart::Never, Ending::Failure, now),
            Decision::Stay
        );
        assert_eq!(
            t.decide(Restart::OnFailure, Ending::PowerOff, now),
            Decision::Stay
        );
        assert_eq!(
            t.decide(Restart::Always, Ending::Requested, now),
            Decision::Stay
        );
        assert_eq!(
            t.decide(Restart::OnFailure, Ending::Failure, now),
            Decision::Restart(FIRST_DELAY)
        );
        assert_eq!(
            t.decide(Restart::Always, Ending::PowerOff, now),
            Decision::Restart(FIRST_DELAY * 2)
        );
        assert_eq!(t.restarts, 2);
    }

    #[test]
    fn a_vm_that_keeps_failing_backs_off_then_is_left_stopped() {
        let start = Instant::now();
        let mut t = Tracker::default();
        let mut delays = Vec::new();
        for i in 0..MAX_RESTARTS {
            match t.decide(
                Restart::Always,
                Ending::Failure,
                start + Duration::from_secs(i as u64),
            ) {
                Decision::Restart(d) => delays.push(d.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(delays, vec![500, 1000, 2000, 4000, 8000]);
        assert_eq!(
            t.decide(
                Restart::Always,
                Ending::Failure,
                start + Duration::from_secs(10)
            ),
            Decision::CrashLoop
        );
        // Failures spread out over time are not a loop.
        let later = start + WINDOW + Duration::from_secs(60);
        assert_eq!(
            t.decide(Restart::Always, Ending::Failure, later),
            Decision::Restart(FIRST_DELAY)
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(Ending::from_status(Some(0)), Ending::PowerOff);
        assert_eq!(Ending::from_status(Some(3)), Ending::Failure);
        assert_eq!(Ending::from_status(None), Ending::Failure);
    }
}
