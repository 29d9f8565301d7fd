//! The TCP data path: the accept loop, the connection limit, and one task per connection.

pub mod access;
pub mod copy;
pub mod proxy_protocol;
pub mod sni;
pub mod socket;
pub mod splice;
pub mod workers;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use arc_swap::ArcSwap;

use crate::backend::BackendAddr;
use crate::config::{ProxyConfig, ProxyProtocol, Splice};
use crate::logging::{Budget, Throttle};
use crate::metrics::{CloseReason, ConnectError, Direction, Metrics, Side};
use crate::route::{Pick, Router, Upstream};

use access::Record;

/// How many backend addresses one client connection tries before giving up. Refused connects
/// cost nothing, but each timeout costs `connect_timeout`; four keeps the worst case well
/// inside the ~30 s a TLS client waits for its handshake at the default 3 s.
const MAX_CONNECT_ATTEMPTS: usize = 4;

/// Access-log lines a second for connections refused at `proxy.max_connections`; the
/// throttled "connection limit reached" warning counts those past it (`unlogged`).
const OVER_LIMIT_LINES: u64 = 100;

/// After a reload changes `proxy.tcp_keepalive`, how long accepted sockets are tuned one by
/// one: the backlog that completed under the old setting drains within it.
const RETUNE_BACKLOG: std::time::Duration = std::time::Duration::from_secs(10);

/// One connection's slot under `proxy.max_connections`, counted in [`Proxy::active`] while it
/// lives; dropped (however the connection's task ends), it goes back to the limit.
struct Slot {
    proxy: Arc<Proxy>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn new(proxy: Arc<Proxy>, permit: OwnedSemaphorePermit) -> Slot {
        proxy.open.fetch_add(1, Ordering::AcqRel);
        Slot { proxy, permit: Some(permit) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.proxy.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(permit) = self.permit.take() {
            self.proxy.release(permit);
        }
    }
}

/// Everything a connection task needs, shared by all of them.
pub struct Proxy {
    /// Swapped by a reload; each connection reads it as it goes.
    config: ArcSwap<ProxyConfig>,
    /// `log.access`: each connection logs a line as it closes.
    access_log: AtomicBool,
    /// `proxy.max_connections` now: `limit` holds this many permits, plus `owed`.
    max_connections: AtomicUsize,
    /// Permits a lowered limit still has to take back: held by connections opened under the
    /// higher one, each forgotten (not returned) as its connection ends.
    owed: AtomicUsize,
    /// Connections holding a slot now (counted apart from the semaphore, whose permits a
    /// lowering of the limit moves about).
    open: AtomicUsize,
    /// Every backend, and which connection goes where.
    router: ArcSwap<Router>,
    metrics: Arc<Metrics>,
    limit: Arc<Semaphore>,
    /// Kernel pipes for `proxy.splice`, sized at start.
    pipes: Arc<splice::PipePool>,
    /// Every connection task, so the drain can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain's grace period ends: open connections are cut.
    pub cut: CancellationToken,
    /// A child of `cut` that each connection takes when it starts: [`Proxy::cut_open`] cancels
    /// it (cutting the connections open now) and puts a fresh one in its place.
    round: std::sync::Mutex<CancellationToken>,
    limit_log: Throttle,
    /// Access-log lines for refusals at the limit: at most [`OVER_LIMIT_LINES`] a second.
    limit_lines: Budget,
    connect_log: Throttle,
    accept_log: Throttle,
}

impl Proxy {
    pub fn new(config: ProxyConfig, access_log: bool, router: Arc<Router>, metrics: Arc<Metrics>) -> Proxy {
        let cut = CancellationToken::new();
        Proxy {
            limit: Arc::new(Semaphore::new(config.max_connections)),
            pipes: splice::PipePool::new(
                splice::PipePool::size_for(config.max_connections, workers::descriptors_for(&config)),
                metrics.splice_pipes.clone(),
                metrics.splice_pipes_limit.clone(),
            ),
            max_connections: AtomicUsize::new(config.max_connections),
            owed: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            config: ArcSwap::from_pointee(config),
            access_log: AtomicBool::new(access_log),
            router: ArcSwap::new(router),
            metrics,
            tracker: TaskTracker::new(),
            round: std::sync::Mutex::new(cut.child_token()),
            cut,
            limit_log: Throttle::new(),
            limit_lines: Budget::new(OVER_LIMIT_LINES),
            connect_log: Throttle::new(),
            accept_log: Throttle::new(),
        }
    }

