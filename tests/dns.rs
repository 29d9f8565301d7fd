//! Following the backend through a real DNS server: flips, failures, truncation, TTLs.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::dns::{DnsServer, Mode};
use common::*;

const BLUE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const GREEN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A proxy to `backend.test:port`, resolved by `dns`, with default DNS settings unless `extra`
/// says otherwise.
async fn proxy_via(dns: &DnsServer, port: u16, extra: &[(&str, &str)]) -> Proxy {
    let ns = dns.addr.to_string();
    let mut pairs = vec![("dns.nameservers", ns.as_str())];
    pairs.extend_from_slice(extra);
    Proxy::start_to(&format!("backend.test:{port}"), &pairs).await
}

async fn status(proxy: &Proxy) -> serde_json::Value {
    serde_json::from_str(&get(proxy.admin, "/status").await.body).expect("status is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_flip_is_followed_within_a_second_even_with_a_one_day_ttl() {
    let (port, _fleet) = Backend::fleet(&[BLUE, GREEN], &["blue", "green"]).await;
    let dns = DnsServer::start(&[BLUE], 86_400).await;
    let proxy = proxy_via(&dns, port, &[]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;

    let (name, mut open) = greeting(proxy.addr).await.expect("a connection to blue");
    assert_eq!(name, "blue");

    dns.zone.set(|z| z.a = vec![GREEN]);
    let flipped = Instant::now();
    let mut seen_blue_after_flip = 0;
    let took = loop {
        let (name, _) = greeting(proxy.addr).await.expect("no connection fails during the flip");
        if name == "green" {
            break flipped.elapsed();
        }
        seen_blue_after_flip += 1;
        assert!(flipped.elapsed() < BOUND, "never reached green");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    eprintln!(
        "DNS flip to first connection on green: {took:?} ({seen_blue_after_flip} connections still went to blue)"
    );
    assert!(took <= Duration::from_millis(1250), "green reached only after {took:?}");

    // The connection opened before the flip still works.
    assert_eq!(round_trip(&mut open, b"still on blue").await, b"still on blue");
    let s = status(&proxy).await;
    assert_eq!(s["backend"]["addresses"].as_array().expect("addresses").len(), 1);
    assert_eq!(s["backend"]["addresses"][0]["address"], format!("{GREEN}:{port}"));
    assert_eq!(s["backend"]["resolution"]["ttl_seconds"], 86_400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_dns_failure_keeps_the_last_good_addresses() {
    let (port, _fleet) = Backend::fleet(&[BLUE], &["blue"]).await;
    let dns = DnsServer::start(&[BLUE], 1).await;
    let proxy = proxy_via(&dns, port, &[("dns.timeout", "300ms")]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;

    for (mode, result, error) in [
        (Mode::NxDomain, "nxdomain", "the name does not exist (NXDOMAIN)"),
        (Mode::ServFail, "servfail", "the nameserver failed (SERVFAIL)"),
        (Mode::Refused, "refused", "the nameserver refused the query (REFUSED)"),
        (Mode::NoData, "nodata", "the name has no address records"),
        (Mode::Drop, "timeout", "the lookup timed out"),
    ] {
        let sample = format!("static_ingress_dns_resolutions_total{{backend=\"default\",result=\"{result}\"}}");
        let before = proxy.metric(&sample).await;
        dns.zone.set(|z| z.mode = mode);
        eventually(&format!("a {result} lookup"), async || proxy.metric(&sample).await > before).await;

        let health = get(proxy.admin, "/health").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"), "after {result}");
        let (name, _) = greeting(proxy.addr).await.expect("still proxying");
        assert_eq!(name, "blue", "after {result}");
        let s = status(&proxy).await;
        assert_eq!(s["backend"]["resolution"]["stale"], true, "after {result}");
        assert_eq!(s["backend"]["resolution"]["error"], error);
        assert_eq!(proxy.metric("static_ingress_dns_stale{backend=\"default\"}").await, 1.0);

        dns.zone.set(|z| z.mode = Mode::Answer);
        eventually("fresh again", async || proxy.metric("static_ingress_dns_stale{backend=\"default\"}").await == 0.0)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_nameserver_keeps_the_last_good_addresses() {
    let (port, _fleet) = Backend::fleet(&[BLUE], &["blue"]).await;
    let dns = DnsServer::start(&[BLUE], 1).await;
    // Before the proxy starts, so before its first answer.
    let started = Instant::now();
    let proxy = proxy_via(&dns, port, &[("dns.timeout", "300ms")]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;
    let stopped = Instant::now();
    drop(dns);
    // Nothing listens on its port now. The kernel answers a UDP query with port unreachable,
    // which the resolver's unconnected socket never sees: each lookup times out.
    let timeouts = "static_ingress_dns_resolutions_total{backend=\"default\",result=\"timeout\"}";
    // Two failed lookups: the second comes a refresh after the first, so by then the last good
    // answer is more than a TTL (1 s) old and must still be the one served.
    eventually("two lookups to time out", async || proxy.metric(timeouts).await >= 2.0).await;
    assert_eq!(get(proxy.admin, "/health").await.status, 200);
    assert_eq!(greeting(proxy.addr).await.expect("still proxying").0, "blue");
    let s = status(&proxy).await;
    assert_eq!(s["backend"]["resolution"]["stale"], true);
    // The age counts from the last good answer, which came before the stop and after the start.
    let at_least = stopped.elapsed().as_secs_f64();
    let age = proxy.metric("static_ingress_dns_answer_age_seconds{backend=\"default\"}").await;
    let at_most = started.elapsed().as_secs_f64();
    assert!(at_least > 1.0, "the failures took only {at_least} s");
    assert!((at_least..=at_most).contains(&age), "answer age {age} s, expected {at_least}..={at_most} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_records_truncated_over_udp_arrive_over_tcp_and_all_are_used() {
    let ips: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    let names: Vec<&'static str> = (1..=40).map(|i| &*Box::leak(format!("b{i}").into_boxed_str())).collect();
    let (port, _fleet) = Backend::fleet(&ips, &names).await;
    let dns = DnsServer::start(&ips, 60).await;
    // An answer this size does not fit 512 bytes: the server truncates it over UDP.
    dns.zone.set(|z| z.max_udp = 512);
    let proxy = proxy_via(&dns, port, &[]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;

    let (_, tcp) = dns.zone.queries();
    assert!(tcp > 0, "the truncated answer was not retried over TCP");
    let s = status(&proxy).await;
    assert_eq!(s["backend"]["addresses"].as_array().expect("addresses").len(), 40);

    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..40 {
        reached.insert(greeting(proxy.addr).await.expect("proxied").0);
    }
    assert_eq!(reached.len(), 40, "round robin reaches every address once in 40 connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_zero_is_floored_at_min_ttl() {
    let (port, _fleet) = Backend::fleet(&[BLUE], &["blue"]).await;
    let dns = DnsServer::start(&[BLUE], 0).await;
    let proxy = proxy_via(&dns, port, &[("dns.min_ttl", "250ms")]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;
    let (before, _) = dns.zone.queries();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = dns.zone.queries();
    // 2 s at one lookup per 250 ms is 8; allow for scheduling, but not for a spin.
    let n = after - before;
    assert!((5..=10).contains(&n), "{n} lookups in 2 s with TTL 0 and a 250 ms floor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_resolve_at_start_runs_anyway_and_recovers() {
    let (port, _fleet) = Backend::fleet(&[BLUE], &["blue"]).await;
    let dns = DnsServer::start(&[BLUE], 1).await;
    dns.zone.set(|z| z.mode = Mode::NxDomain);
    let proxy = proxy_via(&dns, port, &[]).await;
    eventually("503 with the reason", async || {
        get(proxy.admin, "/health").await.body == "backend unresolved: the name does not exist (NXDOMAIN)\n"
    })
    .await;
    assert_eq!(get(proxy.admin, "/health").await.status, 503);
    assert!(greeting(proxy.addr).await.is_err(), "no backend to reach yet");

    dns.zone.set(|z| z.mode = Mode::Answer);
    eventually("healthy once it resolves", async || get(proxy.admin, "/health").await.status == 200).await;
    assert_eq!(greeting(proxy.addr).await.expect("proxied").0, "blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_trigger_an_early_re_resolve() {
    let (port, mut fleet) = Backend::fleet(&[BLUE, GREEN], &["blue", "green"]).await;
    let dns = DnsServer::start(&[BLUE], 3600).await;
    // With a 1 h interval only an early re-resolve can pick up the change in time.
    let proxy = proxy_via(&dns, port, &[("dns.refresh_interval", "1h"), ("dns.min_ttl", "250ms")]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;
    assert_eq!(greeting(proxy.addr).await.expect("blue").0, "blue");

    dns.zone.set(|z| z.a = vec![GREEN]);
    drop(fleet.remove(0)); // blue goes away: connects to it are refused
    let started = Instant::now();
    eventually(
        "a connection to reach green",
        async || matches!(greeting(proxy.addr).await, Ok((name, _)) if name == "green"),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"refused\"}").await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_an_address_that_left_dns_close_after_the_grace() {
    let (port, _fleet) = Backend::fleet(&[BLUE, GREEN], &["blue", "green"]).await;
    let dns = DnsServer::start(&[BLUE], 60).await;
    let proxy = proxy_via(&dns, port, &[("backend.removed_grace", "1s")]).await;
    eventually("healthy", async || get(proxy.admin, "/health").await.status == 200).await;
    let (name, mut open) = greeting(proxy.addr).await.expect("a connection to blue");
    assert_eq!(name, "blue");

    dns.zone.set(|z| z.a = vec![GREEN]);
    eventually("blue to leave the set", async || {
        status(&proxy).await["backend"]["retiring"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    let removed = Instant::now();
    let s = status(&proxy).await;
    assert_eq!(s["backend"]["retiring"][0]["address"], format!("{BLUE}:{port}"));
    assert_eq!(s["backend"]["retiring"][0]["active_connections"], 1);
    // Within the grace the open connection still works; new ones go to green.
    assert_eq!(round_trip(&mut open, b"within the grace").await, b"within the grace");
    assert_eq!(greeting(proxy.addr).await.expect("green").0, "green");

    let result = read_until_closed(&mut open).await;
    let after = removed.elapsed();
    assert!(result.is_err(), "the retired connection is reset, not ended cleanly");
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(3), "closed after {after:?}");
    eventually("counted", async || proxy.closed("backend_retired").await == 1.0).await;
    assert!(status(&proxy).await["backend"]["retiring"].as_array().is_some_and(|r| r.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn family_both_uses_a_and_aaaa_records() {
    let (port, _fleet) = Backend::fleet(&[BLUE], &["v4"]).await;
    let v6 = Backend::named(std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)), "v6")
        .await
        .expect("bind [::1] on the same port");
    let dns = DnsServer::start(&[BLUE], 60).await;
    dns.zone.set(|z| z.aaaa = vec![std::net::Ipv6Addr::LOCALHOST]);
    let proxy = proxy_via(&dns, port, &[("dns.family", "both")]).await;
    eventually("both families resolved", async || {
        status(&proxy).await["backend"]["addresses"].as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..4 {
        names.insert(greeting(proxy.addr).await.expect("proxied").0);
    }
    assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["v4", "v6"]);
    drop(v6);
}
