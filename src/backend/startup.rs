//! The interim address source: resolve `backend.address` once with the system resolver,
//! retrying until it resolves. DNS following (TTL-driven refresh with hickory) replaces it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backends, Resolution};
use crate::config::HostPort;

/// First retry after a failed lookup; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Upper bound on the retry interval, so a backend that appears is found within 30 s.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Publishes the backend's addresses. An IP literal is published before this returns; a name
/// is resolved by a task that retries until it succeeds or `stop` fires.
pub fn start(target: &HostPort, backends: Arc<Backends>, stop: CancellationToken) {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        backends.publish(
            [SocketAddr::new(ip, target.port)],
            Resolution::answered(None),
        );
        return;
    }
    let target = target.clone();
    tokio::spawn(async move {
        let mut retry = FIRST_RETRY;
        loop {
            match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    if !addrs.is_empty() {
                        tracing::info!(backend = %target, addresses = ?addrs, "backend resolved");
                        backends.publish(addrs, Resolution::answered(None));
                        return;
                    }
                    backends.lookup_failed("the name has no addresses");
                }
                Err(e) => {
                    tracing::warn!(backend = %target, error = %e, retry_in = ?retry, "backend does not resolve");
                    backends.lookup_failed(e.to_string());
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    });
}
