//! The admin HTTP server: `/health` for Route 53, `/live`, `/metrics`, `/status` and the
//! status page at `/`. With `admin.operator_listen` set, the admin port serves only `/health`
//! and `/live` ([`Exposure::HealthOnly`]) and the operator's listeners serve everything.
//!
//! It answers from in-memory state only (never waits on DNS or a health check), and is
//! hardened against clients that are slow or many: a header-read timeout, GET and HEAD only,
//! and a connection cap that makes room for a newcomer by closing a connection that waits
//! (see [`slots`]), so slow clients cannot lock Route 53 out of `/health`.

pub mod client;
mod page;
mod slots;
mod status;
pub mod terminal;

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
use prometheus::{IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, HealthPolicy};
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::route::Upstream;

/// How long open admin connections get to finish when the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What the admin endpoints report on.
pub struct State {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub proxy: Arc<Proxy>,
    pub eip: Arc<crate::eip::Eip>,
    /// The proxy listeners, as `proxy.listen` writes them (a reload changes them).
    listen: std::sync::Mutex<Vec<std::net::SocketAddr>>,
    pub version: &'static str,
    started: Instant,
    started_at: SystemTime,
    draining: AtomicBool,
    /// Set while the Elastic IP is being handed over to a newer instance, and after: why
    /// `/health` fails.
    handoff: std::sync::Mutex<Option<String>>,
    /// The reloads so far and the last one's outcome, for `/status` (and `static-ingress
    /// reload`, which waits on it).
    reload: std::sync::Mutex<client::Reload>,
    admin_metrics: AdminMetrics,
}

/// Metrics of the admin server itself. They live here, next to the only code that moves
/// them, in a registry of their own that `/metrics` renders after the proxy's.
struct AdminMetrics {
    registry: Registry,
    /// Connections closed to make room, by whether they had delivered a request: `none`
    /// (slow-loris clients, scanners) or `served` (kept alive, or slow to read an answer).
    evicted: [IntCounter; 2],
}

impl AdminMetrics {
    fn new() -> prometheus::Result<AdminMetrics> {
        let registry = Registry::new_custom(Some("static_ingress".into()), None)?;
        let evicted = IntCounterVec::new(
            Opts::new(
                "admin_connections_evicted_total",
                "Admin connections closed to make room for a new one at admin.max_connections, by whether they had \
                 delivered a request (none, served).",
            ),
            &["request"],
        )?;
        registry.register(Box::new(evicted.clone()))?;
        Ok(AdminMetrics {
            registry,
            evicted: [evicted.with_label_values(&["none"]), evicted.with_label_values(&["served"])],
        })
    }

    fn evicted(&self, e: slots::Eviction) {
        self.evicted[usize::from(e.served)].inc();
    }

