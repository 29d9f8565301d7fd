//! Zero-copy forwarding on Linux: socket to pipe to socket with splice(2), the bytes never
//! entering user space.
//!
//! What HAProxy's `raw_sock.c` and pipe pool learned, kept here:
//! - Pipes come from one bounded pool, reused across connections, and a direction holds one
//!   only while bytes are in flight: an idle connection holds none. A pipe handed back with
//!   bytes still in it (the connection ended mid-transfer) is closed, never reused.
//! - Small transfers are cheaper through a user buffer (one read and one write against two
//!   splices and a pipe), so a direction splices only once it has shown it moves bulk data
//!   ([`SPLICE_AFTER`]); when no pipe is free it goes on copying.
//! - EAGAIN from splice(2) means either "no data" or "pipe full". A direction here fills its
//!   pipe only when it is empty and empties it fully before reading again, so an EAGAIN while
//!   reading always means the socket has nothing, and one while writing always means the
//!   socket's send buffer is full.
//!
//! The pool's size comes from the two limits each pipe counts against: two descriptors under
//! the process's `RLIMIT_NOFILE` (half of what is left after the two per connection
//! `proxy.max_connections` needs and a reserve, so that admin connections, health checks and
//! bursts keep room), and 64 pages (256 KiB, [`PIPE_BYTES`]) of `fs.pipe-user-pages-soft`,
//! past which Linux makes new pipes of the user smaller and refuses to enlarge them (it counts
//! every pipe of the user, and does not apply to root); such a pipe (two pages) is closed and the direction copies. A reload that changes `proxy.max_connections` resizes it. At the edge (every pipe in
//! use, or `pipe2` failing for lack of descriptors) a direction copies through a user buffer
//! instead, and `splice_pipe_shortages_total` counts it once each time that happens.
//!
//! A socket splice cannot read past urgent (out-of-band) data: it reports EAGAIN, or the end
//! of the stream, with bytes still queued. A direction that sees that goes back to copying,
//! whose reads skip the urgent byte as the copy path always did.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntGauge};

/// A direction starts splicing once it has moved this much: two full reads of the copy path's
/// 64 KiB buffer. A TLS handshake and an API request and its answer stay below it.
pub const SPLICE_AFTER: u64 = 128 * 1024;
/// The size each pipe is set to (`F_SETPIPE_SZ`), and so the most one splice(2) moves into it.
/// Four times Linux's default of 64 KiB: a fill from a socket takes one pipe buffer per
/// segment or page fragment, and at 16 buffers a benchmark stream moved 0.35 CPU s per GB; at
/// 64 it moved 0.27, and ran 30 % faster; 1 MiB gained nothing more.
pub const PIPE_BYTES: usize = 256 * 1024;
/// Linux's default pipe size: a pipe smaller than this is not worth splicing through.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;
/// Pages one pipe counts against `fs.pipe-user-pages-soft` (4 KiB pages: x86-64, and arm64 as
/// Debian and Amazon Linux build it).
const PIPE_PAGES: u64 = (PIPE_BYTES / 4096) as u64;
/// Descriptors kept out of the pool's share: listeners, the admin server, DNS, health checks,
/// EC2 calls, logging.
const FD_RESERVE: u64 = 256;

/// The pool's metrics.
#[derive(Clone)]
pub struct PoolMetrics {
    pub in_use: IntGauge,
    pub free: IntGauge,
    pub shortages: IntCounter,
}

/// The pipes a proxy may hold, and those free now.
pub struct PipePool {
    free: Mutex<Vec<(OwnedFd, OwnedFd)>>,
    /// Pipes open now, in use or free.
    count: AtomicUsize,
    max: AtomicUsize,
    metrics: PoolMetrics,
    limit: IntGauge,
}

/// A pipe a direction holds while bytes are in flight. Dropped empty, it goes back to the
/// pool; dropped with bytes in it, it is closed.
pub struct Lease {
    pool: Arc<PipePool>,
    fds: Option<(OwnedFd, OwnedFd)>,
    /// Bytes spliced in and not yet out.
    pub data: usize,
}

impl PipePool {
    /// A pool of at most `max` pipes; `limit` reports it.
    pub fn new(max: usize, metrics: PoolMetrics, limit: IntGauge) -> Arc<PipePool> {
        limit.set(i64::try_from(max).unwrap_or(i64::MAX));
        Arc::new(PipePool {
            free: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            metrics,
            limit,
        })
    }

    /// A new bound (a reload changed `proxy.max_connections`): free pipes above it are closed
    /// now, pipes in use above it when they come back.
    pub fn resize(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.limit.set(i64::try_from(max).unwrap_or(i64::MAX));
        let mut free = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while self.count.load(Ordering::Acquire) > max && free.pop().is_some() {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.metrics.free.dec();
        }
    }

