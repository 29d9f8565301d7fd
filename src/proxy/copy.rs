//! Copying bytes both ways between client and backend, with half-close semantics, an idle
//! timeout, a bound on how long a half-closed connection may linger, and no byte lost when one
//! side ends with a reset.
//!
//! Both directions are driven by one future, so neither is ever dropped early: when one side
//! finishes sending, its FIN is passed on (`shutdown(Write)`) and the other direction keeps
//! running until it finishes too. A direction holds a buffer only while data is in flight, so an
//! idle connection costs two sockets and a little state, not two buffers; and bytes the other
//! side takes at once pass through a per-thread scratch buffer, so a request and its answer
//! allocate nothing.
//!
//! When one side fails (a reset, a broken pipe), what it sent before failing is still owed to
//! the other side: the bytes in our buffer and those still queued in the kernel for us to read.
//! So the direction *from* the failed side goes on until its source runs dry, the other side's
//! send queue is waited on until the kernel has it acknowledged, and only then is the abort
//! passed on, as a reset (the caller's job). A reset sent earlier, with SO_LINGER 0, would make
//! the kernel throw away what it still holds for a slow reader. The direction *toward* the
//! failed side is abandoned: nobody is left to receive it.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::splice::{self, Lease, PipePool};

pub use crate::metrics::Side;

/// Per-direction read size. Large enough that bulk transfers need few system calls; only
/// connections with data in flight hold one.
const BUF_SIZE: usize = 64 * 1024;
/// How often the send queue is looked at while waiting for the kernel to deliver the last
/// bytes before a reset: the kernel has no readiness event for "acknowledged", so poll, from
/// fast (a fast reader is done within a round trip) to slow (a stalled reader costs little).
const DRAIN_POLL_MIN: Duration = Duration::from_millis(2);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Nothing moved either way for this long: close.
    pub idle: Duration,
    /// After one direction has finished, the other may stay idle this long (or `idle`, if
    /// shorter). Also bounds how long the last bytes toward a slow reader may take to drain
    /// after the other side failed, counted from the last progress.
    pub half_close: Duration,
}

/// One side's socket failed.
#[derive(Debug)]
pub struct Failure {
    pub side: Side,
    pub error: io::Error,
    /// The failure was a reset that arrived when nothing was left unsent toward that side, and
    /// the other side then got every byte. That is how many servers (nginx with
    /// `keepalive_timeout 0`, say) and clients end a stream they are done with, not a fault.
    pub clean_reset: bool,
    /// Everything the failed side sent reached the other side's kernel, acknowledged, before
    /// the reset is passed on. False when the other side failed too or the drain timed out.
    pub delivered: bool,
}

/// How a proxied connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached end of stream and everything was forwarded.
    Completed,
    /// One side failed. The caller passes the abort on to the other side with a reset: its
    /// send queue has drained already (see [`Failure::delivered`]).
    Failed(Failure),
    IdleTimeout,
    HalfCloseTimeout,
}

/// Forwarding through kernel pipes (splice(2)) instead of a user buffer, for directions that
/// move bulk data: see [`super::splice`].
#[derive(Clone)]
pub struct Splicing {
    pub pool: Arc<PipePool>,
    /// A direction splices once it has moved this many bytes (0: from its first byte).
    pub after: u64,
    /// Bytes moved through pipes, both directions.
    pub bytes: IntCounter,
}

/// Where one direction counts the bytes it reads: the proxy-wide metric and the connection's own
/// total, for its access-log line.
#[derive(Clone, Copy)]
pub struct Counter<'a> {
    pub metric: &'a IntCounter,
    pub conn: &'a AtomicU64,
}

impl Counter<'_> {
    fn inc_by(self, n: u64) {
        self.metric.inc_by(n);
        self.conn.fetch_add(n, Ordering::Relaxed);
    }
}

/// What one splice into an empty pipe did.
enum Fill {
    /// Moved this many bytes (0: end of stream).
    Moved(usize),
    /// Moved nothing with bytes still queued: urgent data, which splice cannot read past.
    Stuck,
}

