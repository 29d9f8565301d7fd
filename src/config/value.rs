//! Parsing a raw configuration value (from the file, a flag, the environment or a default)
//! into a typed [`Value`] according to its key's [`Kind`].

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::keys::Kind;

/// A value as written, before it is checked against its kind.
#[derive(Debug, Clone, Copy)]
pub enum Raw<'a> {
    /// From the TOML file: already typed by TOML (string, integer, array...).
    Toml(&'a toml::Value),
    /// From a flag, an environment variable or a default: always text.
    Text(&'a str),
}

/// A checked value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Duration(Duration),
    Count(u64),
    Addr(SocketAddr),
    Addrs(Vec<SocketAddr>),
    HostPort(HostPort),
    Word(String),
    Bool(bool),
}

/// A backend name and port, such as `my-elb-123.eu-west-1.elb.amazonaws.com:443`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Renders a value as a TOML literal, for `check-config`.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Duration(d) => write!(f, "\"{}\"", humantime::format_duration(*d)),
            Value::Count(n) => write!(f, "{n}"),
            Value::Addr(a) => write!(f, "\"{a}\""),
            Value::Addrs(list) => {
                let items: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
                write!(f, "[{}]", items.join(", "))
            }
            Value::HostPort(hp) => write!(f, "\"{hp}\""),
            Value::Word(w) => write!(f, "\"{w}\""),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Checks `raw` against `kind`. The error is a short lowercase phrase that the caller prefixes
/// with where the value came from and which key it is for.
pub fn parse(kind: Kind, raw: Raw<'_>) -> Result<Value, String> {
    match kind {
        Kind::Duration { max } | Kind::DurationOrZero { max } => {
            let s = text(raw, "a duration such as \"5s\"")?;
            let d = duration(s)?;
            if matches!(kind, Kind::Duration { .. }) && d.is_zero() {
                return Err("must be greater than zero".into());
            }
            // A bound that does not parse is a mistake in KEYS, which a unit test rules out;
            // refusing the value then is safer than letting an unbounded duration through.
            let limit = duration(max).map_err(|e| format!("internal error: the bound {max} does not parse: {e}"))?;
            if d > limit {
                return Err(format!("must be at most {max}, got \"{}\"", cut(s.trim())));
            }
            Ok(Value::Duration(d))
        }
        Kind::Count { min, max } => {
            let n = match raw {
                Raw::Toml(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
                Raw::Text(s) => s.trim().parse::<u64>().ok(),
                Raw::Toml(other) => return Err(wrong_type("a whole number", other)),
            };
            match n {
                Some(n) if (min..=max).contains(&n) => Ok(Value::Count(n)),
                _ => Err(format!("must be a whole number from {min} to {max}, got {}", show(raw))),
            }
        }
        Kind::SocketAddr => Ok(Value::Addr(socket_addr(text(raw, "an address such as \"0.0.0.0:9001\"")?)?)),
        Kind::SocketAddrs | Kind::OptionalSocketAddrs => {
            let items: Vec<&str> = match raw {
                Raw::Toml(toml::Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().ok_or_else(|| wrong_type("a list of strings", v)))
                    .collect::<Result<_, _>>()?,
                Raw::Toml(toml::Value::String(s)) => s.split(',').map(str::trim).collect(),
                Raw::Text(s) => s.split(',').map(str::trim).collect(),
                Raw::Toml(other) => return Err(wrong_type("a list of addresses", other)),
            };
            let mut addrs: Vec<SocketAddr> = Vec::with_capacity(items.len());
            for item in items.into_iter().filter(|i| !i.is_empty()) {
                let addr = socket_addr(item)?;
                if addrs.contains(&addr) {
                    return Err(format!("lists {addr} twice"));
                }
                addrs.push(addr);
            }
            if addrs.is_empty() && kind == Kind::SocketAddrs {
                return Err("must list at least one address".into());
            }
            Ok(Value::Addrs(addrs))
        }
        Kind::HostPort => {
            Ok(Value::HostPort(host_port(text(raw, "a host:port such as \"backend.example.com:443\"")?)?))
        }
        Kind::Choice(words) => {
            let s = text(raw, "a word")?;
            match words.iter().find(|w| **w == s) {
                Some(w) => Ok(Value::Word((*w).to_string())),
                None => Err(format!("must be one of {}, got \"{}\"", words.join(", "), cut(s))),
            }
        }
        Kind::LogFilter => {
            let s = text(raw, "a log filter such as \"info\"")?;
            tracing_subscriber::EnvFilter::builder()
                .parse(s)
                .map_err(|e| format!("invalid log filter \"{}\": {}", cut(s), cut(&e.to_string())))?;
            Ok(Value::Word(s.to_string()))
        }
        Kind::Bool => match raw {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(Value::Bool(*b)),
            Raw::Text(s) => match s.trim() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                other => Err(format!("must be true or false, got \"{}\"", cut(other))),
            },
            Raw::Toml(other) => Err(wrong_type("true or false", other)),
        },
        Kind::OptionalAllocationId => {
            let s = text(raw, "an allocation id such as \"eipalloc-0123456789abcdef0\"")?.trim();
            if s.is_empty() || is_allocation_id(s) {
                Ok(Value::Word(s.to_string()))
            } else {
                Err(format!(
                    "\"{}\" is not an allocation id: expected eipalloc- and hex digits, such as eipalloc-0123456789abcdef0",
                    cut(s)
                ))
            }
        }
        Kind::TagKey => {
            let s = text(raw, "a tag key")?;
            let allowed = |c: char| c.is_ascii_alphanumeric() || "+-=._:@,".contains(c);
            if s.is_empty() || s.len() > 128 || !s.chars().all(allowed) || s == "." || s == ".." || s == "_index" {
                Err(format!(
                    "\"{}\" cannot be read from instance metadata: a tag key there is 1 to 128 letters, digits \
                     and + - = . , _ : @ (no spaces or /)",
                    cut(s)
                ))
            } else {
                Ok(Value::Word(s.to_string()))
            }
        }
        Kind::OptionalUrl => {
            let s = text(raw, "a URL such as \"http://127.0.0.1:1234\"")?.trim();
            let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
            match rest {
                _ if s.is_empty() => Ok(Value::Word(String::new())),
                Some(rest) if !rest.is_empty() && !rest.starts_with('/') && !rest.contains(char::is_whitespace) => {
                    Ok(Value::Word(s.trim_end_matches('/').to_string()))
                }
                _ => Err(format!("\"{}\" is not a URL: expected http://host[:port] or https://host[:port]", cut(s))),
            }
        }
    }
}

