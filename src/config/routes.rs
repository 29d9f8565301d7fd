//! Routes: several backends on one fleet, picked by the server name a TLS client asks for
//! (SNI). They live in the config file only, as `[[route]]` tables:
//!
//! ```toml
//! [[route]]
//! name = "uploads"                      # the metric label and log name
//! server_names = ["uploads.example.com", "*.uploads.example.com"]
//! backend = "uploads-elb-123.eu-west-1.elb.amazonaws.com:443"
//! # optional: listen (a subset of proxy.listen), proxy_protocol, removed_grace, and the
//! # dns.* and health.* keys (not dns.nameservers), written as here:
//! health.interval = "2s"
//! ```
//!
//! `backend.address`, when set, is the route named `default`: connections whose server name
//! matches no route (and, with `proxy.non_tls = "default"`, those that send no TLS
//! ClientHello) go there. Without `[[route]]` tables it is the only backend and nothing is
//! read before forwarding, as before routes existed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use super::keys::{self, Kind};
use super::source::{ConfigError, FileEntry, Origin, RouteTable};
use super::value::{self, Raw, Value, cut};
use super::{BackendConfig, DnsConfig, Family, HealthConfig, HostPort, ProxyProtocol};

/// The name of the route `backend.address` makes.
pub const DEFAULT: &str = "default";

/// The keys of the main table a route may set for itself, under the same names
/// (`backend.removed_grace` as `removed_grace`: `backend` is the route's address).
pub const OVERRIDES: &[&str] = &[
    "removed_grace",
    "dns.refresh_interval",
    "dns.min_ttl",
    "dns.hold",
    "dns.timeout",
    "dns.family",
    "health.interval",
    "health.timeout",
    "health.fall",
    "health.rise",
    "health.min_healthy",
];

/// The keys a `[[route]]` table has besides [`OVERRIDES`].
pub const FIELDS: &[&str] = &["name", "server_names", "backend", "listen", "proxy_protocol"];

/// A server name a route matches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerName {
    /// Exactly this name (lowercase).
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (one label or more before it), not
    /// `example.com` itself. Stored as the suffix with its dot.
    Wildcard(String),
}

impl ServerName {
    pub fn parse(s: &str) -> Result<ServerName, String> {
        let (wild, host) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let Some(name) = crate::proxy::sni::valid_name(host.as_bytes()) else {
            return Err(format!(
                "\"{}\" is not a server name: a DNS name such as \"api.example.com\", or \"*.example.com\" for its subdomains",
                cut(s)
            ));
        };
        Ok(if wild { ServerName::Wildcard(format!(".{name}")) } else { ServerName::Exact(name) })
    }

    /// Whether `name` (lowercase, as the SNI reader gives it) is matched.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            ServerName::Exact(n) => n == name,
            ServerName::Wildcard(suffix) => name.len() > suffix.len() && name.ends_with(suffix.as_str()),
        }
    }
}

impl std::fmt::Display for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerName::Exact(n) => f.write_str(n),
            ServerName::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// One backend and how connections reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// `default` for `backend.address`, else the `[[route]]`'s name.
    pub name: String,
    /// The proxy listeners it is on; empty: all of them.
    pub listen: Vec<SocketAddr>,
    /// Empty for the default route.
    pub server_names: Vec<ServerName>,
    pub backend: BackendConfig,
    pub dns: DnsConfig,
    pub health: HealthConfig,
}

impl RouteConfig {
    pub fn address(&self) -> &HostPort {
        &self.backend.address
    }

    /// Whether connections accepted on `listener` may use this route.
    pub fn on(&self, listener: SocketAddr) -> bool {
        self.listen.is_empty() || self.listen.contains(&listener)
    }
}

