//! Log setup (text or JSON on stdout, which journald captures), the access log's writer, and a
//! throttle for warnings that could otherwise fire once per connection.
//!
//! The access log (one line per connection, target [`ACCESS`]) goes through the same formatter
//! as every other line, but not through the same writer: a connection's task never waits on
//! stdout. Its lines are appended to a buffer in memory, and a thread of their own writes the
//! buffer out in one `write` per batch. When stdout does not keep up (journald busy, a pipe
//! nobody reads) the buffer fills to [`ACCESS_BUFFER_MAX`]; lines past that are dropped and
//! counted (`static_ingress_access_log_dropped_lines_total`), as HAProxy drops log lines its
//! sink cannot take, rather than stalling the data path.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

/// The target of the access log's events: one per connection, written when `log.access` is on,
/// whatever `log.level` says (the key is the one switch).
pub const ACCESS: &str = "static_ingress::access";

/// How many bytes of access-log lines may wait for stdout before new ones are dropped: about
/// 30,000 lines, seconds of the highest connection rate measured here.
pub const ACCESS_BUFFER_MAX: usize = 8 << 20;

/// How long the writer lets lines gather after the first of a batch arrives: at high rates one
/// write carries many lines, and a quiet proxy wakes the writer once per line at most.
const ACCESS_LINGER: Duration = Duration::from_millis(5);

/// A spare batch buffer that grew past this is freed after its batch is written, rather than
/// kept at the size a burst left it.
const ACCESS_KEEP_CAPACITY: usize = 256 << 10;

/// Access-log lines dropped because stdout did not keep up or failed; registered in every
/// [`crate::metrics::Metrics`].
pub static ACCESS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "access_log_dropped_lines_total",
        "Access-log lines dropped because stdout (journald) did not keep up with them, or failed.",
    )
    .expect("a valid metric definition")
});

/// Installs the global subscriber, writing to stdout. The filter was checked when the config
/// was loaded.
pub fn init(config: &LogConfig) {
    init_to(config, std::io::stdout, std::io::stdout().is_terminal());
}

/// Like [`init`], but to stderr: for one-shot commands whose stdout is their report.
pub fn init_stderr(config: &LogConfig) {
    init_to(config, std::io::stderr, std::io::stderr().is_terminal());
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

fn init_to<W>(config: &LogConfig, writer: W, terminal: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // `log.level` filters every line but the access log's, which `log.access` turns on and off
    // (the proxy does not emit it when off).
    let filter = EnvFilter::builder()
        .parse_lossy(&config.filter)
        .add_directive(format!("{ACCESS}=off").parse().expect("a valid directive"));
    let access = Targets::new().with_target(ACCESS, tracing::Level::INFO);
    let sink = AccessWriter(&SINK);
    let layers: Vec<Boxed> = match config.format {
        LogFormat::Json => vec![
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_writer(writer)
                .with_filter(filter)
                .boxed(),
            // The connection's span would repeat the line's own fields.
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(sink)
                .with_filter(access)
                .boxed(),
        ],
        LogFormat::Text => vec![
            tracing_subscriber::fmt::layer().with_ansi(terminal).with_writer(writer).with_filter(filter).boxed(),
            tracing_subscriber::fmt::layer().with_ansi(terminal).with_writer(sink).with_filter(access).boxed(),
        ],
    };
    tracing_subscriber::registry().with(layers).init();
}

/// The access log's lines waiting for stdout, and the writer thread's state.
struct Sink {
    pending: Mutex<Pending>,
    /// The writer waits here for a first line.
    arrived: Condvar,
    /// [`flush_access`] waits here for the buffer to empty.
    written: Condvar,
}

struct Pending {
    lines: Vec<u8>,
    /// The writer thread is running (started with the first line).
    started: bool,
    /// The writer waits on `arrived`: the next line must wake it.
    asleep: bool,
    /// The writer holds a batch it has not written out yet.
    writing: bool,
}

static SINK: Sink = Sink { pending: Mutex::new(Pending::new()), arrived: Condvar::new(), written: Condvar::new() };

impl Pending {
    const fn new() -> Pending {
        Pending { lines: Vec::new(), started: false, asleep: false, writing: false }
    }
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one line (the formatter writes each whole, with its newline), or drops and counts
    /// it when the buffer is full.
    fn push(&'static self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.lines.len() + line.len() > ACCESS_BUFFER_MAX {
            drop(pending);
            ACCESS_DROPPED.inc();
            return;
        }
        pending.lines.extend_from_slice(line);
        if !pending.started {
            pending.started = true;
            if let Err(e) = std::thread::Builder::new().name("access-log".into()).spawn(move || self.write_out()) {
                // Nothing will write these lines: take them back and count them.
                pending.started = false;
                pending.lines.clear();
                drop(pending);
                ACCESS_DROPPED.inc();
                tracing::warn!(error = %e, "cannot start the access log's writer thread; its lines are dropped");
            }
        } else if pending.asleep {
            pending.asleep = false;
            drop(pending);
            self.arrived.notify_one();
        }
    }

    /// The writer thread: batches out to stdout, for the life of the process.
    fn write_out(&self) {
        let mut batch = Vec::new();
        loop {
            {
                let mut pending = self.lock();
                while pending.lines.is_empty() {
                    pending.asleep = true;
                    pending = self.arrived.wait(pending).unwrap_or_else(PoisonError::into_inner);
                }
                pending.asleep = false;
            }
            // Let a batch gather, then take it whole.
            std::thread::sleep(ACCESS_LINGER);
            {
                let mut pending = self.lock();
                std::mem::swap(&mut pending.lines, &mut batch);
                pending.writing = true;
            }
            let mut out = std::io::stdout().lock();
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                let lines = batch.iter().filter(|&&b| b == b'\n').count();
                ACCESS_DROPPED.inc_by(lines as u64);
            }
            drop(out);
            batch.clear();
            if batch.capacity() > ACCESS_KEEP_CAPACITY {
                batch = Vec::new();
            }
            let mut pending = self.lock();
            pending.writing = false;
            if pending.lines.is_empty() {
                self.written.notify_all();
            }
        }
    }

    /// Waits until every line taken so far is written (or `limit` passes).
    fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut pending = self.lock();
        while pending.started && (!pending.lines.is_empty() || pending.writing) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pending = self.written.wait_timeout(pending, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }
}

/// Writes the access log's lines still waiting; false when `limit` passed first. Called as the
/// proxy exits, so the last connections' lines are not lost.
pub fn flush_access(limit: Duration) -> bool {
    SINK.flush(limit)
}

/// The formatter's writer for access-log lines: into [`SINK`].
struct AccessWriter(&'static Sink);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AccessWriter {
    type Writer = AccessLine;

    fn make_writer(&'a self) -> AccessLine {
        AccessLine(self.0)
    }
}

struct AccessLine(&'static Sink);

impl Write for AccessLine {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