    /// Connections being proxied now.
    pub fn active(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Applies a reloaded `proxy.max_connections`. Raised: the new slots are free at once.
    /// Lowered: free slots go at once, and those held by open connections go as each ends;
    /// no connection is closed, and until enough have ended new ones are refused as over
    /// the limit.
    pub fn set_max_connections(&self, max: usize) {
        let old = self.max_connections.swap(max, Ordering::AcqRel);
        if old != max {
            // The pipe pool shares the descriptor budget with the connections.
            self.pipes.resize(splice::PipePool::size_for(max, workers::descriptors_for(&self.config.load())));
        }
        if max > old {
            // Slots still owed to an earlier lowering are the first to come back.
            let delta = max - old;
            let owed = self.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| Some(o - o.min(delta)));
            let repaid = owed.unwrap_or(0).min(delta);
            self.limit.add_permits(delta - repaid);
        } else if max < old {
            let delta = old - max;
            let taken = self.limit.forget_permits(delta);
            self.owed.fetch_add(delta - taken, Ordering::AcqRel);
        }
    }

    /// A connection's slot, back to the limit (or forgotten while a lowering is owed one).
    fn release(&self, permit: OwnedSemaphorePermit) {
        let owed = self.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1));
        if owed.is_ok() {
            permit.forget();
        } else {
            drop(permit);
        }
    }

    /// Cuts the connections open now with a reset (counted as shutdown), and only those:
    /// connections accepted from now on are served. A handoff does this just before the
    /// address moves away, so nothing open through it breaks silently.
    pub fn cut_open(&self) {
        let mut round = self.round.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        round.cancel();
        *round = self.cut.child_token();
    }

    fn cut_token(&self) -> CancellationToken {
        self.round.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Acquire)
    }

    /// Applies a reloaded configuration to new connections: its routes and backends, and its
    /// `[proxy]` timeouts and bounds. Connections already open keep what they started with,
    /// but `log.access` applies to every connection that closes from now on.
    pub fn reconfigure(&self, config: ProxyConfig, access_log: bool, router: Arc<Router>) {
        self.config.store(Arc::new(config));
        self.access_log.store(access_log, Ordering::Release);
        self.router.store(router);
    }

    /// Logs a closed connection's access-log line, if `log.access` is on.
    fn log_access(&self, record: &Record, reason: CloseReason) {
        if self.access_log.load(Ordering::Acquire) {
            record.log(reason);
        }
    }

    /// The backends and the routing between them, as connections see them now.
    pub fn router(&self) -> Arc<Router> {
        self.router.load_full()
    }

    /// Accepts until `stop` fires, then drops the listener so the port closes. Never returns
    /// early because of an error: per-connection failures are counted and the loop goes on.
    /// `configured` is the listener's address as `proxy.listen` writes it, which routes'
    /// `listen` name (the bound address differs for port 0).
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener, configured: SocketAddr, stop: CancellationToken) {
        let addr = listener.local_addr().ok();
        let on = configured;
        // Connections inherit TCP_NODELAY and keepalive from the listener, which was bound
        // with them (socket::bind_proxy). A reload that changes proxy.tcp_keepalive re-tunes
        // the listener at the next accept, and for a while tunes each accepted socket too:
        // those whose handshake completed before carry the old setting.
        let mut tuned = self.config.load().tcp_keepalive;
        let mut retune_until: Option<tokio::time::Instant> = None;
        let mut acceptor = crate::accept::Acceptor::new(listener);
        while let Some((stream, peer)) = acceptor.next(&stop, |e, exhausted| self.accept_failed(e, exhausted)).await {
            let keepalive = self.config.load().tcp_keepalive;
            if keepalive != tuned {
                acceptor.tune(keepalive);
                tuned = keepalive;
                retune_until = Some(tokio::time::Instant::now() + RETUNE_BACKLOG);
            }
            if let Some(until) = retune_until {
                if tokio::time::Instant::now() < until {
                    socket::tune(&stream, keepalive);
                } else {
                    retune_until = None;
                }
            }
            self.metrics.tcp_open_total.inc();
            self.metrics.tcp_open_connections.inc();
            let record = Record::new(std::time::Instant::now(), peer, on);
            match Arc::clone(&self.limit).try_acquire_owned() {
                Ok(permit) => {
                    let slot = Slot::new(Arc::clone(&self), permit);
                    let span = tracing::debug_span!("conn", client.addr = %peer, backend = tracing::field::Empty,
                        backend.addr = tracing::field::Empty);
                    let proxy = Arc::clone(&self);
                    self.tracker.spawn(proxy.serve(stream, record, slot).instrument(span));
                }
                Err(_) => {
                    // Counted before the reset goes out (at the drop): a client that sees it
                    // finds it counted, even when its worker is another thread.
                    socket::reset(&stream);
                    self.metrics.closed(CloseReason::OverLimit);
                    drop(stream);
                    // A flood of refusals must not crowd the others' lines out of the access
                    // log's buffer: so many a second get one, the warning counts the rest.
                    if self.limit_lines.allow() {
                        self.log_access(&record, CloseReason::OverLimit);
                    }
                    if let Some(suppressed) = self.limit_log.allow() {
                        tracing::warn!(
                            limit = self.max_connections(),
                            suppressed,
                            unlogged = self.limit_lines.take_held_back(),
                            "connection limit reached; resetting new connections"
                        );
                    }
                }
            }
        }
        tracing::info!(addr = ?addr, "stopped accepting");
    }

    /// Counts and logs an accept error; `exhausted` when out of descriptors or memory (the
    /// acceptor then backs off).
    fn accept_failed(&self, e: &io::Error, exhausted: bool) {
        let reason = if exhausted { "fd_limit" } else { "other" };
        self.metrics.accept_errors_total.with_label_values(&[reason]).inc();
        if exhausted {
            if let Some(suppressed) = self.accept_log.allow() {
                tracing::warn!(error = %e, suppressed, "accept failed: out of file descriptors or memory; backing off");
            }
        } else {
            tracing::debug!(error = %e, "accept failed");
        }
    }

    // `serve`, `route`, `proxy` and `copy::bidirectional` make the future a connection's task
    // holds for its life, which is most of what an open connection costs the proxy. They are
    // plain functions returning an `async move` block, not `async fn`s: rustc stores an async
    // fn's arguments twice (the argument and the local it is moved into). Futures are made
    // inside the `select!` that polls them, not held in a local first, for the same reason.
    // `cargo rustc --release --lib -- -Zprint-type-sizes` (with RUSTC_BOOTSTRAP=1) shows the
    // layout.

    #[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice in every connection's task")]
    fn serve(self: Arc<Self>, client: TcpStream, record: Record, slot: Slot) -> impl Future<Output = ()> + Send {
        async move {
            // Logs the line however the task ends: a task dropped before its end (still open
            // when the process exits) logs it as cut by the shutdown.
            let mut line = Line { proxy: &self, record: &record, reason: CloseReason::Shutdown };
            let cut = self.cut_token();
            line.reason = self.route(&client, &record, &cut).await;
            // Free the socket and the slot before counting the close, so that whoever sees the
            // close counted can rely on the slot being free.
            drop(client);
            drop(slot);
            self.metrics.closed(line.reason);
        }
    }

    /// Picks the backend (reading the ClientHello first when routes need it), then proxies.
    /// Each step that waits also ends when `cut` fires (the connection is reset, counted as
    /// shutdown); each in its own `select!`, so that only one wait on `cut` is ever held.
    #[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice in every connection's task")]
    fn route<'a>(
        &'a self,
        client: &'a TcpStream,
        record: &'a Record,
        cut: &'a CancellationToken,
    ) -> impl Future<Output = CloseReason> + Send + 'a {
        async move {
            let (pick, hello) = if self.router().reads_hello(record.listener) {
                let read = tokio::select! {
                    biased;
                    () = cut.cancelled() => None,
                    read = self.read_hello(client) => Some(read),
                };
                match read {
                    // The routes as they are once the hello is in (a reload may have come since).
                    Some(Ok((hello, bytes))) => (self.router().pick(record.listener, &hello), bytes),
                    Some(Err(reason)) => return reason,
                    None => return cut_off(client),
                }
            } else {
                (self.router().direct(), Vec::new())
            };
            // Held by the record from here on, for the access log.
            let upstream = match pick {
                Pick::To(u) => record.route.get_or_init(|| u),
                Pick::Refuse => {
                    socket::reset(client);
                    return CloseReason::NoRoute;
                }
            };
            upstream.metrics.routed.inc();
            tracing::Span::current().record("backend", upstream.name());
            self.proxy(client, upstream, record, hello, cut).await
        }
    }

    /// Reads the client's first bytes until they hold a whole TLS ClientHello, are not TLS,
    /// reach `proxy.sni_max_bytes`, or `proxy.sni_timeout` passes (then what arrived decides:
    /// nothing is routed as not TLS, so a protocol where the server speaks first still
    /// works). The bytes are returned to be forwarded first.
    async fn read_hello(&self, client: &TcpStream) -> Result<(sni::Hello, Vec<u8>), CloseReason> {
        let config = self.config.load();
        let deadline = tokio::time::Instant::now() + config.sni_timeout;
        let max = config.sni_max_bytes;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if tokio::time::timeout_at(deadline, client.readable()).await.is_err() {
                let hello = match sni::read(&buf) {
                    sni::Hello::Incomplete if buf.is_empty() => sni::Hello::NotTls,
                    other => other,
                };
                return Ok((hello, buf));
            }
            // Grow in steps (most hellos fit the first one), never past the bound.
            buf.reserve_exact(HELLO_STEP.min(max.saturating_sub(buf.len())));
            match client.try_read_buf(&mut buf) {
                Ok(0) => {
                    // The client finished sending: route by what it sent.
                    let hello = match sni::read(&buf) {
                        sni::Hello::Incomplete if buf.is_empty() => sni::Hello::NotTls,
                        other => other,
                    };
                    return Ok((hello, buf));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // Nothing was owed to it: a client (a scanner, a probe) ending with a reset.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(CloseReason::ClientReset),
                Err(e) => {
                    tracing::debug!(error = %e, "client failed before its ClientHello arrived");
                    self.metrics.tcp_error(Side::Client, &e);
                    return Err(CloseReason::ClientError);
                }
            }
            match sni::read(&buf) {
                sni::Hello::Incomplete if buf.len() < max => {}
                hello => return Ok((hello, buf)),
            }
        }
    }

    /// Proxies `client` to `upstream`; `first` is what was read from the client already (for
    /// the route), sent before anything else of its own and freed once sent.
    #[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice in every connection's task")]
    fn proxy<'a>(
        &'a self,
        client: &'a TcpStream,
        upstream: &'a Upstream,
        record: &'a Record,
        first: Vec<u8>,
        cut: &'a CancellationToken,
    ) -> impl Future<Output = CloseReason> + Send + 'a {
        async move {
            let backends = &upstream.backends;
            let connected = {
                let set = backends.current();
                if set.addrs.is_empty() {
                    return CloseReason::NoBackend;
                }
                // The order is decided before the first attempt: marking an address suspect below
                // must not move it into a later place in this same connection's list.
                let candidates: Vec<&Arc<BackendAddr>> =
                    set.candidates(backends.next_start()).take(MAX_CONNECT_ATTEMPTS).collect();
                let connected = tokio::select! {
                    biased;
                    () = cut.cancelled() => return cut_off(client),
                    connected = self.connect(upstream, &candidates) => connected,
                };
                // The address is kept, not the set and the list: neither is needed once
                // connected, and an open connection should hold no more than it uses.
                connected.map(|(stream, addr)| (stream, Arc::clone(addr)))
            };
            let (backend, addr) = match connected {
                Ok(connected) => connected,
                Err(Unconnected::OutOfResources(e)) => {
                    if let Some(suppressed) = self.connect_log.allow() {
                        tracing::warn!(error = %e, suppressed, "cannot open a backend socket: out of file descriptors or memory");
                    }
                    socket::reset(client);
                    return CloseReason::FdLimit;
                }
                Err(Unconnected::AllFailed) => {
                    if let Some(suppressed) = self.connect_log.allow() {
                        tracing::warn!(backend = %backends.name, route = upstream.name(), suppressed,
                            "no backend address accepted the connection");
                    }
                    return CloseReason::ConnectFailed;
                }
            };
            tracing::Span::current().record("backend.addr", tracing::field::display(addr.addr));
            let addr = record.backend.get_or_init(|| addr);
            let _active = addr.track();
            let config = self.config.load_full();
            socket::tune(&backend, config.tcp_keepalive);
            // Before the client's own bytes: the PROXY header, then what was read for the route.
            // Both are freed before the copy starts: an idle connection holds no buffer.
            let header = match upstream.config.backend.proxy_protocol {
                ProxyProtocol::Off => Vec::new(),
                ProxyProtocol::V2 => match (client.peer_addr(), client.local_addr()) {
                    (Ok(peer), Ok(local)) => proxy_protocol::v2_header(peer, local),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!(error = %e, "cannot read the client's addresses for the PROXY protocol header");
                        socket::reset(client);
                        socket::reset(&backend);
                        return CloseReason::ClientError;
                    }
                },
            };
            let read_ahead = first.len() as u64;
            for part in [header, first] {
                if part.is_empty() {
                    continue;
                }
                let sent = tokio::select! {
                    biased;
                    () = cut.cancelled() => {
                        socket::reset(&backend);
                        return cut_off(client);
                    }
                    sent = tokio::time::timeout(config.connect_timeout, write_all(&backend, &part)) => sent,
                };
                if let Err(e) = sent.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
                    // The client has not been answered: reset it, so it retries rather than
                    // taking the close for an answer.
                    tracing::debug!(error = %e, "cannot send the first bytes to the backend");
                    socket::reset(client);
                    socket::reset(&backend);
                    return CloseReason::BackendError;
                }
            }
            self.metrics.bytes(Direction::ToBackend).inc_by(read_ahead);
            record.to_backend.fetch_add(read_ahead, Ordering::Relaxed);

            let timeouts = copy::Timeouts { idle: config.idle_timeout, half_close: config.half_close_timeout };
            let after = match config.splice {
                Splice::Auto => Some(splice::SPLICE_AFTER),
                Splice::Always => Some(0),
                Splice::Off => None,
            };
            drop(config);
            let splicing = after.filter(|_| self.pipes.max() > 0).map(|after| copy::Splicing {
                pool: Arc::clone(&self.pipes),
                after,
                bytes: self.metrics.splice_bytes_total.clone(),
            });
            let outcome = tokio::select! {
                outcome = copy::bidirectional(
                    client,
                    &backend,
                    timeouts,
                    copy::Counter { metric: self.metrics.bytes(Direction::ToBackend), conn: &record.to_backend },
                    copy::Counter { metric: self.metrics.bytes(Direction::ToClient), conn: &record.to_client },
                    splicing.as_ref(),
                ) => outcome,
                () = addr.retired() => {
                    // The address may now belong to someone else: end the stream with a reset so
                    // the client reconnects (and resolves again) rather than mistaking it for an end.
                    socket::reset(client);
                    socket::reset(&backend);
                    return CloseReason::BackendRetired;
                }
                () = cut.cancelled() => {
                    // Cut mid-stream by the end of the drain: both ends see an abort, so neither
                    // takes a partial upload or reply for a complete one.
                    socket::reset(client);
                    socket::reset(&backend);
                    return CloseReason::Shutdown;
                }
            };
            match outcome {
                copy::Outcome::Completed => CloseReason::Completed,
                copy::Outcome::IdleTimeout => CloseReason::IdleTimeout,
                copy::Outcome::HalfCloseTimeout => CloseReason::HalfCloseTimeout,
                copy::Outcome::Failed(failure) => {
                    tracing::debug!(side = failure.side.as_str(), error = %failure.error, clean = failure.clean_reset,
                        delivered = failure.delivered, "connection ended by a failure of one side");
                    // The other side has received (and acknowledged) everything the failed side sent
                    // before it failed, or the drain gave up: now pass the abort on, as a reset, so
                    // that it sees what it would have seen talking to the failed side directly.
                    let other = match failure.side {
                        Side::Client => &backend,
                        Side::Backend => client,
                    };
                    socket::reset(other);
                    match (failure.side, failure.clean_reset) {
                        (Side::Client, true) => CloseReason::ClientReset,
                        (Side::Backend, true) => CloseReason::BackendReset,
                        (side, false) => {
                            self.metrics.tcp_error(side, &failure.error);
                            match side {
                                Side::Client => CloseReason::ClientError,
                                Side::Backend => CloseReason::BackendError,
                            }
                        }
                    }
                }
            }
        }
    }

    /// Tries `candidates` in order until one accepts, each once, under the connect timeout.
    async fn connect<'a>(
        &self,
        upstream: &Upstream,
        candidates: &[&'a Arc<BackendAddr>],
    ) -> Result<(TcpStream, &'a Arc<BackendAddr>), Unconnected> {
        for &addr in candidates {
            let started = tokio::time::Instant::now();
            let timeout = self.config.load().connect_timeout;
            let result = tokio::time::timeout(timeout, TcpStream::connect(addr.addr)).await;
            let error = match result {
                Ok(Ok(stream)) => {
                    upstream.metrics.connect_duration_seconds.observe(started.elapsed().as_secs_f64());
                    return Ok((stream, addr));
                }
                // No socket could be made: the next address would fail the same way, and the
                // backend is not at fault, so it is neither counted nor marked suspect.
                Ok(Err(e)) if socket::out_of_resources(&e) => return Err(Unconnected::OutOfResources(e)),
                Ok(Err(e)) => {
                    tracing::debug!(backend.addr = %addr.addr, error = %e, "connect failed; trying the next address");
                    ConnectError::classify(&e)
                }
                Err(_elapsed) => {
                    tracing::debug!(backend.addr = %addr.addr, ?timeout, "connect timed out; trying the next address");
                    ConnectError::Timeout
                }
            };
            upstream.metrics.connect_error(error);
            addr.mark_suspect();
            // The address may have left DNS: ask for a fresh answer (rate-limited there).
            upstream.backends.request_refresh();
        }
        Err(Unconnected::AllFailed)
    }
}

/// A connection's access-log line, logged when dropped: at the end of its task, or with the task.
struct Line<'a> {
    proxy: &'a Proxy,
    record: &'a Record,
    reason: CloseReason,
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        self.proxy.log_access(self.record, self.reason);
    }
}

/// Ends a connection the drain's end cut before it reached the copy: reset, so the client
/// retries rather than taking the close for an answer.
fn cut_off(client: &TcpStream) -> CloseReason {
    socket::reset(client);
    CloseReason::Shutdown
}

/// How much the ClientHello buffer grows by at a time.
const HELLO_STEP: usize = 4096;

/// Writes all of `buf` (a header of a few dozen bytes to a socket just connected: one write).
async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why no backend connection was made.
enum Unconnected {
    /// Every candidate was tried once and failed.
    AllFailed,
    /// The proxy itself is out of descriptors or memory.
    OutOfResources(io::Error),
}
