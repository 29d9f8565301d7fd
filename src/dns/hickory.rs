//! Lookups with hickory-resolver: no cache (the follower owns the schedule), TTLs as the
//! nameserver gave them, EDNS with a 1232-byte payload, TCP after a truncated UDP answer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::time::Instant;

use super::{Answer, Failure, FailureKind, Lookup};
use crate::config::{DnsConfig, Family};

/// EDNS payload advertised: the size the DNS community settled on (DNS flag day 2020) that avoids
/// IP fragmentation; an ELB's answer with many records fits, larger ones come back over TCP.
const EDNS_PAYLOAD: u16 = 1232;
/// Attempts after the first within one lookup, each bounded by the per-try timeout.
const RETRIES: usize = 1;

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up DNS resolution from /etc/resolv.conf (set dns.nameservers to name nameservers)")]
pub struct SetupError(#[source] NetError);

pub struct HickoryLookup {
    resolver: TokioResolver,
    family: Family,
    /// With `dns.family = "both"`: each family's last good answer, for its transient failures.
    held: std::sync::Mutex<Held>,
    hold: Duration,
}

/// Each family's last good answer and when it came.
#[derive(Debug, Default)]
struct Held {
    v4: Option<(Answer, Instant)>,
    v6: Option<(Answer, Instant)>,
}

/// One family's part of a dual-stack answer: its fresh answer, else its last good one while a
/// failure is transient and the answer younger than `hold`. An authoritative "none" (NXDOMAIN,
/// no records of that type) is believed: that family's addresses are gone.
fn family_part(
    fresh: Result<Answer, Failure>,
    held: &mut Option<(Answer, Instant)>,
    hold: Duration,
    now: Instant,
) -> Part {
    match fresh {
        Ok(answer) => {
            *held = Some((answer.clone(), now));
            Part::Fresh(answer)
        }
        Err(f) if matches!(f.kind, FailureKind::NxDomain | FailureKind::NoData) => {
            *held = None;
            Part::Failed(f)
        }
        Err(f) => match held {
            Some((answer, at)) if now.saturating_duration_since(*at) < hold => Part::Held(answer.addrs.clone(), f),
            _ => Part::Failed(f),
        },
    }
}

enum Part {
    Fresh(Answer),
    /// The family failed transiently; these are its last good addresses.
    Held(Vec<IpAddr>, Failure),
    Failed(Failure),
}

/// Both families' lookups made into one answer. A transient failure of one family keeps that
/// family's last good addresses instead of leaving only the other family's: otherwise, after
/// `backend.removed_grace`, every connection of the failed family would be cut by one bad
/// query. Fails only when no family has a fresh answer (the follower then holds the whole set).
fn merge(
    v4: Result<Answer, Failure>,
    v6: Result<Answer, Failure>,
    held: &mut Held,
    hold: Duration,
    now: Instant,
) -> Result<Answer, Failure> {
    let parts = [family_part(v4, &mut held.v4, hold, now), family_part(v6, &mut held.v6, hold, now)];
    let mut addrs = Vec::new();
    let mut ttl: Option<Duration> = None;
    let mut first_error = None;
    for part in parts {
        match part {
            Part::Fresh(answer) => {
                ttl = Some(ttl.map_or(answer.ttl, |t| t.min(answer.ttl)));
                addrs.extend(answer.addrs);
            }
            Part::Held(kept, f) => {
                addrs.extend(kept);
                first_error.get_or_insert(f);
            }
            Part::Failed(f) => {
                first_error.get_or_insert(f);
            }
        }
    }
    match (ttl, first_error) {
        (Some(ttl), _) => Ok(Answer { addrs, ttl }),
        (None, Some(f)) => Err(f),
        // Unreachable (two parts, each fresh or failed), but an empty answer is the honest reply.
        (None, None) => Ok(Answer { addrs, ttl: Duration::ZERO }),
    }
}

impl HickoryLookup {
    pub fn new(config: &DnsConfig) -> Result<HickoryLookup, SetupError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(SetupError)?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|ns| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.port();
                    NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.cache_size = 0;
        // Report TTLs as given: hickory caps them at one day by default.
        opts.positive_min_ttl = None;
        opts.negative_min_ttl = None;
        opts.positive_max_ttl = Some(Duration::from_secs(u64::from(u32::MAX)));
        opts.negative_max_ttl = Some(Duration::from_secs(u64::from(u32::MAX)));
        // resolv.conf turns EDNS off unless it says `options edns0`; an ELB answer needs it.
        opts.edns0 = true;
        opts.edns_payload_len = EDNS_PAYLOAD;
        let tries = u32::try_from(RETRIES + 1).unwrap_or(2);
        opts.timeout = (config.timeout / tries).max(Duration::from_millis(50));
        opts.attempts = RETRIES;
        opts.use_hosts_file = ResolveHosts::Never;
        let resolver = builder.build().map_err(SetupError)?;
        Ok(HickoryLookup { resolver, family: config.family, held: std::sync::Mutex::default(), hold: config.hold })
    }

    async fn v4(&self, name: &str) -> Result<Answer, Failure> {
        let lookup = self.resolver.ipv4_lookup(name).await.map_err(|e| classify(&e))?;
        Ok(collect(lookup.answers().iter().filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            _ => None,
        })))
    }

    async fn v6(&self, name: &str) -> Result<Answer, Failure> {
        let lookup = self.resolver.ipv6_lookup(name).await.map_err(|e| classify(&e))?;
        Ok(collect(lookup.answers().iter().filter_map(|r| match &r.data {
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })))
    }
}

