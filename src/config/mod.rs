//! Configuration: file, flags and environment merged and checked once into [`Config`], the
//! type the rest of the program uses.
//!
//! Precedence, highest first: command-line flag, `STATIC_INGRESS_*` environment variable,
//! config file, built-in default (see [`keys::KEYS`]).

pub mod keys;
pub mod routes;
pub mod source;
pub mod value;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use routes::{RouteConfig, ServerName};
pub use source::{ConfigError, ConfigErrors, FileLayer, Origin, Override, drop_in_dir};
pub use value::HostPort;
use value::{Raw, Value};

/// The shortest `eip.check_interval` accepted (tests use a few hundred milliseconds).
const MIN_EIP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Where `run` looks for its config file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/static-ingress/static-ingress.toml";

/// The checked configuration. Every field is final: nothing here needs checking again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// Every backend, each with its DNS and health settings: the route `default`
    /// (`backend.address`, with the main table's settings) first when it is set, then the
    /// `[[route]]` tables in file order. Never empty.
    pub routes: Vec<RouteConfig>,
    pub dns: DnsConfig,
    pub health: HealthConfig,
    pub admin: AdminConfig,
    pub lifecycle: LifecycleConfig,
    pub eip: EipConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub half_close_timeout: Duration,
    pub max_connections: usize,
    /// Data-path threads; 0 for one per two CPUs (`proxy::workers`).
    pub workers: usize,
    pub tcp_keepalive: Duration,
    pub splice: Splice,
    pub sni_timeout: Duration,
    pub sni_max_bytes: usize,
    /// Where TLS connections that match no route go.
    pub unmatched: Fallback,
    /// Where connections that send no TLS ClientHello go.
    pub non_tls: Fallback,
}

/// When a connection's bytes go through kernel pipes (`proxy.splice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// Each direction once it has moved `proxy::splice::SPLICE_AFTER` bytes.
    Auto,
    /// From the first byte.
    Always,
    Off,
}

/// Where a connection that no route claims goes, with `[[route]]` tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// To the route `default` (`backend.address`).
    Default,
    /// Reset at once.
    Refuse,
}

/// When `/health` fails for lack of healthy backend addresses, with several backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthPolicy {
    AllBackendsDown,
    AnyBackendDown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: HostPort,
    pub removed_grace: Duration,
    pub proxy_protocol: ProxyProtocol,
}

/// What the proxy sends the backend before the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Nothing: the backend sees the client's bytes only.
    Off,
    /// A PROXY protocol v2 header with the client's address.
    V2,
}

/// Which address records the backend name is resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
    Both,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Empty: use the system's resolver configuration.
    pub nameservers: Vec<SocketAddr>,
    pub refresh_interval: Duration,
    pub min_ttl: Duration,
    pub hold: Duration,
    pub timeout: Duration,
    pub family: Family,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    pub min_healthy: usize,
    pub unhealthy_when: HealthPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The operator's listeners (everything the admin server serves); when any, `listen`
    /// serves only `/health` and `/live`.
    pub operator_listen: Vec<SocketAddr>,
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Whether listening on `a` and on `b` would take the same port: the same address, or one of
/// them a wildcard that covers the other (an IPv6 wildcard covers IPv4 too, as Linux binds it
/// by default). Port 0 (any free port) never clashes.
fn takes_port_of(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

impl AdminConfig {
    /// Where `/status` is served: the first operator's listener, else the admin port.
    pub fn status_listen(&self) -> SocketAddr {
        self.operator_listen.first().copied().unwrap_or(self.listen)
    }

    /// Where to look for `/status`, best first: the operator's listeners, then the admin port
    /// (a proxy started before the files gained or lost `operator_listen` still answers there).
    pub fn status_candidates(&self) -> Vec<SocketAddr> {
        let mut out = self.operator_listen.clone();
        if !out.contains(&self.listen) {
            out.push(self.listen);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleConfig {
    pub drain_delay: Duration,
    pub grace_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EipConfig {
    pub enabled: bool,
    /// `None`: read it from the instance tag `tag_key`.
    pub allocation_id: Option<String>,
    pub tag_key: String,
    pub check_interval: Duration,
    pub deadline: Duration,
    /// `None`: the real instance metadata service.
    pub imds_endpoint: Option<String>,
    /// `None`: the region's EC2 endpoint.
    pub ec2_endpoint: Option<String>,
    /// Ask a running older holder to hand the address over instead of taking it.
    pub handoff: bool,
    /// How many addresses of the address set may be in handoff at once.
    pub handoffs_at_once: usize,
    /// How long a handed-over address keeps its turn, for Route 53 to announce it again.
    pub handoff_announce_delay: Duration,
    /// `None`: the region's Auto Scaling endpoint.
    pub autoscaling_endpoint: Option<String>,
    /// How long an own failure lasts before the instance reports itself unhealthy; zero: never.
    pub report_unhealthy_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A checked tracing filter directive.
    pub filter: String,
    /// One line per connection (`log.access`).
    pub access: bool,
}

/// One key's effective value and where it came from, for `check-config`.
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: &'static keys::Key,
    pub value: Value,
    pub origin: Origin,
}

/// The result of a load: the config and how each key got its value.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub settings: Vec<Setting>,
    /// The drop-ins read after the main file, in order.
    pub drop_ins: Vec<std::path::PathBuf>,
    /// Keys the files set to another value than a flag or the environment gives them, which
    /// win: one line each, naming both places (a reload re-reads the files only).
    pub shadowed: Vec<String>,
}

impl Loaded {
    /// The effective configuration as TOML, each key commented with where its value came
    /// from. Feeding it back as a config file gives the same configuration.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for s in &self.settings {
            if s.key.section() != section {
                section = s.key.section();
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&format!("[{section}]\n"));
            }
            let line = format!("{} = {}", s.key.field(), s.value);
            out.push_str(&format!("{line:<44} # {}\n", s.origin));
        }
        for route in self.config.routes.iter().filter(|r| r.name != routes::DEFAULT) {
            out.push('\n');
            out.push_str(&routes::render(route));
        }
        out
    }
}

