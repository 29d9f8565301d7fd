//! Active health checks: every backend address gets a TCP connect every `health.interval`;
//! `fall` failures in a row mark it down, `rise` successes bring it back.
//!
//! One task per address, started when the address appears (its first check runs at once) and
//! stopped when it leaves the set. The data path only reads the result.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use prometheus::IntCounter;

use crate::backend::{BackendAddr, Backends};
use crate::config::HealthConfig;

pub struct Checker {
    pub config: HealthConfig,
    pub backends: Arc<Backends>,
    /// The backend's `static_ingress_health_check_failures_total`.
    pub failures: IntCounter,
}

impl Checker {
    /// Keeps one check loop per current address until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = self.backends.subscribe();
        let mut loops: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        loop {
            let set = self.backends.current();
            loops.retain(|addr, token| {
                let keep = set.addrs.iter().any(|a| a.addr == *addr);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for addr in &set.addrs {
                if let std::collections::hash_map::Entry::Vacant(slot) = loops.entry(addr.addr) {
                    let token = slot.insert(stop.child_token()).clone();
                    tokio::spawn(check_loop(Arc::clone(addr), self.config.clone(), self.failures.clone(), token));
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }
}

async fn check_loop(addr: Arc<BackendAddr>, config: HealthConfig, failures: IntCounter, stop: CancellationToken) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            // Stopped mid-check (the address left, or a reload replaced these checks).
            () = stop.cancelled() => return,
            r = tokio::time::timeout(config.timeout, TcpStream::connect(addr.addr)) => r,
        };
        let error = match result {
            Ok(Ok(_stream)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", config.timeout)),
        };
        addr.checked(error.is_none());
        match error {
            None => {
                ok_streak += 1;
                fail_streak = 0;
                if !addr.is_healthy() && ok_streak >= config.rise {
                    addr.set_healthy(true);
                    tracing::info!(backend.addr = %addr.addr, "backend address is up");
                }
            }
            Some(e) => {
                fail_streak += 1;
                ok_streak = 0;
                failures.inc();
                if addr.is_healthy() && fail_streak >= config.fall {
                    addr.set_healthy(false);
                    tracing::warn!(backend.addr = %addr.addr, error = %e, checks = fail_streak, "backend address is down");
                }
            }
        }
    }
}
