//! Every configuration key with its kind, default and meaning: the one place defaults live.
//!
//! The file parser, the command-line flags, the `STATIC_INGRESS_*` environment variables,
//! `check-config` and the example config are all derived from [`KEYS`], so a key added here
//! is accepted everywhere at once. Code reads a key through its typed constant (below, such as
//! [`PROXY_CONNECT_TIMEOUT`]), never by its name.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use super::value::{HostPort, Value};
use super::{Fallback, Family, HealthPolicy, LogFormat, ProxyProtocol, Splice};

/// What a key's value must look like; each kind has one parser in `config::value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A duration with a unit, like `5s`, `250ms` or `10m`, above zero and at most `max`
    /// (written like a default). Every duration has an upper bound so that no value reaching
    /// `Instant + duration` can overflow it, and so that a slip such as `300000000000y` is
    /// refused by `check-config` instead of panicking at run time.
    Duration { max: &'static str },
    /// Like `Duration`, but zero is allowed (`0s` turns the step off).
    DurationOrZero { max: &'static str },
    /// A whole number within `min..=max`.
    Count { min: u64, max: u64 },
    /// One `IP:port` socket address.
    SocketAddr,
    /// One or more `IP:port` socket addresses: a TOML array, or a comma-separated string.
    SocketAddrs,
    /// Like `SocketAddrs`, but may be empty (`[]` or `""`).
    OptionalSocketAddrs,
    /// A `host:port` pair whose host may be a DNS name or an IP address.
    HostPort,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A tracing filter such as `info` or `info,static_ingress=debug`.
    LogFilter,
    /// `true` or `false`.
    Bool,
    /// An Elastic IP allocation id (`eipalloc-` and hex digits), or empty for none.
    OptionalAllocationId,
    /// An EC2 tag key that instance metadata can serve: letters, digits and `+ - = . , _ : @`.
    TagKey,
    /// An `http://` or `https://` URL, or empty for the built-in default.
    OptionalUrl,
}

impl Kind {
    /// The placeholder shown for the value in `--help`.
    pub fn value_name(self) -> &'static str {
        match self {
            Kind::Duration { .. } | Kind::DurationOrZero { .. } => "DURATION",
            Kind::Count { .. } => "N",
            Kind::SocketAddr => "IP:PORT",
            Kind::SocketAddrs | Kind::OptionalSocketAddrs => "IP:PORT[,IP:PORT...]",
            Kind::HostPort => "HOST:PORT",
            Kind::Choice(_) => "WORD",
            Kind::LogFilter => "FILTER",
            Kind::Bool => "BOOL",
            Kind::OptionalAllocationId => "ALLOCATION-ID",
            Kind::TagKey => "TAG-KEY",
            Kind::OptionalUrl => "URL",
        }
    }

    /// The longest value a duration kind accepts, as written in [`KEYS`].
    pub fn max_duration(self) -> Option<&'static str> {
        match self {
            Kind::Duration { max } | Kind::DurationOrZero { max } => Some(max),
            _ => None,
        }
    }
}

/// One configuration key.
#[derive(Debug)]
pub struct Key {
    /// `section.name`, as written in the TOML file.
    pub name: &'static str,
    pub kind: Kind,
    /// The value used when neither the file, a flag nor the environment sets one, written as
    /// a flag would take it. `None` means the key is required.
    pub default: Option<&'static str>,
    /// One or two sentences: what it does and why the default is what it is.
    pub doc: &'static str,
}

impl Key {
    pub fn section(&self) -> &'static str {
        self.name.split_once('.').map_or(self.name, |(s, _)| s)
    }

    pub fn field(&self) -> &'static str {
        self.name.split_once('.').map_or(self.name, |(_, f)| f)
    }

    /// `proxy.connect_timeout` -> `--proxy-connect-timeout`.
    pub fn flag(&self) -> String {
        self.name.replace(['.', '_'], "-")
    }

    /// `proxy.connect_timeout` -> `STATIC_INGRESS_PROXY_CONNECT_TIMEOUT`.
    pub fn env(&self) -> String {
        format!("STATIC_INGRESS_{}", self.name.replace('.', "_").to_uppercase())
    }
}

/// Looks a key up by its dotted name.
pub fn find(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The sections, in the order the keys list them.
pub fn sections() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for key in KEYS {
        if !out.contains(&key.section()) {
            out.push(key.section());
        }
    }
    out
}