/// One direction: reads from `from`, writes to `to`.
struct Pipe {
    buf: Vec<u8>,
    written: usize,
    /// The kernel pipe this direction holds while spliced bytes are in flight.
    lease: Option<Lease>,
    /// Bytes read so far (for [`Splicing::after`]).
    total: u64,
    /// These sockets cannot splice (the kernel said so, or urgent data stopped it): copy from
    /// now on.
    no_splice: bool,
    /// The last time this direction wanted a pipe none was free (counted once until one is).
    short: bool,
    eof: bool,
    done: bool,
    /// The other side failed: a read error here is the end of what can be salvaged, and the
    /// end is not passed on as a FIN (the caller resets once the data is out).
    salvage: bool,
    from: Side,
    to: Side,
}

impl Pipe {
    fn new(from: Side, to: Side) -> Pipe {
        Pipe {
            buf: Vec::new(),
            written: 0,
            lease: None,
            total: 0,
            no_splice: false,
            short: false,
            eof: false,
            done: false,
            salvage: false,
            from,
            to,
        }
    }

    /// Bytes read and not yet written, in the user buffer or in the pipe.
    fn pending(&self) -> usize {
        self.buf.len() - self.written + self.lease.as_ref().map_or(0, |l| l.data)
    }

    /// Whether the next read goes through a pipe: one is held, or the direction has moved
    /// enough to want one and the pool has one free (else it copies).
    fn splices(&mut self, splicing: Option<&Splicing>) -> bool {
        if self.lease.is_some() {
            return true;
        }
        match splicing {
            Some(s) if !self.no_splice && self.total >= s.after => {
                self.lease = s.pool.take();
                match (self.lease.is_some(), self.short) {
                    (true, _) => self.short = false,
                    (false, false) => {
                        s.pool.short();
                        self.short = true;
                    }
                    (false, true) => {}
                }
                self.lease.is_some()
            }
            _ => false,
        }
    }

    /// Moves what it can. Ready(Ok) once the source has ended and the FIN has been passed on.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: Counter<'_>,
        splicing: Option<&Splicing>,
        moved: &mut bool,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(lease) = self.lease.as_mut().filter(|l| l.data > 0) {
                ready!(to.poll_write_ready(cx)).map_err(|e| (self.to, e))?;
                // try_io clears the readiness on WouldBlock: the send buffer is full.
                match to.try_io(Interest::WRITABLE, || lease.drain(to.as_raw_fd())) {
                    Ok(n) => {
                        if let Some(s) = splicing {
                            s.bytes.inc_by(n as u64);
                        }
                        *moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Not the socket's failure: take the bytes out of the pipe and copy them.
                    Err(e) if splice::unsupported(&e) && self.buf.is_empty() => {
                        let rescued = lease.empty_into(&mut self.buf);
                        self.written = 0;
                        self.no_splice = true;
                        if let Err(e) = rescued {
                            tracing::debug!(error = %e, "cannot read a pipe back; the stream is cut");
                            return Poll::Ready(Err((self.from, e)));
                        }
                        self.lease = None;
                    }
                    Err(e) => return Poll::Ready(Err((self.to, e))),
                }
                continue;
            }
            if self.written < self.buf.len() {
                ready!(to.poll_write_ready(cx)).map_err(|e| (self.to, e))?;
                match to.try_write(&self.buf[self.written..]) {
                    Ok(0) => return Poll::Ready(Err((self.to, io::ErrorKind::WriteZero.into()))),
                    Ok(n) => {
                        self.written += n;
                        *moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err((self.to, e))),
                }
                continue;
            }
            self.buf.clear();
            self.written = 0;
            if self.eof {
                if !self.salvage {
                    // Pass the FIN on. NotConnected means the peer is already fully gone, which
                    // the other direction will report if it matters.
                    match SockRef::from(to).shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Poll::Ready(Err((self.to, e))),
                    }
                }
                self.done = true;
                self.buf = Vec::new();
                self.lease = None;
                continue;
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => {
                    // Going idle: give the buffer and the pipe (empty here) back rather than
                    // hold them while nothing moves.
                    self.buf = Vec::new();
                    self.lease = None;
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) if self.salvage => {
                    self.eof = true;
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((self.from, e))),
                Poll::Ready(Ok(())) => {}
            }
            if self.splices(splicing) {
                let Some(lease) = self.lease.as_mut() else { continue };
                // The pipe is empty here, so WouldBlock means the socket has nothing (and
                // try_io clears its readiness), unless urgent data stopped splice short of
                // bytes still queued: then the copy path reads on.
                let filled = from.try_io(Interest::READABLE, || match lease.fill(from.as_raw_fd()) {
                    Ok(0) if at_urgent_mark(from) => Ok(Fill::Stuck),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && at_urgent_mark(from) => Ok(Fill::Stuck),
                    Ok(n) => Ok(Fill::Moved(n)),
                    Err(e) => Err(e),
                });
                match filled {
                    Ok(Fill::Moved(0)) => self.eof = true,
                    Ok(Fill::Moved(n)) => {
                        bytes.inc_by(n as u64);
                        self.total += n as u64;
                        *moved = true;
                    }
                    Ok(Fill::Stuck) => {
                        self.no_splice = true;
                        self.lease = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if splice::unsupported(&e) => {
                        self.no_splice = true;
                        self.lease = None;
                    }
                    Err(_) if self.salvage => self.eof = true,
                    Err(e) => return Poll::Ready(Err((self.from, e))),
                }
                continue;
            }
            if self.buf.capacity() == 0 {
                // Holding no buffer: read into this thread's scratch buffer and write straight
                // on. Only what the other side cannot take now is copied into one of our own.
                let through = SCRATCH.try_with(|scratch| match scratch.try_borrow_mut() {
                    Ok(mut scratch) => Some(self.pass_through(&mut scratch, cx, from, to, bytes, moved)),
                    Err(_) => None,
                });
                match through {
                    Ok(Some(Ok(()))) => continue,
                    Ok(Some(Err(failed))) => return Poll::Ready(Err(failed)),
                    // No scratch buffer on this thread (it is being torn down): use our own.
                    Ok(None) | Err(_) => self.buf.reserve_exact(BUF_SIZE),
                }
            }
            match from.try_read_buf(&mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    bytes.inc_by(n as u64);
                    self.total += n as u64;
                    *moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The failed side's kernel hands out what it had queued, then the error (or
                // end of file once the error was reported elsewhere): that is the end.
                Err(_) if self.salvage => self.eof = true,
                Err(e) => return Poll::Ready(Err((self.from, e))),
            }
        }
    }
}

