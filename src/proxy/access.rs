//! The access log: what one connection did, filled in as it goes and logged as it closes.
//!
//! One line per client connection, those refused at the limit included, with the fields
//! HAProxy's `option tcplog` gives: who connected where, which route and backend address it
//! went to, the bytes each way, how long it lasted and why it ended. The line is an event on the
//! target [`crate::logging::ACCESS`], formatted like every other log line (text or JSON), and
//! written by the access log's own thread (see [`crate::logging`]): never waited for.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::backend::BackendAddr;
use crate::logging::ACCESS;
use crate::metrics::CloseReason;
use crate::route::Upstream;

/// One connection, as its access-log line will describe it.
pub struct Record {
    /// When the connection was accepted.
    pub accepted: Instant,
    pub client: SocketAddr,
    /// The listener as `proxy.listen` writes it.
    pub listener: SocketAddr,
    /// The route it took, once picked.
    pub route: OnceLock<Arc<Upstream>>,
    /// The backend address that accepted it, once connected.
    pub backend: OnceLock<Arc<BackendAddr>>,
    /// Bytes read from the client and forwarded (or being forwarded) to the backend.
    pub to_backend: AtomicU64,
    /// Bytes read from the backend and forwarded (or being forwarded) to the client.
    pub to_client: AtomicU64,
}

impl Record {
    pub fn new(accepted: Instant, client: SocketAddr, listener: SocketAddr) -> Record {
        Record {
            accepted,
            client,
            listener,
            route: OnceLock::new(),
            backend: OnceLock::new(),
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
        }
    }

    /// Logs the connection's line, ended for `reason`. A connection that never reached a route
    /// or a backend has no `route` or `backend` field.
    pub fn log(&self, reason: CloseReason) {
        let duration_ms = millis(self.accepted.elapsed());
        tracing::info!(
            target: ACCESS,
            parent: None,
            client = %self.client,
            listener = %self.listener,
            route = self.route.get().map(|u| tracing::field::display(u.name())),
            backend = self.backend.get().map(|a| tracing::field::display(a.addr)),
            to_backend = self.to_backend.load(Ordering::Relaxed),
            to_client = self.to_client.load(Ordering::Relaxed),
            duration_ms,
            reason = %reason.as_str(),
            "connection"
        );
    }
}

/// Milliseconds to the microsecond, as the line shows them.
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_as_milliseconds_to_the_microsecond() {
        use std::time::Duration;
        assert!((millis(Duration::from_nanos(1_234_567)) - 1.235).abs() < 1e-9);
        assert!((millis(Duration::from_secs(3600)) - 3_600_000.0).abs() < 1e-9);
        assert!(millis(Duration::ZERO).abs() < 1e-12);
    }
}
