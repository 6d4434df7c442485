//! The clock the flow tables judge idleness by: the real one, which tests can move on.

use std::time::Instant;

/// `Instant::now()`, plus however far a test moved it on.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Clock {
    #[cfg(test)]
    skew: std::time::Duration,
}

impl Clock {
    /// Moves the clock on by `by` (so that a test need not wait).
    #[cfg(test)]
    pub(crate) fn advance(&mut self, by: std::time::Duration) {
        self.skew += by;
    }

    /// Now.
    pub(crate) fn now(&self) -> Instant {
        #[cfg(test)]
        return Instant::now() + self.skew;
        #[cfg(not(test))]
        Instant::now()
    }
}
