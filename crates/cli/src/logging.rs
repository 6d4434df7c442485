//! tandem's log output: `TANDEM_LOG` levels on stderr, with a rate limit per call site.
//!
//! Many messages are triggered by the guest (a notify for a queue that does not exist, a block
//! request outside the disk): a guest that repeats the bad access in a loop must not fill the
//! host's disk or drown every other message. Each call site may log [`BURST`] messages at once
//! and then [`PER_SECOND`] a second; what it logs beyond that is dropped and counted, and the
//! count is reported before the site's next message.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use tracing::callsite::Identifier;
use tracing::{Event, Metadata};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

/// Messages a call site may log at once.
pub const BURST: u32 = 20;
/// Messages a call site may log each second once its burst is spent.
pub const PER_SECOND: u32 = 2;

/// One call site's allowance: a token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// Token buckets by key; pure, so the rate rules are tested with made-up times.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: u32,
    per_second: u32,
    sites: HashMap<K, Bucket>,
}

/// The verdict on one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it; `suppressed` messages of the same site were dropped since the last one logged.
    Yes {
        /// Messages dropped before this one.
        suppressed: u64,
    },
    /// Drop it (counted).
    No,
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    /// Buckets holding `burst` messages and refilling `per_second`.
    pub fn new(burst: u32, per_second: u32) -> Self {
        Buckets {
            burst,
            per_second,
            sites: HashMap::new(),
        }
    }

    /// Whether a message from `site` at `now` may be logged.
    pub fn admit(&mut self, site: K, now: Instant) -> Admit {
        let burst = f64::from(self.burst);
        let b = self.sites.entry(site).or_insert(Bucket {
            tokens: burst,
            last: now,
            suppressed: 0,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(self.per_second)).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Admit::Yes {
                suppressed: std::mem::take(&mut b.suppressed),
            }
        } else {
            b.suppressed += 1;
            Admit::No
        }
    }
}

/// The per-call-site rate limit as a `tracing` filter; messages it drops are counted and the
/// count goes to stderr before the site's next message.
pub struct RateLimit {
    buckets: Mutex<Buckets<Identifier>>,
}

impl RateLimit {
    /// The limit of [`BURST`] and [`PER_SECOND`].
    pub fn new() -> Self {
        RateLimit {
            buckets: Mutex::new(Buckets::new(BURST, PER_SECOND)),
        }
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        let verdict = self
            .buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(meta.callsite(), Instant::now());
        match verdict {
            Admit::Yes { suppressed: 0 } => true,
            Admit::Yes { suppressed } => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{:>5} {suppressed} more messages from {}:{} were dropped (rate limit)",
                    meta.level(),
                    meta.file().unwrap_or("?"),
                    meta.line().unwrap_or(0)
                );
                true
            }
            Admit::No => false,
        }
    }
}

/// Installs the subscriber: `TANDEM_LOG` (default `warn`) on stderr, rate-limited per site.
pub fn init() {
    let levels =
        tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| "warn".into());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(levels.and(RateLimit::new()));
    tracing_subscriber::registry().with(layer).init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_site_gets_its_burst_then_its_rate_and_the_dropped_are_counted() {
        let t0 = Instant::now();
        let mut b = Buckets::new(3, 2);
        for _ in 0..3 {
            assert_eq!(b.admit("a", t0), Admit::Yes { suppressed: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(b.admit("a", t0), Admit::No);
        }
        // Another site has its own allowance.
        assert_eq!(b.admit("b", t0), Admit::Yes { suppressed: 0 });
        // Half a second refills one message, which reports the 1000 dropped before it.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.admit("a", t1), Admit::Yes { suppressed: 1000 });
        assert_eq!(b.admit("a", t1), Admit::No);
        // A long pause refills the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(matches!(b.admit("a", t2), Admit::Yes { .. }));
        }
        assert_eq!(b.admit("a", t2), Admit::No);
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_message_repeated_a_million_times_leaves_a_few_lines() {
        let out = Captured::default();
        let w = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_filter(tracing_subscriber::filter::LevelFilter::WARN.and(RateLimit::new()));
        let start = Instant::now();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for i in 0..1_000_000u32 {
                tracing::warn!(queue = i, "notify for a queue that does not exist");
                // Below the level: never counted against the site.
                tracing::debug!("not shown");
            }
        });
        let secs = start.elapsed().as_secs() + 1;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines = text.lines().count() as u64;
        assert!(lines >= u64::from(BURST), "{text}");
        assert!(
            lines <= u64::from(BURST) + secs * u64::from(PER_SECOND),
            "{lines} lines in {secs} s"
        );
        assert!(text.len() < 64 * 1024, "{} bytes", text.len());
        assert!(!text.contains("not shown"));
    }
}
