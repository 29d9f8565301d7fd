//! The `/status` JSON document: what an operator wants to see at a glance.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Health, State};
use crate::metrics::CloseReason;

#[derive(Serialize)]
struct Status<'a> {
    version: &'a str,
    /// This process's id (`static-ingress reload --pid` checks it is talking to the right one).
    pid: u32,
    started_at: f64,
    uptime_seconds: f64,
    health: HealthView,
    draining: bool,
    listen: Vec<String>,
    /// The first of `backends` (the only one without routes), as before routes existed.
    backend: BackendView,
    /// Every backend: the route `default` first when it exists, then the `[[route]]`s.
    backends: Vec<BackendView>,
    connections: Connections,
    eip: EipView,
    /// The reloads (SIGHUP) since start: `count`, and the last one's `result` (applied,
    /// invalid or failed), `errors`, `needs_restart` and `shadowed`.
    reload: super::client::Reload,
}

#[derive(Serialize)]
struct EipView {
    /// disabled, claiming, associated, lost (another instance holds it) or failed.
    state: crate::eip::State,
    allocation_id: Option<String>,
    public_ip: Option<String>,
    instance_id: Option<String>,
    /// The instance holding the address when it is not this one.
    owner: Option<String>,
    /// Unix time the state last changed.
    since: f64,
    last_check: Option<f64>,
    error: Option<String>,
}

#[derive(Serialize, Clone)]
struct HealthView {
    healthy: bool,
    reason: Option<String>,
}

#[derive(Serialize, Clone)]
struct BackendView {
    /// The route's name: `default`, or the `[[route]]`'s.
    route: String,
    /// `host:port` as configured.
    name: String,
    /// The server names the route matches (none for `default`).
    server_names: Vec<String>,
    /// This backend's own verdict (`/health` combines them by `health.unhealthy_when`).
    health: HealthView,
    resolution: ResolutionView,
    addresses: Vec<AddressView>,
    /// Addresses that left DNS, whose open connections are closed when the grace ends.
    retiring: Vec<RetiringView>,
}

#[derive(Serialize, Clone)]
struct RetiringView {
    address: String,
    active_connections: usize,
    closes_in_seconds: f64,
}

#[derive(Serialize, Clone)]
struct ResolutionView {
    /// True while the proxy has addresses from a good answer.
    resolved: bool,
    /// True when those addresses come from an earlier answer because the latest lookup failed.
    stale: bool,
    /// Unix time of the last good answer, and its age.
    last_good: Option<f64>,
    age_seconds: Option<f64>,
    /// TTL of the last good answer, as the nameserver gave it.
    ttl_seconds: Option<f64>,
    /// Unix time of the last lookup, good or bad, and why it failed if it did.
    last_attempt: Option<f64>,
    error: Option<String>,
}

#[derive(Serialize, Clone)]
struct AddressView {
    address: String,
    /// healthy, suspect (a connect failed since the last good check) or unhealthy.
    state: &'static str,
    healthy: bool,
    active_connections: usize,
    last_check: Option<f64>,
    first_seen: f64,
    last_seen: Option<f64>,
}

#[derive(Serialize)]
struct Connections {
    active: usize,
    limit: usize,
    accepted_total: u64,
    /// Client connections closed since start, by reason (`static_ingress_tcp_close_total`).
    closed: BTreeMap<&'static str, u64>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn health_view(h: Health) -> HealthView {
    match h {
        Health::Ok => HealthView { healthy: true, reason: None },
        Health::Unhealthy(why) => HealthView { healthy: false, reason: Some(why) },
    }
}

fn backend_view(u: &crate::route::Upstream) -> BackendView {
    let set = u.backends.current();
    let r = &set.resolution;
    let resolution = ResolutionView {
        resolved: r.last_good.is_some() && !set.addrs.is_empty(),
        stale: r.is_stale(),
        last_good: r.last_good.map(unix),
        age_seconds: r.last_good.map(|t| t.elapsed().map_or(0.0, |d| d.as_secs_f64())),
        ttl_seconds: r.ttl.map(|d| d.as_secs_f64()),
        last_attempt: r.last_attempt.map(unix),
        error: r.error.clone(),
    };
    BackendView {
        route: u.name().to_string(),
        name: u.backends.name.clone(),
        server_names: u.config.server_names.iter().map(ToString::to_string).collect(),
        health: health_view(super::upstream_health(u)),
        resolution,
        addresses: set
            .addrs
            .iter()
            .map(|a| AddressView {
                address: a.addr.to_string(),
                state: match (a.is_healthy(), a.is_suspect()) {
                    (true, false) => "healthy",
                    (true, true) => "suspect",
                    (false, _) => "unhealthy",
                },
                healthy: a.is_healthy(),
                active_connections: a.active_connections(),
                last_check: a.last_check().map(unix),
                first_seen: unix(a.first_seen),
                last_seen: a.last_seen().map(unix),
            })
            .collect(),
        retiring: u
            .backends
            .retiring()
            .into_iter()
            .map(|(a, since)| RetiringView {
                address: a.addr.to_string(),
                active_connections: a.active_connections(),
                closes_in_seconds: (since + u.config.backend.removed_grace)
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs_f64(),
            })
            .collect(),
    }
}

/// The `/status` document, as the page renders it.
pub fn document(state: &State) -> serde_json::Value {
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_value(status(state)).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
}

/// The `/status` body.
pub fn render(state: &State) -> String {
    serde_json::to_string_pretty(&status(state)).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}

fn status(state: &State) -> Status<'_> {
    let backends: Vec<BackendView> = state.proxy.router().upstreams.iter().map(|u| backend_view(u)).collect();
    Status {
        version: state.version,
        pid: std::process::id(),
        started_at: unix(state.started_at),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        health: health_view(state.health()),
        draining: state.is_draining(),
        listen: state.listen().iter().map(ToString::to_string).collect(),
        backend: backends[0].clone(),
        backends,
        connections: Connections {
            active: state.proxy.active(),
            limit: state.proxy.max_connections(),
            accepted_total: state.metrics.tcp_open_total.get(),
            closed: CloseReason::ALL.iter().map(|&r| (r.as_str(), state.metrics.close_count(r))).collect(),
        },
        eip: {
            let e = state.eip.status();
            EipView {
                state: e.state,
                allocation_id: e.allocation_id,
                public_ip: e.public_ip,
                instance_id: e.instance_id,
                owner: e.owner,
                since: unix(e.since),
                last_check: e.last_check.map(unix),
                error: e.error,
            }
        },
        reload: state.reload_status(),
    }
}
