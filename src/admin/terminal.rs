//! `static-ingress status`: a running proxy's `/status` as a compact table for a terminal,
//! with colour only when standard output is one (and `NO_COLOR` is unset).

use std::fmt::Write;

use serde_json::Value;

/// Exit codes of `status`, documented in the README: scripts tell the three cases apart.
pub mod exit {
    pub const HEALTHY: u8 = 0;
    /// The proxy answered and its `/health` fails (draining, no healthy backend, ...).
    pub const UNHEALTHY: u8 = 3;
    /// No static-ingress answered at the admin address.
    pub const UNREACHABLE: u8 = 4;
}

struct Paint(bool);

impl Paint {
    fn good(&self, s: &str) -> String {
        self.wrap("32", s)
    }
    fn bad(&self, s: &str) -> String {
        self.wrap("31;1", s)
    }
    fn warn(&self, s: &str) -> String {
        self.wrap("33", s)
    }
    fn dim(&self, s: &str) -> String {
        self.wrap("2", s)
    }
    fn wrap(&self, code: &str, s: &str) -> String {
        if self.0 { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() }
    }
}

pub(super) fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

pub(super) fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

pub(super) fn strings<'a>(v: &'a Value, key: &str) -> Vec<&'a str> {
    v.get(key).and_then(Value::as_array).map_or(vec![], |a| a.iter().filter_map(Value::as_str).collect())
}

