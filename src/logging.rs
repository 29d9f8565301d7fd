//! Log setup (text or JSON on stdout, which journald captures), the access log's writer, and a
//! throttle for warnings that could otherwise fire once per connection.
//!
//! The access log (one line per connection, target [`ACCESS`]) goes through the same formatter
//! as every other line, but not through the same writer: a connection's task never waits on
//! stdout. Its lines are appended to a buffer in memory, and a thread of their own writes the
//! buffer out, many lines per write, in pieces cut at line ends so that other log lines wait
//! for stdout at most one piece. When stdout does not keep up (journald busy, a pipe
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

/// Installs the global subscriber, writing to stdout, and starts the access log's writer.
/// The filter was checked when the config was loaded.
pub fn init(config: &LogConfig) {
    init_to(config, std::io::stdout, std::io::stdout().is_terminal(), true);
    if let Err(e) = SINK.start() {
        tracing::warn!(error = %e, "cannot start the access log's writer thread; its lines are dropped and counted");
    }
}

/// Like [`init`], but to stderr and without the access log: for one-shot commands whose
/// stdout is their report.
pub fn init_stderr(config: &LogConfig) {
    init_to(config, std::io::stderr, std::io::stderr().is_terminal(), false);
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

fn init_to<W>(config: &LogConfig, writer: W, terminal: bool, access_log: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // `log.level` filters every line but the access log's, which `log.access` turns on and off
    // (the proxy does not emit it when off).
    let filter = EnvFilter::builder()
        .parse_lossy(&config.filter)
        .add_directive(format!("{ACCESS}=off").parse().expect("a valid directive"));
    let main: Boxed = match config.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_ansi(terminal).with_writer(writer).with_filter(filter).boxed()
        }
    };
    let mut layers = vec![main];
    if access_log {
        let (access, sink) = (Targets::new().with_target(ACCESS, tracing::Level::INFO), AccessWriter(&SINK));
        layers.push(match config.format {
            // The connection's span would repeat the line's own fields.
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(sink)
                .with_filter(access)
                .boxed(),
            LogFormat::Text => {
                tracing_subscriber::fmt::layer().with_ansi(terminal).with_writer(sink).with_filter(access).boxed()
            }
        });
    }
    tracing_subscriber::registry().with(layers).init();
}

