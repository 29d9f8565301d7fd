//! Prometheus metrics, all named `static_ingress_*`, with label values from small fixed sets.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a client connection ended. Every accepted connection ends with exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished sending and the proxy forwarded everything.
    Completed,
    /// The client's socket failed (reset, broken pipe...) with bytes still pending toward it.
    ClientError,
    /// The backend's socket failed after the connection was established, with bytes still
    /// pending toward it.
    BackendError,
    /// The client ended with a reset when nothing was left unsent toward it and the backend got
    /// every byte: how many clients end a connection they are done with, not a fault.
    ClientReset,
    /// The backend ended with a reset when nothing was left unsent toward it and the client got
    /// every byte: how nginx with `keepalive_timeout 0` ends a TLS stream, not a fault.
    BackendReset,
    /// The proxy could not open a socket to the backend: out of file descriptors or memory.
    /// The proxy's fault, not the backend's.
    FdLimit,
    /// Nothing moved either way for `proxy.idle_timeout`.
    IdleTimeout,
    /// One side had closed and the other stayed idle for `proxy.half_close_timeout`.
    HalfCloseTimeout,
    /// Every backend address was tried and none accepted the connection.
    ConnectFailed,
    /// No backend address was known (unresolved, or all removed).
    NoBackend,
    /// `proxy.max_connections` was reached; the connection was reset at once.
    OverLimit,
    /// Still open when the drain's grace period ran out.
    Shutdown,
    /// Its backend address left DNS longer ago than `backend.removed_grace`.
    BackendRetired,
    /// With routes: no route takes it (`proxy.unmatched` or `proxy.non_tls` is `refuse`).
    NoRoute,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::Completed,
        CloseReason::ClientError,
        CloseReason::BackendError,
        CloseReason::ClientReset,
        CloseReason::BackendReset,
        CloseReason::FdLimit,
        CloseReason::IdleTimeout,
        CloseReason::HalfCloseTimeout,
        CloseReason::ConnectFailed,
        CloseReason::NoBackend,
        CloseReason::OverLimit,
        CloseReason::Shutdown,
        CloseReason::BackendRetired,
        CloseReason::NoRoute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::ClientError => "client_error",
            CloseReason::BackendError => "backend_error",
            CloseReason::ClientReset => "client_reset",
            CloseReason::BackendReset => "backend_reset",
            CloseReason::FdLimit => "fd_limit",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HalfCloseTimeout => "half_close_timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::NoBackend => "no_backend",
            CloseReason::OverLimit => "over_limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BackendRetired => "backend_retired",
            CloseReason::NoRoute => "no_route",
        }
    }
}

/// Why one connect attempt to one backend address failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    Timeout,
    Unreachable,
    Other,
}

impl ConnectError {
    pub const ALL: [ConnectError; 4] =
        [ConnectError::Refused, ConnectError::Timeout, ConnectError::Unreachable, ConnectError::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout => "timeout",
            ConnectError::Unreachable => "unreachable",
            ConnectError::Other => "other",
        }
    }

    pub fn classify(e: &std::io::Error) -> ConnectError {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnectError::Refused,
            Some(libc::ETIMEDOUT) => ConnectError::Timeout,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EADDRNOTAVAIL) => ConnectError::Unreachable,
            _ => ConnectError::Other,
        }
    }
}

/// The errno class of an I/O error that ended a proxied connection: a small fixed set, so
/// `tcp_errors_total` stays bounded and a spike of `backend_error` explains itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    ConnReset,
    Pipe,
    TimedOut,
    HostUnreach,
    NetUnreach,
    ConnAborted,
    Other,
}

impl Errno {
    pub const ALL: [Errno; 7] = [
        Errno::ConnReset,
        Errno::Pipe,
        Errno::TimedOut,
        Errno::HostUnreach,
        Errno::NetUnreach,
        Errno::ConnAborted,
        Errno::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Errno::ConnReset => "ECONNRESET",
            Errno::Pipe => "EPIPE",
            Errno::TimedOut => "ETIMEDOUT",
            Errno::HostUnreach => "EHOSTUNREACH",
            Errno::NetUnreach => "ENETUNREACH",
            Errno::ConnAborted => "ECONNABORTED",
            Errno::Other => "other",
        }
    }

    pub fn classify(e: &std::io::Error) -> Errno {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) => Errno::ConnReset,
            Some(libc::EPIPE) => Errno::Pipe,
            Some(libc::ETIMEDOUT) => Errno::TimedOut,
            Some(libc::EHOSTUNREACH) => Errno::HostUnreach,
            Some(libc::ENETUNREACH) => Errno::NetUnreach,
            Some(libc::ECONNABORTED) => Errno::ConnAborted,
            _ => Errno::Other,
        }
    }
}