/// Every key, in the order `check-config` and the docs list them.
pub static KEYS: &[Key] = KEY_LIST;

const KEY_LIST: &[Key] = &[
    Key {
        name: "proxy.listen",
        kind: Kind::SocketAddrs,
        default: Some("0.0.0.0:443"),
        doc: "Addresses the TCP proxy listens on. Ports below 1024 need CAP_NET_BIND_SERVICE.",
    },
    Key {
        name: "proxy.connect_timeout",
        kind: Kind::Duration { max: "10m" },
        default: Some("3s"),
        doc: "How long one connect to a backend address may take before the next address is \
              tried. 3s allows one SYN retransmission (1s) and still leaves time to try \
              another address inside a client's TLS handshake timeout. \
              At most 10m: Linux itself gives up a connect after about 2 minutes of SYN retries.",
    },
    Key {
        name: "proxy.idle_timeout",
        kind: Kind::Duration { max: "30d" },
        default: Some("360s"),
        doc: "A connection on which neither side sends anything for this long is closed. \
              Above the 350s of AWS NLB, so clients tuned for AWS load balancers keep working. \
              At most 30d: quiet long-lived connections may want days, but a month-old silence is a dead peer.",
    },
    Key {
        name: "proxy.half_close_timeout",
        kind: Kind::Duration { max: "30d" },
        default: Some("60s"),
        doc: "Once one side has closed its sending half, the other direction may stay idle \
              this long (or idle_timeout, if shorter) before the connection is closed, so \
              half-closed connections cannot pile up. After one side resets, it also bounds \
              how long the proxy waits, without progress, for the other side to receive the \
              last bytes before the reset is passed on. \
              At most 30d: as for idle_timeout, which caps it anyway.",
    },
    Key {
        name: "proxy.max_connections",
        kind: Kind::Count { min: 1, max: 1_000_000 },
        default: Some("10000"),
        doc: "Client connections served at once. At the limit a new connection is accepted \
              and reset at once (counted as over_limit), so the client fails fast and can try \
              another address of the static name. Each connection holds two file descriptors (and, while a direction splices, a pipe's two, from a pool sized to fit: see proxy.splice).",
    },
    Key {
        name: "proxy.workers",
        kind: Kind::Count { min: 0, max: 1024 },
        default: Some("0"),
        doc: "Threads that accept and forward connections, each with its own listener on every \
              proxy.listen address (SO_REUSEPORT: the kernel spreads new connections among them) \
              and each running the connections it accepted to their end, so none waits on \
              another thread. 0, one per two CPUs the process may use (at least one): most of \
              a TCP proxy's work is the kernel's network processing, which needs CPUs of its own, \
              and on two CPUs one worker used about a sixth less CPU per new connection than two \
              (loadtest/analysis.md). The admin server, DNS, health checks and the Elastic IP run \
              apart from them. Applied at start only.",
    },
    Key {
        name: "proxy.tcp_keepalive",
        kind: Kind::Duration { max: "32767s" },
        default: Some("60s"),
        doc: "Idle time before TCP keepalive probes start on both sides (then every 10s, 6 \
              probes), so peers that vanished without a FIN are noticed and NAT state stays warm. \
              At most 32767s: Linux refuses a keepalive idle time above 32767 seconds.",
    },
    Key {
        name: "proxy.splice",
        kind: Kind::Choice(&["auto", "always", "off"]),
        default: Some("auto"),
        doc: "Forwarding through kernel pipes with splice(2), the bytes never copied into the proxy: \
              auto, each direction of a connection once it has moved 128 KiB (bulk transfers; small \
              requests and TLS handshakes are cheaper through a buffer); always, from the first byte; \
              off, never. Pipes come from a pool sized at start from the open-file limit (two \
              descriptors each, after proxy.max_connections' two per connection) and \
              fs.pipe-user-pages-soft (256 KiB, 64 pages each); with none free a direction copies instead.",
    },
    Key {
        name: "proxy.sni_timeout",
        kind: Kind::Duration { max: "1m" },
        default: Some("5s"),
        doc: "With [[route]] tables, how long a new connection may take to send its TLS \
              ClientHello (the proxy reads it to pick the route by server name, and forwards \
              every byte it read). A connection that sends no hello within it is routed by what \
              it sent (nothing counts as not TLS: see proxy.non_tls). TLS clients send the hello \
              at once; 5s is HAProxy's usual inspect-delay. \
              At most 1m: a longer wait only holds slots for clients that send nothing.",
    },
    Key {
        name: "proxy.sni_max_bytes",
        kind: Kind::Count { min: 512, max: 65536 },
        default: Some("16384"),
        doc: "With [[route]] tables, the most bytes read looking for the ClientHello. A hello \
              longer than this (browsers send 0.5 to 2 KiB; post-quantum key shares add about \
              1 KiB) is routed as if it named no server.",
    },
    Key {
        name: "proxy.unmatched",
        kind: Kind::Choice(&["default", "refuse"]),
        default: Some("default"),
        doc: "With [[route]] tables, where a TLS connection goes whose server name matches no \
              route, or that sends none: default, to backend.address (the route named \
              default); refuse, reset at once (counted as no_route).",
    },
    Key {
        name: "proxy.non_tls",
        kind: Kind::Choice(&["default", "refuse"]),
        default: Some("default"),
        doc: "With [[route]] tables, where a connection goes whose first bytes are not a TLS \
              ClientHello: default, to backend.address, as without routes; refuse, reset at \
              once (counted as no_route).",
    },
    Key {
        name: "backend.address",
        kind: Kind::HostPort,
        default: None,
        doc: "The backend as host:port, usually the ELB's DNS name and 443. Required, unless \
              the file has [[route]] tables and proxy.unmatched and proxy.non_tls are both \
              refuse; with routes it is the route named default.",
    },
    Key {
        name: "backend.proxy_protocol",
        kind: Kind::Choice(&["off", "v2"]),
        default: Some("off"),
        doc: "v2: send a PROXY protocol v2 header with the client's address and port (and the \
              address it connected to) before the client's first byte, for a backend that reads \
              it: HAProxy with accept-proxy, nginx with proxy_protocol, or targets behind an NLB \
              or Classic ELB TCP listener that adds no header of its own. No AWS load balancer \
              parses one itself: an ALB, or a TLS, HTTPS or SSL listener, takes it for the \
              client's first bytes and the connection fails, so leave it off when the backend is \
              such an ELB (see the PROXY protocol section of docs/configuration.md).",
    },
    Key {
        name: "backend.removed_grace",
        kind: Kind::DurationOrZero { max: "7d" },
        default: Some("5m"),
        doc: "When an address leaves DNS, new connections stop going there at once; connections \
              already open to it are closed after this grace, because AWS hands retired ELB \
              addresses to other customers. An address that comes back within it is kept. \
              At most 7d: a retired ELB address may soon serve another AWS customer.",
    },
    Key {
        name: "dns.nameservers",
        kind: Kind::OptionalSocketAddrs,
        default: Some(""),
        doc: "Nameservers to ask, as IP:port. Empty: those in /etc/resolv.conf (on EC2, the VPC \
              resolver). Each is asked over UDP, and over TCP when an answer is truncated.",
    },
    Key {
        name: "dns.refresh_interval",
        kind: Kind::Duration { max: "1d" },
        default: Some("500ms"),
        doc: "Re-resolve at the earlier of the answer's TTL and this interval, so a blue/green \
              flip is seen within half a second even when the record's TTL is long (0.16s at \
              the median in docs/benchmarks.md, HAProxy's 1s schedule 0.29s). Two \
              queries a second per name (per family with dns.family = both), far below the \
              1,024 packets a second the VPC resolver allows each network interface. \
              At most 1d: re-resolving less than daily would miss blue/green flips for a day.",
    },
    Key {
        name: "dns.min_ttl",
        kind: Kind::Duration { max: "1d" },
        default: Some("250ms"),
        doc: "Never re-resolve faster than this, whatever the TTL (a TTL of 0 uses it), and \
              never retry a failed lookup faster than this, so a broken resolver cannot make \
              the proxy spin. \
              At most 1d: it may not exceed dns.refresh_interval anyway.",
    },
    Key {
        name: "dns.hold",
        kind: Kind::Duration { max: "7d" },
        default: Some("6h"),
        doc: "While lookups fail (NXDOMAIN, SERVFAIL, timeouts, no answer), keep using the last \
              good addresses for this long after that answer. Past it the addresses are dropped, \
              because ELB addresses are eventually given to other AWS customers. \
              At most 7d: a week rides out any resolver outage; older ELB addresses may belong to others by then.",
    },
    Key {
        name: "dns.timeout",
        kind: Kind::Duration { max: "10m" },
        default: Some("2s"),
        doc: "How long one lookup may take (one retry included) before it counts as a timeout. \
              At most 10m: a resolver answers or fails within seconds.",
    },
    Key {
        name: "dns.family",
        kind: Kind::Choice(&["ipv4", "ipv6", "both"]),
        default: Some("ipv4"),
        doc: "Which records to use: ipv4 (A), ipv6 (AAAA) or both. ELBs answer A records; \
              dualstack ELB names also answer AAAA.",
    },
    Key {
        name: "health.interval",
        kind: Kind::Duration { max: "1h" },
        default: Some("1s"),
        doc: "How often every backend address is checked with a TCP connect. New addresses from \
              DNS are checked at once. \
              At most 1h: checked more rarely, a dead address would take hours to be marked down.",
    },
    Key {
        name: "health.timeout",
        kind: Kind::Duration { max: "10m" },
        default: Some("1s"),
        doc: "A check whose connect takes longer than this fails. \
              At most 10m: Linux itself gives up a connect after about 2 minutes.",
    },
    Key {
        name: "health.fall",
        kind: Kind::Count { min: 1, max: 100 },
        default: Some("3"),
        doc: "Consecutive failed checks that mark an address down (3 x 1s: a dead address is out \
              within 3s, while one lost SYN does not flap it).",
    },
    Key {
        name: "health.rise",
        kind: Kind::Count { min: 1, max: 100 },
        default: Some("2"),
        doc: "Consecutive good checks that mark a down address up again.",
    },
    Key {
        name: "health.min_healthy",
        kind: Kind::Count { min: 1, max: 1000 },
        default: Some("1"),
        doc: "/health answers 200 only while at least this many backend addresses are healthy \
              (of each backend, with [[route]] tables; see health.unhealthy_when).",
    },
    Key {
        name: "health.unhealthy_when",
        kind: Kind::Choice(&["all_backends_down", "any_backend_down"]),
        default: Some("all_backends_down"),
        doc: "With [[route]] tables (several backends), when /health fails for lack of \
              healthy backend addresses: all_backends_down, only when no backend has \
              health.min_healthy healthy addresses; any_backend_down, as soon as one has not, \
              which takes this address out of Route 53 for every service. See the routes \
              section of docs/configuration.md for why the default is all_backends_down.",
    },
    Key {
        name: "admin.listen",
        kind: Kind::SocketAddr,
        default: Some("0.0.0.0:9001"),
        doc: "Address of the admin HTTP server: /health and /live for Route 53's health checks; \
              also /, /status and /metrics while admin.operator_listen is empty. Route 53 \
              health checks must reach it; keep it closed to everyone else.",
    },
    Key {
        name: "admin.operator_listen",
        kind: Kind::OptionalSocketAddrs,
        default: Some(""),
        doc: "Addresses of the operator's listener: the status page at /, /status, /metrics, \
              /health and /live, for Prometheus and people on the operator's network. When set, \
              admin.listen serves only /health and /live, so the port Route 53 reaches shows \
              nothing else. Empty: admin.listen serves everything.",
    },
    Key {
        name: "admin.header_timeout",
        kind: Kind::Duration { max: "10m" },
        default: Some("5s"),
        doc: "A client must send a whole request header within this time, also between \
              requests on a kept-alive connection, or it is disconnected. \
              At most 10m: a request header is a few hundred bytes; waiting longer only holds an admin slot.",
    },
    Key {
        name: "admin.max_connections",
        kind: Kind::Count { min: 1, max: 10_000 },
        default: Some("64"),
        doc: "Admin connections held at once, on each admin listener (admin.listen and every \
              admin.operator_listen address). A new connection is always served: at the cap, \
              the one that has waited longest for a request, from the client holding the most, \
              is closed to make room. Route 53 uses about one per health-checker region.",
    },
    Key {
        name: "lifecycle.drain_delay",
        kind: Kind::DurationOrZero { max: "1d" },
        default: Some("120s"),
        doc: "After SIGTERM, or when handing the Elastic IP to a newer instance, /health \
              answers 503 but the proxy keeps accepting for this long, so Route 53 drops this \
              IP (3 failed checks at 10s, up to 40s with the checks' phase) and clients' cached \
              answers (TTL 60s) expire before the listener closes or the address moves: \
              40s + 60s, plus 20s for Route 53 to publish the change. \
              At most 1d: it only has to outlast Route 53's checks and the clients' DNS TTL.",
    },
    Key {
        name: "lifecycle.grace_period",
        kind: Kind::DurationOrZero { max: "7d" },
        default: Some("120s"),
        doc: "After the listeners close, open connections may finish for this long; those \
              still open then are closed (counted as shutdown). \
              At most 7d: long-lived connections may need hours to finish; a week is plenty.",
    },
    Key {
        name: "eip.enabled",
        kind: Kind::Bool,
        default: Some("false"),
        doc: "Claim this instance's Elastic IP at start (in the background: the proxy serves at \
              once) and check every eip.check_interval that it is still ours. Needs an EC2 \
              instance with IMDSv2 and the IAM policy in docs/iam-policy.json.",
    },
    Key {
        name: "eip.allocation_id",
        kind: Kind::OptionalAllocationId,
        default: Some(""),
        doc: "The Elastic IP allocation to hold, such as eipalloc-0123456789abcdef0. Empty: read \
              it from this instance's tag eip.tag_key (instance metadata tags, else \
              ec2:DescribeTags).",
    },
    Key {
        name: "eip.tag_key",
        kind: Kind::TagKey,
        default: Some("static-ingress:eip-allocation-id"),
        doc: "The instance tag whose value names the allocation, set by each instance's Auto \
              Scaling group with PropagateAtLaunch.",
    },
    Key {
        name: "eip.check_interval",
        kind: Kind::Duration { max: "1d" },
        default: Some("10s"),
        doc: "How often the running proxy checks that the Elastic IP is still associated with \
              this instance, and whether a newer instance asks for it (one DescribeAddresses \
              call; every second while a handoff waits for its turn). Losing it to a newer \
              fleet is logged and shown, not fought over. \
              At most 1d: a rarer check would leave a lost address unnoticed for more than a day.",
    },
    Key {
        name: "eip.handoff",
        kind: Kind::Bool,
        default: Some("true"),
        doc: "When a running older instance holds this instance's Elastic IP (the previous \
              fleet during a release), ask it to hand the address over (tags on the address) \
              instead of taking it: the holder drains first (lifecycle.drain_delay, then its \
              connections up to lifecycle.grace_period) and moves it here itself. A holder \
              that does not answer, or is not running, is taken from as before. See \
              docs/handoff.md.",
    },
    Key {
        name: "eip.handoffs_at_once",
        kind: Kind::Count { min: 1, max: 16 },
        default: Some("1"),
        doc: "How many addresses of the fleet's address set (the Elastic IPs tagged with the \
              same static-ingress:address-set) may be handing off at once: of N addresses, at \
              least N minus this many stay announced by Route 53 during a release.",
    },
    Key {
        name: "eip.handoff_announce_delay",
        kind: Kind::DurationOrZero { max: "1h" },
        default: Some("40s"),
        doc: "After an address is handed over to this instance, the next address of the set \
              waits this long before its handoff starts, so that Route 53 counts this one \
              healthy again first (3 checks at 10s, plus their phase). \
              At most 1h: Route 53 needs well under a minute; an hour only stalls a release.",
    },
    Key {
        name: "eip.deadline",
        kind: Kind::Duration { max: "1h" },
        default: Some("2m"),
        doc: "How long one claim may take in all: retries of throttled or failed calls (with \
              exponential backoff and jitter) and waiting for DescribeAddresses to show the new \
              association, which is eventually consistent. \
              At most 1h: an instance that cannot claim its address within an hour needs a person, not more retries.",
    },
    Key {
        name: "eip.imds_endpoint",
        kind: Kind::OptionalUrl,
        default: Some(""),
        doc: "Instance metadata service URL. Empty: http://169.254.169.254. Set it only for tests \
              or an IPv6-only instance (http://[fd00:ec2::254]).",
    },
    Key {
        name: "eip.ec2_endpoint",
        kind: Kind::OptionalUrl,
        default: Some(""),
        doc: "EC2 API URL. Empty: the region's public endpoint (or a VPC endpoint through private \
              DNS). Set it only for tests against an emulator.",
    },
    Key {
        name: "eip.autoscaling_endpoint",
        kind: Kind::OptionalUrl,
        default: Some(""),
        doc: "Auto Scaling API URL. Empty: the region's public endpoint (or a VPC endpoint \
              through private DNS). Set it only for tests against an emulator.",
    },
    Key {
        name: "eip.report_unhealthy_after",
        kind: Kind::DurationOrZero { max: "1d" },
        default: Some("5m"),
        doc: "When this instance cannot serve for a fault of its own for this long, it marks \
              itself Unhealthy in its Auto Scaling group (SetInstanceHealth), so the group \
              replaces it: its proxy port held by another process start after start (3 or more \
              failed starts in a row), or its admin server no longer answering its own /live. \
              Never for a backend outage, a bad config or a failing Elastic IP claim (the fleet \
              shares those), and guarded: not while another instance of the fleet is being \
              replaced, at most one report per fleet in 15 minutes, and not again within 2 hours \
              in a group whose previous instance reported (docs/handoff.md). 0: never. Needs \
              eip.enabled. Values under a minute are for tests. \
              At most 1d: an instance that cannot serve for a day should long have been replaced.",
    },
    Key {
        name: "log.format",
        kind: Kind::Choice(&["text", "json"]),
        default: Some("text"),
        doc: "Log line format on stdout: text for people, json for log pipelines.",
    },
    Key {
        name: "log.level",
        kind: Kind::LogFilter,
        default: Some("info"),
        doc: "A tracing filter: a level (error, warn, info, debug, trace) or directives such \
              as info,static_ingress::proxy=debug. It does not apply to the access log \
              (log.access).",
    },
    Key {
        name: "log.access",
        kind: Kind::Bool,
        default: Some("true"),
        doc: "The access log: one line per client connection as it closes (client address, \
              listener, route, backend address, bytes each way, duration, close reason), in \
              log.format, on stdout like the rest (target static_ingress::access). Applied by a \
              reload. Lines stdout cannot take in time are dropped and counted, never waited \
              for (docs/configuration.md#access-log).",
    },
];