fn collect(records: impl Iterator<Item = (IpAddr, u32)>) -> Answer {
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for (ip, record_ttl) in records {
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
        ttl = ttl.min(record_ttl);
    }
    Answer { addrs, ttl: Duration::from_secs(u64::from(if ttl == u32::MAX { 0 } else { ttl })) }
}

impl Lookup for HickoryLookup {
    async fn lookup(&self, host: &str) -> Result<Answer, Failure> {
        // A name with a dot is taken as complete, so search domains are not tried first.
        let name = if host.contains('.') && !host.ends_with('.') { format!("{host}.") } else { host.to_string() };
        match self.family {
            Family::Ipv4 => self.v4(&name).await,
            Family::Ipv6 => self.v6(&name).await,
            Family::Both => {
                let (v4, v6) = tokio::join!(self.v4(&name), self.v6(&name));
                let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                merge(v4, v6, &mut held, self.hold, Instant::now())
            }
        }
    }
}

/// Sorts a hickory error into the few cases an operator acts on differently.
pub fn classify(e: &NetError) -> Failure {
    let kind = match e {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => match *response_code {
            ResponseCode::NXDomain => FailureKind::NxDomain,
            ResponseCode::NoError => FailureKind::NoData,
            ResponseCode::ServFail => FailureKind::ServFail,
            ResponseCode::Refused => FailureKind::Refused,
            _ => FailureKind::Other,
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => FailureKind::ServFail,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => FailureKind::Refused,
        NetError::Timeout => FailureKind::Timeout,
        // A refused TCP connect surfaces as NoConnections; a silent UDP port as Timeout.
        NetError::NoConnections | NetError::Io(_) => FailureKind::Unreachable,
        _ => FailureKind::Other,
    };
    let detail = match kind {
        FailureKind::Other | FailureKind::Unreachable => e.to_string(),
        _ => String::new(),
    };
    Failure { kind, detail }
}

/// The address to dial for a literal IP backend, or `None` when the host is a name.
pub fn literal(host: &str, port: u16) -> Option<SocketAddr> {
    host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ips: &[&str], ttl: u64) -> Result<Answer, Failure> {
        Ok(Answer { addrs: ips.iter().map(|ip| ip.parse().unwrap()).collect(), ttl: Duration::from_secs(ttl) })
    }

    fn failure(kind: FailureKind) -> Result<Answer, Failure> {
        Err(Failure { kind, detail: String::new() })
    }

    #[test]
    fn a_transient_failure_of_one_family_keeps_its_last_good_addresses() {
        let mut held = Held::default();
        let hold = Duration::from_secs(3600);
        let t0 = Instant::now();
        let both = merge(answer(&["192.0.2.1"], 60), answer(&["2001:db8::1"], 30), &mut held, hold, t0).unwrap();
        assert_eq!(both.addrs.len(), 2);
        assert_eq!(both.ttl, Duration::from_secs(30));

        // IPv6 times out: its address stays, the TTL comes from the family that answered.
        let later = t0 + Duration::from_secs(60);
        let kept = merge(answer(&["192.0.2.1"], 60), failure(FailureKind::Timeout), &mut held, hold, later).unwrap();
        assert_eq!(kept.addrs, both.addrs);
        assert_eq!(kept.ttl, Duration::from_secs(60));

        // Past dns.hold the old IPv6 answer is no longer trusted.
        let much_later = t0 + hold + Duration::from_secs(1);
        let v4_only = merge(answer(&["192.0.2.1"], 60), failure(FailureKind::ServFail), &mut held, hold, much_later);
        assert_eq!(v4_only.unwrap().addrs, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn an_authoritative_none_for_one_family_drops_it_and_two_failures_fail() {
        let mut held = Held::default();
        let hold = Duration::from_secs(3600);
        let t0 = Instant::now();
        merge(answer(&["192.0.2.1"], 60), answer(&["2001:db8::1"], 60), &mut held, hold, t0).unwrap();
        let gone = merge(answer(&["192.0.2.1"], 60), failure(FailureKind::NoData), &mut held, hold, t0).unwrap();
        assert_eq!(gone.addrs.len(), 1);
        // Nothing fresh from either family: a failure, which the follower holds the whole set through.
        let both_failed = merge(failure(FailureKind::Timeout), failure(FailureKind::Timeout), &mut held, hold, t0);
        assert_eq!(both_failed.unwrap_err().kind, FailureKind::Timeout);
    }
}
