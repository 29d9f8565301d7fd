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
        Ok(HickoryLookup { resolver, family: config.family })
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
                match (v4, v6) {
                    (Ok(a), Ok(b)) => {
                        let mut addrs = a.addrs;
                        addrs.extend(b.addrs);
                        Ok(Answer { addrs, ttl: a.ttl.min(b.ttl) })
                    }
                    (Ok(a), Err(_)) | (Err(_), Ok(a)) => Ok(a),
                    (Err(e), Err(_)) => Err(e),
                }
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