    fn render(&self) -> String {
        // Encoding only fails for invalid families, which registration rejects.
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "encoding admin metrics failed");
            String::new()
        })
    }
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
        metrics: Arc<Metrics>,
        proxy: Arc<Proxy>,
        eip: Arc<crate::eip::Eip>,
        listen: Vec<std::net::SocketAddr>,
    ) -> State {
        State {
            config,
            metrics,
            proxy,
            eip,
            listen: std::sync::Mutex::new(listen),
            version: env!("CARGO_PKG_VERSION"),
            started: Instant::now(),
            started_at: SystemTime::now(),
            draining: AtomicBool::new(false),
            handoff: std::sync::Mutex::new(None),
            reload: std::sync::Mutex::new(client::Reload::default()),
            // The one name and label set are fixed and valid; `admin_metrics_render` in the
            // tests registers them.
            admin_metrics: AdminMetrics::new().expect("admin metric definitions are valid"),
        }
    }

    /// A reload begins.
    pub fn reload_started(&self) {
        self.reload.lock().unwrap_or_else(std::sync::PoisonError::into_inner).started += 1;
    }

    /// Records a reload's outcome: `applied`, `invalid` or `failed`.
    pub fn reloaded(&self, result: &str, errors: Vec<String>, needs_restart: Vec<String>, shadowed: Vec<String>) {
        let mut r = self.reload.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *r = client::Reload {
            started: r.started,
            count: r.count + 1,
            result: result.to_string(),
            errors,
            needs_restart,
            shadowed,
        };
    }

    pub fn reload_status(&self) -> client::Reload {
        self.reload.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn listen(&self) -> Vec<std::net::SocketAddr> {
        self.listen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set_listen(&self, listen: Vec<std::net::SocketAddr>) {
        *self.listen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = listen;
    }

    /// From now on `/health` answers 503 `draining`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// While `Some`, `/health` answers 503 with this reason (a handoff of the Elastic IP);
    /// `draining` says whether the proxy counts as draining meanwhile (`static_ingress_draining`).
    pub fn set_handoff(&self, why: Option<String>, draining: bool) {
        self.metrics.draining.set(i64::from((why.is_some() && draining) || self.is_draining()));
        *self.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// 200 when serving, not draining, and some backend address is healthy; else the reason.
    pub fn health(&self) -> Health {
        if self.is_draining() {
            return Health::Unhealthy("draining".into());
        }
        if let Some(why) = self.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            return Health::Unhealthy(why);
        }
        // Healthy only once it holds the address: until then Route 53 checks the holder anyway,
        // and an operator reading this sees it is waiting.
        let eip = self.eip.status();
        if eip.state == crate::eip::State::Requesting {
            let holder = eip.owner.as_deref().unwrap_or("the holder");
            return Health::Unhealthy(format!("waiting for {holder} to hand the Elastic IP over"));
        }
        self.backend_health()
    }

    /// Whether the backends have been seen to work: [`State::backend_health`] passes, and
    /// every reachable backend that counts as up has enough addresses that passed their last
    /// health check (new addresses count as healthy before their first check, which is right
    /// for serving, not for asking to be handed an address).
    pub fn backend_proven(&self) -> bool {
        if self.backend_health() != Health::Ok {
            return false;
        }
        let router = self.proxy.router();
        router.reachable().filter(|u| upstream_health(u) == Health::Ok).all(|u| {
            let set = u.backends.current();
            let n = set.addrs.iter().filter(|a| a.is_healthy() && !a.is_suspect() && a.last_check_passed()).count();
            n >= u.config.health.min_healthy.max(1)
        })
    }

    /// What the backend checks say, whatever the drain and the Elastic IP are doing: each
    /// reachable backend's own verdict, combined by `health.unhealthy_when`.
    pub fn backend_health(&self) -> Health {
        let router = self.proxy.router();
        let verdicts: Vec<(String, Health)> =
            router.reachable().map(|u| (u.name().to_string(), upstream_health(u))).collect();
        if let [(_, only)] = verdicts.as_slice() {
            return only.clone();
        }
        let down: Vec<String> = verdicts
            .iter()
            .filter_map(|(name, h)| match h {
                Health::Ok => None,
                Health::Unhealthy(why) => Some(format!("{name}: {why}")),
            })
            .collect();
        let failing = match self.config.health.unhealthy_when {
            HealthPolicy::AllBackendsDown => down.len() == verdicts.len(),
            HealthPolicy::AnyBackendDown => !down.is_empty(),
        };
        if failing { Health::Unhealthy(down.join("; ")) } else { Health::Ok }
    }
}

/// One backend's verdict: resolved, and at least `health.min_healthy` healthy addresses.
pub(crate) fn upstream_health(u: &Upstream) -> Health {
    let set = u.backends.current();
    if set.addrs.is_empty() {
        return Health::Unhealthy(match &set.resolution.error {
            Some(why) => format!("backend unresolved: {why}"),
            None if set.resolution.last_good.is_none() => "backend unresolved: resolution in progress".into(),
            None => "no backend address".into(),
        });
    }
    let healthy = set.healthy_count();
    let need = u.config.health.min_healthy;
    if healthy == 0 {
        return Health::Unhealthy("no healthy backend address".into());
    }
    if healthy < need {
        return Health::Unhealthy(format!("{healthy} of {} backend addresses healthy, need {need}", set.addrs.len()));
    }
    Health::Ok
}

/// What one admin listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Every endpoint: the admin port while no operator's listener is set, and each
    /// operator's listener (`admin.operator_listen`).
    All,
    /// `/health` and `/live` only: the port Route 53's checkers reach, while the rest is on
    /// the operator's listener.
    HealthOnly,
}