/// The process collector, keeping each family's last value when `/proc` cannot be read: the
/// moment descriptors run out is when `process_open_fds` matters most, and a family that
/// vanished from `/metrics` would look like a scrape problem instead.
#[cfg(target_os = "linux")]
struct LastGoodProcess {
    inner: prometheus::process_collector::ProcessCollector,
    last: std::sync::Mutex<Vec<prometheus::proto::MetricFamily>>,
    stale: IntGauge,
}

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for LastGoodProcess {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut fresh = self.inner.collect();
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut missing = false;
        for old in last.iter() {
            if !fresh.iter().any(|f| f.name() == old.name()) {
                missing = true;
                fresh.push(old.clone());
            }
        }
        // Before the first good read there is nothing to repeat, and nothing is "missing".
        self.stale.set(i64::from(missing || fresh.is_empty()));
        last.clone_from(&fresh);
        fresh
    }
}

/// Which end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Backend = 1,
}

impl Side {
    pub const ALL: [Side; 2] = [Side::Client, Side::Backend];

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// Direction of proxied bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToBackend = 0,
    ToClient = 1,
}

pub struct Metrics {
    registry: Registry,
    process: Registry,
    pub tcp_open_total: IntCounter,
    pub tcp_open_connections: IntGauge,
    tcp_close_total: [IntCounter; CloseReason::ALL.len()],
    proxied_bytes_total: [IntCounter; 2],
    /// The splice path ([`crate::proxy::splice`]): bytes moved through pipes, the pool.
    pub splice_bytes_total: IntCounter,
    pub splice_pipes: crate::proxy::splice::PoolMetrics,
    pub splice_pipes_limit: IntGauge,
    /// By side (client, backend) and errno class.
    tcp_errors_total: [[IntCounter; Errno::ALL.len()]; 2],
    pub accept_errors_total: IntCounterVec,
    pub draining: IntGauge,
    /// 1 while `/health` would answer 200, else 0; set when `/metrics` is rendered.
    pub healthy: IntGauge,
    pub eip_associated: IntGauge,
    /// 1 for the Elastic IP claim's state now, 0 for the others ([`crate::eip::State`]).
    pub eip_state: IntGaugeVec,
    config_reloads_total: [IntCounter; 2],
    /// The families labelled by backend (the route's name); [`Metrics::route`] makes a
    /// route's children.
    by_backend: ByBackend,
}

struct ByBackend {
    routed: IntCounterVec,
    connect_errors: IntCounterVec,
    connect_duration: prometheus::HistogramVec,
    backend_addresses: IntGaugeVec,
    health_check_failures: IntCounterVec,
    dns_resolutions: IntCounterVec,
    dns_answer_age: prometheus::GaugeVec,
    dns_stale: IntGaugeVec,
}

/// One backend's metrics, every series labelled `backend="<route name>"`.
pub struct RouteMetrics {
    /// Client connections sent to this backend.
    pub routed: IntCounter,
    connect_errors: [IntCounter; ConnectError::ALL.len()],
    pub connect_duration_seconds: Histogram,
    backend_addresses: [IntGauge; 3],
    pub health_check_failures_total: IntCounter,
    dns_resolutions: Vec<(&'static str, IntCounter)>,
    dns_answer_age_seconds: prometheus::Gauge,
    dns_stale: IntGauge,
}

impl RouteMetrics {
    pub fn connect_error(&self, reason: ConnectError) {
        self.connect_errors[reason as usize].inc();
    }

    pub fn dns_resolution(&self, result: &str) {
        if let Some((_, c)) = self.dns_resolutions.iter().find(|(r, _)| *r == result) {
            c.inc();
        }
    }

    /// Sets the gauges that describe the backend set, just before they are read.
    pub fn observe_backends(&self, set: &crate::backend::BackendSet) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let healthy = set.addrs.iter().filter(|a| a.is_healthy() && !a.is_suspect()).count();
        let suspect = set.addrs.iter().filter(|a| a.is_healthy() && a.is_suspect()).count();
        let unhealthy = set.addrs.len() - healthy - suspect;
        self.backend_addresses[0].set(count(healthy));
        self.backend_addresses[1].set(count(suspect));
        self.backend_addresses[2].set(count(unhealthy));
        let age = set.resolution.last_good.and_then(|t| t.elapsed().ok()).map_or(0.0, |d| d.as_secs_f64());
        self.dns_answer_age_seconds.set(age);
        self.dns_stale.set(i64::from(set.resolution.is_stale()));
    }
}

impl Metrics {
    pub fn new(version: &str) -> Metrics {
        // Registration only fails on a duplicate or invalid name; the names below are fixed
        // and distinct, and `metrics_render` in the tests registers all of them.
        Self::try_new(version).expect("metric definitions are valid and distinct")
    }

