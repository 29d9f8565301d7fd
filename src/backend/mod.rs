//! The backend's current address set: published by a source, read lock-free by every
//! connection, and the choice of which address a new connection tries first.
//!
//! The seam: a source (the DNS follower in `crate::dns`, or a fixed IP) calls [`Backends::publish`]; the data path calls [`Backends::current`] and
//! [`BackendSet::candidates`]. Neither side knows how the other works.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One backend address and what the proxy knows about it.
#[derive(Debug)]
pub struct BackendAddr {
    pub addr: SocketAddr,
    /// When DNS first gave this address.
    pub first_seen: SystemTime,
    healthy: AtomicBool,
    /// A connect from the data path failed since the last good check.
    suspect: AtomicBool,
    /// The last health check passed (false before the first).
    last_ok: AtomicBool,
    active: AtomicUsize,
    /// Unix milliseconds of the last health check and last DNS answer naming it (0: never).
    last_check_ms: AtomicU64,
    last_seen_ms: AtomicU64,
    /// Cancelled when the address has been out of DNS for longer than the grace: connections
    /// to it close.
    retired: CancellationToken,
}

impl BackendAddr {
    /// New addresses start healthy, so they are used at once; their first check runs at once too.
    pub fn new(addr: SocketAddr) -> BackendAddr {
        BackendAddr {
            addr,
            first_seen: SystemTime::now(),
            healthy: AtomicBool::new(true),
            suspect: AtomicBool::new(false),
            last_ok: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            last_check_ms: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(unix_ms(SystemTime::now())),
            retired: CancellationToken::new(),
        }
    }