/// The Rust type a key's value is read as: one per [`Value`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Duration,
    Count,
    Addr,
    Addrs,
    HostPort,
    Word,
    Bool,
}

impl Kind {
    /// Which [`Value`] variant `config::value::parse` makes of this kind.
    pub const fn class(self) -> Class {
        match self {
            Kind::Duration { .. } | Kind::DurationOrZero { .. } => Class::Duration,
            Kind::Count { .. } => Class::Count,
            Kind::SocketAddr => Class::Addr,
            Kind::SocketAddrs | Kind::OptionalSocketAddrs => Class::Addrs,
            Kind::HostPort => Class::HostPort,
            Kind::Choice(_) | Kind::LogFilter | Kind::OptionalAllocationId | Kind::TagKey | Kind::OptionalUrl => {
                Class::Word
            }
            Kind::Bool => Class::Bool,
        }
    }
}

/// A type a key's checked [`Value`] is read as.
pub trait FromValue: Sized {
    /// The class of kinds whose values this type reads.
    const CLASS: Class;
    /// `None` only for a value of another class, or a word no variant names: what
    /// [`Typed::new`] and the unit tests rule out.
    fn from_value(v: Value) -> Option<Self>;
}

macro_rules! from_value {
    ($($t:ty = $class:ident($v:ident) => $e:expr;)*) => {$(
        impl FromValue for $t {
            const CLASS: Class = Class::$class;
            fn from_value(v: Value) -> Option<Self> {
                match v {
                    Value::$class($v) => $e,
                    _ => None,
                }
            }
        }
    )*};
}

