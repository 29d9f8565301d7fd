//! Following the backend's DNS name: re-resolve on the answer's TTL (clamped to
//! `[min_ttl, refresh_interval]`), use every record, and hold the last good answer through
//! failures for `dns.hold`.
//!
//! The schedule lives here, independent of the resolver library, so it can be tested with
//! paused time; [`hickory`] does the actual lookups.

pub mod hickory;

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backends, Resolution};
use crate::config::DnsConfig;
use crate::logging::Throttle;
use crate::metrics::RouteMetrics;

/// Upper bound on the retry interval while lookups fail: a recovered resolver is noticed within
/// this long, and a dead one is asked at most this often.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Early re-resolves (after connect failures) happen at most this often.
const EARLY_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A good answer: every address, and the smallest TTL among the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub ttl: Duration,
}

/// Why a lookup gave no usable answer. Label values for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    NxDomain,
    /// The name exists but has no records of the asked type.
    NoData,
    ServFail,
    Refused,
    Timeout,
    /// No nameserver could be reached.
    Unreachable,
    Other,
}

impl FailureKind {
    pub const ALL: [FailureKind; 7] = [
        FailureKind::NxDomain,
        FailureKind::NoData,
        FailureKind::ServFail,
        FailureKind::Refused,
        FailureKind::Timeout,
        FailureKind::Unreachable,
        FailureKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::NxDomain => "nxdomain",
            FailureKind::NoData => "nodata",
            FailureKind::ServFail => "servfail",
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Other => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            FailureKind::NxDomain => "the name does not exist (NXDOMAIN)",
            FailureKind::NoData => "the name has no address records",
            FailureKind::ServFail => "the nameserver failed (SERVFAIL)",
            FailureKind::Refused => "the nameserver refused the query (REFUSED)",
            FailureKind::Timeout => "the lookup timed out",
            FailureKind::Unreachable => "no nameserver could be reached",
            FailureKind::Other => "the lookup failed",
        };
        if self.detail.is_empty() { f.write_str(what) } else { write!(f, "{what}: {}", self.detail) }
    }
}

/// Something that resolves a name to addresses.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> impl Future<Output = Result<Answer, Failure>> + Send;
}

/// How long to use an answer before asking again.
pub fn refresh_after(ttl: Duration, config: &DnsConfig) -> Duration {
    ttl.min(config.refresh_interval).max(config.min_ttl)
}

/// Resolves `host` for as long as `stop` is not cancelled, publishing into `backends`.
pub struct Follower<L> {
    pub lookup: L,
    pub host: String,
    pub port: u16,
    pub config: DnsConfig,
    pub backends: Arc<Backends>,
    /// The backend's metrics, which count the lookups.
    pub metrics: Arc<RouteMetrics>,
}

