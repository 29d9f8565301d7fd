//! The admin server under hostile load: slow-loris clients must not lock Route 53 out of
//! `/health`, and the connection cap still bounds what the server holds.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Route 53 counts a check as failed unless the status line arrives within 2 s of connecting.
const ROUTE53_WINDOW: Duration = Duration::from_secs(2);
/// The default `admin.max_connections`; the tests run at the default, as the field test did.
const MAX_CONNECTIONS: usize = 64;
/// How often a slow-loris client sends the next byte of its never-ending request header.
const DRIP: Duration = Duration::from_millis(500);
/// Fresh checker connections per test, one source address each, as Route 53's checkers are.
const PROBES: usize = 10;
/// Time between two checker probes (Route 53's fast interval is 10 s; this keeps the test short).
const PROBE_PACE: Duration = Duration::from_millis(150);

/// Connects to `target` from `source` (any port), as a client on another host would.
async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(target).await
}

/// How the slow-loris clients of one test are doing.
#[derive(Default)]
struct Attack {
    /// Clients that have connected at least once.
    connected: AtomicUsize,
    /// Times the server closed a slow-loris connection (refused it or evicted it).
    closed_by_server: AtomicUsize,
}

/// One slow-loris client: connects from `source`, sends the start of a request header and
/// then one byte per [`DRIP`], never finishing it. When the server closes the connection it
/// reconnects after `pause`, as a hostile client would, until `stop`.
async fn slow_loris(
    target: SocketAddr,
    source: Ipv4Addr,
    pause: Duration,
    attack: Arc<Attack>,
    stop: CancellationToken,
) {
    let mut first = true;
    while !stop.is_cancelled() {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            r = connect_from(source, target) => r,
        };
        let Ok(mut s) = connected else {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => continue,
            }
        };
        if first {
            first = false;
            attack.connected.fetch_add(1, Ordering::Relaxed);
        }
        let (mut r, mut w) = s.split();
        let mut sink = [0u8; 256];
        let mut held = w.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: ").await.is_ok();
        while held {
            tokio::select! {
                () = stop.cancelled() => return,
                // The server answering or closing both end this connection's hold on a slot.
                _ = r.read(&mut sink) => held = false,
                () = tokio::time::sleep(DRIP) => held = w.write_all(b"a").await.is_ok(),
            }
        }
        attack.closed_by_server.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One Route 53 style check: a fresh connection from `source`, `GET /health`, and the time
/// until a `200` status line arrived, or why it did not within [`ROUTE53_WINDOW`].
async fn probe(admin: SocketAddr, source: Ipv4Addr) -> Result<Duration, String> {
    let started = Instant::now();
    let check = async {
        let mut s = connect_from(source, admin).await.map_err(|e| format!("connect: {e}"))?;
        let req = "GET /health HTTP/1.1\r\nHost: test\r\nUser-Agent: Amazon-Route53-Health-Check-Service\r\n\r\n";
        s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) => return Err(format!("closed after {} bytes", head.len())),
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        match head.starts_with("HTTP/1.1 200 ") {
            true => Ok(started.elapsed()),
            false => Err(format!("answered {}", head.lines().next().unwrap_or_default())),
        }
    };
    tokio::time::timeout(ROUTE53_WINDOW, check).await.unwrap_or_else(|_| Err("no answer within 2 s".into()))
}