from_value! {
    Duration = Duration(d) => Some(d);
    usize = Count(n) => usize::try_from(n).ok();
    u32 = Count(n) => u32::try_from(n).ok();
    SocketAddr = Addr(a) => Some(a);
    Vec<SocketAddr> = Addrs(a) => Some(a);
    HostPort = HostPort(h) => Some(h);
    String = Word(w) => Some(w);
    bool = Bool(b) => Some(b);
}

/// The words of a [`Kind::Choice`] read as the enum they stand for.
macro_rules! choice {
    ($($t:ident { $($word:literal => $variant:ident),* $(,)? })*) => {$(
        impl FromValue for $t {
            const CLASS: Class = Class::Word;
            fn from_value(v: Value) -> Option<Self> {
                match v {
                    Value::Word(w) => match w.as_str() {
                        $($word => Some($t::$variant),)*
                        _ => None,
                    },
                    _ => None,
                }
            }
        }
    )*};
}

choice! {
    Fallback { "default" => Default, "refuse" => Refuse }
    ProxyProtocol { "off" => Off, "v2" => V2 }
    Family { "ipv4" => Ipv4, "ipv6" => Ipv6, "both" => Both }
    HealthPolicy { "all_backends_down" => AllBackendsDown, "any_backend_down" => AnyBackendDown }
    LogFormat { "text" => Text, "json" => Json }
    Splice { "auto" => Auto, "always" => Always, "off" => Off }
}