impl<L: Lookup> Follower<L> {
    pub async fn run(self, stop: CancellationToken) {
        // A set that already holds an answer (kept across a reload) keeps its age: the hold
        // counts from that answer, not from this follower's start.
        let mut last_good: Option<Instant> = self
            .backends
            .current()
            .resolution
            .last_good
            .and_then(|t| t.elapsed().ok())
            .and_then(|age| Instant::now().checked_sub(age));
        let mut retry = self.config.min_ttl;
        let failure_log = Throttle::new();
        loop {
            let started = Instant::now();
            // Stopped mid-lookup (a reload replaced this follower): its answer is not written,
            // the set may belong to the follower that replaced it.
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.lookup.lookup(&self.host) => r,
            };
            let wait = match result {
                Ok(answer) if !answer.addrs.is_empty() => {
                    self.metrics.dns_resolution("success");
                    self.publish(&answer);
                    last_good = Some(Instant::now());
                    retry = self.config.min_ttl;
                    refresh_after(answer.ttl, &self.config)
                }
                Ok(_) => {
                    let f = Failure { kind: FailureKind::NoData, detail: String::new() };
                    self.failed(&f, last_good, &failure_log);
                    next_retry(&mut retry, self.config.min_ttl)
                }
                Err(f) => {
                    self.failed(&f, last_good, &failure_log);
                    next_retry(&mut retry, self.config.min_ttl)
                }
            };
            let mut deadline = started + wait;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(deadline) => break,
                    () = self.backends.refresh_requested() => {
                        // Connects are failing: look again soon, but not more than once a second.
                        deadline = deadline.min((started + EARLY_MIN_INTERVAL).max(Instant::now()));
                    }
                }
            }
        }
    }

    fn publish(&self, answer: &Answer) {
        let addrs: Vec<SocketAddr> = answer.addrs.iter().map(|ip| SocketAddr::new(*ip, self.port)).collect();
        let before = self.backends.current();
        let changed = before.addrs.len() != addrs.len() || before.addrs.iter().any(|a| !addrs.contains(&a.addr));
        if changed {
            let added: Vec<String> =
                addrs.iter().filter(|a| !before.addrs.iter().any(|b| b.addr == **a)).map(ToString::to_string).collect();
            let removed: Vec<String> =
                before.addrs.iter().filter(|b| !addrs.contains(&b.addr)).map(|b| b.addr.to_string()).collect();
            tracing::info!(backend = %self.backends.name, ?added, ?removed, ttl = ?answer.ttl, "backend addresses changed");
        } else if before.resolution.is_stale() {
            tracing::info!(backend = %self.backends.name, "DNS answers again; addresses unchanged");
        }
        self.backends.publish(addrs, Resolution::answered(Some(answer.ttl)));
    }

    fn failed(&self, f: &Failure, last_good: Option<Instant>, log: &Throttle) {
        self.metrics.dns_resolution(f.kind.as_str());
        let held = self.backends.current().addrs.len();
        match last_good {
            Some(t) if t.elapsed() >= self.config.hold && held > 0 => {
                let why = format!(
                    "{f}; the last good answer is older than dns.hold ({})",
                    humantime::format_duration(self.config.hold)
                );
                tracing::error!(backend = %self.backends.name, error = %why, "dropping the backend's addresses");
                self.backends.expire(why);
            }
            _ => {
                self.backends.lookup_failed(f.to_string());
                if let Some(suppressed) = log.allow() {
                    if held > 0 {
                        tracing::warn!(backend = %self.backends.name, error = %f, held, suppressed,
                            "DNS lookup failed; keeping the last good addresses");
                    } else {
                        tracing::warn!(backend = %self.backends.name, error = %f, suppressed, "backend does not resolve");
                    }
                }
            }
        }
    }
}