/// Serves until `stop` fires, then gives open admin connections a moment to finish.
pub async fn serve(listener: TcpListener, exposure: Exposure, state: Arc<State>, stop: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let slots = slots::Slots::new(state.config.admin.max_connections);
    let evict_log = Throttle::new();
    let accept_log = Throttle::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(state.config.admin.header_timeout).keep_alive(true);

    let mut acceptor = crate::accept::Acceptor::new(listener);
    let accept_failed = |e: &std::io::Error, exhausted: bool| {
        if !exhausted {
            tracing::debug!(error = %e, "admin accept failed");
        } else if let Some(suppressed) = accept_log.allow() {
            tracing::warn!(error = %e, suppressed, "admin accept failed: out of file descriptors or memory; backing off");
        }
    };
    while let Some((stream, peer)) = acceptor.next(&stop, accept_failed).await {
        let (slot, evicted) = slots.admit(peer.ip());
        if let Some(e) = evicted {
            state.admin_metrics.evicted(e);
            if let Some(suppressed) = evict_log.allow() {
                tracing::warn!(
                    client.addr = %peer,
                    limit = state.config.admin.max_connections,
                    evicted.served = e.served,
                    suppressed,
                    "admin connection limit reached; closed the longest-waiting connection of the client holding the most"
                );
            }
        }
        let slot = Arc::new(slot);
        let service_slot = Arc::clone(&slot);
        let state = Arc::clone(&state);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                // A complete request head is progress: this connection is the last to evict.
                service_slot.progressed();
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&req, exposure, &state)) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(client.addr = %peer, error = %e, "admin connection ended with an error");
                },
                // Dropping the connection closes the socket; the slot is already someone else's.
                () = slot.evicted() => tracing::debug!(client.addr = %peer, "admin connection evicted"),
            }
        });
    }
    drop(acceptor);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::debug!("admin connections still open at exit");
    }
}

fn route(req: &Request<hyper::body::Incoming>, exposure: Exposure, state: &State) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if !head && req.method() != Method::GET {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET or HEAD\n".into());
        resp.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let path = req.uri().path();
    let mut resp = match path {
        // Route 53's checkers reach this port, and anyone can aim a checker at the address:
        // the answer names the setting, not the operator's addresses.
        "/" | "/status" | "/metrics" if exposure == Exposure::HealthOnly => text(
            StatusCode::NOT_FOUND,
            "not found: this port serves /health and /live; the status page, /status and /metrics are on the \
             operator's listener (admin.operator_listen)\n"
                .into(),
        ),
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/health" => match state.health() {
            Health::Ok => text(StatusCode::OK, "ok\n".into()),
            Health::Unhealthy(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            state.metrics.healthy.set(i64::from(matches!(state.health(), Health::Ok)));
            for u in &state.proxy.router().upstreams {
                u.metrics.observe_backends(&u.backends.current());
            }
            let mut r = text(StatusCode::OK, state.metrics.render() + &state.admin_metrics.render());
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        "/" => {
            let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            // `/?refresh=0`: no self-reload (to read it at leisure, or to script it).
            let refresh = !req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "refresh=0"));
            let page = page::render(&status::document(state), now, refresh);
            let mut r = Response::new(Full::new(Bytes::from(page)));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            // The page loads nothing and runs nothing; say so, so a browser enforces it.
            r.headers_mut().insert(
                hyper::header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
            );
            r
        }
        "/status" => {
            let body = status::render(state);
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        _ if exposure == Exposure::HealthOnly => {
            text(StatusCode::NOT_FOUND, "not found: this port serves /health and /live\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /, /health, /live, /metrics or /status\n".into()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_metrics_render() {
        let m = AdminMetrics::new().unwrap();
        m.evicted(slots::Eviction { served: false });
        let text = m.render();
        assert!(text.contains("static_ingress_admin_connections_evicted_total{request=\"none\"} 1"), "{text}");
        assert!(text.contains("static_ingress_admin_connections_evicted_total{request=\"served\"} 0"), "{text}");
    }
}