/// `eipalloc-` followed by hex digits.
pub fn is_allocation_id(s: &str) -> bool {
    s.strip_prefix("eipalloc-").is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

fn text<'a>(raw: Raw<'a>, expected: &str) -> Result<&'a str, String> {
    match raw {
        Raw::Toml(toml::Value::String(s)) => Ok(s),
        Raw::Text(s) => Ok(s),
        Raw::Toml(other) => Err(wrong_type(expected, other)),
    }
}

fn wrong_type(expected: &str, got: &toml::Value) -> String {
    format!("expected {expected}, got {} {}", got.type_str(), cut(&got.to_string()))
}

fn show(raw: Raw<'_>) -> String {
    match raw {
        Raw::Toml(v) => cut(&v.to_string()).into_owned(),
        Raw::Text(s) => format!("\"{}\"", cut(s)),
    }
}

/// How many characters of a value an error message echoes: enough to recognise it, while a
/// megabyte pasted by mistake does not become a megabyte of log.
pub const SHOWN_CHARS: usize = 80;

/// `s` itself if it is short, else its first [`SHOWN_CHARS`] characters and an ellipsis.
pub fn cut(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => std::borrow::Cow::Borrowed(s),
        Some((end, _)) => std::borrow::Cow::Owned(format!("{}…", &s[..end])),
    }
}

/// `5s`, `250ms`, `10m`, `1h 30m`. A bare number is refused: `5` could mean seconds or
/// milliseconds, and guessing wrong would be silent.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        let s = cut(s);
        return Err(format!("\"{s}\" has no unit: write it as \"{s}s\" or \"{s}ms\""));
    }
    humantime::parse_duration(s).map_err(|e| {
        // Only an unknown unit echoes the input; the other reasons are short and fixed.
        let why = match &e {
            humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => {
                format!("unknown time unit \"{}\"", cut(unit))
            }
            other => other.to_string(),
        };
        format!("invalid duration \"{}\" ({why}); write durations like \"5s\", \"250ms\" or \"10m\"", cut(s))
    })
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid address \"{}\": expected IP:port, such as 0.0.0.0:443 or [::]:443", cut(s)))
}

fn host_port(s: &str) -> Result<HostPort, String> {
    let bad = |why: &str| format!("invalid host:port \"{}\": {why}", cut(s));
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(|| bad("expected [IPv6]:port"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("the part in brackets is not an IPv6 address"));
        }
        (host, port)
    } else {
        s.rsplit_once(':').ok_or_else(|| bad("the port is missing"))?
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if !host.contains(':') && !is_hostname(host) {
        return Err(bad("the host is neither an IP address nor a DNS name"));
    }
    Ok(HostPort { host: host.trim_end_matches('.').to_string(), port })
}

