//! The backend's current address set: published by a source, read lock-free by every
//! connection, and the choice of which address a new connection tries first.
//!
//! The seam: a source (the DNS follower in `crate::dns`, or a fixed IP) calls [`Backends::publish`]; the data path calls [`Backends::current`] and
//! [`BackendSet::candidates`]. Neither side knows how the other works.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

/// One backend address and what the proxy knows about it.
#[derive(Debug)]
pub struct BackendAddr {
    pub addr: SocketAddr,
    healthy: AtomicBool,
    active: AtomicUsize,
}

impl BackendAddr {
    pub fn new(addr: SocketAddr) -> BackendAddr {
        BackendAddr {
            addr,
            healthy: AtomicBool::new(true),
            active: AtomicUsize::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Client connections currently proxied to this address.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection to this address until the guard drops.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }
}

/// Decrements the address's active count when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendAddr>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How the current set was obtained, for `/health`, `/status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// When an answer last confirmed the current addresses; `None` if none ever did.
    pub last_good: Option<SystemTime>,
    /// The TTL that answer carried, before any clamping.
    pub ttl: Option<Duration>,
    /// When the last lookup finished, good or bad.
    pub last_attempt: Option<SystemTime>,
    /// Why the last lookup failed; `None` when it succeeded.
    pub error: Option<String>,
}

impl Resolution {
    /// A good answer, just received.
    pub fn answered(ttl: Option<Duration>) -> Resolution {
        let now = SystemTime::now();
        Resolution {
            last_good: Some(now),
            ttl,
            last_attempt: Some(now),
            error: None,
        }
    }

    /// True when the addresses come from an earlier answer because the latest lookup failed.
    pub fn is_stale(&self) -> bool {
        self.error.is_some() && self.last_good.is_some()
    }
}

/// An immutable snapshot of the backend's addresses.
#[derive(Debug)]
pub struct BackendSet {
    pub addrs: Vec<Arc<BackendAddr>>,
    pub resolution: Resolution,
}

impl BackendSet {
    pub fn unresolved(why: impl Into<String>) -> BackendSet {
        let resolution = Resolution {
            error: Some(why.into()),
            last_attempt: Some(SystemTime::now()),
            ..Default::default()
        };
        BackendSet {
            addrs: Vec::new(),
            resolution,
        }
    }

    /// The order in which a new connection tries addresses: healthy ones first, starting at
    /// `start` and wrapping (round robin, so each address gets an equal share of new
    /// connections), then the unhealthy ones as a last resort rather than refusing outright.
    pub fn candidates(&self, start: usize) -> impl Iterator<Item = &Arc<BackendAddr>> {
        let n = self.addrs.len();
        let rotated = (0..n).map(move |i| &self.addrs[(start + i) % n.max(1)]);
        let healthy = rotated.clone().filter(|a| a.is_healthy());
        let unhealthy = rotated.filter(|a| !a.is_healthy());
        healthy.chain(unhealthy)
    }

    pub fn healthy_count(&self) -> usize {
        self.addrs.iter().filter(|a| a.is_healthy()).count()
    }
}

/// The published address set and the round-robin cursor.
#[derive(Debug)]
pub struct Backends {
    /// `host:port` as configured, for logs and `/status`.
    pub name: String,
    current: ArcSwap<BackendSet>,
    cursor: AtomicUsize,
    /// Raised by the data path when connects fail: the source should look again soon.
    refresh: Notify,
}

impl Backends {
    pub fn new(name: impl Into<String>) -> Backends {
        Backends {
            name: name.into(),
            current: ArcSwap::from_pointee(BackendSet::unresolved("resolution in progress")),
            cursor: AtomicUsize::new(0),
            refresh: Notify::new(),
        }
    }

    /// The current snapshot; cheap and lock-free.
    pub fn current(&self) -> Arc<BackendSet> {
        self.current.load_full()
    }

    /// Replaces the set. Addresses present in both keep their state (health, counters).
    pub fn publish(&self, addrs: impl IntoIterator<Item = SocketAddr>, resolution: Resolution) {
        let old = self.current();
        let mut next: Vec<Arc<BackendAddr>> = Vec::new();
        for addr in addrs {
            if next.iter().any(|a| a.addr == addr) {
                continue;
            }
            let kept = old.addrs.iter().find(|a| a.addr == addr).cloned();
            next.push(kept.unwrap_or_else(|| Arc::new(BackendAddr::new(addr))));
        }
        self.current.store(Arc::new(BackendSet {
            addrs: next,
            resolution,
        }));
    }

    /// Records a failed lookup. A set that has addresses keeps them (it is now stale): a failed
    /// lookup never empties a working backend. Only [`Backends::expire`] does.
    pub fn lookup_failed(&self, why: impl Into<String>) {
        let old = self.current();
        let resolution = Resolution {
            error: Some(why.into()),
            last_attempt: Some(SystemTime::now()),
            ..old.resolution.clone()
        };
        self.current.store(Arc::new(BackendSet {
            addrs: old.addrs.clone(),
            resolution,
        }));
    }

    /// Drops every address: the last good answer is too old to trust.
    pub fn expire(&self, why: impl Into<String>) {
        let old = self.current();
        let resolution = Resolution {
            error: Some(why.into()),
            last_attempt: Some(SystemTime::now()),
            ..old.resolution.clone()
        };
        self.current.store(Arc::new(BackendSet {
            addrs: Vec::new(),
            resolution,
        }));
    }

    /// Asks the address source to look again soon (it rate-limits).
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Completes when a refresh has been asked for since the last call.
    pub async fn refresh_requested(&self) {
        self.refresh.notified().await;
    }

    /// Where the next connection starts in the candidate order.
    pub fn next_start(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn candidates_rotate_and_put_unhealthy_last() {
        let b = Backends::new("x");
        b.publish([addr(1), addr(2), addr(3)], Resolution::answered(None));
        let set = b.current();
        let order = |start| {
            set.candidates(start)
                .map(|a| a.addr.port())
                .collect::<Vec<_>>()
        };
        assert_eq!(order(0), vec![1, 2, 3]);
        assert_eq!(order(4), vec![2, 3, 1]);
        set.addrs[1].set_healthy(false);
        assert_eq!(order(1), vec![3, 1, 2]);
    }

    #[test]
    fn publish_keeps_state_of_surviving_addresses_and_dedups() {
        let b = Backends::new("x");
        b.publish([addr(1), addr(2)], Resolution::answered(None));
        b.current().addrs[0].set_healthy(false);
        b.publish([addr(1), addr(3), addr(3)], Resolution::answered(None));
        let set = b.current();
        assert_eq!(set.addrs.len(), 2);
        assert!(!set.addrs[0].is_healthy());
        assert!(set.addrs[1].is_healthy());
    }

    #[test]
    fn a_failed_lookup_never_empties_a_known_set() {
        let b = Backends::new("x");
        b.lookup_failed("nxdomain");
        assert_eq!(b.current().resolution.error.as_deref(), Some("nxdomain"));
        assert!(!b.current().resolution.is_stale());
        b.publish([addr(1)], Resolution::answered(None));
        b.lookup_failed("servfail");
        assert_eq!(b.current().addrs.len(), 1);
        assert!(b.current().resolution.is_stale());
        b.expire("too old");
        assert!(b.current().addrs.is_empty());
    }

    #[test]
    fn active_guard_counts() {
        let a = Arc::new(BackendAddr::new(addr(1)));
        let g = a.track();
        assert_eq!(a.active_connections(), 1);
        drop(g);
        assert_eq!(a.active_connections(), 0);
    }
}
