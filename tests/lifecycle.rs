//! The admin server as Route 53 and an operator see it, and the drain after SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::*;
use static_ingress::Exit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_refuse_what_they_should() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;

    let live = get(proxy.admin, "/live").await;
    assert_eq!((live.status, live.body.as_str()), (200, "live\n"));
    let health = get(proxy.admin, "/health").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    let post = request(proxy.admin, "POST", "/health").await;
    assert_eq!(post.status, 405);
    assert!(post.head.to_ascii_lowercase().contains("allow: get, head"), "{}", post.head);
    assert_eq!(get(proxy.admin, "/nope").await.status, 404);

    let head = request(proxy.admin, "HEAD", "/health").await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));

    let status = get(proxy.admin, "/status").await;
    assert_eq!(status.status, 200);
    let json: serde_json::Value = serde_json::from_str(&status.body).expect("status is JSON");
    assert_eq!(json["backend"]["name"], backend.addr.to_string());
    assert_eq!(json["backend"]["addresses"][0]["address"], backend.addr.to_string());
    assert_eq!(json["backend"]["addresses"][0]["healthy"], true);
    assert_eq!(json["health"]["healthy"], true);
    assert_eq!(json["draining"], false);
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_bytes_and_reasons() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    assert_eq!(proxy.metric("static_ingress_tcp_open_total").await, 0.0);

    let mut c = proxy.connect().await;
    assert_eq!(round_trip(&mut c, b"12345").await, b"12345");
    assert_eq!(proxy.metric("static_ingress_tcp_open_total").await, 1.0);
    assert_eq!(proxy.metric("static_ingress_tcp_open_connections").await, 1.0);
    c.shutdown().await.expect("shutdown");
    let _ = read_until_closed(&mut c).await;

    eventually("the close to be counted", async || proxy.closed("completed").await == 1.0).await;
    assert_eq!(proxy.metric("static_ingress_tcp_open_connections").await, 0.0);
    assert_eq!(proxy.metric("static_ingress_proxied_bytes_total{direction=\"to_backend\"}").await, 5.0);
    assert_eq!(proxy.metric("static_ingress_proxied_bytes_total{direction=\"to_client\"}").await, 5.0);
    assert_eq!(proxy.metric("static_ingress_backend_connect_duration_seconds_count{backend=\"default\"}").await, 1.0);
    assert_eq!(proxy.metric("static_ingress_backend_addresses{backend=\"default\",state=\"healthy\"}").await, 1.0);
    let build = format!("static_ingress_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(proxy.metric(&build).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drops_clients_that_send_headers_too_slowly() {
    let proxy = Proxy::start(refusing_addr().await, &[("admin.header_timeout", "300ms")]).await;
    let mut slow = TcpStream::connect(proxy.admin).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.expect("write half a header");
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = within(BOUND, "the slow client to be dropped", slow.read_to_end(&mut buf)).await;
    assert!(started.elapsed() >= Duration::from_millis(250), "dropped after {:?}", started.elapsed());
    assert!(!String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"), "a partial request was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_fails_health_keeps_serving_then_closes_and_lets_open_connections_finish() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("lifecycle.drain_delay", "1s"), ("lifecycle.grace_period", "10s")]).await;
    let mut open = proxy.connect().await;
    assert_eq!(round_trip(&mut open, b"before").await, b"before");
    assert_eq!(get(proxy.admin, "/health").await.status, 200);

    let signalled = Instant::now();
    proxy.terminate().await;
    eventually("/health to say draining", async || {
        let h = get(proxy.admin, "/health").await;
        h.status == 503 && h.body == "draining\n"
    })
    .await;
    assert_eq!(get(proxy.admin, "/live").await.status, 200, "the process is still alive");

    // During the drain delay new connections are still served (Route 53 needs time to react).
    let mut late = proxy.connect().await;
    assert_eq!(round_trip(&mut late, b"late").await, b"late");
    assert!(signalled.elapsed() < Duration::from_secs(1), "test too slow to check the drain delay");

    // After it, the listener is closed...
    eventually("the listener to close", async || TcpStream::connect(proxy.addr).await.is_err()).await;
    assert!(signalled.elapsed() >= Duration::from_millis(990), "listener closed before the drain delay");
    // ...but connections already open keep working within the grace period.
    assert_eq!(round_trip(&mut open, b"during grace").await, b"during grace");
    assert_eq!(round_trip(&mut late, b"late too").await, b"late too");
    let status: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).expect("JSON");
    assert_eq!(status["draining"], true);
    assert_eq!(status["connections"]["active"], 2);

    drop(open);
    drop(late);
    let metrics = proxy.metrics.clone();
    let admin = proxy.admin;
    assert_eq!(proxy.exit().await, Exit::Drained);
    assert!(signalled.elapsed() < Duration::from_secs(5), "the server waited for nothing");
    assert_eq!(metrics.close_count(static_ingress::metrics::CloseReason::Shutdown), 0);
    // Every connection accepted (including the probes above) ended normally.
    assert_eq!(metrics.close_count(static_ingress::metrics::CloseReason::Completed), metrics.tcp_open_total.get());
    assert!(TcpStream::connect(admin).await.is_err(), "the admin server is down after exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_open_after_the_grace_period_are_closed() {
    access::capture();
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("lifecycle.grace_period", "300ms")]).await;
    let mut straggler = proxy.connect().await;
    let from = straggler.local_addr().unwrap();
    assert_eq!(round_trip(&mut straggler, b"x").await, b"x");

    let signalled = Instant::now();
    proxy.terminate().await;
    let metrics = proxy.metrics.clone();
    assert_eq!(proxy.exit().await, Exit::Drained);
    assert!(signalled.elapsed() >= Duration::from_millis(300), "exited before the grace period");
    assert!(read_until_closed(&mut straggler).await.is_err(), "the cut connection is reset");
    assert_eq!(metrics.close_count(static_ingress::metrics::CloseReason::Shutdown), 1);
    // Logged by the time the proxy has exited, with what moved before the cut.
    let line = access::find(from).expect("the cut connection's access-log line");
    assert_eq!((line["reason"].as_str(), access::bytes(&line)), ("shutdown", (1, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("lifecycle.drain_delay", "60s")]).await;
    let mut open = proxy.connect().await;
    assert_eq!(round_trip(&mut open, b"x").await, b"x");
    proxy.terminate().await;
    eventually("draining", async || get(proxy.admin, "/health").await.status == 503).await;
    let started = Instant::now();
    proxy.terminate().await;
    assert_eq!(proxy.exit().await, Exit::Forced);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(read_until_closed(&mut open).await.is_err(), "open connections are cut");
}