fn is_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(duration("5").unwrap_err(), "\"5\" has no unit: write it as \"5s\" or \"5ms\"");
        assert!(duration("5x").is_err());
    }

    #[test]
    fn zero_duration_only_where_allowed() {
        assert!(parse(Kind::Duration { max: "1h" }, Raw::Text("0s")).is_err());
        assert_eq!(parse(Kind::DurationOrZero { max: "1h" }, Raw::Text("0s")), Ok(Value::Duration(Duration::ZERO)));
    }

    #[test]
    fn durations_past_their_bound_are_refused() {
        let kind = Kind::Duration { max: "30d" };
        assert_eq!(parse(kind, Raw::Text("30d")), Ok(Value::Duration(Duration::from_secs(30 * 86_400))));
        for huge in ["30d 1ns", "300000000000y", "18446744073709551615s"] {
            assert_eq!(parse(kind, Raw::Text(huge)), Err(format!("must be at most 30d, got \"{huge}\"")));
        }
        let toml = toml::Value::String("300000000000y".into());
        assert_eq!(parse(kind, Raw::Toml(&toml)), Err("must be at most 30d, got \"300000000000y\"".into()));
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        assert_eq!(cut("short"), "short");
        // A megabyte that no kind accepts (`=9x` is not a log level either).
        let long = "é".repeat(1 << 19) + "=9x";
        let shown = cut(&long);
        assert_eq!(shown.chars().count(), SHOWN_CHARS + 1);
        assert!(shown.ends_with('…'), "{shown}");
        // Every kind that echoes a bad value keeps its message short.
        let kinds = [
            Kind::Duration { max: "1h" },
            Kind::Count { min: 1, max: 10 },
            Kind::SocketAddr,
            Kind::SocketAddrs,
            Kind::HostPort,
            Kind::Choice(&["a", "b"]),
            Kind::LogFilter,
            Kind::Bool,
            Kind::OptionalAllocationId,
            Kind::TagKey,
            Kind::OptionalUrl,
        ];
        let as_toml = toml::Value::Array(vec![toml::Value::Integer(1); 1 << 16]);
        for kind in kinds {
            for raw in [Raw::Text(&long), Raw::Toml(&as_toml)] {
                let Err(err) = parse(kind, raw) else { panic!("{kind:?} accepted the megabyte") };
                assert!(err.len() < 400, "{kind:?}: a {} byte message", err.len());
            }
        }
    }

    #[test]
    fn host_port_forms() {
        let hp = host_port("elb-1.eu-west-1.elb.amazonaws.com.:443").unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("elb-1.eu-west-1.elb.amazonaws.com", 443));
        assert_eq!(host_port("[::1]:8443").unwrap().to_string(), "[::1]:8443");
        assert_eq!(host_port("127.0.0.1:80").unwrap().host, "127.0.0.1");
        assert!(host_port("example.com").is_err());
        assert!(host_port("example.com:0").is_err());
        assert!(host_port("bad host:443").is_err());
        assert!(host_port(":443").is_err());
    }

    #[test]
    fn address_lists_from_text_and_toml() {
        let want = Value::Addrs(vec!["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()]);
        assert_eq!(parse(Kind::SocketAddrs, Raw::Text("127.0.0.1:1, [::1]:2")), Ok(want.clone()));
        let arr = toml::Value::Array(vec!["127.0.0.1:1".into(), "[::1]:2".into()]);
        assert_eq!(parse(Kind::SocketAddrs, Raw::Toml(&arr)), Ok(want));
        assert!(parse(Kind::SocketAddrs, Raw::Text("127.0.0.1:1,127.0.0.1:1")).is_err());
    }

    #[test]
    fn eip_values() {
        assert_eq!(parse(Kind::Bool, Raw::Toml(&toml::Value::Boolean(true))), Ok(Value::Bool(true)));
        assert_eq!(parse(Kind::Bool, Raw::Text("yes")).unwrap_err(), "must be true or false, got \"yes\"");
        let id = Kind::OptionalAllocationId;
        assert_eq!(parse(id, Raw::Text("eipalloc-0a1b")), Ok(Value::Word("eipalloc-0a1b".into())));
        assert_eq!(parse(id, Raw::Text("")), Ok(Value::Word(String::new())));
        assert!(parse(id, Raw::Text("eipassoc-0a1b")).is_err());
        assert!(parse(id, Raw::Text("eipalloc-")).is_err());
        assert!(parse(Kind::TagKey, Raw::Text("static-ingress:eip-allocation-id")).is_ok());
        assert!(parse(Kind::TagKey, Raw::Text("has space")).is_err());
        assert!(parse(Kind::TagKey, Raw::Text("a/b")).is_err());
        assert_eq!(
            parse(Kind::OptionalUrl, Raw::Text("http://127.0.0.1:80/")),
            Ok(Value::Word("http://127.0.0.1:80".into()))
        );
        assert!(parse(Kind::OptionalUrl, Raw::Text("169.254.169.254")).is_err());
        assert!(parse(Kind::OptionalUrl, Raw::Text("http://")).is_err());
    }

    #[test]
    fn counts_are_range_checked() {
        let kind = Kind::Count { min: 1, max: 10 };
        assert_eq!(parse(kind, Raw::Toml(&toml::Value::Integer(10))), Ok(Value::Count(10)));
        assert_eq!(
            parse(kind, Raw::Toml(&toml::Value::Integer(0))).unwrap_err(),
            "must be a whole number from 1 to 10, got 0"
        );
        assert_eq!(
            parse(kind, Raw::Toml(&toml::Value::String("3".into()))).unwrap_err(),
            "expected a whole number, got string \"3\""
        );
    }
}