impl Pipe {
    /// One read into `scratch` and a write of it straight on (the source was readable). What
    /// `to` does not take now is kept in a buffer of the direction's own, which later reads then
    /// fill as long as bytes keep coming: a request and its answer allocate nothing, a
    /// direction with a slow reader holds one buffer, as before.
    fn pass_through(
        &mut self,
        scratch: &mut [u8],
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: Counter<'_>,
        moved: &mut bool,
    ) -> Result<(), (Side, io::Error)> {
        let n = match from.try_read(scratch) {
            Ok(0) => {
                self.eof = true;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) if self.salvage => {
                self.eof = true;
                return Ok(());
            }
            Err(e) => return Err((self.from, e)),
        };
        bytes.inc_by(n as u64);
        self.total += n as u64;
        *moved = true;
        let (sent, result) = match to.poll_write_ready(cx) {
            Poll::Ready(Ok(())) => match to.try_write(&scratch[..n]) {
                Ok(0) => (0, Err(io::ErrorKind::WriteZero.into())),
                Ok(sent) => (sent, Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Ok(())),
                Err(e) => (0, Err(e)),
            },
            Poll::Ready(Err(e)) => (0, Err(e)),
            // Woken when it can take more; the bytes wait in our buffer meanwhile.
            Poll::Pending => (0, Ok(())),
        };
        if sent < n {
            // Also on a failed write: the bytes count as pending (no clean end, see
            // `bidirectional`).
            self.buf.reserve_exact(BUF_SIZE);
            self.buf.extend_from_slice(&scratch[sent..n]);
            self.written = 0;
        }
        result.map_err(|e| (self.to, e))
    }
}

thread_local! {
    /// Each thread's read buffer for the directions that hold none (see [`Pipe::pass_through`]).
    /// Allocated zeroed, so its pages are taken only as reads reach them.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; BUF_SIZE].into_boxed_slice());
}

/// `SIOCOUTQNSD` from linux/sockios.h (not in the libc crate): bytes written but not yet sent.
const SIOCOUTQNSD: libc::Ioctl = 0x894B;

