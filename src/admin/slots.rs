//! The admin server's connection slots: which connection to close when all are taken.
//!
//! # Why evict rather than refuse
//!
//! Route 53 opens a fresh connection for every check and counts the check failed unless a
//! status line arrives within 2 s. When the cap refused newcomers, 64 clients dripping a
//! request header one byte a second held every slot, and checks were refused until the
//! header timeout freed a slot (which the attacker took back at once): 2 of 26 checks passed.
//! Whoever holds a slot can keep it by being slow; whoever wants one can only ask. So a new
//! connection is always admitted, and when the cap is reached an existing one is closed.
//!
//! The alternatives do not hold on their own: a shorter header deadline frees slots sooner,
//! but an attacker that reconnects at once takes them back before a checker arrives; a slot
//! reserved for `/health` cannot be granted before the request is read, which is exactly what
//! a slow client withholds.
//!
//! # Which connection goes
//!
//! Before a request arrives the server cannot tell a checker from an attacker, so the choice
//! uses what it can see:
//!
//! 1. **The source holding the most slots** loses one. Route 53's checkers are many hosts,
//!    each with at most one connection in flight; an attacker must hold many slots to matter,
//!    so its new connections push out its own old ones, never a checker's. A source is an IPv4
//!    address or an IPv6 /64 (one host usually owns a whole /64, so counting addresses would
//!    let it pose as 2^64 clients). IPv4-mapped IPv6 peers (a dual-stack listener) count as the
//!    IPv4 address; without that, every IPv4 client would share the /64 `::ffff:0:0`.
//! 2. **Among that source's connections, the one that has waited longest without progress**:
//!    progress is being accepted or delivering a complete request head, not a byte of one, so
//!    a slow-loris client cannot look fresh by dripping. A checker's request is on the wire
//!    right behind its handshake and is read on the connection's first poll, so it is the
//!    newest entry while it matters; a kept-alive scraper idle since its last answer, or a
//!    client stalled reading a response, ages and goes before it.
//!
//! Ties between sources with equal counts (many attacking hosts, one slot each) go to the
//! connection that has waited longest overall. What stays out of reach: a flood that opens
//! `admin.max_connections` connections within the moment between a checker's accept and its
//! first read; only the network (the security group) can stop that.
//!
//! The new connection is never the one closed, and an evicted connection's slot is free at
//! once (its task closes the socket on its next poll), so at most `admin.max_connections`
//! connections are held, plus those being closed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Who holds a slot, for fairness between clients: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => Source(IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64)))),
        }
    }
}

/// A connection closed to make room, as the accept loop reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// True when it had delivered at least one request (kept alive, or slow to read an
    /// answer); false when it never completed one, the mark of a slow-loris client.
    pub served: bool,
}

/// The slots of one admin server.
pub struct Slots {
    max: usize,
    inner: Mutex<Inner>,
}

struct Held {
    source: Source,
    served: bool,
    evict: CancellationToken,
}

#[derive(Default)]
struct Inner {
    /// Stamps progress; a larger stamp is more recent. u64 cannot wrap in practice.
    next: u64,
    /// Every held slot by its last progress stamp, so the first entry has waited longest.
    order: BTreeMap<u64, Held>,
    /// Slots held by each source.
    per_source: HashMap<Source, usize>,
    /// How many sources hold exactly n slots, for each n > 0: the last key is the largest count.
    sources_holding: BTreeMap<usize, usize>,
}

impl Inner {
    fn stamp(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn count(&self, source: Source) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    /// Moves `source` from holding n slots to n + 1 (`up`) or n - 1.
    fn adjust(&mut self, source: Source, up: bool) {
        let old = self.count(source);
        let new = if up { old + 1 } else { old.saturating_sub(1) };
        if old > 0
            && let Some(n) = self.sources_holding.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.sources_holding.remove(&old);
            }
        }
        if new > 0 {
            *self.sources_holding.entry(new).or_default() += 1;
            self.per_source.insert(source, new);
        } else {
            self.per_source.remove(&source);
        }
    }

    fn remove(&mut self, stamp: u64) -> Option<Held> {
        let held = self.order.remove(&stamp)?;
        self.adjust(held.source, false);
        Some(held)
    }

    /// The slot to free for a newcomer from `newcomer`: the longest-waiting connection of the
    /// source that holds the most slots once the newcomer is counted. Scans from the
    /// longest-waiting entry; a source that dominates the slots is met within a few entries,
    /// and the scan never exceeds the cap.
    fn victim(&self, newcomer: Source) -> Option<u64> {
        let largest = self.sources_holding.last_key_value().map_or(0, |(n, _)| *n);
        let heaviest = largest.max(self.count(newcomer) + 1);
        let counted = |s: Source| self.count(s) + usize::from(s == newcomer);
        self.order.iter().find(|(_, held)| counted(held.source) == heaviest).map(|(stamp, _)| *stamp)
    }
}

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots { max: max.max(1), inner: Mutex::new(Inner::default()) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the tables consistent before anything can panic, so a
        // poisoned lock still guards sound data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slots held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().order.len()
    }

    /// Gives a slot to a connection from `peer`, closing another connection when all are
    /// taken. Never refuses.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> (Slot, Option<Eviction>) {
        let source = Source::of(peer);
        let evict = CancellationToken::new();
        let (stamp, evicted) = {
            let mut inner = self.lock();
            let evicted = if inner.order.len() >= self.max {
                inner.victim(source).and_then(|stamp| inner.remove(stamp))
            } else {
                None
            };
            let stamp = inner.stamp();
            inner.order.insert(stamp, Held { source, served: false, evict: evict.clone() });
            inner.adjust(source, true);
            (stamp, evicted)
        };
        let eviction = evicted.map(|held| {
            held.evict.cancel();
            Eviction { served: held.served }
        });
        (Slot { slots: Arc::clone(self), stamp: AtomicU64::new(stamp), evict }, eviction)
    }
}