/// A route as a `[[route]]` table, every setting written out, for `check-config`.
pub fn render(r: &RouteConfig) -> String {
    let quoted = |items: Vec<String>| items.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ");
    let d = |d: std::time::Duration| format!("\"{}\"", humantime::format_duration(d));
    let mut out = String::from("[[route]]\n");
    out.push_str(&format!("name = \"{}\"\n", r.name));
    out.push_str(&format!("server_names = [{}]\n", quoted(r.server_names.iter().map(ToString::to_string).collect())));
    out.push_str(&format!("backend = \"{}\"\n", r.backend.address));
    if !r.listen.is_empty() {
        out.push_str(&format!("listen = [{}]\n", quoted(r.listen.iter().map(ToString::to_string).collect())));
    }
    let pp = if r.backend.proxy_protocol == ProxyProtocol::V2 { "v2" } else { "off" };
    out.push_str(&format!("proxy_protocol = \"{pp}\"\n"));
    let family = match r.dns.family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
        Family::Both => "both",
    };
    for (key, value) in [
        ("removed_grace", d(r.backend.removed_grace)),
        ("dns.refresh_interval", d(r.dns.refresh_interval)),
        ("dns.min_ttl", d(r.dns.min_ttl)),
        ("dns.hold", d(r.dns.hold)),
        ("dns.timeout", d(r.dns.timeout)),
        ("dns.family", format!("\"{family}\"")),
        ("health.interval", d(r.health.interval)),
        ("health.timeout", d(r.health.timeout)),
        ("health.fall", r.health.fall.to_string()),
        ("health.rise", r.health.rise.to_string()),
        ("health.min_healthy", r.health.min_healthy.to_string()),
    ] {
        out.push_str(&format!("{key} = {value}\n"));
    }
    out
}

/// What routes inherit: the main table's backend, DNS and health settings.
pub struct Base<'a> {
    pub proxy_protocol: ProxyProtocol,
    pub removed_grace: std::time::Duration,
    pub dns: &'a DnsConfig,
    pub health: &'a HealthConfig,
    pub listen: &'a [SocketAddr],
}

/// Checks the `[[route]]` tables (of the file and its drop-ins); every error is pushed to
/// `errors`.
pub fn build(tables: &[RouteTable], base: &Base<'_>, errors: &mut Vec<ConfigError>) -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    // Which route already claimed each server name, for duplicates across routes.
    let mut claimed: BTreeMap<ServerName, String> = BTreeMap::new();
    for (i, table) in tables.iter().enumerate() {
        let mut r = Table { path: &table.path, table, label: format!("#{}", i + 1), errors };
        if let Some(route) = r.route(base, &routes, &mut claimed) {
            routes.push(route);
        }
    }
    routes
}

struct Table<'a, 'e> {
    path: &'a Path,
    table: &'a RouteTable,
    /// `#2` until the name is known, then the name.
    label: String,
    errors: &'e mut Vec<ConfigError>,
}