/// A key together with the type its value is read as. Only the constants below make one, and
/// [`Typed::new`] runs at compile time: a name [`KEYS`] does not list, or a type its kind does
/// not give (a duration read as a count, a backend's address as a word), does not compile.
#[derive(Debug)]
pub struct Typed<T> {
    pub name: &'static str,
    of: PhantomData<fn() -> T>,
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Typed<T> {}

impl<T: FromValue> Typed<T> {
    const fn new(name: &'static str) -> Typed<T> {
        let mut i = 0;
        while i < KEY_LIST.len() {
            if const_eq(KEY_LIST[i].name, name) {
                assert!(
                    KEY_LIST[i].kind.class() as u8 == T::CLASS as u8,
                    "a typed key whose type its kind in KEYS does not give"
                );
                return Typed { name, of: PhantomData };
            }
            i += 1;
        }
        panic!("a typed key that KEYS does not list");
    }
}

impl<T> Typed<T> {
    /// The key's entry in [`KEYS`].
    pub fn key(self) -> &'static Key {
        // Typed::new found the name there, and KEYS is fixed.
        find(self.name).expect("a typed key is listed in KEYS")
    }
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// One typed constant per key, named after it.
pub const PROXY_LISTEN: Typed<Vec<SocketAddr>> = Typed::new("proxy.listen");
pub const PROXY_CONNECT_TIMEOUT: Typed<Duration> = Typed::new("proxy.connect_timeout");
pub const PROXY_IDLE_TIMEOUT: Typed<Duration> = Typed::new("proxy.idle_timeout");
pub const PROXY_HALF_CLOSE_TIMEOUT: Typed<Duration> = Typed::new("proxy.half_close_timeout");
pub const PROXY_MAX_CONNECTIONS: Typed<usize> = Typed::new("proxy.max_connections");
pub const PROXY_WORKERS: Typed<usize> = Typed::new("proxy.workers");
pub const PROXY_TCP_KEEPALIVE: Typed<Duration> = Typed::new("proxy.tcp_keepalive");
pub const PROXY_SPLICE: Typed<Splice> = Typed::new("proxy.splice");
pub const PROXY_SNI_TIMEOUT: Typed<Duration> = Typed::new("proxy.sni_timeout");
pub const PROXY_SNI_MAX_BYTES: Typed<usize> = Typed::new("proxy.sni_max_bytes");
pub const PROXY_UNMATCHED: Typed<Fallback> = Typed::new("proxy.unmatched");
pub const PROXY_NON_TLS: Typed<Fallback> = Typed::new("proxy.non_tls");
pub const BACKEND_ADDRESS: Typed<HostPort> = Typed::new("backend.address");
pub const BACKEND_PROXY_PROTOCOL: Typed<ProxyProtocol> = Typed::new("backend.proxy_protocol");
pub const BACKEND_REMOVED_GRACE: Typed<Duration> = Typed::new("backend.removed_grace");
pub const DNS_NAMESERVERS: Typed<Vec<SocketAddr>> = Typed::new("dns.nameservers");
pub const DNS_REFRESH_INTERVAL: Typed<Duration> = Typed::new("dns.refresh_interval");
pub const DNS_MIN_TTL: Typed<Duration> = Typed::new("dns.min_ttl");
pub const DNS_HOLD: Typed<Duration> = Typed::new("dns.hold");
pub const DNS_TIMEOUT: Typed<Duration> = Typed::new("dns.timeout");
pub const DNS_FAMILY: Typed<Family> = Typed::new("dns.family");
pub const HEALTH_INTERVAL: Typed<Duration> = Typed::new("health.interval");
pub const HEALTH_TIMEOUT: Typed<Duration> = Typed::new("health.timeout");
pub const HEALTH_FALL: Typed<u32> = Typed::new("health.fall");
pub const HEALTH_RISE: Typed<u32> = Typed::new("health.rise");
pub const HEALTH_MIN_HEALTHY: Typed<usize> = Typed::new("health.min_healthy");
pub const HEALTH_UNHEALTHY_WHEN: Typed<HealthPolicy> = Typed::new("health.unhealthy_when");
pub const ADMIN_LISTEN: Typed<SocketAddr> = Typed::new("admin.listen");
pub const ADMIN_OPERATOR_LISTEN: Typed<Vec<SocketAddr>> = Typed::new("admin.operator_listen");
pub const ADMIN_HEADER_TIMEOUT: Typed<Duration> = Typed::new("admin.header_timeout");
pub const ADMIN_MAX_CONNECTIONS: Typed<usize> = Typed::new("admin.max_connections");
pub const LIFECYCLE_DRAIN_DELAY: Typed<Duration> = Typed::new("lifecycle.drain_delay");
pub const LIFECYCLE_GRACE_PERIOD: Typed<Duration> = Typed::new("lifecycle.grace_period");
pub const EIP_ENABLED: Typed<bool> = Typed::new("eip.enabled");
pub const EIP_ALLOCATION_ID: Typed<String> = Typed::new("eip.allocation_id");
pub const EIP_TAG_KEY: Typed<String> = Typed::new("eip.tag_key");
pub const EIP_CHECK_INTERVAL: Typed<Duration> = Typed::new("eip.check_interval");
pub const EIP_HANDOFF: Typed<bool> = Typed::new("eip.handoff");
pub const EIP_HANDOFFS_AT_ONCE: Typed<usize> = Typed::new("eip.handoffs_at_once");
pub const EIP_HANDOFF_ANNOUNCE_DELAY: Typed<Duration> = Typed::new("eip.handoff_announce_delay");
pub const EIP_DEADLINE: Typed<Duration> = Typed::new("eip.deadline");
pub const EIP_IMDS_ENDPOINT: Typed<String> = Typed::new("eip.imds_endpoint");
pub const EIP_EC2_ENDPOINT: Typed<String> = Typed::new("eip.ec2_endpoint");
pub const EIP_AUTOSCALING_ENDPOINT: Typed<String> = Typed::new("eip.autoscaling_endpoint");
pub const EIP_REPORT_UNHEALTHY_AFTER: Typed<Duration> = Typed::new("eip.report_unhealthy_after");
pub const LOG_FORMAT: Typed<LogFormat> = Typed::new("log.format");
pub const LOG_LEVEL: Typed<String> = Typed::new("log.level");
pub const LOG_ACCESS: Typed<bool> = Typed::new("log.access");

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word a choice key accepts reads as a variant of its enum (a word added to KEYS
    /// but not to the enum would be an internal error at load).
    #[test]
    fn every_choice_word_reads_as_its_enum() {
        fn words_of<T: FromValue>(typed: Typed<T>) -> usize {
            let Kind::Choice(words) = typed.key().kind else { panic!("{} is not a choice", typed.name) };
            for w in words {
                assert!(T::from_value(Value::Word((*w).to_string())).is_some(), "{}: {w}", typed.name);
            }
            assert!(T::from_value(Value::Word("nonsense".into())).is_none());
            words.len()
        }
        let n = words_of(PROXY_UNMATCHED)
            + words_of(PROXY_NON_TLS)
            + words_of(BACKEND_PROXY_PROTOCOL)
            + words_of(DNS_FAMILY)
            + words_of(HEALTH_UNHEALTHY_WHEN)
            + words_of(LOG_FORMAT)
            + words_of(PROXY_SPLICE);
        let all: usize = KEYS.iter().map(|k| if let Kind::Choice(words) = k.kind { words.len() } else { 0 }).sum();
        assert_eq!(n, all, "a choice key is read as a plain word: give it an enum");
    }
}
