//! Active health checks as Route 53 and clients see them.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;

const FAST_CHECKS: &[(&str, &str)] =
    &[("health.interval", "100ms"), ("health.timeout", "100ms"), ("health.fall", "3"), ("health.rise", "2")];

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = FAST_CHECKS.to_vec();
    v.extend_from_slice(extra);
    v
}

async fn address_state(proxy: &Proxy, addr: SocketAddr) -> String {
    let status: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).expect("JSON");
    status["backend"]["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .find(|a| a["address"] == addr.to_string())
        .and_then(|a| a["state"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("{addr} not in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_marked_down_within_interval_x_fall_and_back_within_interval_x_rise() {
    let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 4), 0));
    let backend = Backend::named(addr, "only").await.expect("bind");
    let addr = backend.addr;
    let proxy = Proxy::start(addr, &with(&[])).await;
    eventually("checked healthy", async || get(proxy.admin, "/health").await.status == 200).await;

    drop(backend);
    let killed = Instant::now();
    eventually("marked down", async || address_state(&proxy, addr).await == "unhealthy").await;
    let down_after = killed.elapsed();
    let health = get(proxy.admin, "/health").await;
    assert_eq!((health.status, health.body.as_str()), (503, "no healthy backend address\n"));
    // 3 failed checks 100 ms apart: about 200-300 ms; never a single check.
    assert!(
        down_after >= Duration::from_millis(150) && down_after < Duration::from_secs(2),
        "down after {down_after:?}"
    );
    assert!(proxy.metric("static_ingress_health_check_failures_total{backend=\"default\"}").await >= 3.0);
    assert_eq!(proxy.metric("static_ingress_backend_addresses{backend=\"default\",state=\"unhealthy\"}").await, 1.0);

    let _back = Backend::named(addr, "only").await.expect("rebind the same address");
    let restarted = Instant::now();
    eventually("marked up", async || get(proxy.admin, "/health").await.status == 200).await;
    let up_after = restarted.elapsed();
    eprintln!("killed backend marked down after {down_after:?}, restarted one up after {up_after:?}");
    assert!(up_after >= Duration::from_millis(50) && up_after < Duration::from_secs(2), "up after {up_after:?}");
    assert_eq!(greeting(proxy.addr).await.expect("proxied again").0, "only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_avoid_an_address_that_is_down() {
    let (port, mut fleet) =
        Backend::fleet(&[Ipv4Addr::new(127, 0, 0, 5), Ipv4Addr::new(127, 0, 0, 6)], &["five", "six"]).await;
    let five = SocketAddr::from(([127, 0, 0, 5], port));
    let six = SocketAddr::from(([127, 0, 0, 6], port));
    let proxy = Proxy::start(five, &with(&[])).await;
    proxy.set_backends(&[five, six]);
    drop(fleet.remove(0)); // five dies
    eventually("five marked down", async || address_state(&proxy, five).await == "unhealthy").await;

    let refused_before =
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"refused\"}").await;
    for _ in 0..10 {
        assert_eq!(greeting(proxy.addr).await.expect("proxied").0, "six");
    }
    let refused_after =
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"refused\"}").await;
    assert_eq!(refused_after, refused_before, "a down address was still tried first");
    assert_eq!(get(proxy.admin, "/health").await.status, 200, "one healthy address is enough by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_healthy_sets_how_many_healthy_addresses_health_needs() {
    let (port, mut fleet) =
        Backend::fleet(&[Ipv4Addr::new(127, 0, 0, 7), Ipv4Addr::new(127, 0, 0, 8)], &["seven", "eight"]).await;
    let seven = SocketAddr::from(([127, 0, 0, 7], port));
    let eight = SocketAddr::from(([127, 0, 0, 8], port));
    let proxy = Proxy::start(seven, &with(&[("health.min_healthy", "2")])).await;
    proxy.set_backends(&[seven, eight]);
    eventually("both healthy", async || get(proxy.admin, "/health").await.status == 200).await;

    drop(fleet.remove(1)); // eight dies
    eventually("503 with the count", async || {
        get(proxy.admin, "/health").await.body == "1 of 2 backend addresses healthy, need 2\n"
    })
    .await;
    // Still proxying to the healthy one: /health speaks for Route 53, not for the data path.
    assert_eq!(greeting(proxy.addr).await.expect("proxied").0, "seven");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_address_fails_its_checks_connections_still_try_them() {
    // Nothing listens on the only address yet, so its checks fail and it is marked down. When it
    // comes back, a client that connects before enough good checks have passed is still served:
    // with every address down the proxy tries them anyway (fail open) instead of refusing.
    // Bound but not listening: connects are refused, and no other test can take the port.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from((Ipv4Addr::new(127, 0, 0, 9), 0)).into()).expect("bind");
    let addr = socket.local_addr().expect("address").as_socket().expect("an IP address");
    let proxy = Proxy::start(addr, &with(&[("health.interval", "1s"), ("health.rise", "5")])).await;
    eventually("marked down", async || address_state(&proxy, addr).await == "unhealthy").await;
    assert_eq!(get(proxy.admin, "/health").await.status, 503);

    socket.listen(16).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(socket.into()).expect("listener");
    let _back = Backend::named_on(listener, "nine");
    assert_eq!(greeting(proxy.addr).await.expect("fail open: still tried").0, "nine");
    assert_eq!(address_state(&proxy, addr).await, "unhealthy", "5 good checks at 1 s are needed to mark it up");
}
