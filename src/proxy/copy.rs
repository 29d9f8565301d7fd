//! Copying bytes both ways between client and backend, with half-close semantics, an idle
//! timeout and a bound on how long a half-closed connection may linger.
//!
//! Both directions are driven by one future, so neither is ever dropped early: when one side
//! finishes sending, its FIN is passed on (`shutdown(Write)`) and the other direction keeps
//! running until it finishes too. A direction holds a buffer only while data is in flight, so an
//! idle connection costs two sockets and a little state, not two buffers.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::pin::pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Per-direction read size. Large enough that bulk transfers need few system calls; only
/// connections with data in flight hold one.
const BUF_SIZE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Nothing moved either way for this long: close.
    pub idle: Duration,
    /// After one direction has finished, the other may stay idle this long (or `idle`, if
    /// shorter).
    pub half_close: Duration,
}

/// How a proxied connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached end of stream and everything was forwarded.
    Completed,
    ClientError(io::Error),
    BackendError(io::Error),
    IdleTimeout,
    HalfCloseTimeout,
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

/// One direction: reads from `from`, writes to `to`.
struct Pipe {
    buf: Vec<u8>,
    written: usize,
    eof: bool,
    done: bool,
    from: Side,
    to: Side,
}

impl Pipe {
    fn new(from: Side, to: Side) -> Pipe {
        Pipe { buf: Vec::new(), written: 0, eof: false, done: false, from, to }
    }

    /// Moves what it can. Ready(Ok) once the source has ended and the FIN has been passed on.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: &IntCounter,
        moved: &mut bool,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
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
                // Pass the FIN on. NotConnected means the peer is already fully gone, which the
                // other direction will report if it matters.
                match SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err((self.to, e))),
                }
                self.done = true;
                self.buf = Vec::new();
                continue;
            }
            if from.poll_read_ready(cx).map_err(|e| (self.from, e))?.is_pending() {
                // Going idle: give the buffer back rather than hold it while nothing moves.
                self.buf = Vec::new();
                return Poll::Pending;
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(BUF_SIZE);
            }
            match from.try_read_buf(&mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    bytes.inc_by(n as u64);
                    *moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err((self.from, e))),
            }
        }
    }
}

/// Proxies until both directions end, a side fails, or a timeout fires.
pub async fn bidirectional(
    client: &TcpStream,
    backend: &TcpStream,
    timeouts: Timeouts,
    to_backend: &IntCounter,
    to_client: &IntCounter,
) -> Outcome {
    let mut up = Pipe::new(Side::Client, Side::Backend);
    let mut down = Pipe::new(Side::Backend, Side::Client);
    let half_limit = timeouts.half_close.min(timeouts.idle);
    let mut last_activity = Instant::now();
    let mut half_closed = false;
    // The timer is re-armed lazily: activity only moves `last_activity`, and when the timer
    // fires early it is pushed to the real deadline. That keeps timer work off the per-read path.
    let mut timer = pin!(tokio::time::sleep(timeouts.idle));

    poll_fn(|cx| {
        let mut moved = false;
        let up_poll = up.poll(cx, client, backend, to_backend, &mut moved);
        let down_poll = down.poll(cx, backend, client, to_client, &mut moved);
        for p in [up_poll, down_poll] {
            if let Poll::Ready(Err((side, e))) = p {
                return Poll::Ready(match side {
                    Side::Client => Outcome::ClientError(e),
                    Side::Backend => Outcome::BackendError(e),
                });
            }
        }
        if up.done && down.done {
            return Poll::Ready(Outcome::Completed);
        }
        if moved {
            last_activity = Instant::now();
        }
        let limit = if up.done || down.done { half_limit } else { timeouts.idle };
        let deadline = last_activity + limit;
        if (up.done || down.done) && !half_closed {
            // The half-close limit may be shorter than the idle one: bring the timer forward.
            half_closed = true;
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(if half_closed { Outcome::HalfCloseTimeout } else { Outcome::IdleTimeout });
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}