impl<'a> Table<'a, '_> {
    fn route(
        &mut self,
        base: &Base<'_>,
        earlier: &[RouteConfig],
        claimed: &mut BTreeMap<ServerName, String>,
    ) -> Option<RouteConfig> {
        let before = self.errors.len();
        let table: &'a RouteTable = self.table;
        let name = self.required("name").and_then(|e| self.name(e, earlier));
        if let Some(n) = &name {
            self.label = n.clone();
        }
        for (field, entry) in &table.entries {
            if !FIELDS.contains(&field.as_str()) && !OVERRIDES.contains(&field.as_str()) {
                let all = FIELDS.iter().chain(OVERRIDES);
                let hint = all
                    .filter(|k| strsim::levenshtein(field, k) <= 2.max(k.len() / 4))
                    .min_by_key(|k| strsim::levenshtein(field, k))
                    .map(|k| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                let message = format!(
                    "unknown key {}{hint}; a route takes {}, and may set {}",
                    cut(field),
                    FIELDS.join(", "),
                    OVERRIDES.join(", ")
                );
                self.error(Some(entry.line), None, message);
            }
        }
        let server_names = self.required("server_names").and_then(|e| self.server_names(e, claimed));
        let address = self.required("backend").and_then(|e| match self.parse("backend", e, Kind::HostPort) {
            Some(Value::HostPort(hp)) => Some(hp),
            _ => None,
        });
        let listen =
            match table.entries.get("listen") {
                None => Some(Vec::new()),
                Some(e) => {
                    match self.parse("listen", e, Kind::SocketAddrs) {
                        Some(Value::Addrs(addrs)) => {
                            let unknown: Vec<String> =
                                addrs.iter().filter(|a| !base.listen.contains(a)).map(ToString::to_string).collect();
                            if unknown.is_empty() {
                                Some(addrs)
                            } else {
                                self.error(Some(e.line), Some("listen"), format!(
                            "{} is not in proxy.listen ({}); a route can only be on the proxy's own listeners",
                            unknown.join(", "),
                            base.listen.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                        ));
                                None
                            }
                        }
                        _ => None,
                    }
                }
            };
        let proxy_protocol = match table.entries.get("proxy_protocol") {
            None => Some(base.proxy_protocol),
            Some(e) => match self.parse("proxy_protocol", e, Kind::Choice(&["off", "v2"])) {
                Some(Value::Word(w)) => Some(if w == "v2" { ProxyProtocol::V2 } else { ProxyProtocol::Off }),
                _ => None,
            },
        };
        let mut dns = base.dns.clone();
        let mut health = base.health.clone();
        let mut removed_grace = base.removed_grace;
        for name in OVERRIDES {
            let Some(entry) = table.entries.get(*name) else { continue };
            let main = if *name == "removed_grace" { "backend.removed_grace" } else { name };
            let Some(key) = keys::find(main) else { continue };
            let Some(v) = self.parse(name, entry, key.kind) else { continue };
            match (*name, v) {
                ("removed_grace", Value::Duration(d)) => removed_grace = d,
                ("dns.refresh_interval", Value::Duration(d)) => dns.refresh_interval = d,
                ("dns.min_ttl", Value::Duration(d)) => dns.min_ttl = d,
                ("dns.hold", Value::Duration(d)) => dns.hold = d,
                ("dns.timeout", Value::Duration(d)) => dns.timeout = d,
                ("dns.family", Value::Word(w)) => {
                    dns.family = match w.as_str() {
                        "ipv6" => Family::Ipv6,
                        "both" => Family::Both,
                        _ => Family::Ipv4,
                    }
                }
                ("health.interval", Value::Duration(d)) => health.interval = d,
                ("health.timeout", Value::Duration(d)) => health.timeout = d,
                ("health.fall", Value::Count(n)) => health.fall = u32::try_from(n).unwrap_or(u32::MAX),
                ("health.rise", Value::Count(n)) => health.rise = u32::try_from(n).unwrap_or(u32::MAX),
                ("health.min_healthy", Value::Count(n)) => {
                    health.min_healthy = usize::try_from(n).unwrap_or(usize::MAX)
                }
                (name, _) => {
                    self.error(Some(entry.line), None, format!("internal error: {name} is read as another kind"))
                }
            }
        }
        if dns.min_ttl > dns.refresh_interval {
            let line = table.entries.get("dns.min_ttl").or(table.entries.get("dns.refresh_interval"));
            self.error(
                line.map(|e| e.line),
                Some("dns.min_ttl"),
                format!(
                    "{} is longer than dns.refresh_interval ({}); the floor must not exceed the interval",
                    humantime::format_duration(dns.min_ttl),
                    humantime::format_duration(dns.refresh_interval)
                ),
            );
        }
        if self.errors.len() > before {
            return None;
        }
        Some(RouteConfig {
            name: name?,
            listen: listen?,
            server_names: server_names?,
            backend: BackendConfig { address: address?, removed_grace, proxy_protocol: proxy_protocol? },
            dns,
            health,
        })
    }

    fn required(&mut self, field: &'static str) -> Option<&'a FileEntry> {
        let table: &'a RouteTable = self.table;
        let entry = table.entries.get(field);
        if entry.is_none() {
            self.error(Some(self.table.line), Some(field), "is required in every [[route]]".into());
        }
        entry
    }

    fn name(&mut self, entry: &FileEntry, earlier: &[RouteConfig]) -> Option<String> {
        let toml::Value::String(s) = &entry.value else {
            self.error(Some(entry.line), Some("name"), "must be a string such as \"api\"".into());
            return None;
        };
        let valid = (1..=32).contains(&s.len())
            && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            self.error(Some(entry.line), Some("name"), format!(
                "\"{}\" is not a route name: 1 to 32 lowercase letters, digits, - or _, starting with a letter or digit (it is a metric label)",
                cut(s)
            ));
            return None;
        }
        if s == DEFAULT {
            self.error(
                Some(entry.line),
                Some("name"),
                format!(
                    "\"{DEFAULT}\" is the route backend.address makes; name this one otherwise, or set backend.address"
                ),
            );
            return None;
        }
        if earlier.iter().any(|r| &r.name == s) {
            self.error(Some(entry.line), Some("name"), format!("two routes are named \"{s}\""));
            return None;
        }
        Some(s.clone())
    }

    fn server_names(
        &mut self,
        entry: &FileEntry,
        claimed: &mut BTreeMap<ServerName, String>,
    ) -> Option<Vec<ServerName>> {
        let items: Vec<&str> = match &entry.value {
            toml::Value::Array(items) if !items.is_empty() => {
                let strings: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
                let Some(strings) = strings else {
                    self.error(Some(entry.line), Some("server_names"), "must be a list of strings".into());
                    return None;
                };
                strings
            }
            _ => {
                self.error(
                    Some(entry.line),
                    Some("server_names"),
                    "must be a non-empty list such as [\"api.example.com\"]".into(),
                );
                return None;
            }
        };
        let mut names = Vec::new();
        for item in items {
            match ServerName::parse(item) {
                Ok(n) => {
                    if let Some(other) = claimed.get(&n) {
                        let message = if *other == self.label {
                            format!("lists {n} twice")
                        } else {
                            format!(
                                "{n} is already a server name of route \"{other}\"; a name can lead to one backend only"
                            )
                        };
                        self.error(Some(entry.line), Some("server_names"), message);
                        continue;
                    }
                    claimed.insert(n.clone(), self.label.clone());
                    names.push(n);
                }
                Err(e) => self.error(Some(entry.line), Some("server_names"), e),
            }
        }
        (names.len() == items_len(&entry.value)).then_some(names)
    }

    fn parse(&mut self, field: &str, entry: &FileEntry, kind: Kind) -> Option<Value> {
        match value::parse(kind, Raw::Toml(&entry.value)) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(Some(entry.line), Some(field), message);
                None
            }
        }
    }

    fn error(&mut self, line: Option<usize>, field: Option<&str>, message: String) {
        let key = match field {
            Some(f) => format!("[[route]] {}.{f}", self.label),
            None => format!("[[route]] {}", self.label),
        };
        self.errors.push(ConfigError {
            origin: Origin::File { path: self.path.to_path_buf(), line },
            key: Some(key),
            message,
        });
    }
}

fn items_len(v: &toml::Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_match_exactly_or_as_subdomains() {
        let exact = ServerName::parse("API.Example.com").unwrap();
        assert_eq!(exact, ServerName::Exact("api.example.com".into()));
        assert!(exact.matches("api.example.com"));
        assert!(!exact.matches("x.api.example.com"));
        let wild = ServerName::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com") && wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com") && !wild.matches("badexample.com"));
        assert_eq!(wild.to_string(), "*.example.com");
        for bad in ["", "*", "*.", "a..b", "exa mple.com", "*.*.example.com", "a.*.example.com"] {
            assert!(ServerName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