/// One of the queue-size ioctls on `stream`; None when the kernel cannot say.
fn queued(stream: &TcpStream, request: libc::Ioctl) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: these ioctls write one c_int through the pointer, which points at a live c_int;
    // the descriptor is open for as long as `stream` is borrowed.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), request, &mut n) };
    (rc == 0).then(|| usize::try_from(n).unwrap_or(0))
}

/// Bytes written to `stream` that its peer has not acknowledged yet (`SIOCOUTQ`), including a
/// FIN once sent.
fn unacknowledged(stream: &TcpStream) -> Option<usize> {
    queued(stream, libc::TIOCOUTQ)
}

/// Bytes written to `stream` that have not even been sent yet: still owed to the peer.
fn unsent(stream: &TcpStream) -> Option<usize> {
    queued(stream, SIOCOUTQNSD)
}

/// `SIOCATMARK` from linux/sockios.h (not in the libc crate): 1 when the next byte to read is
/// the urgent mark.
const SIOCATMARK: libc::Ioctl = 0x8905;

/// Whether reading `stream` has stopped at urgent (out-of-band) data, which splice cannot read
/// past (it reports nothing to read, or the end of the stream, there). FIONREAD counts only the
/// bytes before the mark, so it says 0 there too: ask for the mark itself.
fn at_urgent_mark(stream: &TcpStream) -> bool {
    queued(stream, SIOCATMARK).is_some_and(|n| n > 0)
}

/// Bytes received on `stream` that the proxy has not read yet (`FIONREAD`).
fn unread(stream: &TcpStream) -> Option<usize> {
    queued(stream, libc::FIONREAD)
}

/// Ends `to` with a reset when the stream toward it was cut short: bytes still in the pipe's
/// buffer or pipe, written and not yet sent, or arrived from `from` and never read. A FIN would
/// make the truncated stream look complete to that peer.
fn reset_if_truncated(pipe: &Pipe, from: &TcpStream, to: &TcpStream) {
    let cut =
        pipe.pending() > 0 || unsent(to).is_some_and(|n| n > 0) || (!pipe.eof && unread(from).is_some_and(|n| n > 0));
    if cut && let Err(e) = SockRef::from(to).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "could not set SO_LINGER; the truncated stream ends with a FIN");
    }
}