    /// How many pipes a proxy with `max_connections` may hold: half of what the descriptor
    /// limit leaves after the connections' two each, the workers' `worker_descriptors` and a
    /// reserve, what `fs.pipe-user-pages-soft` allows at full size, and never more than two
    /// per connection.
    pub fn size_for(max_connections: usize, worker_descriptors: u64) -> usize {
        let nofile = rlimit::Resource::NOFILE.get().map_or(1024, |(soft, _)| soft).saturating_sub(worker_descriptors);
        let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(16384);
        Self::size(max_connections as u64, nofile, pages)
    }

    fn size(max_connections: u64, nofile: u64, pipe_user_pages_soft: u64) -> usize {
        // Each pipe is two descriptors; the pool takes half of the spare ones.
        let by_fds = nofile.saturating_sub(2 * max_connections + FD_RESERVE) / 4;
        // 0 means no soft limit.
        let by_pages = if pipe_user_pages_soft == 0 { u64::MAX } else { pipe_user_pages_soft / PIPE_PAGES };
        let max = by_fds.min(by_pages).min(2 * max_connections);
        usize::try_from(max).unwrap_or(usize::MAX)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Counts a direction that wanted a pipe and copies instead.
    pub fn short(&self) {
        self.metrics.shortages.inc();
    }

    /// A pipe, or None when all are in use or one cannot be made.
    pub fn take(self: &Arc<Self>) -> Option<Lease> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let fds = free.pop();
            if fds.is_some() {
                self.metrics.free.dec();
            }
            fds
        };
        let fds = match reused {
            Some(fds) => fds,
            None => {
                let max = self.max();
                let grown =
                    self.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c < max).then_some(c + 1));
                if grown.is_err() {
                    return None;
                }
                match new_pipe() {
                    Ok(fds) => fds,
                    Err(e) => {
                        self.count.fetch_sub(1, Ordering::AcqRel);
                        tracing::debug!(error = %e, "cannot make a pipe for splice; copying instead");
                        return None;
                    }
                }
            }
        };
        self.metrics.in_use.inc();
        Some(Lease { pool: Arc::clone(self), fds: Some(fds), data: 0 })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(fds) = self.fds.take() else { return };
        self.pool.metrics.in_use.dec();
        // Bytes nobody will read: close it rather than hand them to the next connection; and
        // close one the pool no longer has room for.
        if self.data == 0 && self.pool.count.load(Ordering::Acquire) <= self.pool.max() {
            let mut free = self.pool.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            free.push(fds);
            self.pool.metrics.free.inc();
        } else {
            drop(fds);
            self.pool.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Lease {
    fn read_end(&self) -> RawFd {
        self.fds.as_ref().map_or(-1, |(r, _)| r.as_raw_fd())
    }

    fn write_end(&self) -> RawFd {
        self.fds.as_ref().map_or(-1, |(_, w)| w.as_raw_fd())
    }

    /// Moves up to [`PIPE_BYTES`] from socket `from` into the pipe (which must be empty, see
    /// the module's notes): Ok(0) at end of stream, WouldBlock when the socket has nothing.
    pub fn fill(&mut self, from: RawFd) -> io::Result<usize> {
        let n = splice(from, self.write_end(), PIPE_BYTES)?;
        self.data += n;
        Ok(n)
    }

    /// Reads what the pipe holds into `buf` (a direction going back to copying with bytes in
    /// its pipe).
    pub fn empty_into(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        while self.data > 0 {
            let start = buf.len();
            buf.resize(start + self.data, 0);
            // SAFETY: reads at most `data` bytes into the `data` bytes just made room for, from
            // the pipe's read end, which this lease holds open.
            let n = unsafe { libc::read(self.read_end(), buf[start..].as_mut_ptr().cast(), self.data) };
            let Ok(n) = usize::try_from(n) else {
                buf.truncate(start);
                return Err(io::Error::last_os_error());
            };
            buf.truncate(start + n);
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.data -= n;
        }
        Ok(())
    }

    /// Moves what the pipe holds into socket `to`: WouldBlock when its send buffer is full.
    pub fn drain(&mut self, to: RawFd) -> io::Result<usize> {
        let n = splice(self.read_end(), to, self.data)?;
        if n == 0 && self.data > 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.data -= n;
        Ok(n)
    }
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors nothing else owns.
    let pipe = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours; the descriptor is open.
    if unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int) } < 0 {
        let refused = io::Error::last_os_error();
        // A fs.pipe-max-size below ours: the default-sized pipe works, with more system calls
        // per byte. Past fs.pipe-user-pages-soft (other pipes of the user count too), Linux
        // makes new pipes of two pages, slower than copying: such a pipe would be pooled and
        // reused for the process's life, so it is refused and the direction copies.
        // SAFETY: F_GETPIPE_SZ reads the pipe's size; the descriptor is open.
        let size = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        if usize::try_from(size).is_ok_and(|size| size < DEFAULT_PIPE_BYTES) {
            return Err(io::Error::other(format!(
                "a pipe of {size} bytes, which splices slower than copying ({refused})"
            )));
        }
        tracing::debug!(error = %refused, "cannot enlarge a splice pipe; using it at its default size");
    }
    Ok(pipe)
}