impl Config {
    /// Merges the file (if any) with overrides and defaults, and checks every key. All errors
    /// are returned, not just the first.
    /// The file is read with its drop-ins ([`FileLayer::read_with_drop_ins`]); it must exist.
    pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<Loaded, ConfigErrors> {
        Self::load_from(file.map(|p| (p, false)), overrides)
    }

    /// Like [`Config::load`], for a file that may be missing when its flag is true (the
    /// default path: its drop-ins are still read).
    pub fn load_from(file: Option<(&Path, bool)>, overrides: &[Override]) -> Result<Loaded, ConfigErrors> {
        let file = match file {
            Some((path, optional)) => FileLayer::read_with_drop_ins(path, optional)?,
            None => None,
        };
        Self::from_layers(file.as_ref(), overrides)
    }

    /// A config from overrides alone, for tests and embedders: `[("backend.address", "...")]`.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Config, ConfigErrors> {
        let overrides = pairs
            .into_iter()
            .map(|(k, v)| Override::flag(k, v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigErrors(vec![e]))?;
        Self::from_layers(None, &overrides).map(|l| l.config)
    }

    pub fn from_layers(file: Option<&FileLayer>, overrides: &[Override]) -> Result<Loaded, ConfigErrors> {
        let mut r = Resolver { file, overrides, errors: Vec::new(), settings: Vec::new(), shadowed: Vec::new() };

        // Read every key before building, so that all errors are collected.
        let listen = r.get(keys::PROXY_LISTEN);
        let connect_timeout = r.get(keys::PROXY_CONNECT_TIMEOUT);
        let idle_timeout = r.get(keys::PROXY_IDLE_TIMEOUT);
        let half_close_timeout = r.get(keys::PROXY_HALF_CLOSE_TIMEOUT);
        let max_connections = r.get(keys::PROXY_MAX_CONNECTIONS);
        let workers = r.get(keys::PROXY_WORKERS);
        let tcp_keepalive = r.get(keys::PROXY_TCP_KEEPALIVE);
        let splice = r.get(keys::PROXY_SPLICE);
        let sni_timeout = r.get(keys::PROXY_SNI_TIMEOUT);
        let sni_max_bytes = r.get(keys::PROXY_SNI_MAX_BYTES);
        let unmatched = r.get(keys::PROXY_UNMATCHED);
        let non_tls = r.get(keys::PROXY_NON_TLS);
        let has_routes = file.is_some_and(|f| !f.routes.is_empty());
        // With routes, backend.address may be left out (checked below with proxy.unmatched).
        let backend_address = if has_routes && !r.is_set("backend.address") {
            Some(None)
        } else {
            r.get(keys::BACKEND_ADDRESS).map(Some)
        };
        let removed_grace = r.get(keys::BACKEND_REMOVED_GRACE);
        let proxy_protocol = r.get(keys::BACKEND_PROXY_PROTOCOL);
        let nameservers = r.get(keys::DNS_NAMESERVERS);
        let refresh_interval = r.get(keys::DNS_REFRESH_INTERVAL);
        let min_ttl = r.get(keys::DNS_MIN_TTL);
        let hold = r.get(keys::DNS_HOLD);
        let dns_timeout = r.get(keys::DNS_TIMEOUT);
        let family = r.get(keys::DNS_FAMILY);
        let health_interval = r.get(keys::HEALTH_INTERVAL);
        let health_timeout = r.get(keys::HEALTH_TIMEOUT);
        let fall = r.get(keys::HEALTH_FALL);
        let rise = r.get(keys::HEALTH_RISE);
        let min_healthy = r.get(keys::HEALTH_MIN_HEALTHY);
        let unhealthy_when = r.get(keys::HEALTH_UNHEALTHY_WHEN);
        let admin_listen = r.get(keys::ADMIN_LISTEN);
        let operator_listen = r.get(keys::ADMIN_OPERATOR_LISTEN);
        let admin_header_timeout = r.get(keys::ADMIN_HEADER_TIMEOUT);
        let admin_max_connections = r.get(keys::ADMIN_MAX_CONNECTIONS);
        let drain_delay = r.get(keys::LIFECYCLE_DRAIN_DELAY);
        let grace_period = r.get(keys::LIFECYCLE_GRACE_PERIOD);
        let eip = r.eip();
        let log = r.log();

        let config = (|| {
            Some(Config {
                proxy: ProxyConfig {
                    listen: listen?,
                    connect_timeout: connect_timeout?,
                    idle_timeout: idle_timeout?,
                    half_close_timeout: half_close_timeout?,
                    max_connections: max_connections?,
                    workers: workers?,
                    tcp_keepalive: tcp_keepalive?,
                    splice: splice?,
                    sni_timeout: sni_timeout?,
                    sni_max_bytes: sni_max_bytes?,
                    unmatched: unmatched?,
                    non_tls: non_tls?,
                },
                routes: Vec::new(),
                dns: DnsConfig {
                    nameservers: nameservers?,
                    refresh_interval: refresh_interval?,
                    min_ttl: min_ttl?,
                    hold: hold?,
                    timeout: dns_timeout?,
                    family: family?,
                },
                health: HealthConfig {
                    interval: health_interval?,
                    timeout: health_timeout?,
                    fall: fall?,
                    rise: rise?,
                    min_healthy: min_healthy?,
                    unhealthy_when: unhealthy_when?,
                },
                admin: AdminConfig {
                    listen: admin_listen?,
                    operator_listen: operator_listen?,
                    header_timeout: admin_header_timeout?,
                    max_connections: admin_max_connections?,
                },
                lifecycle: LifecycleConfig { drain_delay: drain_delay?, grace_period: grace_period? },
                eip: eip?,
                log: log?,
            })
        })();

        let mut config = config;
        if let (Some(c), Some(Some(address)), Some(grace), Some(pp)) =
            (config.as_mut(), backend_address.clone(), removed_grace, proxy_protocol)
        {
            c.routes.push(RouteConfig {
                name: routes::DEFAULT.to_string(),
                listen: Vec::new(),
                server_names: Vec::new(),
                backend: BackendConfig { address, removed_grace: grace, proxy_protocol: pp },
                dns: c.dns.clone(),
                health: c.health.clone(),
            });
        }
        if let (Some(c), Some(file)) = (config.as_mut(), file) {
            let base = routes::Base {
                proxy_protocol: proxy_protocol.unwrap_or(ProxyProtocol::Off),
                removed_grace: removed_grace.unwrap_or_default(),
                dns: &c.dns,
                health: &c.health,
                listen: &c.proxy.listen,
            };
            let built = routes::build(&file.routes, &base, &mut r.errors);
            c.routes.extend(built);
        }
        if let Some(config) = &config {
            r.cross_checks(config);
            r.dns_checks(config);
            r.route_checks(config, has_routes);
        }
        match config {
            Some(config) if r.errors.is_empty() => {
                // Keep check-config's output in the order of the key table.
                r.settings.sort_by_key(|s| keys::KEYS.iter().position(|k| k.name == s.key.name));
                let drop_ins = file.map(|f| f.drop_ins.clone()).unwrap_or_default();
                Ok(Loaded { config, settings: r.settings, drop_ins, shadowed: r.shadowed })
            }
            _ => Err(ConfigErrors(r.errors)),
        }
    }