/// Proxies until both directions end, a side fails, or a timeout fires.
///
/// Not an `async fn`, whose arguments rustc would store twice: see `Proxy::serve`.
#[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice in every connection's task")]
pub fn bidirectional<'a>(
    client: &'a TcpStream,
    backend: &'a TcpStream,
    timeouts: Timeouts,
    to_backend: Counter<'a>,
    to_client: Counter<'a>,
    splicing: Option<&'a Splicing>,
) -> impl Future<Output = Outcome> + Send + 'a {
    async move {
        let mut up = Pipe::new(Side::Client, Side::Backend);
        let mut down = Pipe::new(Side::Backend, Side::Client);
        let half_limit = timeouts.half_close.min(timeouts.idle);
        let mut last_activity = Instant::now();
        let mut half_closed = false;
        // The timer is re-armed lazily: activity only moves `last_activity`, and when the timer
        // fires early it is pushed to the real deadline. That keeps timer work off the per-read path.
        // `checked_add` everywhere: a deadline past the end of time means "never".
        let mut timer = pin!(tokio::time::sleep(timeouts.idle));

        let ended = poll_fn(|cx| {
            let mut moved = false;
            // Stop at the first failure, before polling the other direction: a socket reports its
            // error once, and a read after a write consumed it returns end of file, which would be
            // passed on as a FIN, as if the failed side had ended cleanly.
            if let Poll::Ready(Err(failed)) = up.poll(cx, client, backend, to_backend, splicing, &mut moved) {
                return Poll::Ready(Err(failed));
            }
            if let Poll::Ready(Err(failed)) = down.poll(cx, backend, client, to_client, splicing, &mut moved) {
                return Poll::Ready(Err(failed));
            }
            if up.done && down.done {
                return Poll::Ready(Ok(Outcome::Completed));
            }
            if moved {
                last_activity = Instant::now();
            }
            let limit = if up.done || down.done { half_limit } else { timeouts.idle };
            let Some(deadline) = last_activity.checked_add(limit) else {
                return Poll::Pending;
            };
            if (up.done || down.done) && !half_closed {
                // The FIN just passed on is activity: the half-close limit counts from it, not from
                // the last data, which may be long ago. It may be shorter than the idle limit, so
                // bring the timer forward.
                half_closed = true;
                last_activity = Instant::now();
                let Some(deadline) = last_activity.checked_add(limit) else {
                    return Poll::Pending;
                };
                timer.as_mut().reset(deadline);
                return match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Ok(Outcome::HalfCloseTimeout)),
                    Poll::Pending => Poll::Pending,
                };
            }
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(Ok(if half_closed { Outcome::HalfCloseTimeout } else { Outcome::IdleTimeout }));
                }
                timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await;
        let (side, error) = match ended {
            Ok(outcome) => {
                if !matches!(outcome, Outcome::Completed) {
                    // A timeout cuts the stream: whoever had bytes still coming must not take the
                    // end for a complete one.
                    reset_if_truncated(&up, client, backend);
                    reset_if_truncated(&down, backend, client);
                }
                return outcome;
            }
            Err(failed) => failed,
        };

        // `failed`/`other`: the sockets; `salvaged`: the pipe from the failed side; `abandoned`:
        // the pipe toward it, whose bytes have nowhere to go.
        let (failed, other, mut salvaged, abandoned, counter) = match side {
            Side::Client => (client, backend, up, &down, to_backend),
            Side::Backend => (backend, client, down, &up, to_client),
        };
        // "Nothing pending toward it": every byte for the failed side had left this machine. Sent
        // but unacknowledged bytes do not count against it: a peer that resets within its delayed
        // ACK window carries its last ACK on the RST, which Linux does not apply.
        let nothing_pending =
            abandoned.pending() == 0 && unsent(failed).is_some_and(|n| n == 0) && unread(other).is_some_and(|n| n == 0);
        salvaged.salvage = true;
        // Boxed: this path is rare, and its timers would otherwise be part of every connection's
        // task for its whole life, idle or not.
        let delivered = Box::pin(async {
            salvage(&mut salvaged, failed, other, counter, splicing, half_limit).await && drain(other, half_limit).await
        })
        .await;
        // A reset is only "how that side ends a stream" if the other side got everything too.
        let clean_reset = error.kind() == io::ErrorKind::ConnectionReset && nothing_pending && delivered;
        Outcome::Failed(Failure { side, error, clean_reset, delivered })
    }
}

/// Forwards what the failed side had sent before failing. False if the other side failed too
/// or nothing moved for `limit`.
async fn salvage(
    pipe: &mut Pipe,
    from: &TcpStream,
    to: &TcpStream,
    bytes: Counter<'_>,
    splicing: Option<&Splicing>,
    limit: Duration,
) -> bool {
    let mut last_activity = Instant::now();
    let mut timer = pin!(tokio::time::sleep(limit));
    poll_fn(|cx| {
        let mut moved = false;
        match pipe.poll(cx, from, to, bytes, splicing, &mut moved) {
            Poll::Ready(Ok(())) => return Poll::Ready(true),
            Poll::Ready(Err(_)) => return Poll::Ready(false),
            Poll::Pending => {}
        }
        if moved {
            last_activity = Instant::now();
        }
        let Some(deadline) = last_activity.checked_add(limit) else {
            return Poll::Pending;
        };
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(false);
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

/// Waits until the kernel has delivered everything written to `stream` (acknowledged by the
/// peer), giving up after `limit` without progress. True when it drained.
async fn drain(stream: &TcpStream, limit: Duration) -> bool {
    let mut interval = DRAIN_POLL_MIN;
    let mut last = usize::MAX;
    let mut last_progress = Instant::now();
    loop {
        let Some(left) = unacknowledged(stream) else { return false };
        if left == 0 {
            return true;
        }
        if left < last {
            last = left;
            last_progress = Instant::now();
            interval = DRAIN_POLL_MIN;
        } else if last_progress.elapsed() >= limit {
            return false;
        }
        // A peer that reset (the socket is closed) cannot acknowledge anything more.
        if stream.peer_addr().is_err() {
            return false;
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(DRAIN_POLL_MAX);
    }
}