/// One non-blocking splice(2) of up to `len` bytes between a socket and a pipe.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors are open (borrowed from live sockets and a held pipe), and
        // null offsets are what splice takes for sockets and pipes.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            // Non-negative and at most `len`.
            return Ok(usize::try_from(n).unwrap_or(0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// True for splice errors that are no failure of the connection (this pair of descriptors
/// cannot splice, or the kernel is short of memory for pipe buffers, which a plain read does
/// not need): the direction goes back to copying.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> PoolMetrics {
        PoolMetrics {
            in_use: IntGauge::new("in_use", "h").unwrap(),
            free: IntGauge::new("free", "h").unwrap(),
            shortages: IntCounter::new("shortages", "h").unwrap(),
        }
    }

    fn pool(max: usize) -> Arc<PipePool> {
        PipePool::new(max, metrics(), IntGauge::new("limit", "h").unwrap())
    }

    #[test]
    fn the_pool_is_sized_from_descriptors_and_pipe_pages() {
        // The unit's 32768 descriptors, 10000 connections: 3128 by descriptors, 256 by the
        // default 16384 pages (64 MiB, 256 KiB a pipe).
        assert_eq!(PipePool::size(10_000, 32_768, 16_384), 256);
        // This machine's 20000 and the benchmark's 9000 connections: 436 by descriptors.
        assert_eq!(PipePool::size(9_000, 20_000, 16_384), 256);
        assert_eq!(PipePool::size(9_000, 20_000, 65_536), 436);
        // Descriptors decide when connections take most of them.
        assert_eq!(PipePool::size(9_500, 20_000, 16_384), 186);
        // No room: no pool, every direction copies.
        assert_eq!(PipePool::size(10_000, 20_000, 16_384), 0);
        // No soft limit; never more than two per connection.
        assert_eq!(PipePool::size(10, 1 << 20, 0), 20);
    }

    #[test]
    fn pipes_are_reused_when_empty_closed_when_not_and_bounded() {
        let pool = pool(2);
        let a = pool.take().expect("first");
        let mut b = pool.take().expect("second");
        assert!(pool.take().is_none(), "past the bound");
        drop(a);
        assert_eq!((pool.metrics.in_use.get(), pool.metrics.free.get()), (1, 1));
        let again = pool.take().expect("the freed one");
        assert_eq!((pool.count.load(Ordering::Acquire), pool.metrics.free.get()), (2, 0), "reused, not made anew");
        // One handed back holding bytes is closed, and its place in the bound freed.
        b.data = 10;
        drop(b);
        assert_eq!(pool.count.load(Ordering::Acquire), 1);
        let c = pool.take().expect("room again");
        // A smaller bound: free pipes above it close now, those in use as they come back.
        drop(again);
        pool.resize(1);
        assert_eq!((pool.count.load(Ordering::Acquire), pool.metrics.free.get()), (1, 0));
        drop(c);
        assert_eq!((pool.count.load(Ordering::Acquire), pool.metrics.free.get()), (1, 1));
        pool.resize(0);
        assert_eq!(pool.count.load(Ordering::Acquire), 0);
        assert!(pool.take().is_none());
    }

    #[test]
    fn pipes_are_enlarged_to_the_splice_size() {
        let pool = pool(1);
        let lease = pool.take().unwrap();
        // SAFETY: F_GETPIPE_SZ reads the pipe's size; the descriptor is open.
        let size = unsafe { libc::fcntl(lease.write_end(), libc::F_GETPIPE_SZ) };
        // Root is exempt from fs.pipe-user-pages-soft (CI runs as root); another user past it,
        // or under a lower fs.pipe-max-size, gets Linux's default size at least.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let size = usize::try_from(size).expect("a pipe size");
        assert!(size == PIPE_BYTES || (!root && size >= DEFAULT_PIPE_BYTES), "pipe of {size} bytes");
    }

    #[test]
    fn bytes_in_a_pipe_can_be_read_back_into_a_buffer() {
        let pool = pool(1);
        let mut lease = pool.take().unwrap();
        // SAFETY: writes 5 bytes from a live array into the pipe's write end.
        let n = unsafe { libc::write(lease.write_end(), b"hello".as_ptr().cast(), 5) };
        assert_eq!(n, 5);
        lease.data = 5;
        let mut buf = b"<".to_vec();
        lease.empty_into(&mut buf).unwrap();
        assert_eq!((buf.as_slice(), lease.data), (&b"<hello"[..], 0));
    }
}
