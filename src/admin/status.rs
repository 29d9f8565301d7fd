//! The `/status` JSON document: what an operator wants to see at a glance.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Health, State};
use crate::backend::Resolution;

#[derive(Serialize)]
struct Status<'a> {
    version: &'a str,
    started_at: f64,
    uptime_seconds: f64,
    health: HealthView,
    draining: bool,
    listen: Vec<String>,
    backend: BackendView,
    connections: Connections,
}

#[derive(Serialize)]
struct HealthView {
    healthy: bool,
    reason: Option<String>,
}

#[derive(Serialize)]
struct BackendView {
    name: String,
    resolution: ResolutionView,
    addresses: Vec<AddressView>,
}

#[derive(Serialize)]
struct ResolutionView {
    resolved: bool,
    /// Unix time of the last successful resolution.
    resolved_at: Option<f64>,
    age_seconds: Option<f64>,
    error: Option<String>,
}

#[derive(Serialize)]
struct AddressView {
    address: String,
    healthy: bool,
    active_connections: usize,
}

#[derive(Serialize)]
struct Connections {
    active: usize,
    limit: usize,
    accepted_total: u64,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn render(state: &State) -> String {
    let set = state.backends.current();
    let resolution = match &set.resolution {
        Resolution::Resolved { at } => ResolutionView {
            resolved: true,
            resolved_at: Some(unix(*at)),
            age_seconds: Some(at.elapsed().map_or(0.0, |d| d.as_secs_f64())),
            error: None,
        },
        Resolution::Unresolved(why) => ResolutionView {
            resolved: false,
            resolved_at: None,
            age_seconds: None,
            error: Some(why.clone()),
        },
    };
    let health = match state.health() {
        Health::Ok => HealthView {
            healthy: true,
            reason: None,
        },
        Health::Unhealthy(why) => HealthView {
            healthy: false,
            reason: Some(why),
        },
    };
    let status = Status {
        version: state.version,
        started_at: unix(state.started_at),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        health,
        draining: state.is_draining(),
        listen: state.listen.iter().map(ToString::to_string).collect(),
        backend: BackendView {
            name: state.backends.name.clone(),
            resolution,
            addresses: set
                .addrs
                .iter()
                .map(|a| AddressView {
                    address: a.addr.to_string(),
                    healthy: a.is_healthy(),
                    active_connections: a.active_connections(),
                })
                .collect(),
        },
        connections: Connections {
            active: state.proxy.active(),
            limit: state.proxy.max_connections(),
            accepted_total: state.metrics.tcp_open_total.get(),
        },
    };
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        + "\n"
}