/// "3.2s", "4m10s", "2h5m", "3d4h": an age or a time left, short.
pub fn short(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 10.0 {
        format!("{s:.1}s")
    } else if s < 60.0 {
        format!("{s:.0}s")
    } else if s < 3600.0 {
        format!("{}m{}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else if s < 86_400.0 {
        format!("{}h{}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    } else {
        format!("{}d{}h", (s / 86_400.0) as u64, ((s % 86_400.0) / 3600.0) as u64)
    }
}

pub(super) fn ago(now: f64, at: Option<f64>) -> String {
    at.map_or_else(|| "never".to_string(), |t| format!("{} ago", short(now - t)))
}

/// Whether the proxy says it is healthy (what `/health` answers); for one of its `backends`,
/// that backend's own verdict.
pub fn healthy(status: &Value) -> bool {
    status.pointer("/health/healthy").and_then(Value::as_bool).unwrap_or(false)
}

/// The table for `status`, `now` being Unix time in seconds.
pub fn render(status: &Value, colour: bool, now: f64) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let health = if healthy(status) {
        p.good("HEALTHY")
    } else {
        let why = status.pointer("/health/reason").and_then(Value::as_str).unwrap_or("no reason given");
        format!("{}: {why}", p.bad("UNHEALTHY"))
    };
    let _ = writeln!(
        out,
        "static-ingress {} (pid {}, up {})  {health}{}",
        text(status, "version"),
        count(status, "pid"),
        short(number(status, "uptime_seconds").unwrap_or(0.0)),
        if status.get("draining").and_then(Value::as_bool).unwrap_or(false) {
            format!("  {}", p.warn("DRAINING"))
        } else {
            String::new()
        },
    );
    let listen = strings(status, "listen");
    let c = status.get("connections").unwrap_or(&Value::Null);
    let _ = writeln!(
        out,
        "listening {}  connections {} of {} (accepted {})",
        listen.join(", "),
        count(c, "active"),
        count(c, "limit"),
        count(c, "accepted_total"),
    );
    let eip = status.get("eip").unwrap_or(&Value::Null);
    let state = text(eip, "state");
    let painted = match state {
        "associated" | "disabled" => p.good(state),
        "claiming" | "requesting" | "handing_off" | "handed_off" => p.warn(state),
        _ => p.bad(state),
    };
    let mut line = format!("elastic ip {painted}");
    for key in ["public_ip", "allocation_id"] {
        if !text(eip, key).is_empty() {
            let _ = write!(line, " {}", text(eip, key));
        }
    }
    if !text(eip, "owner").is_empty() {
        let _ = write!(line, ", held by {}", text(eip, "owner"));
    }
    if state != "disabled" {
        let _ = write!(line, ", checked {}", ago(now, number(eip, "last_check")));
    }
    if !text(eip, "error").is_empty() {
        let _ = write!(line, ", {}", p.bad(text(eip, "error")));
    }
    let _ = writeln!(out, "{line}");
    for b in status.get("backends").and_then(Value::as_array).into_iter().flatten() {
        backend(&mut out, b, &p, now);
    }
    out
}

fn backend(out: &mut String, b: &Value, p: &Paint, now: f64) {
    let verdict = if healthy(b) {
        p.good("healthy")
    } else {
        format!("{}: {}", p.bad("unhealthy"), b.pointer("/health/reason").and_then(Value::as_str).unwrap_or(""))
    };
    let names = strings(b, "server_names");
    let names = if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) };
    let _ = writeln!(out, "\nbackend {}{names} -> {}  {verdict}", text(b, "route"), text(b, "name"));
    let r = b.get("resolution").unwrap_or(&Value::Null);
    let mut dns = match number(r, "age_seconds") {
        Some(age) => format!("  dns answer {} old", short(age)),
        None => "  dns no answer yet".to_string(),
    };
    if let Some(ttl) = number(r, "ttl_seconds") {
        let _ = write!(dns, ", ttl {}", short(ttl));
    }
    if r.get("stale").and_then(Value::as_bool).unwrap_or(false) {
        let _ = write!(dns, ", {}", p.warn("STALE (holding the last good answer)"));
    }
    if !text(r, "error").is_empty() {
        let _ = write!(dns, ", last lookup: {}", p.bad(text(r, "error")));
    }
    let _ = writeln!(out, "{dns}");
    let addresses = b.get("addresses").and_then(Value::as_array).cloned().unwrap_or_default();
    if addresses.is_empty() {
        let _ = writeln!(out, "  {}", p.bad("no addresses"));
    } else {
        let _ = writeln!(
            out,
            "  {}",
            p.dim(&format!("{:<42} {:<9} {:>5}  {:<12} {}", "ADDRESS", "STATE", "CONNS", "CHECKED", "FIRST SEEN"))
        );
        for a in &addresses {
            let state = text(a, "state");
            let painted = match state {
                "healthy" => p.good(state),
                "suspect" => p.warn(state),
                _ => p.bad(state),
            };
            // Padding counts the visible text: colour codes are added after.
            let pad = " ".repeat(9usize.saturating_sub(state.len()));
            let _ = writeln!(
                out,
                "  {:<42} {painted}{pad} {:>5}  {:<12} {}",
                text(a, "address"),
                count(a, "active_connections"),
                ago(now, number(a, "last_check")),
                ago(now, number(a, "first_seen")),
            );
        }
    }
    for r in b.get("retiring").and_then(Value::as_array).into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} {} ({} connections, closed in {})",
            p.warn("retiring"),
            text(r, "address"),
            count(r, "active_connections"),
            short(number(r, "closes_in_seconds").unwrap_or(0.0)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({
            "version": "0.1.0", "pid": 42, "uptime_seconds": 7300.0, "draining": false,
            "health": {"healthy": false, "reason": "no healthy backend address"},
            "listen": ["0.0.0.0:443"],
            "connections": {"active": 3, "limit": 10000, "accepted_total": 99},
            "eip": {"state": "associated", "public_ip": "203.0.113.7", "allocation_id": "eipalloc-1",
                    "last_check": 995.0, "owner": null, "error": null},
            "backends": [{
                "route": "default", "name": "api.example.com:443", "server_names": [],
                "health": {"healthy": false, "reason": "no healthy backend address"},
                "resolution": {"age_seconds": 0.4, "ttl_seconds": 60.0, "stale": true,
                               "error": "the lookup timed out"},
                "addresses": [{"address": "10.0.1.5:443", "state": "unhealthy", "active_connections": 2,
                               "last_check": 999.0, "first_seen": 100.0}],
                "retiring": [{"address": "10.0.1.9:443", "active_connections": 1, "closes_in_seconds": 250.0}]
            }]
        })
    }

    #[test]
    fn the_table_says_what_an_operator_looks_for() {
        let out = render(&sample(), false, 1000.0);
        assert!(out.contains("UNHEALTHY: no healthy backend address"), "{out}");
        assert!(out.contains("pid 42, up 2h1m"), "{out}");
        assert!(out.contains("connections 3 of 10000 (accepted 99)"), "{out}");
        assert!(out.contains("elastic ip associated 203.0.113.7 eipalloc-1, checked 5.0s ago"), "{out}");
        assert!(out.contains("backend default -> api.example.com:443"), "{out}");
        assert!(
            out.contains(
                "dns answer 0.4s old, ttl 1m0s, STALE (holding the last good answer), last lookup: the lookup timed out"
            ),
            "{out}"
        );
        assert!(out.contains("10.0.1.5:443"), "{out}");
        assert!(out.contains("unhealthy     2  1.0s ago     15m0s ago"), "{out}");
        assert!(out.contains("retiring 10.0.1.9:443 (1 connections, closed in 4m10s)"), "{out}");
        assert!(!out.contains('\x1b'), "no colour unless asked");
        assert!(render(&sample(), true, 1000.0).contains("\x1b[31;1mUNHEALTHY\x1b[0m"));
    }

    #[test]
    fn short_durations_read_at_a_glance() {
        assert_eq!(short(0.24), "0.2s");
        assert_eq!(short(59.0), "59s");
        assert_eq!(short(61.0), "1m1s");
        assert_eq!(short(90_000.0), "1d1h");
        assert_eq!(short(-3.0), "0.0s");
    }
}