    /// Completes when connections to this address must close.
    pub async fn retired(&self) {
        self.retired.cancelled().await;
    }

    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// A connect to it failed: try it after the others until a check says it is fine.
    pub fn mark_suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// Records a health check's result time; a good check clears suspicion.
    pub fn checked(&self, ok: bool) {
        self.last_check_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.last_ok.store(ok, Ordering::Relaxed);
        if ok {
            self.suspect.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the last health check passed; false before the first.
    pub fn last_check_passed(&self) -> bool {
        self.last_ok.load(Ordering::Relaxed)
    }

    pub fn last_check(&self) -> Option<SystemTime> {
        from_unix_ms(self.last_check_ms.load(Ordering::Relaxed))
    }

    pub fn last_seen(&self) -> Option<SystemTime> {
        from_unix_ms(self.last_seen_ms.load(Ordering::Relaxed))
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

/// Retires addresses that left DNS once `grace` has passed, until `stop` fires.
pub async fn retire_removed(backends: Arc<Backends>, grace: Duration, stop: CancellationToken) {
    let mut changes = backends.subscribe();
    loop {
        let next = backends.retire_due(grace);
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
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
        Resolution { last_good: Some(now), ttl, last_attempt: Some(now), error: None }
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
        let resolution =
            Resolution { error: Some(why.into()), last_attempt: Some(SystemTime::now()), ..Default::default() };
        BackendSet { addrs: Vec::new(), resolution }
    }

    /// The order in which a new connection tries addresses: healthy ones first, starting at
    /// `start` and wrapping (round robin: new connections are spread evenly, and an ELB spreads
    /// them again behind each address), then healthy ones a connect recently failed on, then
    /// unhealthy ones as a last resort: when every check fails, trying beats refusing outright.
    pub fn candidates(&self, start: usize) -> impl Iterator<Item = &Arc<BackendAddr>> {
        let n = self.addrs.len();
        // A retired address may still be in a snapshot taken just before it was retired: its
        // connections are being closed, so a new one must not start there.
        let rotated = (0..n).map(move |i| &self.addrs[(start + i) % n.max(1)]).filter(|a| !a.retired.is_cancelled());
        let good = rotated.clone().filter(|a| a.is_healthy() && !a.is_suspect());
        let suspect = rotated.clone().filter(|a| a.is_healthy() && a.is_suspect());
        let unhealthy = rotated.filter(|a| !a.is_healthy());
        good.chain(suspect).chain(unhealthy)
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
    /// Bumped on every change of the set, for those who must react (the health checker).
    version: watch::Sender<u64>,
    /// Addresses that left DNS, since when, while connections to them may still be open.
    retiring: std::sync::Mutex<Vec<(Arc<BackendAddr>, Instant)>>,
    /// Raised by the data path when connects fail: the source should look again soon.
    refresh: Notify,
}

impl Backends {
    pub fn new(name: impl Into<String>) -> Backends {
        Backends {
            name: name.into(),
            current: ArcSwap::from_pointee(BackendSet::unresolved("resolution in progress")),
            cursor: AtomicUsize::new(0),
            version: watch::Sender::new(0),
            retiring: std::sync::Mutex::new(Vec::new()),
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
        let mut retiring = self.retiring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next: Vec<Arc<BackendAddr>> = Vec::new();
        for addr in addrs {
            if next.iter().any(|a| a.addr == addr) {
                continue;
            }
            let kept = old.addrs.iter().find(|a| a.addr == addr).cloned().or_else(|| {
                // Back within the grace: keep it, and the connections still open to it.
                let i = retiring.iter().position(|(a, _)| a.addr == addr)?;
                Some(retiring.swap_remove(i).0)
            });
            let kept = kept.unwrap_or_else(|| Arc::new(BackendAddr::new(addr)));
            kept.last_seen_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
            next.push(kept);
        }
        let now = Instant::now();
        for gone in old.addrs.iter().filter(|a| !next.iter().any(|n| n.addr == a.addr)) {
            retiring.push((Arc::clone(gone), now));
        }
        drop(retiring);
        // Subscribers care about the addresses, not the resolution's timestamps: a refresh that
        // confirms the same addresses (once a second) wakes nobody.
        let changed = next.len() != old.addrs.len() || next.iter().zip(&old.addrs).any(|(a, b)| !Arc::ptr_eq(a, b));
        self.current.store(Arc::new(BackendSet { addrs: next, resolution }));
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Closes connections to addresses out of DNS for `grace` or longer. Returns when the next
    /// one is due, if any.
    pub fn retire_due(&self, grace: Duration) -> Option<Instant> {
        let mut retiring = self.retiring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        retiring.retain(|(addr, since)| {
            let due = now >= *since + grace;
            if due {
                if addr.active_connections() > 0 {
                    tracing::info!(backend.addr = %addr.addr, open = addr.active_connections(),
                        "closing connections to an address that left DNS");
                }
                addr.retired.cancel();
            }
            !due
        });
        retiring.iter().map(|(_, since)| *since + grace).min()
    }

    /// Closes every connection to every address of this set, current or retiring: the backend
    /// is no longer used (a reload removed or changed it) and its grace is over.
    pub fn retire_all(&self) {
        for addr in &self.current().addrs {
            addr.retired.cancel();
        }
        for (addr, _) in self.retiring.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            addr.retired.cancel();
        }
    }

    /// Addresses that left DNS and are not yet retired, with when they left.
    pub fn retiring(&self) -> Vec<(Arc<BackendAddr>, Instant)> {
        self.retiring.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Changes whenever the list of addresses does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Records a failed lookup. A set that has addresses keeps them (it is now stale): a failed
    /// lookup never empties a working backend. Only [`Backends::expire`] does.
    pub fn lookup_failed(&self, why: impl Into<String>) {
        let old = self.current();
        let resolution =
            Resolution { error: Some(why.into()), last_attempt: Some(SystemTime::now()), ..old.resolution.clone() };
        self.current.store(Arc::new(BackendSet { addrs: old.addrs.clone(), resolution }));
    }

    /// Drops every address: the last good answer is too old to trust.
    pub fn expire(&self, why: impl Into<String>) {
        let old = self.current();
        let resolution =
            Resolution { error: Some(why.into()), last_attempt: Some(SystemTime::now()), ..old.resolution.clone() };
        let now = Instant::now();
        self.retiring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(old.addrs.iter().map(|a| (Arc::clone(a), now)));
        self.current.store(Arc::new(BackendSet { addrs: Vec::new(), resolution }));
        self.version.send_modify(|v| *v += 1);
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
        let order = |start| set.candidates(start).map(|a| a.addr.port()).collect::<Vec<_>>();
        assert_eq!(order(0), vec![1, 2, 3]);
        assert_eq!(order(4), vec![2, 3, 1]);
        set.addrs[1].set_healthy(false);
        assert_eq!(order(1), vec![3, 1, 2]);
    }

    #[test]
    fn a_retired_address_is_never_a_candidate() {
        let b = Backends::new("x");
        b.publish([addr(1), addr(2)], Resolution::answered(None));
        // A snapshot taken before the address left DNS and its grace ran out.
        let set = b.current();
        b.publish([addr(2)], Resolution::answered(None));
        b.retire_due(Duration::ZERO);
        assert_eq!(set.candidates(0).map(|a| a.addr.port()).collect::<Vec<_>>(), vec![2]);
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

    #[tokio::test(start_paused = true)]
    async fn a_removed_address_is_retired_after_the_grace_unless_it_comes_back() {
        let b = Backends::new("x");
        let grace = Duration::from_secs(60);
        b.publish([addr(1), addr(2)], Resolution::answered(None));
        let (one, two) = (Arc::clone(&b.current().addrs[0]), Arc::clone(&b.current().addrs[1]));
        b.publish([addr(3)], Resolution::answered(None));
        assert_eq!(b.retiring().len(), 2);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.retire_due(grace), Some(Instant::now() + Duration::from_secs(30)));
        // addr(1) comes back within the grace: the same address, not retired.
        b.publish([addr(3), addr(1)], Resolution::answered(None));
        assert!(Arc::ptr_eq(&b.current().addrs[1], &one));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(b.retire_due(grace), None);
        assert!(two.retired.is_cancelled());
        assert!(!one.retired.is_cancelled());
        assert!(b.retiring().is_empty());
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