/// Runs `2 x MAX_CONNECTIONS` slow-loris clients spread over `attacker_sources`, waits until
/// they have filled the admin port, then sends [`PROBES`] checks, each from its own address.
/// Every probe must be answered `200` within Route 53's window.
async fn health_checks_under_slow_loris(attacker_sources: &[Ipv4Addr], reconnect_pause: Duration) {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("health.interval", "100ms")]).await;
    eventually("the backend to be checked healthy", async || get(proxy.admin, "/health").await.status == 200).await;

    let attack = Arc::new(Attack::default());
    let stop = CancellationToken::new();
    let clients = 2 * MAX_CONNECTIONS;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let source = attacker_sources[i % attacker_sources.len()];
        tasks.push(tokio::spawn(slow_loris(proxy.admin, source, reconnect_pause, Arc::clone(&attack), stop.clone())));
    }
    // Full once every client has connected and the server has had to close at least one
    // connection for each client over the cap: before the fix by refusing the newcomer, after
    // it by evicting an older one.
    eventually("the slow-loris clients to fill the admin port", async || {
        attack.connected.load(Ordering::Relaxed) == clients
            && attack.closed_by_server.load(Ordering::Relaxed) >= clients - MAX_CONNECTIONS
    })
    .await;

    let mut answered = Vec::new();
    let mut failed = Vec::new();
    for i in 0..PROBES {
        let source = Ipv4Addr::new(127, 0, 3, u8::try_from(i + 1).expect("few probes"));
        match probe(proxy.admin, source).await {
            Ok(took) => answered.push(took),
            Err(why) => failed.push(why),
        }
        tokio::time::sleep(PROBE_PACE).await;
    }
    stop.cancel();
    for t in tasks {
        within(BOUND, "a slow-loris client to stop", t).await.expect("client task did not panic");
    }
    eprintln!(
        "{} of {PROBES} probes answered within 2 s (slowest {:?}); failures: {failed:?}; slow-loris connections \
         closed by the server: {}",
        answered.len(),
        answered.iter().max(),
        attack.closed_by_server.load(Ordering::Relaxed),
    );
    assert_eq!(answered.len(), PROBES, "health checks not answered within Route 53's window: {failed:?}");
    // At least one eviction for each client over the cap (more as they reconnect).
    let evicted = proxy.metric(EVICTED_NONE).await;
    assert!(evicted >= (clients - MAX_CONNECTIONS) as f64, "evicted {evicted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_within_route53_window_while_slow_loris_clients_from_one_host_flood_the_admin_port() {
    // One attacking host, reconnecting 20 ms after each close: its connections can only push
    // out each other, never a checker's.
    health_checks_under_slow_loris(&[Ipv4Addr::new(127, 0, 2, 1)], Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_within_route53_window_while_slow_loris_clients_from_many_hosts_flood_the_admin_port() {
    // Every slow-loris client on its own address (more addresses than slots), so no source
    // stands out and only the age of a connection without a request tells them apart.
    let sources: Vec<Ipv4Addr> =
        (0..2 * MAX_CONNECTIONS).map(|i| Ipv4Addr::new(127, 0, 4, u8::try_from(i + 1).expect("< 255"))).collect();
    health_checks_under_slow_loris(&sources, Duration::from_millis(100)).await;
}

/// Sends `GET path` on a kept-alive connection and reads the whole response: status and body.
async fn ask_on(s: &mut TcpStream, path: &str) -> (u16, String) {
    within(BOUND, "a kept-alive response", async {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .expect("a content-length");
                if raw.len() >= end + 4 + len {
                    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
                    return (status, String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned());
                }
            }
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed instead of answering: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
}

async fn live_on(s: &mut TcpStream) -> u16 {
    ask_on(s, "/live").await.0
}

/// True when the server has closed `s` (EOF or reset) within [`BOUND`].
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(within(BOUND, "the server to close a connection", s.read(&mut buf)).await, Ok(0) | Err(_))
}

/// A sample of `/metrics`, read on `s` so that reading it opens no connection of its own.
async fn metric_on(s: &mut TcpStream, sample: &str) -> f64 {
    let (status, body) = ask_on(s, "/metrics").await;
    assert_eq!(status, 200);
    sample_value(&body, sample)
}

const EVICTED_NONE: &str = "static_ingress_admin_connections_evicted_total{request=\"none\"}";
const EVICTED_SERVED: &str = "static_ingress_admin_connections_evicted_total{request=\"served\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_new_connection_closes_the_one_that_waited_longest_for_a_request() {
    let proxy = Proxy::start(refusing_addr().await, &[("admin.max_connections", "2")]).await;
    // `served` asks once and keeps the connection; `silent` connects after it and never asks.
    let mut served = TcpStream::connect(proxy.admin).await.expect("connect");
    assert_eq!(live_on(&mut served).await, 200);
    let mut silent = TcpStream::connect(proxy.admin).await.expect("connect");

    // The cap holds: a third connection is answered, and the one idle since its answer (longer
    // than `silent` has waited for its first request) is closed to make room.
    let mut third = TcpStream::connect(proxy.admin).await.expect("connect");
    assert_eq!(live_on(&mut third).await, 200);
    assert!(closed_by_server(&mut served).await, "the longest-waiting connection stayed open");

    // Now `silent` has waited longest: a fourth pushes it out, and `third` is still served.
    let mut fourth = TcpStream::connect(proxy.admin).await.expect("connect");
    assert_eq!(live_on(&mut fourth).await, 200);
    assert!(closed_by_server(&mut silent).await, "the connection that never asked stayed open");
    assert_eq!(metric_on(&mut third, EVICTED_SERVED).await, 1.0);
    assert_eq!(metric_on(&mut third, EVICTED_NONE).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_host_holding_the_most_connections_loses_one_first() {
    let proxy = Proxy::start(refusing_addr().await, &[("admin.max_connections", "4")]).await;
    let checker = Ipv4Addr::new(127, 0, 5, 1);
    let hog = Ipv4Addr::new(127, 0, 5, 2);
    // The checker's connection is the oldest, but its host holds one slot and the hog three.
    let mut kept = connect_from(checker, proxy.admin).await.expect("connect");
    assert_eq!(live_on(&mut kept).await, 200);
    let mut hogs = Vec::new();
    for _ in 0..3 {
        hogs.push(connect_from(hog, proxy.admin).await.expect("connect"));
    }
    let mut fourth = connect_from(hog, proxy.admin).await.expect("connect");
    assert_eq!(live_on(&mut fourth).await, 200, "the hog's new connection is served");
    assert!(closed_by_server(&mut hogs[0]).await, "the hog's oldest connection stayed open");
    assert_eq!(live_on(&mut kept).await, 200, "the checker's connection was closed for the hog's");
    assert_eq!(metric_on(&mut kept, EVICTED_NONE).await, 1.0);
    assert_eq!(metric_on(&mut kept, EVICTED_SERVED).await, 0.0);
}

/// With `admin.operator_listen` set, the port Route 53 reaches answers `/health` and `/live`
/// and nothing else; the operator's listener serves the page, `/status` and `/metrics` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_operators_listener_the_route53_port_shows_only_health_and_live() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("admin.operator_listen", "127.0.0.1:0")]).await;
    let operator = proxy.operator[0];
    eventually("the backend address is healthy", async || get(operator, "/health").await.status == 200).await;

    assert_eq!(get(proxy.admin, "/health").await.status, 200);
    assert_eq!(get(proxy.admin, "/live").await.status, 200);
    for path in ["/", "/status", "/metrics"] {
        let r = get(proxy.admin, path).await;
        assert_eq!(r.status, 404, "{path} on the Route 53 port: {r:?}");
        assert!(r.body.contains("on the operator's listener (admin.operator_listen)"), "{path} says where: {r:?}");
        assert!(!r.body.contains(&operator.port().to_string()), "the Route 53 port names no operator's address");
    }
    let r = get(proxy.admin, "/anything").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("this port serves /health and /live"), "{r:?}");

    let status = get(operator, "/status").await;
    assert_eq!(status.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&status.body).expect("/status is JSON");
    assert_eq!(doc["backend"]["addresses"][0]["address"], backend.addr.to_string());
    let metrics = get(operator, "/metrics").await.body;
    assert!(metrics.contains("static_ingress_tcp_open_total"), "{metrics}");
    assert_eq!(sample_value(&metrics, "static_ingress_healthy"), 1.0, "what /health answers");
    assert_eq!(get(operator, "/live").await.status, 200);
    let page = get(operator, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.head.to_ascii_lowercase().contains("content-type: text/html"), "{}", page.head);
    assert!(page.body.contains("static-ingress: healthy"), "{}", page.body);
    assert!(page.body.contains(&backend.addr.to_string()), "the page lists the backend address");
}

/// Without an operator's listener the admin port serves everything, the page included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_operators_listener_the_admin_port_serves_the_page_too() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    assert!(proxy.operator.is_empty());
    eventually("the backend address is healthy", async || get(proxy.admin, "/health").await.status == 200).await;
    let page = get(proxy.admin, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("static-ingress: healthy"), "{}", page.body);
    assert_eq!(get(proxy.admin, "/status").await.status, 200);
    assert_eq!(proxy.metric("static_ingress_healthy").await, 1.0);
    proxy.set_backends(&[]);
    assert_eq!(get(proxy.admin, "/health").await.status, 503);
    assert_eq!(proxy.metric("static_ingress_healthy").await, 0.0, "the gauge follows /health");
}