/// The wait before the next attempt after a failure: `min_ttl`, doubling up to [`MAX_RETRY`].
fn next_retry(retry: &mut Duration, min_ttl: Duration) -> Duration {
    let now = *retry;
    *retry = (*retry * 2).min(MAX_RETRY.max(min_ttl));
    now
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Family;
    use std::sync::Mutex;

    fn config() -> DnsConfig {
        DnsConfig {
            nameservers: vec![],
            refresh_interval: Duration::from_secs(1),
            min_ttl: Duration::from_millis(250),
            hold: Duration::from_secs(3600),
            timeout: Duration::from_secs(2),
            family: Family::Ipv4,
        }
    }

    #[test]
    fn refresh_is_the_ttl_clamped_to_floor_and_interval() {
        let c = config();
        assert_eq!(refresh_after(Duration::ZERO, &c), Duration::from_millis(250));
        assert_eq!(refresh_after(Duration::from_millis(600), &c), Duration::from_millis(600));
        assert_eq!(refresh_after(Duration::from_secs(86_400), &c), Duration::from_secs(1));
    }

    /// A scripted resolver: answers from a queue, the last entry repeating; records call times.
    #[derive(Clone, Default)]
    struct Script(Arc<Mutex<ScriptState>>);

    #[derive(Default)]
    struct ScriptState {
        answers: Vec<Result<Answer, Failure>>,
        calls: Vec<Instant>,
    }

    impl Script {
        fn new(answers: Vec<Result<Answer, Failure>>) -> Script {
            Script(Arc::new(Mutex::new(ScriptState { answers, calls: vec![] })))
        }
    }

    impl Lookup for Script {
        async fn lookup(&self, _host: &str) -> Result<Answer, Failure> {
            let mut s = self.0.lock().unwrap();
            s.calls.push(Instant::now());
            if s.answers.len() > 1 { s.answers.remove(0) } else { s.answers[0].clone() }
        }
    }

    fn ok(last_octet: u8, ttl_ms: u64) -> Result<Answer, Failure> {
        Ok(Answer { addrs: vec![IpAddr::from([127, 0, 0, last_octet])], ttl: Duration::from_millis(ttl_ms) })
    }

    fn fail(kind: FailureKind) -> Result<Answer, Failure> {
        Err(Failure { kind, detail: String::new() })
    }

    fn start(script: &Script, config: DnsConfig) -> (Arc<Backends>, CancellationToken) {
        let backends = Arc::new(Backends::new("backend.test:443"));
        let stop = CancellationToken::new();
        let f = Follower {
            lookup: script.clone(),
            host: "backend.test".into(),
            port: 443,
            config,
            backends: Arc::clone(&backends),
            metrics: Arc::new(crate::metrics::Metrics::new("test").route("test")),
        };
        tokio::spawn(f.run(stop.clone()));
        (backends, stop)
    }

    fn gaps(script: &Script) -> Vec<u128> {
        let calls = &script.0.lock().unwrap().calls;
        calls.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn follows_the_ttl_within_floor_and_interval() {
        // TTL 0 -> floor (250 ms); TTL 600 ms -> 600 ms; TTL one day -> the 1 s interval.
        let script = Script::new(vec![ok(2, 0), ok(2, 600), ok(2, 86_400_000)]);
        let (backends, stop) = start(&script, config());
        tokio::time::sleep(Duration::from_millis(3900)).await;
        stop.cancel();
        assert_eq!(gaps(&script), vec![250, 600, 1000, 1000, 1000]);
        assert_eq!(backends.current().addrs[0].addr, SocketAddr::from(([127, 0, 0, 2], 443)));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_set_and_back_off_from_the_floor() {
        let script = Script::new(vec![ok(2, 1000), fail(FailureKind::ServFail)]);
        let (backends, stop) = start(&script, config());
        tokio::time::sleep(Duration::from_secs(20)).await;
        stop.cancel();
        assert_eq!(gaps(&script)[..7], [1000, 250, 500, 1000, 2000, 4000, 5000]);
        let set = backends.current();
        assert_eq!(set.addrs.len(), 1, "a failing resolver must not empty the set");
        assert!(set.resolution.is_stale());
        assert_eq!(set.resolution.error.as_deref(), Some("the nameserver failed (SERVFAIL)"));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_hold_the_addresses_are_dropped_and_come_back_with_dns() {
        let mut c = config();
        c.hold = Duration::from_secs(10);
        let script = Script::new(vec![ok(2, 1000), fail(FailureKind::Timeout)]);
        let (backends, stop) = start(&script, c);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(backends.current().addrs.len(), 1, "held within dns.hold");
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(backends.current().addrs.is_empty(), "dropped after dns.hold");
        let why = backends.current().resolution.error.clone().unwrap();
        assert!(why.starts_with("the lookup timed out; the last good answer is older than dns.hold (10s)"), "{why}");
        script.0.lock().unwrap().answers = vec![ok(3, 1000)];
        tokio::time::sleep(Duration::from_secs(6)).await;
        stop.cancel();
        assert_eq!(backends.current().addrs[0].addr, SocketAddr::from(([127, 0, 0, 3], 443)));
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_bring_the_next_lookup_forward_at_most_once_a_second() {
        let mut c = config();
        c.refresh_interval = Duration::from_secs(30);
        let script = Script::new(vec![ok(2, 30_000)]);
        let (backends, stop) = start(&script, c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..50 {
            backends.request_refresh();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        // One lookup at start, then one a second while connects keep failing (2.6 s of them).
        assert_eq!(gaps(&script), vec![1000, 1000]);
    }
}
