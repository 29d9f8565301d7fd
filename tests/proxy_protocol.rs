//! `backend.proxy_protocol = "v2"` against a real receiver: HAProxy (Debian's package,
//! installed by `scripts/install-system-packages.sh` when missing) with `accept-proxy`, which
//! answers every request with the client address it read from the header.

mod common;
#[allow(dead_code)]
#[path = "common/haproxy.rs"]
mod haproxy;

use common::*;
use haproxy::Haproxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// HAProxy with `accept-proxy`, answering each HTTP request with `src:src_port dst:dst_port`
/// as the PROXY header told it.
async fn receiver(bind: &str) -> Haproxy {
    Haproxy::start(bind, "accept-proxy", "%[src]:%[src_port] %[dst]:%[dst_port]").await
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: receiver\r\nConnection: close\r\n\r\n";

/// One HTTP request on `client`, a connection through the proxy: the body of the answer, or
/// `None` if the connection closed without one.
async fn request_through(client: &mut TcpStream) -> Option<String> {
    client.write_all(REQUEST).await.ok()?;
    let mut raw = Vec::new();
    within(BOUND, "the receiver's answer", client.read_to_end(&mut raw)).await.ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_reads_the_clients_address_from_the_v2_header() {
    let receiver = receiver("127.0.0.1:0").await;
    access::capture();
    let proxy = Proxy::start(receiver.addr, &[("backend.proxy_protocol", "v2")]).await;
    // Several connections, each with its own source port.
    for _ in 0..3 {
        let mut client = proxy.connect().await;
        let me = client.local_addr().unwrap();
        let seen = request_through(&mut client).await.expect("HAProxy accepted the header and answered");
        assert_eq!(seen, format!("{}:{} {}:{}", me.ip(), me.port(), proxy.addr.ip(), proxy.addr.port()));
        // The access log counts the client's bytes, not the header the proxy wrote before them.
        drop(client);
        let line = access::line_of(me).await;
        let (to_backend, to_client) = access::bytes(&line);
        assert_eq!(to_backend, REQUEST.len() as u64, "{line:?}");
        assert!(to_client > seen.len() as u64, "{line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_sent_as_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        panic!("this machine has no IPv6 loopback, which the test needs");
    }
    let receiver = receiver("127.0.0.1:0").await;
    let proxy = Proxy::start(receiver.addr, &[("backend.proxy_protocol", "v2"), ("proxy.listen", "[::1]:0")]).await;
    let mut client = within(BOUND, "connect", TcpStream::connect(proxy.addr)).await.unwrap();
    let me = client.local_addr().unwrap();
    let seen = request_through(&mut client).await.expect("HAProxy accepted the header and answered");
    assert_eq!(seen, format!("::1:{} ::1:{}", me.port(), proxy.addr.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_nothing_is_sent_before_the_clients_bytes() {
    // The receiver insists on a header: without one it closes the connection unanswered.
    let receiver = receiver("127.0.0.1:0").await;
    let proxy = Proxy::start(receiver.addr, &[]).await;
    let mut client = proxy.connect().await;
    assert_eq!(request_through(&mut client).await, None, "HAProxy answered a connection without a header");
    // And with the header on, the same receiver answers: the refusal above was the header's.
    let with = Proxy::start(receiver.addr, &[("backend.proxy_protocol", "v2")]).await;
    assert!(request_through(&mut with.connect().await).await.is_some());
}
