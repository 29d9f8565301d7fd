//! Log setup (text or JSON on stdout, which journald captures) and a throttle for warnings that
//! could otherwise fire once per connection.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to stdout. The filter was checked when the config
/// was loaded.
pub fn init(config: &LogConfig) {
    init_to(config, std::io::stdout, std::io::stdout().is_terminal());
}

/// Like [`init`], but to stderr: for one-shot commands whose stdout is their report.
pub fn init_stderr(config: &LogConfig) {
    init_to(config, std::io::stderr, std::io::stderr().is_terminal());
}

fn init_to<W>(config: &LogConfig, writer: W, terminal: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder().parse_lossy(&config.filter);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.with_ansi(terminal).init(),
    }
}

/// `outer: inner: innermost`, for one-line error reports.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Lets one event through per second and counts the ones it held back.
#[derive(Debug)]
pub struct Throttle {
    origin: Instant,
    /// Milliseconds since `origin` of the last event let through, plus one (0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

/// Time between two events that a [`Throttle`] lets through.
const THROTTLE_PERIOD_MS: u64 = 1_000;

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle { origin: Instant::now(), last: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were held back since the
    /// last one; `None` when it should be dropped.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < THROTTLE_PERIOD_MS {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_through_per_period_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        // Move the throttle's clock back, as if the last event were two periods ago.
        let t = Throttle {
            origin: t.origin.checked_sub(std::time::Duration::from_millis(2 * THROTTLE_PERIOD_MS)).unwrap(),
            ..t
        };
        assert_eq!(t.allow(), Some(2));
        assert_eq!(t.allow(), None);
    }
}