    /// Only the `[eip]` and `[log]` sections, for `claim-eip`, which needs no backend. The
    /// file is still parsed whole, so unknown keys anywhere are refused as for `run`.
    pub fn load_eip(
        file: Option<(&Path, bool)>,
        overrides: &[Override],
    ) -> Result<(EipConfig, LogConfig), ConfigErrors> {
        let file = match file {
            Some((path, optional)) => FileLayer::read_with_drop_ins(path, optional)?,
            None => None,
        };
        let mut r =
            Resolver { file: file.as_ref(), overrides, errors: Vec::new(), settings: Vec::new(), shadowed: Vec::new() };
        let (eip, log) = (r.eip(), r.log());
        match (eip, log) {
            (Some(eip), Some(log)) if r.errors.is_empty() => Ok((eip, log)),
            _ => Err(ConfigErrors(r.errors)),
        }
    }
}

struct Resolver<'a> {
    file: Option<&'a FileLayer>,
    overrides: &'a [Override],
    errors: Vec<ConfigError>,
    settings: Vec<Setting>,
    shadowed: Vec<String>,
}

impl Resolver<'_> {
    /// Whether a flag, the environment or the file sets `name`.
    fn is_set(&self, name: &str) -> bool {
        self.overrides.iter().any(|o| o.key.name == name) || self.file.is_some_and(|f| f.entries.contains_key(name))
    }

    /// The checked value of `name`, from the highest-precedence place that sets it; `None`
    /// (with the error recorded) when that value is invalid or a required key is missing.
    fn get<T: keys::FromValue>(&mut self, typed: keys::Typed<T>) -> Option<T> {
        let (key, name) = (typed.key(), typed.name);
        let in_file = self.file.and_then(|f| f.entries.get(name));
        let (raw, origin) = if let Some(o) = self.overrides.iter().rev().find(|o| o.key.name == name) {
            if let Some(entry) = in_file {
                let (ours, theirs) =
                    (value::parse(key.kind, Raw::Text(&o.value)), value::parse(key.kind, Raw::Toml(&entry.value)));
                if let (Ok(ours), Ok(theirs)) = (ours, theirs)
                    && ours != theirs
                {
                    self.shadowed.push(format!(
                        "{name}: {} sets {theirs}, but {} sets {ours}, which wins over the files",
                        entry.origin(),
                        o.origin
                    ));
                }
            }
            (Raw::Text(&o.value), o.origin.clone())
        } else if let Some(entry) = in_file {
            (Raw::Toml(&entry.value), entry.origin())
        } else if let Some(default) = key.default {
            (Raw::Text(default), Origin::Default)
        } else {
            let where_ = match self.file {
                Some(f) => format!("in {}", f.path.display()),
                None => "in the config file".to_string(),
            };
            self.errors.push(ConfigError {
                origin: self.file.map_or(Origin::Default, |f| Origin::File { path: f.path.clone(), line: None }),
                key: Some(name.to_string()),
                message: format!("is required: set it {where_}, with --{}, or with {}", key.flag(), key.env()),
            });
            return None;
        };
        match value::parse(key.kind, raw) {
            Ok(v) => {
                // Typed::new checked the class at compile time; a choice's words are checked
                // against its enum by a unit test.
                let Some(t) = T::from_value(v.clone()) else {
                    self.errors.push(internal(name, "is read as a different kind than KEYS declares"));
                    return None;
                };
                self.settings.push(Setting { key, value: v, origin });
                Some(t)
            }
            Err(message) => {
                self.errors.push(ConfigError { origin, key: Some(name.to_string()), message });
                None
            }
        }
    }

    fn eip(&mut self) -> Option<EipConfig> {
        let enabled = self.get(keys::EIP_ENABLED);
        let allocation_id = self.get(keys::EIP_ALLOCATION_ID);
        let tag_key = self.get(keys::EIP_TAG_KEY);
        let check_interval = self.get(keys::EIP_CHECK_INTERVAL);
        let deadline = self.get(keys::EIP_DEADLINE);
        let imds_endpoint = self.get(keys::EIP_IMDS_ENDPOINT);
        let ec2_endpoint = self.get(keys::EIP_EC2_ENDPOINT);
        let handoff = self.get(keys::EIP_HANDOFF);
        let handoffs_at_once = self.get(keys::EIP_HANDOFFS_AT_ONCE);
        let handoff_announce_delay = self.get(keys::EIP_HANDOFF_ANNOUNCE_DELAY);
        let autoscaling_endpoint = self.get(keys::EIP_AUTOSCALING_ENDPOINT);
        let report_unhealthy_after = self.get(keys::EIP_REPORT_UNHEALTHY_AFTER);
        let non_empty = |s: String| Some(s).filter(|s| !s.is_empty());
        if let Some(interval) = check_interval
            && interval < MIN_EIP_CHECK_INTERVAL
        {
            self.reject(
                "eip.check_interval",
                format!(
                    "{} is too short: checks would hammer EC2; use at least {}",
                    humantime::format_duration(interval),
                    humantime::format_duration(MIN_EIP_CHECK_INTERVAL)
                ),
            );
            return None;
        }
        Some(EipConfig {
            enabled: enabled?,
            allocation_id: non_empty(allocation_id?),
            tag_key: tag_key?,
            check_interval: check_interval?,
            deadline: deadline?,
            imds_endpoint: non_empty(imds_endpoint?),
            ec2_endpoint: non_empty(ec2_endpoint?),
            handoff: handoff?,
            handoffs_at_once: handoffs_at_once?,
            handoff_announce_delay: handoff_announce_delay?,
            autoscaling_endpoint: non_empty(autoscaling_endpoint?),
            report_unhealthy_after: report_unhealthy_after?,
        })
    }

    fn log(&mut self) -> Option<LogConfig> {
        let format = self.get(keys::LOG_FORMAT);
        let filter = self.get(keys::LOG_LEVEL);
        let access = self.get(keys::LOG_ACCESS);
        Some(LogConfig { format: format?, filter: filter?, access: access? })
    }

    /// Rules that involve more than one key.
    fn cross_checks(&mut self, c: &Config) {
        if c.admin.listen.port() != 0 && c.proxy.listen.contains(&c.admin.listen) {
            self.reject(
                "admin.listen",
                format!("{} is also in proxy.listen; the admin server needs its own port", c.admin.listen),
            );
        }
        // (A list naming one address twice is refused where it is parsed.)
        for &addr in &c.admin.operator_listen {
            let clash = if let Some(&p) = c.proxy.listen.iter().find(|&&p| takes_port_of(addr, p)) {
                Some(format!("{addr} takes the port of proxy.listen {p}; the operator's listener needs its own port"))
            } else if takes_port_of(addr, c.admin.listen) {
                Some(format!(
                    "{addr} takes the port of admin.listen {}; the operator's listener needs its own port",
                    c.admin.listen
                ))
            } else {
                None
            };
            if let Some(why) = clash {
                self.reject("admin.operator_listen", why);
            }
        }
    }

    /// With routes: what the fallbacks need.
    fn route_checks(&mut self, c: &Config, has_routes: bool) {
        let has_default = c.routes.first().is_some_and(|r| r.name == routes::DEFAULT);
        if !has_routes || has_default {
            return;
        }
        for &listener in &c.proxy.listen {
            if !c.routes.iter().any(|r| r.on(listener)) {
                self.reject(
                    "proxy.listen",
                    format!(
                        "{listener} has no route, and backend.address is not set: every connection there would be \
                         refused; put a route on it, set backend.address, or drop the listener"
                    ),
                );
            }
        }
        for (key, value) in [("proxy.unmatched", c.proxy.unmatched), ("proxy.non_tls", c.proxy.non_tls)] {
            if value == Fallback::Default {
                self.reject(
                    key,
                    "is default, which sends connections no route takes to backend.address, and that is not set: \
                     set backend.address, or set this to refuse"
                        .into(),
                );
            }
        }
    }

    fn dns_checks(&mut self, c: &Config) {
        if c.dns.min_ttl > c.dns.refresh_interval {
            self.reject(
                "dns.min_ttl",
                format!(
                    "{} is longer than dns.refresh_interval ({}); the floor must not exceed the interval",
                    humantime::format_duration(c.dns.min_ttl),
                    humantime::format_duration(c.dns.refresh_interval)
                ),
            );
        }
    }

    /// Records that `key`'s value breaks a rule, where that value came from.
    fn reject(&mut self, key: &'static str, message: String) {
        let origin = self.origin_of(key);
        self.errors.push(ConfigError { origin, key: Some(key.into()), message });
    }

    fn origin_of(&self, name: &str) -> Origin {
        self.settings.iter().find(|s| s.key.name == name).map_or(Origin::Default, |s| s.origin.clone())
    }
}

