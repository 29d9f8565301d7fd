//! A small blocking client of a running proxy's admin server, for the subcommands that talk
//! to it (`reload` waits on its `/status`). Plain HTTP/1.1 over loopback with one request per
//! connection: the admin server is ours, and a CLI needs no runtime for one GET.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one request to the admin server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of an answer read: `/status` of a proxy with many routes is tens of KiB.
const MAX_ANSWER: u64 = 4 << 20;
/// How often `wait_for_reload` asks.
const POLL: Duration = Duration::from_millis(100);

/// Where to reach an admin server listening on `listen`: a wildcard address is reached on
/// loopback.
pub fn local(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET path`: the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("cannot reach {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| format!("cannot set a timeout on the connection to {addr}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send to {addr}: {e}"))?;
    // One deadline for the whole answer, not one per read.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{addr} did not answer within {}", humantime::format_duration(REQUEST_TIMEOUT)));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("cannot set a timeout on the connection to {addr}: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if (answer.len() + n) as u64 > MAX_ANSWER => {
                return Err(format!("{addr} sent more than {MAX_ANSWER} bytes"));
            }
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("no answer from {addr}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr} sent no HTTP answer"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr} sent no HTTP status line"))?;
    Ok((code, body.to_string()))
}

/// The reload part of a proxy's `/status`.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
pub struct Reload {
    /// Reloads begun since start (SIGHUP handled).
    #[serde(default)]
    pub started: u64,
    /// Reloads finished since start; the fields below describe the last of them.
    pub count: u64,
    /// The last one's outcome: `applied`, `invalid` (the file had errors) or `failed` (valid,
    /// but it could not be applied); empty before the first.
    #[serde(default)]
    pub result: String,
    #[serde(default)]
    pub errors: Vec<String>,
    /// Keys that changed but only a restart applies.
    #[serde(default)]
    pub needs_restart: Vec<String>,
    /// Keys the files changed that a flag or the environment of the start still overrides.
    #[serde(default)]
    pub shadowed: Vec<String>,
}

#[derive(serde::Deserialize)]
struct StatusPart {
    pid: u32,
    draining: bool,
    reload: Reload,
}

/// The reload state of the proxy with process id `pid` whose admin server is at `addr`, and
/// whether it is draining; an error if it does not answer or another process does.
pub fn reload_status(addr: SocketAddr, pid: i32) -> Result<(Reload, bool), String> {
    let (code, body) = get(addr, "/status")?;
    if code != 200 {
        return Err(format!("{addr}/status answered {code}"));
    }
    let status: StatusPart =
        serde_json::from_str(&body).map_err(|e| format!("{addr}/status is not a static-ingress status: {e}"))?;
    if i64::from(status.pid) != i64::from(pid) {
        return Err(format!("the admin server at {addr} is process {}'s, not {pid}'s", status.pid));
    }
    Ok((status.reload, status.draining))
}

/// Waits up to `wait` for the proxy to finish a reload begun after the `started`-th (the one
/// a SIGHUP sent now causes: one under way when it was sent is not it), and returns the
/// outcome.
pub fn wait_for_reload(addr: SocketAddr, pid: i32, started: u64, wait: Duration) -> Result<Reload, String> {
    let until = Instant::now() + wait;
    let mut last_error = None;
    // Bounded by `wait`: one request (itself bounded) every POLL.
    while Instant::now() < until {
        match reload_status(addr, pid) {
            Ok((r, _)) if r.count > started && !r.result.is_empty() => return Ok(r),
            Ok(_) => last_error = None,
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(POLL);
    }
    Err(match last_error {
        Some(e) => format!("it did not report the outcome within {} ({e})", humantime::format_duration(wait)),
        None => format!("it did not report the outcome within {}", humantime::format_duration(wait)),
    })
}