    fn try_new(version: &str) -> prometheus::Result<Metrics> {
        let registry = Registry::new_custom(Some("static_ingress".into()), None)?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter_vec = |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };

        let close = counter_vec("tcp_close_total", "Client connections closed, by reason.", "reason")?;
        let bytes = counter_vec("proxied_bytes_total", "Bytes forwarded, by direction.", "direction")?;
        let backend_vec = |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["backend", label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let tcp_errors = IntCounterVec::new(
            Opts::new(
                "tcp_errors_total",
                "I/O errors that ended proxied connections (client_error and backend_error closes), by side and errno.",
            ),
            &["side", "errno"],
        )?;
        registry.register(Box::new(tcp_errors.clone()))?;
        let tcp_errors_total =
            Side::ALL.map(|side| Errno::ALL.map(|e| tcp_errors.with_label_values(&[side.as_str(), e.as_str()])));
        let accept_errors_total =
            counter_vec("accept_errors_total", "Errors accepting client connections, by reason.", "reason")?;
        for reason in ["fd_limit", "other"] {
            accept_errors_total.with_label_values(&[reason]);
        }
        let routed = IntCounterVec::new(
            Opts::new(
                "backend_connections_total",
                "Client connections routed to each backend (route), counted before the connect.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(routed.clone()))?;
        let connect_errors = backend_vec(
            "backend_connect_errors_total",
            "Failed connect attempts to backend addresses, by backend and reason.",
            "reason",
        )?;
        let connect_duration = prometheus::HistogramVec::new(
            HistogramOpts::new("backend_connect_duration_seconds", "Time to establish a backend connection.")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["backend"],
        )?;
        registry.register(Box::new(connect_duration.clone()))?;
        let backend_addresses = IntGaugeVec::new(
            Opts::new("backend_addresses", "Backend addresses currently known, by backend and state."),
            &["backend", "state"],
        )?;
        registry.register(Box::new(backend_addresses.clone()))?;
        let health_check_failures = IntCounterVec::new(
            Opts::new("health_check_failures_total", "Failed health checks of backend addresses, by backend."),
            &["backend"],
        )?;
        registry.register(Box::new(health_check_failures.clone()))?;
        let dns_resolutions =
            backend_vec("dns_resolutions_total", "Lookups of each backend's name, by backend and result.", "result")?;
        let dns_answer_age = prometheus::GaugeVec::new(
            Opts::new(
                "dns_answer_age_seconds",
                "Seconds since a DNS answer last confirmed the backend's addresses (0 before any), by backend.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(dns_answer_age.clone()))?;
        let dns_stale = IntGaugeVec::new(
            Opts::new(
                "dns_stale",
                "1 while a backend's addresses come from an earlier answer because lookups fail, by backend.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(dns_stale.clone()))?;

        let eip_state = IntGaugeVec::new(
            Opts::new(
                "eip_state",
                "1 for the Elastic IP claim's state now, 0 for the others: disabled, claiming, associated, lost \
                 (a newer instance took it), failed (the claim fails), requesting, handing_off, handed_off.",
            ),
            &["state"],
        )?;
        registry.register(Box::new(eip_state.clone()))?;

        let reloads = counter_vec(
            "config_reloads_total",
            "Configuration reloads (SIGHUP), by result: ok, or failed (the running configuration is kept).",
            "result",
        )?;
        let build_info =
            IntGaugeVec::new(Opts::new("build_info", "Always 1; labels describe this build."), &["version"])?;
        registry.register(Box::new(build_info.clone()))?;
        // One counter for the process, whose access log has one writer (crate::logging).
        registry.register(Box::new(crate::logging::ACCESS_DROPPED.clone()))?;
        build_info.with_label_values(&[version]).set(1);

        let process = Registry::new();
        let process_stale = gauge(
            "process_metrics_stale",
            "1 while the process_* metrics repeat their last values because /proc could not be read (out of \
             file descriptors, say), else 0.",
        )?;
        #[cfg(target_os = "linux")]
        process.register(Box::new(LastGoodProcess {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            last: std::sync::Mutex::new(Vec::new()),
            stale: process_stale.clone(),
        }))?;

        Ok(Metrics {
            tcp_open_total: counter("tcp_open_total", "Client connections accepted.")?,
            tcp_open_connections: gauge("tcp_open_connections", "Client connections open now.")?,
            tcp_close_total: CloseReason::ALL.map(|r| close.with_label_values(&[r.as_str()])),
            proxied_bytes_total: [bytes.with_label_values(&["to_backend"]), bytes.with_label_values(&["to_client"])],
            splice_bytes_total: counter(
                "splice_bytes_total",
                "Bytes forwarded through kernel pipes (splice), both directions; also in proxied_bytes_total.",
            )?,
            splice_pipes: {
                let pipes = IntGaugeVec::new(
                    Opts::new("splice_pipes", "Kernel pipes for splice, by state: in_use, free."),
                    &["state"],
                )?;
                registry.register(Box::new(pipes.clone()))?;
                crate::proxy::splice::PoolMetrics {
                    in_use: pipes.with_label_values(&["in_use"]),
                    free: pipes.with_label_values(&["free"]),
                    shortages: counter(
                        "splice_pipe_shortages_total",
                        "Times a direction wanted a pipe and none was free (or none could be made), and copied instead.",
                    )?,
                }
            },
            splice_pipes_limit: gauge(
                "splice_pipes_limit",
                "The most pipes the splice pool may hold: from the open-file limit and fs.pipe-user-pages-soft.",
            )?,
            tcp_errors_total,
            accept_errors_total,
            draining: gauge(
                "draining",
                "1 while the proxy is draining (after SIGTERM, or handing its Elastic IP over), else 0.",
            )?,
            healthy: gauge(
                "healthy",
                "1 while /health answers 200 (what Route 53 sees), else 0: draining, or no healthy backend address.",
            )?,
            eip_associated: gauge(
                "eip_associated",
                "1 while this instance's Elastic IP was associated with it at the last check, else 0 (also with \
                 eip.enabled = false).",
            )?,
            eip_state,
            config_reloads_total: [reloads.with_label_values(&["ok"]), reloads.with_label_values(&["failed"])],
            by_backend: ByBackend {
                routed,
                connect_errors,
                connect_duration,
                backend_addresses,
                health_check_failures,
                dns_resolutions,
                dns_answer_age,
                dns_stale,
            },
            registry,
            process,
        })
    }

    pub fn closed(&self, reason: CloseReason) {
        self.tcp_close_total[reason as usize].inc();
        self.tcp_open_connections.dec();
    }

    pub fn close_count(&self, reason: CloseReason) -> u64 {
        self.tcp_close_total[reason as usize].get()
    }

    pub fn bytes(&self, direction: Direction) -> &IntCounter {
        &self.proxied_bytes_total[direction as usize]
    }

    /// A route a reload removed: its gauges go, so that they do not stay frozen at their last
    /// values (its counters stay, as counters do).
    pub fn forget_route(&self, name: &str) {
        let b = &self.by_backend;
        for state in ["healthy", "suspect", "unhealthy"] {
            let _ = b.backend_addresses.remove_label_values(&[name, state]);
        }
        let _ = b.dns_answer_age.remove_label_values(&[name]);
        let _ = b.dns_stale.remove_label_values(&[name]);
    }

    pub fn config_reload(&self, ok: bool) {
        self.config_reloads_total[usize::from(!ok)].inc();
    }

    /// Counts an I/O error that ended a connection, by the side that failed.
    pub fn tcp_error(&self, side: Side, e: &std::io::Error) {
        self.tcp_errors_total[side as usize][Errno::classify(e) as usize].inc();
    }

    /// The metrics of the backend `name` (a route's name), every series made at once so that
    /// each shows from the start, at zero.
    pub fn route(&self, name: &str) -> RouteMetrics {
        let b = &self.by_backend;
        let dns_results = std::iter::once("success").chain(crate::dns::FailureKind::ALL.iter().map(|k| k.as_str()));
        RouteMetrics {
            routed: b.routed.with_label_values(&[name]),
            connect_errors: ConnectError::ALL.map(|r| b.connect_errors.with_label_values(&[name, r.as_str()])),
            connect_duration_seconds: b.connect_duration.with_label_values(&[name]),
            backend_addresses: ["healthy", "suspect", "unhealthy"]
                .map(|state| b.backend_addresses.with_label_values(&[name, state])),
            health_check_failures_total: b.health_check_failures.with_label_values(&[name]),
            dns_resolutions: dns_results.map(|r| (r, b.dns_resolutions.with_label_values(&[name, r]))).collect(),
            dns_answer_age_seconds: b.dns_answer_age.with_label_values(&[name]),
            dns_stale: b.dns_stale.with_label_values(&[name]),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut buf = Vec::new();
        // Encoding into a Vec only fails for invalid families, which registration rejects.
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render() {
        let m = Metrics::new("1.2.3");
        m.tcp_open_total.inc();
        m.tcp_open_connections.inc();
        m.closed(CloseReason::IdleTimeout);
        let text = m.render();
        assert!(text.contains("static_ingress_tcp_open_total 1"), "{text}");
        assert!(text.contains("static_ingress_tcp_close_total{reason=\"idle_timeout\"} 1"), "{text}");
        assert!(text.contains("static_ingress_tcp_close_total{reason=\"over_limit\"} 0"), "{text}");
        assert!(text.contains("static_ingress_build_info{version=\"1.2.3\"} 1"), "{text}");
        assert!(text.contains("static_ingress_tcp_open_connections 0"), "{text}");
    }
}