fn internal(name: &str, what: &str) -> ConfigError {
    ConfigError { origin: Origin::Default, key: Some(name.to_string()), message: format!("internal error: {what}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_parses_and_only_the_backend_is_required() {
        let config = Config::from_pairs([("backend.address", "127.0.0.1:8080")]).unwrap();
        assert_eq!(config.proxy.listen, vec!["0.0.0.0:443".parse::<SocketAddr>().unwrap()]);
        assert!(config.proxy.idle_timeout >= Duration::from_secs(350));
        assert_eq!(config.admin.listen, "0.0.0.0:9001".parse::<SocketAddr>().unwrap());
        for key in keys::KEYS {
            if let Some(d) = key.default {
                assert!(value::parse(key.kind, Raw::Text(d)).is_ok(), "default of {} does not parse", key.name);
            }
        }
    }

    #[test]
    fn every_duration_has_a_documented_bound_above_its_default() {
        // 30 days is far below where `Instant + Duration` overflows (Instant counts i64
        // seconds since boot), also for the sum of a few such values.
        let longest = Duration::from_secs(30 * 86_400);
        let mut bounded = 0;
        for key in keys::KEYS {
            let Some(max) = key.kind.max_duration() else { continue };
            bounded += 1;
            let limit = value::duration(max).unwrap_or_else(|e| panic!("{}: bound {max}: {e}", key.name));
            assert!(limit <= longest, "{}: bound {max} is past 30d", key.name);
            if let Some(default) = key.default {
                assert!(value::duration(default).unwrap() <= limit, "{}: default above {max}", key.name);
            }
            assert!(key.doc.contains(&format!("At most {max}: ")), "{} does not say why it stops at {max}", key.name);
        }
        assert!(bounded > 0);
    }

    #[test]
    fn missing_backend_is_one_clear_error() {
        let err = Config::from_pairs([]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "default: backend.address: is required: set it in the config file, with --backend-address, or with STATIC_INGRESS_BACKEND_ADDRESS"
        );
    }

    #[test]
    fn overrides_beat_the_file() {
        let file = FileLayer::parse(
            Path::new("f.toml"),
            "[backend]\naddress = \"a.example:1\"\n[proxy]\nmax_connections = 5\n",
        )
        .unwrap();
        let o = vec![Override::flag("proxy.max_connections", "7").unwrap()];
        let loaded = Config::from_layers(Some(&file), &o).unwrap();
        assert_eq!(loaded.config.proxy.max_connections, 7);
        assert_eq!(loaded.config.routes[0].backend.address.host, "a.example");
        let rendered = loaded.render();
        assert!(rendered.contains("max_connections = 7"), "{rendered}");
        assert!(rendered.contains("# flag --proxy-max-connections"), "{rendered}");
        assert!(rendered.contains("# f.toml:2"), "{rendered}");
    }

    #[test]
    fn rendered_config_loads_back_to_the_same_config() {
        let loaded = Config::from_layers(None, &[Override::flag("backend.address", "b.example:443").unwrap()]).unwrap();
        let again = FileLayer::parse(Path::new("r.toml"), &loaded.render()).unwrap();
        assert_eq!(Config::from_layers(Some(&again), &[]).unwrap().config, loaded.config);
    }

    fn routes_errors(text: &str) -> Vec<String> {
        let file = FileLayer::parse(Path::new("r.toml"), text).map_err(|e| e.to_string());
        match file {
            Err(e) => vec![e],
            Ok(file) => Config::from_layers(Some(&file), &[])
                .map(|_| Vec::new())
                .unwrap_or_else(|e| e.0.iter().map(ToString::to_string).collect()),
        }
    }

    const TWO_ROUTES: &str = "[proxy]\nlisten = [\"127.0.0.1:8443\"]\n[backend]\naddress = \"main.example:443\"\n\
        [[route]]\nname = \"api\"\nserver_names = [\"api.example.com\"]\nbackend = \"api.example:443\"\n\
        health.interval = \"2s\"\n\
        [[route]]\nname = \"up\"\nserver_names = [\"*.up.example.com\"]\nbackend = \"10.0.0.1:443\"\n\
        listen = [\"127.0.0.1:8443\"]\nproxy_protocol = \"v2\"\n";

    #[test]
    fn routes_are_read_with_their_overrides_and_render_back() {
        let file = FileLayer::parse(Path::new("r.toml"), TWO_ROUTES).unwrap();
        let loaded = Config::from_layers(Some(&file), &[]).unwrap();
        let routes = &loaded.config.routes;
        assert_eq!(routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["default", "api", "up"]);
        assert_eq!(routes[1].health.interval, Duration::from_secs(2));
        assert_eq!(routes[0].health.interval, loaded.config.health.interval, "the default keeps the main table's");
        assert_eq!(routes[2].server_names, vec![ServerName::Wildcard(".up.example.com".into())]);
        assert_eq!(routes[2].backend.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(routes[1].backend.proxy_protocol, ProxyProtocol::Off);
        let again = FileLayer::parse(Path::new("r.toml"), &loaded.render()).unwrap();
        assert_eq!(Config::from_layers(Some(&again), &[]).unwrap().config, loaded.config);
    }

    #[test]
    fn bad_routes_are_each_named_with_their_line() {
        let route = |body: &str| format!("[backend]\naddress = \"m:1\"\n[[route]]\n{body}");
        let cases = [
            (
                route("name = \"api\"\nserver_names = [\"a.example\"]\nbackned = \"x:1\"\n"),
                vec![
                    "r.toml:6: [[route]] api: unknown key backned (did you mean backend?)",
                    "r.toml:3: [[route]] api.backend: is required",
                ],
            ),
            (
                route("name = \"default\"\nserver_names = [\"a.example\"]\nbackend = \"x:1\"\n"),
                vec!["r.toml:4: [[route]] #1.name: \"default\" is the route backend.address makes"],
            ),
            (
                route("name = \"Api\"\nserver_names = [\"a.example\"]\nbackend = \"x:1\"\n"),
                vec!["r.toml:4: [[route]] #1.name: \"Api\" is not a route name"],
            ),
            (
                route("name = \"a\"\nserver_names = [\"bad name\"]\nbackend = \"x:1\"\n"),
                vec!["r.toml:5: [[route]] a.server_names: \"bad name\" is not a server name"],
            ),
            (
                route("name = \"a\"\nserver_names = []\nbackend = \"x:1\"\n"),
                vec!["r.toml:5: [[route]] a.server_names: must be a non-empty list"],
            ),
            (
                route("name = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\nlisten = [\"10.9.9.9:443\"]\n"),
                vec!["r.toml:7: [[route]] a.listen: 10.9.9.9:443 is not in proxy.listen"],
            ),
            (
                route("name = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\nhealth.fall = 0\n"),
                vec!["r.toml:7: [[route]] a.health.fall: must be a whole number from 1"],
            ),
            (
                route(
                    "name = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\n[[route]]\nname = \"b\"\nserver_names = [\"X.example\"]\nbackend = \"y:1\"\n",
                ),
                vec!["r.toml:9: [[route]] b.server_names: x.example is already a server name of route \"a\""],
            ),
            ("[route]\nname = \"a\"\n".to_string(), vec!["r.toml:1: routes are a list: write each as [[route]]"]),
            (
                "[[proxy]]\nlisten = \"1.2.3.4:1\"\n".to_string(),
                vec!["r.toml:1: [[proxy]] is not a list the config takes (only [[route]] is): write [proxy]"],
            ),
            (
                "[[route]]\nname = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\n".to_string(),
                vec![
                    "default: proxy.unmatched: is default, which sends connections no route takes to backend.address, and that is not set",
                    "default: proxy.non_tls: is default",
                ],
            ),
        ];
        for (text, want) in cases {
            let got = routes_errors(&text);
            assert_eq!(got.len(), want.len(), "{text}\n{got:#?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.starts_with(w), "{text}\ngot:  {g}\nwant: {w}...");
            }
        }
        // A listener no route is on, without backend.address: refused up front.
        let stranded = "[proxy]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nunmatched = \"refuse\"\nnon_tls = \"refuse\"\n\
            [[route]]\nname = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\nlisten = [\"127.0.0.1:1\"]\n";
        let got = routes_errors(stranded);
        assert!(got.len() == 1 && got[0].contains("127.0.0.1:2 has no route"), "{got:?}");
        assert!(
            routes_errors(&route("name = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\nlisten = []\n"))[0]
                .contains("a.listen: must list at least one address")
        );
        // With both refusals, no backend.address is needed.
        let ok = "[proxy]\nunmatched = \"refuse\"\nnon_tls = \"refuse\"\n[[route]]\nname = \"a\"\nserver_names = [\"x.example\"]\nbackend = \"x:1\"\n";
        assert_eq!(routes_errors(ok), Vec::<String>::new());
        // Without routes it is still required.
        assert!(routes_errors("[proxy]\nunmatched = \"refuse\"\n")[0].contains("backend.address: is required"));
    }

    #[test]
    fn the_operators_listener_needs_a_port_of_its_own() {
        let with = |operator: &str| {
            Config::from_pairs([
                ("backend.address", "b:1"),
                ("proxy.listen", "127.0.0.1:443"),
                ("admin.listen", "0.0.0.0:9001"),
                ("admin.operator_listen", operator),
            ])
        };
        // The same port on an address the other does not cover is fine: 0.0.0.0 is IPv4 only.
        assert!(with("[::1]:9001").is_ok());
        let c = with("10.0.0.5:9002,127.0.0.1:9002").unwrap();
        assert_eq!(c.admin.operator_listen.len(), 2);
        assert_eq!(c.admin.status_listen(), "10.0.0.5:9002".parse::<SocketAddr>().unwrap());
        let none = with("").unwrap();
        assert!(none.admin.operator_listen.is_empty());
        assert_eq!(none.admin.status_listen(), "0.0.0.0:9001".parse::<SocketAddr>().unwrap());
        for (value, why) in [
            (
                "127.0.0.1:443",
                "127.0.0.1:443 takes the port of proxy.listen 127.0.0.1:443; the operator's listener needs its own port",
            ),
            (
                "0.0.0.0:443",
                "0.0.0.0:443 takes the port of proxy.listen 127.0.0.1:443; the operator's listener needs its own port",
            ),
            (
                "0.0.0.0:9001",
                "0.0.0.0:9001 takes the port of admin.listen 0.0.0.0:9001; the operator's listener needs its own port",
            ),
            (
                "127.0.0.1:9001",
                "127.0.0.1:9001 takes the port of admin.listen 0.0.0.0:9001; the operator's listener needs its own port",
            ),
            (
                "[::]:9001",
                "[::]:9001 takes the port of admin.listen 0.0.0.0:9001; the operator's listener needs its own port",
            ),
            ("127.0.0.1:9002,127.0.0.1:9002", "lists 127.0.0.1:9002 twice"),
        ] {
            let err = with(value).unwrap_err().to_string();
            assert!(err.ends_with(&format!("admin.operator_listen: {why}")), "{value}: {err}");
        }
    }

    #[test]
    fn admin_port_must_differ_from_proxy_port() {
        let err = Config::from_pairs([
            ("backend.address", "b:1"),
            ("proxy.listen", "127.0.0.1:9001"),
            ("admin.listen", "127.0.0.1:9001"),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "flag --admin-listen: admin.listen: 127.0.0.1:9001 is also in proxy.listen; the admin server needs its own port"
        );
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    fn repo_file(rel: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn example_config_sets_every_key_to_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/static-ingress.example.toml");
        let file = FileLayer::read(&path).expect("the example parses");
        let loaded = Config::from_layers(Some(&file), &[]).expect("the example is valid");
        for key in keys::KEYS {
            let setting = loaded.settings.iter().find(|s| s.key.name == key.name).expect("every key is set");
            assert!(matches!(setting.origin, Origin::File { .. }), "{} is missing from the example", key.name);
            if let Some(default) = key.default {
                let want = value::parse(key.kind, Raw::Text(default)).expect("default parses");
                assert_eq!(setting.value, want, "{} in the example is not its default", key.name);
            }
        }
    }

    #[test]
    fn reference_documents_every_key_with_its_default() {
        let doc = repo_file("docs/configuration.md");
        for key in keys::KEYS {
            let default = match key.default {
                None => "required".to_string(),
                Some("") => "`\"\"`".to_string(),
                Some(d) => format!("`{d}`"),
            };
            // The whole row, meaning included, so a duration's bound and its reason are there too.
            let row = format!("| `{}` | {default} | `--{}` | `{}` | {} |", key.name, key.flag(), key.env(), key.doc);
            assert!(doc.contains(&row), "docs/configuration.md lacks the row:\n{row}");
        }
    }
}