/// One connection's slot; dropping it frees the slot.
pub struct Slot {
    slots: Arc<Slots>,
    /// The key of this slot in `Inner::order`; changed only under the lock.
    stamp: AtomicU64,
    evict: CancellationToken,
}

impl Slot {
    /// Records that a complete request arrived: this connection becomes the most recent.
    pub fn progressed(&self) {
        let mut inner = self.slots.lock();
        let old = self.stamp.load(Ordering::Relaxed);
        // Absent when it was evicted a moment ago: it must not take a slot back.
        if let Some(mut held) = inner.order.remove(&old) {
            held.served = true;
            let new = inner.stamp();
            inner.order.insert(new, held);
            self.stamp.store(new, Ordering::Relaxed);
        }
    }

    /// Completes when this connection has been evicted and should close now.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let stamp = self.stamp.load(Ordering::Relaxed);
        self.slots.lock().remove(stamp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn is_evicted(slot: &Slot) -> bool {
        slot.evict.is_cancelled()
    }

    #[test]
    fn below_the_cap_nobody_is_evicted_and_dropping_frees_the_slot() {
        let slots = Slots::new(2);
        let (a, none) = slots.admit(ip("10.0.0.1"));
        assert_eq!(none, None);
        let (_b, none) = slots.admit(ip("10.0.0.2"));
        assert_eq!(none, None);
        assert_eq!(slots.held(), 2);
        drop(a);
        assert_eq!(slots.held(), 1);
        let (_c, none) = slots.admit(ip("10.0.0.3"));
        assert_eq!(none, None);
    }

    #[test]
    fn the_connection_without_progress_for_longest_goes_and_a_request_counts_as_progress() {
        let slots = Slots::new(2);
        let (a, _) = slots.admit(ip("10.0.0.1"));
        let (b, _) = slots.admit(ip("10.0.0.2"));
        a.progressed();
        let (c, ev) = slots.admit(ip("10.0.0.3"));
        assert_eq!(ev, Some(Eviction { served: false }));
        assert!(is_evicted(&b) && !is_evicted(&a) && !is_evicted(&c));
        assert_eq!(slots.held(), 2);
        let (_d, ev) = slots.admit(ip("10.0.0.4"));
        assert_eq!(ev, Some(Eviction { served: true }));
        assert!(is_evicted(&a));
    }

    #[test]
    fn the_source_holding_most_slots_loses_one_even_when_another_waited_longer() {
        let slots = Slots::new(4);
        let (checker, _) = slots.admit(ip("192.0.2.1"));
        let hogs: Vec<Slot> = (0..3).map(|_| slots.admit(ip("198.51.100.7")).0).collect();
        let (_new, ev) = slots.admit(ip("203.0.113.9"));
        assert_eq!(ev, Some(Eviction { served: false }));
        assert!(!is_evicted(&checker), "the checker went instead of the hog's oldest");
        assert!(is_evicted(&hogs[0]) && !is_evicted(&hogs[1]));
        // The hog's own newcomers push out its own connections too.
        let (_hog4, _) = slots.admit(ip("198.51.100.7"));
        assert!(is_evicted(&hogs[1]) && !is_evicted(&checker));
    }

    #[test]
    fn the_newcomer_is_never_the_one_closed() {
        let slots = Slots::new(1);
        let (a, _) = slots.admit(ip("10.0.0.1"));
        let (b, ev) = slots.admit(ip("10.0.0.1"));
        assert!(ev.is_some() && is_evicted(&a) && !is_evicted(&b));
        assert_eq!(slots.held(), 1);
    }

    #[test]
    fn an_evicted_connection_that_then_completes_a_request_does_not_take_a_slot_back() {
        let slots = Slots::new(1);
        let (a, _) = slots.admit(ip("10.0.0.1"));
        let (_b, _) = slots.admit(ip("10.0.0.2"));
        a.progressed();
        assert_eq!(slots.held(), 1);
        drop(a);
        assert_eq!(slots.held(), 1, "dropping the evicted slot freed the newcomer's");
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_its_ipv4_address() {
        assert_eq!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:3::1")));
        assert_eq!(Source::of(ip("::ffff:192.0.2.1")), Source::of(ip("192.0.2.1")));
        assert_ne!(Source::of(ip("::ffff:192.0.2.1")), Source::of(ip("::ffff:192.0.2.2")));
    }
}
