//! The status page at `/`: the `/status` document as one server-rendered HTML page for a
//! person, on a phone at 3 a.m. as on a desk. No script, no external asset (it works offline
//! and through any proxy); it refreshes itself every few seconds.

use std::fmt::Write;

use serde_json::Value;

use super::terminal::{ago, count, healthy, number, short, strings, text};

/// Seconds between the page's own reloads.
pub const REFRESH_SECONDS: u32 = 5;

/// `s` with HTML's special characters escaped, for text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A state word in a coloured badge: `good`, `warn` or `bad`.
fn badge(class: &str, word: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(word))
}

/// A Unix time as an age, the exact UTC time in its tooltip.
fn when(now: f64, at: Option<f64>) -> String {
    match at {
        Some(t) if t > 0.0 => format!("<span title=\"{}\">{}</span>", utc(t), esc(&ago(now, Some(t)))),
        _ => "never".to_string(),
    }
}

fn utc(t: f64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t.max(0.0));
    humantime::format_rfc3339_seconds(at).to_string()
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{padding:12px 16px;color:#fff}
header.up{background:#1f7a3d}header.down{background:#b3261e}
header h1{font-size:20px;margin:0}header p{margin:4px 0 0}
main{padding:8px 12px;max-width:1100px}
section{background:#fff;border-radius:6px;padding:10px 14px;margin:10px 0;box-shadow:0 1px 2px #0002}
h2{font-size:16px;margin:0 0 6px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:4px 8px 4px 0;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{font-weight:600;color:#5a6472;font-size:13px}
.scroll{overflow-x:auto}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-weight:600;font-size:13px}
.good{background:#d7f0de;color:#14532d}.warn{background:#fdeccc;color:#7a4b00}.bad{background:#fbd9d6;color:#8c1d18}
header .badge{background:#fff3;color:#fff}
.kv td:first-child{color:#5a6472;white-space:nowrap;width:1%}
.err{color:#8c1d18}
footer{padding:4px 16px 16px;color:#5a6472;font-size:13px}
a{color:inherit}
";

/// The page for the `/status` document `status`, `now` being Unix time in seconds; it reloads
/// itself every [`REFRESH_SECONDS`] when `refresh`.
pub fn render(status: &Value, now: f64, refresh: bool) -> String {
    let mut out = String::new();
    let ok = healthy(status);
    let reason = status.pointer("/health/reason").and_then(Value::as_str).unwrap_or("no reason given");
    let draining = status.get("draining").and_then(Value::as_bool).unwrap_or(false);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         {}<title>{} static-ingress</title><style>{STYLE}</style></head><body>",
        if refresh { format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">") } else { String::new() },
        if ok { "OK" } else { "UNHEALTHY" },
    );
    let _ = write!(
        out,
        "<header class=\"{}\"><h1>static-ingress: {}</h1><p>{}{}</p></header><main>",
        if ok { "up" } else { "down" },
        if ok { "healthy" } else { "UNHEALTHY" },
        if ok { "/health answers 200".to_string() } else { format!("/health answers 503: {}", esc(reason)) },
        if draining { format!(" &middot; {}", badge("warn", "DRAINING")) } else { String::new() },
    );
    overview(&mut out, status);
    for b in status.get("backends").and_then(Value::as_array).into_iter().flatten() {
        backend(&mut out, b, now);
    }
    eip(&mut out, status, now);
    closes(&mut out, status);
    reload(&mut out, status);
    let _ = writeln!(
        out,
        "</main><footer>Rendered at <span id=\"rendered\">{}</span>{}. \
         The same as JSON: <a href=\"/status\">/status</a>; metrics: <a href=\"/metrics\">/metrics</a>.</footer>\
         </body></html>",
        utc(now),
        if refresh { format!("; reloads every {REFRESH_SECONDS} s") } else { String::new() },
    );
    out
}

fn overview(out: &mut String, status: &Value) {
    let c = status.get("connections").unwrap_or(&Value::Null);
    let started = number(status, "started_at");
    let _ = write!(
        out,
        "<section id=\"overview\"><h2>This proxy</h2><table class=\"kv\">\
         <tr><td>version</td><td>{} (pid {})</td></tr>\
         <tr><td>up</td><td>{} (since {})</td></tr>\
         <tr><td>listening</td><td>{}</td></tr>\
         <tr><td>connections</td><td>{} open of {} allowed; {} accepted since start</td></tr>\
         </table></section>",
        esc(text(status, "version")),
        count(status, "pid"),
        esc(&short(number(status, "uptime_seconds").unwrap_or(0.0))),
        started.map_or_else(|| "unknown".to_string(), utc),
        esc(&strings(status, "listen").join(", ")),
        count(c, "active"),
        count(c, "limit"),
        count(c, "accepted_total"),
    );
}

fn address_state(state: &str) -> String {
    let class = match state {
        "healthy" => "good",
        "suspect" => "warn",
        _ => "bad",
    };
    badge(class, state)
}

fn backend(out: &mut String, b: &Value, now: f64) {
    let names = strings(b, "server_names");
    let verdict = if healthy(b) {
        badge("good", "healthy")
    } else {
        format!(
            "{} {}",
            badge("bad", "unhealthy"),
            esc(b.pointer("/health/reason").and_then(Value::as_str).unwrap_or(""))
        )
    };
    let _ = write!(
        out,
        "<section class=\"backend\"><h2>Backend {} &rarr; {}{} {verdict}</h2>",
        esc(text(b, "route")),
        esc(text(b, "name")),
        if names.is_empty() { String::new() } else { format!(" ({})", esc(&names.join(", "))) },
    );
    let r = b.get("resolution").unwrap_or(&Value::Null);
    let answer = match number(r, "age_seconds") {
        Some(age) => format!(
            "<span title=\"{}\">{} old</span>{}",
            number(r, "last_good").map_or_else(String::new, utc),
            esc(&short(age)),
            number(r, "ttl_seconds").map_or_else(String::new, |ttl| format!(", TTL {}", short(ttl)))
        ),
        None => badge("bad", "no answer yet"),
    };
    let stale = if r.get("stale").and_then(Value::as_bool).unwrap_or(false) {
        format!(" {}", badge("warn", "STALE: holding the last good answer"))
    } else {
        String::new()
    };
    let error = if text(r, "error").is_empty() {
        "none".to_string()
    } else {
        format!("<span class=\"err\">{}</span>", esc(text(r, "error")))
    };
    let _ = write!(
        out,
        "<table class=\"kv\"><tr><td>DNS answer</td><td>{answer}{stale}</td></tr>\
         <tr><td>last lookup</td><td>{}; error: {error}</td></tr></table>",
        when(now, number(r, "last_attempt")),
    );
    let addresses = b.get("addresses").and_then(Value::as_array).cloned().unwrap_or_default();
    if addresses.is_empty() {
        let _ = write!(out, "<p>{}</p>", badge("bad", "no addresses"));
    } else {
        out.push_str(
            "<div class=\"scroll\"><table class=\"addresses\"><tr><th>address</th><th>state</th>\
             <th>open</th><th>last check</th><th>first seen</th><th>last seen in DNS</th></tr>",
        );
        for a in &addresses {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(text(a, "address")),
                address_state(text(a, "state")),
                count(a, "active_connections"),
                when(now, number(a, "last_check")),
                when(now, number(a, "first_seen")),
                when(now, number(a, "last_seen")),
            );
        }
        out.push_str("</table></div>");
    }
    let retiring = b.get("retiring").and_then(Value::as_array).cloned().unwrap_or_default();
    if !retiring.is_empty() {
        out.push_str(
            "<h2>Retiring (left DNS; open connections closed when the grace ends)</h2>\
             <div class=\"scroll\"><table class=\"retiring\"><tr><th>address</th><th>open</th><th>closed in</th></tr>",
        );
        for r in &retiring {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(text(r, "address")),
                count(r, "active_connections"),
                esc(&short(number(r, "closes_in_seconds").unwrap_or(0.0))),
            );
        }
        out.push_str("</table></div>");
    }
    out.push_str("</section>");
}

fn eip(out: &mut String, status: &Value, now: f64) {
    let e = status.get("eip").unwrap_or(&Value::Null);
    let state = text(e, "state");
    let class = match state {
        "associated" | "disabled" => "good",
        "claiming" | "requesting" | "handing_off" | "handed_off" => "warn",
        _ => "bad",
    };
    let or_none = |key: &str| if text(e, key).is_empty() { "none".to_string() } else { esc(text(e, key)) };
    let _ = write!(
        out,
        "<section id=\"eip\"><h2>Elastic IP {}</h2><table class=\"kv\">\
         <tr><td>address</td><td>{} ({})</td></tr>\
         <tr><td>this instance</td><td>{}</td></tr>\
         <tr><td>held by another</td><td>{}</td></tr>\
         <tr><td>state since</td><td>{}</td></tr>\
         <tr><td>last check</td><td>{}</td></tr>\
         <tr><td>error</td><td>{}</td></tr></table></section>",
        badge(class, state),
        or_none("public_ip"),
        or_none("allocation_id"),
        or_none("instance_id"),
        or_none("owner"),
        when(now, number(e, "since")),
        when(now, number(e, "last_check")),
        if text(e, "error").is_empty() {
            "none".to_string()
        } else {
            format!("<span class=\"err\">{}</span>", esc(text(e, "error")))
        },
    );
}

fn closes(out: &mut String, status: &Value) {
    let Some(closed) = status.pointer("/connections/closed").and_then(Value::as_object) else {
        return;
    };
    out.push_str(
        "<section id=\"closes\"><h2>Connections closed since start, by reason</h2>\
         <table class=\"kv\">",
    );
    let mut any = false;
    for (reason, n) in closed {
        let n = n.as_u64().unwrap_or(0);
        if n > 0 {
            any = true;
            let _ = write!(out, "<tr><td>{}</td><td>{n}</td></tr>", esc(reason));
        }
    }
    if !any {
        out.push_str("<tr><td>none yet</td><td></td></tr>");
    }
    out.push_str("</table></section>");
}

fn reload(out: &mut String, status: &Value) {
    let r = status.get("reload").unwrap_or(&Value::Null);
    if count(r, "count") == 0 {
        return;
    }
    let errors: Vec<String> = strings(r, "errors").into_iter().map(esc).collect();
    let restart: Vec<String> = strings(r, "needs_restart").into_iter().map(esc).collect();
    let _ = write!(
        out,
        "<section id=\"reload\"><h2>Reloads</h2><table class=\"kv\">\
         <tr><td>reloads</td><td>{}; the last: {}</td></tr>{}{}</table></section>",
        count(r, "count"),
        esc(text(r, "result")),
        if errors.is_empty() {
            String::new()
        } else {
            format!("<tr><td>errors</td><td class=\"err\">{}</td></tr>", errors.join("<br>"))
        },
        if restart.is_empty() {
            String::new()
        } else {
            format!("<tr><td>needs a restart</td><td>{}</td></tr>", restart.join(", "))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({
            "version": "0.1.0", "pid": 42, "uptime_seconds": 7300.0, "started_at": 1.0, "draining": true,
            "health": {"healthy": false, "reason": "draining <now>"},
            "listen": ["0.0.0.0:443"],
            "connections": {"active": 3, "limit": 10000, "accepted_total": 99,
                            "closed": {"completed": 90, "connect_failed": 6, "idle_timeout": 0}},
            "eip": {"state": "lost", "public_ip": "203.0.113.7", "allocation_id": "eipalloc-1",
                    "owner": "i-0abc", "since": 900.0, "last_check": 995.0, "error": null},
            "backends": [{
                "route": "default", "name": "api.example.com:443", "server_names": [],
                "health": {"healthy": false, "reason": "no healthy backend address"},
                "resolution": {"age_seconds": 0.4, "last_good": 999.6, "ttl_seconds": 60.0, "stale": true,
                               "last_attempt": 999.9, "error": "the lookup timed out"},
                "addresses": [{"address": "10.0.1.5:443", "state": "unhealthy", "active_connections": 2,
                               "last_check": 999.0, "first_seen": 100.0, "last_seen": 999.6}],
                "retiring": [{"address": "10.0.1.9:443", "active_connections": 1, "closes_in_seconds": 250.0}]
            }],
            "reload": {"count": 2, "result": "invalid", "errors": ["proxy.listen: bad & worse"]}
        })
    }

    #[test]
    fn the_page_says_what_an_operator_looks_for_and_escapes_what_it_shows() {
        let page = render(&sample(), 1000.0, true);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("http-equiv=\"refresh\" content=\"5\""), "it refreshes itself");
        assert!(page.contains("/health answers 503: draining &lt;now&gt;"), "{page}");
        assert!(page.contains(">DRAINING<"));
        assert!(page.contains("3 open of 10000 allowed; 99 accepted since start"));
        assert!(page.contains("10.0.1.5:443</td><td><span class=\"badge bad\">unhealthy</span></td><td>2</td>"));
        assert!(page.contains("STALE: holding the last good answer"));
        assert!(page.contains("the lookup timed out"));
        assert!(page.contains("<td>10.0.1.9:443</td><td>1</td><td>4m10s</td>"));
        assert!(page.contains("Elastic IP <span class=\"badge bad\">lost</span>"));
        assert!(page.contains("<td>held by another</td><td>i-0abc</td>"));
        assert!(page.contains("<td>connect_failed</td><td>6</td>"));
        assert!(!page.contains("idle_timeout"), "reasons never seen are left out");
        assert!(page.contains("proxy.listen: bad &amp; worse"));
        assert!(!page.contains("<script"), "no script");
        assert!(!page.contains("http://") && !page.contains("https://"), "no external asset");
    }

    #[test]
    fn a_healthy_proxy_reads_green() {
        let mut s = sample();
        s["health"] = serde_json::json!({"healthy": true, "reason": null});
        s["draining"] = Value::Bool(false);
        let page = render(&s, 1000.0, true);
        assert!(!render(&s, 1000.0, false).contains("http-equiv"), "?refresh=0: no reload");
        assert!(page.contains("<header class=\"up\"><h1>static-ingress: healthy</h1><p>/health answers 200</p>"));
        assert!(!page.contains("DRAINING"));
    }
}