/// The most the writer hands stdout in one write, cut at a line's end: other log lines wait
/// for stdout's lock at most one piece, however large the batch.
const ACCESS_PIECE: usize = 64 << 10;

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
    /// The writer thread is running (started by [`init`]); until then, or if it could not
    /// start, lines are dropped and counted.
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

    /// Starts the writer thread, once.
    fn start(&'static self) -> std::io::Result<()> {
        if self.lock().started {
            return Ok(());
        }
        std::thread::Builder::new().name("access-log".into()).spawn(move || self.write_out())?;
        self.lock().started = true;
        Ok(())
    }

    /// Takes one line (the formatter writes each whole, with its newline), or drops and counts
    /// it when the buffer is full or nothing will write it.
    fn push(&self, line: &[u8]) {
        let mut pending = self.lock();
        if !pending.started || pending.lines.len() + line.len() > ACCESS_BUFFER_MAX {
            drop(pending);
            ACCESS_DROPPED.inc();
            return;
        }
        pending.lines.extend_from_slice(line);
        if pending.asleep {
            pending.asleep = false;
            drop(pending);
            self.arrived.notify_one();
        }
    }

    /// The writer thread: batches out to stdout, for the life of the process.
    fn write_out(&self) {
        let mut batch = Vec::new();
        let mut torn = false;
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
            let lost = write_batch(|| std::io::stdout().lock(), &batch, &mut torn);
            ACCESS_DROPPED.inc_by(lost);
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

/// Writes `batch` (whole lines) in pieces of at most [`ACCESS_PIECE`] bytes, each cut at a
/// line's end and written under its own `out()` (stdout's lock). Returns how many lines were
/// lost: at the first failed write, the lines not wholly written. A line cut partway by the
/// failure is lost too, and is ended with a newline at once, under the same lock, so that the
/// next line (this log's or another's) starts a line of its own; if that fails too, `torn` is
/// set and the next write begins with it.
fn write_batch<W: Write>(mut out: impl FnMut() -> W, batch: &[u8], torn: &mut bool) -> u64 {
    let lines = |bytes: &[u8]| bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    let mut rest = batch;
    while !rest.is_empty() {
        let piece = piece_len(rest);
        let mut w = out();
        if *torn {
            if w.write_all(b"\n").is_err() {
                return lines(rest);
            }
            *torn = false;
        }
        let mut written = 0;
        while written < piece {
            match w.write(&rest[written..piece]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let flushed = written == piece && w.flush().is_ok();
        if !flushed {
            *torn = written > 0 && rest[written - 1] != b'\n' && w.write_all(b"\n").and_then(|()| w.flush()).is_err();
            return lines(&rest[written..]);
        }
        rest = &rest[piece..];
    }
    0
}

/// The length of the next piece of `bytes` to write: whole lines, at most [`ACCESS_PIECE`]
/// bytes unless the first line alone is longer.
fn piece_len(bytes: &[u8]) -> usize {
    if bytes.len() <= ACCESS_PIECE {
        return bytes.len();
    }
    match bytes[..ACCESS_PIECE].iter().rposition(|&b| b == b'\n') {
        Some(end) => end + 1,
        None => bytes.iter().position(|&b| b == b'\n').map_or(bytes.len(), |end| end + 1),
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

/// Lets up to a number of events through in each second (of its own clock) and counts the
/// rest: a cap on lines that a flood could otherwise multiply, without hiding that it happened.
#[derive(Debug)]
pub struct Budget {
    origin: Instant,
    per_second: u64,
    /// The second (since `origin`) counted in, above [`BUDGET_USED_BITS`], and the events let
    /// through in it below: one word, so a new second and its first event are one change.
    state: AtomicU64,
    held_back: AtomicU64,
}

/// The bits of [`Budget::state`] that count a second's events (a budget is at most about a
/// million a second).
const BUDGET_USED_BITS: u32 = 20;

impl Budget {
    pub fn new(per_second: u64) -> Budget {
        Budget {
            origin: Instant::now(),
            per_second: per_second.min((1 << BUDGET_USED_BITS) - 1),
            state: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// True when this event may be logged; false (and counted) when this second's budget is
    /// spent.
    pub fn allow(&self) -> bool {
        let now = self.origin.elapsed().as_secs();
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let (second, used) = (state >> BUDGET_USED_BITS, state & ((1 << BUDGET_USED_BITS) - 1));
            // A thread that read the clock a moment before another counts in the other's second.
            let now = now.max(second);
            let used = if second == now { used } else { 0 };
            if used >= self.per_second {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            let next = (now << BUDGET_USED_BITS) | (used + 1);
            match self.state.compare_exchange_weak(state, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => state = seen,
            }
        }
    }

    /// How many events were held back since the last call.
    pub fn take_held_back(&self) -> u64 {
        self.held_back.swap(0, Ordering::Relaxed)
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

    /// What a [`Limited`] writer took.
    #[derive(Default)]
    struct Taken {
        got: Vec<u8>,
        /// How many times `out()` was called: one per piece.
        pieces: usize,
        /// Bytes it still takes before failing every write.
        room: usize,
        /// Takes everything again after its first failure (a stdout that was full for a moment).
        recovers: bool,
    }

    /// Takes `room` bytes, at most 1,000 a write, then fails every write.
    struct Limited(std::rc::Rc<std::cell::RefCell<Taken>>);

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut t = self.0.borrow_mut();
            if t.room == 0 {
                if t.recovers {
                    t.room = usize::MAX;
                }
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            let n = buf.len().min(t.room).min(1000);
            t.room -= n;
            t.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Writes `batch` into `taken` as [`Sink::write_out`] writes into stdout.
    fn write_into(taken: &std::rc::Rc<std::cell::RefCell<Taken>>, batch: &[u8], torn: &mut bool) -> u64 {
        write_batch(
            || {
                taken.borrow_mut().pieces += 1;
                Limited(std::rc::Rc::clone(taken))
            },
            batch,
            torn,
        )
    }

    fn taking(room: usize) -> std::rc::Rc<std::cell::RefCell<Taken>> {
        std::rc::Rc::new(std::cell::RefCell::new(Taken { room, ..Taken::default() }))
    }

    fn lines_of(n: usize, len: usize) -> Vec<u8> {
        (0..n).flat_map(|i| format!("{i:0>w$}\n", w = len - 1).into_bytes()).collect()
    }

    #[test]
    fn budget_lets_so_many_through_a_second_and_counts_the_rest() {
        let b = Budget::new(3);
        assert_eq!((0..5).map(|_| b.allow()).collect::<Vec<_>>(), [true, true, true, false, false]);
        assert_eq!(b.take_held_back(), 2);
        assert_eq!(b.take_held_back(), 0);
        // A second later the budget is new.
        let b = Budget { origin: b.origin.checked_sub(Duration::from_secs(1)).unwrap(), ..b };
        assert_eq!((0..4).map(|_| b.allow()).collect::<Vec<_>>(), [true, true, true, false]);
        assert_eq!(b.take_held_back(), 1);
    }

    #[test]
    fn a_batch_goes_out_in_pieces_of_whole_lines() {
        let batch = lines_of(1000, 200);
        let (taken, mut torn) = (taking(usize::MAX), false);
        assert_eq!(write_into(&taken, &batch, &mut torn), 0);
        assert!(!torn);
        assert_eq!(taken.borrow().got, batch);
        // 200,000 bytes in pieces of 327 lines (65,400 bytes).
        assert_eq!(piece_len(&batch), 65_400);
        assert_eq!(taken.borrow().pieces, 4);
    }

    #[test]
    fn a_line_longer_than_a_piece_goes_whole() {
        let mut long = vec![b'x'; ACCESS_PIECE + 10];
        long.push(b'\n');
        long.extend_from_slice(b"next\n");
        assert_eq!(piece_len(&long), ACCESS_PIECE + 11);
    }

    #[test]
    fn a_failed_write_counts_the_lines_not_wholly_written_and_ends_the_torn_one() {
        let batch = lines_of(10, 100);
        let (taken, mut torn) = (taking(350), false);
        // Three lines out whole, the fourth cut at 50 bytes: seven lost, the fourth among them.
        assert_eq!(write_into(&taken, &batch, &mut torn), 7);
        assert!(torn);
        assert_eq!(taken.borrow().got, batch[..350]);
        // The next batch ends the torn line first.
        taken.borrow_mut().room = usize::MAX;
        let next = lines_of(2, 100);
        assert_eq!(write_into(&taken, &next, &mut torn), 0);
        assert!(!torn);
        let got = &taken.borrow().got;
        assert_eq!(got.len(), 350 + 1 + 200);
        assert_eq!(got[350], b'\n');
        assert_eq!(got[351..], next[..]);
        // A failure at a line's end tears nothing.
        let (taken, mut torn) = (taking(300), false);
        assert_eq!(write_into(&taken, &batch, &mut torn), 7);
        assert!(!torn);
        // A stdout that takes bytes again right after the failure: the torn line is ended at
        // once, before any other line can follow it.
        let (taken, mut torn) = (taking(350), false);
        taken.borrow_mut().recovers = true;
        assert_eq!(write_into(&taken, &batch, &mut torn), 7);
        assert!(!torn);
        let got = &taken.borrow().got;
        assert_eq!((got.len(), got[350]), (351, b'\n'));
    }
}
