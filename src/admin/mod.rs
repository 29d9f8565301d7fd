//! The admin HTTP server: `/health` for Route 53, `/live`, `/metrics` and `/status`.
//!
//! It answers from in-memory state only (never waits on DNS or a health check), and is
//! hardened against clients that are slow or many: a header-read timeout, a connection cap,
//! GET and HEAD only.

mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::backend::Backends;
use crate::config::Config;
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::proxy::Proxy;

/// How long open admin connections get to finish when the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after accept fails for lack of descriptors, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the admin endpoints report on.
pub struct State {
    pub config: Arc<Config>,
    pub backends: Arc<Backends>,
    pub metrics: Arc<Metrics>,
    pub proxy: Arc<Proxy>,
    pub eip: Arc<crate::eip::Eip>,
    pub listen: Vec<std::net::SocketAddr>,
    pub version: &'static str,
    started: Instant,
    started_at: SystemTime,
    draining: AtomicBool,
}

/// The answer `/health` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    Unhealthy(String),
}

impl State {
    pub fn new(
        config: Arc<Config>,
        backends: Arc<Backends>,
        metrics: Arc<Metrics>,
        proxy: Arc<Proxy>,
        eip: Arc<crate::eip::Eip>,
        listen: Vec<std::net::SocketAddr>,
    ) -> State {
        State {
            config,
            backends,
            metrics,
            proxy,
            eip,
            listen,
            version: env!("CARGO_PKG_VERSION"),
            started: Instant::now(),
            started_at: SystemTime::now(),
            draining: AtomicBool::new(false),
        }
    }

    /// From now on `/health` answers 503 `draining`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// 200 when serving, not draining, and some backend address is healthy; else the reason.
    pub fn health(&self) -> Health {
        if self.is_draining() {
            return Health::Unhealthy("draining".into());
        }
        let set = self.backends.current();
        if set.addrs.is_empty() {
            return Health::Unhealthy(match &set.resolution.error {
                Some(why) => format!("backend unresolved: {why}"),
                None if set.resolution.last_good.is_none() => "backend unresolved: resolution in progress".into(),
                None => "no backend address".into(),
            });
        }
        let healthy = set.healthy_count();
        let need = self.config.health.min_healthy;
        if healthy == 0 {
            return Health::Unhealthy("no healthy backend address".into());
        }
        if healthy < need {
            return Health::Unhealthy(format!(
                "{healthy} of {} backend addresses healthy, need {need}",
                set.addrs.len()
            ));
        }
        Health::Ok
    }
}

/// Serves until `stop` fires, then gives open admin connections a moment to finish.
pub async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(state.config.admin.max_connections));
    let limit_log = Throttle::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(state.config.admin.header_timeout).keep_alive(true);

    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                if crate::proxy::socket::out_of_resources(&e) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            if let Some(suppressed) = limit_log.allow() {
                tracing::warn!(client.addr = %peer, suppressed, "admin connection limit reached; closing");
            }
            continue;
        };
        let state = Arc::clone(&state);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(client.addr = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::debug!("admin connections still open at exit");
    }
}

fn route(req: &Request<hyper::body::Incoming>, state: &State) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if !head && req.method() != Method::GET {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET or HEAD\n".into());
        resp.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let mut resp = match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/health" => match state.health() {
            Health::Ok => text(StatusCode::OK, "ok\n".into()),
            Health::Unhealthy(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            state.metrics.observe_backends(&state.backends.current());
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        "/status" => {
            let body = status::render(state);
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /health, /live, /metrics or /status\n".into()),
    };
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if head {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
