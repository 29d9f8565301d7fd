// The data-path cases, included by tests/proxy.rs (the copy path, `proxy.splice = "off"`) and
// tests/proxy_splice.rs (every byte through splice(2), `proxy.splice = "always"`), so that
// half-close, the timeouts, the byte counters and the end-of-stream rules are tested on both
// paths. Each includer defines `SPLICE`, and `WORKERS` (one includer runs one worker, the
// other several, each accepting on its own SO_REUSEPORT listener).

/// `extra` on top of this binary's `proxy.splice` and `proxy.workers`, with a connection limit
/// that leaves the pipe pool room under the test process's open-file limit.
fn with_splice<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![("proxy.splice", SPLICE), ("proxy.workers", WORKERS), ("proxy.max_connections", "100")];
    all.extend_from_slice(extra);
    all
}

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_each_way_arrive_byte_for_byte() {
    access::capture();
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;
    let data = pattern(10 * 1024 * 1024 + 7, 42);

    let client = proxy.connect().await;
    let from = client.local_addr().expect("the client's address");
    let (mut r, mut w) = client.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write 10 MB");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::with_capacity(data.len());
    within(BOUND, "10 MB to come back", r.read_to_end(&mut back)).await.expect("read echo");
    writer.await.expect("writer");

    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ from the bytes sent");
    eventually("the connection to be counted as completed", async || proxy.closed("completed").await == 1.0).await;
    let to_backend = proxy.metric("static_ingress_proxied_bytes_total{direction=\"to_backend\"}").await;
    let to_client = proxy.metric("static_ingress_proxied_bytes_total{direction=\"to_client\"}").await;
    assert_eq!((to_backend, to_client), (data.len() as f64, data.len() as f64));
    // Every byte went the way this binary tests: through pipes, or through the user buffer.
    let spliced = proxy.metric("static_ingress_splice_bytes_total").await;
    assert_eq!(spliced, if SPLICE == "always" { 2.0 * data.len() as f64 } else { 0.0 });
    // The access log counts the same bytes, spliced or copied.
    let line = access::line_of(from).await;
    assert_eq!(access::bytes(&line), (data.len() as u64, data.len() as u64), "{line:?}");
    assert_eq!(line["reason"], "completed");
    assert_eq!(line["backend"], backend.addr.to_string());
    assert_eq!((line["route"].as_str(), line["listener"].as_str()), ("default", "127.0.0.1:0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_half_closes_still_receives_the_whole_reply() {
    // Reads the request to its end, then answers with 1 MB and closes: the shape of a client
    // that shuts its write side after sending.
    let backend = Backend::start(|mut s| async move {
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.expect("read request");
        let reply = pattern(1024 * 1024, req.len() as u64);
        s.write_all(&reply).await.expect("write reply");
    })
    .await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;

    let mut client = proxy.connect().await;
    client.write_all(b"request body of 29 bytes....\n").await.expect("write");
    client.shutdown().await.expect("half-close");
    let reply = read_until_closed(&mut client).await.expect("a clean close after the reply");
    assert!(reply == pattern(1024 * 1024, 29), "reply truncated or corrupted: {} bytes", reply.len());
    eventually("completed", async || proxy.closed("completed").await == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_half_closes_still_receives_the_whole_request() {
    // Sends a greeting and shuts its write side at once, then reports what the client sent.
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"hello\n").await.expect("greet");
            s.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            // Health-check connections carry nothing; only the proxied one is reported.
            if !got.is_empty() {
                tx.send(got).expect("test is waiting");
            }
        }
    })
    .await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;
    let mut client = proxy.connect().await;
    let mut greeting = [0; 6];
    within(BOUND, "greeting", client.read_exact(&mut greeting)).await.expect("greeting");
    assert_eq!(&greeting, b"hello\n");
    // The backend's FIN has been passed on...
    assert_eq!(within(BOUND, "EOF", client.read(&mut [0; 1])).await.expect("read"), 0);
    // ...and the other direction still works.
    client.write_all(&pattern(300_000, 3)).await.expect("write after the backend half-closed");
    client.shutdown().await.expect("shutdown");
    let got = within(BOUND, "the backend to receive everything", received.recv()).await.expect("a report");
    assert!(got == pattern(300_000, 3), "backend received {} bytes, not the 300000 sent", got.len());
    eventually("completed", async || proxy.closed("completed").await == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_address_is_skipped_for_the_next_one() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;
    let refusing = refusing_addr().await;
    proxy.set_backends(&[refusing, backend.addr]);

    for i in 0..4u8 {
        let mut c = proxy.connect().await;
        assert_eq!(round_trip(&mut c, &[i; 100]).await, vec![i; 100], "connection {i}");
    }
    // The first connection that tries the refusing address marks it suspect; the others try it
    // last, so it is refused once, not on every other connection.
    let refused =
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"refused\"}").await;
    assert_eq!(refused, 1.0);
    assert_eq!(proxy.closed("connect_failed").await, 0.0);
    let status: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).expect("JSON");
    let state = status["backend"]["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .find(|a| a["address"] == refusing.to_string())
        .map(|a| a["state"].clone());
    assert!(matches!(state.as_ref().and_then(|s| s.as_str()), Some("suspect" | "unhealthy")), "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_hangs_times_out_and_the_next_address_serves() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[("proxy.connect_timeout", "300ms")])).await;
    let blackhole = Blackhole::new();
    proxy.set_backends(&[blackhole.addr, backend.addr]);

    let started = Instant::now();
    let mut c = proxy.connect().await;
    assert_eq!(round_trip(&mut c, b"ping").await, b"ping");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "the hanging address was not tried first ({elapsed:?})");
    assert_eq!(
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"timeout\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_address_answers_the_client_is_closed_after_the_connect_timeout() {
    let proxy = Proxy::start(refusing_addr().await, &with_splice(&[("proxy.connect_timeout", "200ms")])).await;
    let blackhole = Blackhole::new();
    proxy.set_backends(&[blackhole.addr]);

    let started = Instant::now();
    let mut c = proxy.connect().await;
    let _ = read_until_closed(&mut c).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(3), "closed after {elapsed:?}");
    eventually("connect_failed", async || proxy.closed("connect_failed").await == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[("proxy.idle_timeout", "400ms")])).await;

    // At the same time: one connection busy with a message every 100 ms for 1.2 s (three
    // idle timeouts), and one that goes quiet after its first message.
    let mut busy = proxy.connect().await;
    let busy = tokio::spawn(async move {
        for i in 0..12u8 {
            assert_eq!(round_trip(&mut busy, &[i]).await, vec![i]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        busy
    });
    let mut idle = proxy.connect().await;
    assert_eq!(round_trip(&mut idle, b"x").await, b"x");
    let last_activity = Instant::now();
    let _ = read_until_closed(&mut idle).await;
    let waited = last_activity.elapsed();
    assert!(waited >= Duration::from_millis(390), "closed too early: {waited:?}");

    let mut busy = within(BOUND, "the busy connection", busy).await.expect("busy connection kept working");
    assert_eq!(round_trip(&mut busy, b"still open").await, b"still open");
    assert_eq!(proxy.closed("idle_timeout").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_is_closed_after_the_half_close_timeout() {
    let backend = Backend::silent().await;
    let proxy =
        Proxy::start(backend.addr, &with_splice(&[("proxy.idle_timeout", "30s"), ("proxy.half_close_timeout", "300ms")])).await;
    let mut c = proxy.connect().await;
    c.write_all(b"bye").await.expect("write");
    c.shutdown().await.expect("half-close");
    let started = Instant::now();
    let _ = read_until_closed(&mut c).await;
    assert!(started.elapsed() < Duration::from_secs(5), "the half-closed connection lingered");
    eventually("half_close_timeout", async || proxy.closed("half_close_timeout").await == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_new_connections_are_reset_and_served_again_once_below() {
    access::capture();
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[("proxy.max_connections", "2")])).await;

    let mut a = proxy.connect().await;
    let mut b = proxy.connect().await;
    assert_eq!(round_trip(&mut a, b"a").await, b"a");
    assert_eq!(round_trip(&mut b, b"b").await, b"b");

    // The reset can arrive before connect() returns or on the first read: either way the
    // client sees a reset at once, not a hang.
    let (over, refused) = bound_client();
    let result = within(BOUND, "the reset", async {
        let mut over = over.connect(proxy.addr).await?;
        let mut buf = Vec::new();
        over.read_to_end(&mut buf).await
    })
    .await;
    assert_eq!(
        result.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "a connection over the limit is reset"
    );
    assert_eq!(proxy.closed("over_limit").await, 1.0);
    let line = access::line_of(refused).await;
    assert_eq!((line["reason"].as_str(), access::bytes(&line)), ("over_limit", (0, 0)));
    assert!(!line.contains_key("backend") && !line.contains_key("route"), "{line:?}");
    assert_eq!(round_trip(&mut a, b"a2").await, b"a2", "connections under the limit are untouched");

    drop(a);
    eventually("a slot to free up", async || proxy.closed("completed").await == 1.0).await;
    let mut c = proxy.connect().await;
    assert_eq!(round_trip(&mut c, b"c").await, b"c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_backend_address_connections_close_and_health_says_why() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;
    assert_eq!(get(proxy.admin, "/health").await.status, 200);

    proxy.set_backends(&[]);
    let h = get(proxy.admin, "/health").await;
    assert_eq!((h.status, h.body.as_str()), (503, "no backend address\n"));
    let mut c = proxy.connect().await;
    assert_eq!(read_until_closed(&mut c).await.expect("closed").len(), 0);
    eventually("no_backend", async || proxy.closed("no_backend").await == 1.0).await;
}

/// A client socket with a small receive buffer, the shape of a slow reader: the proxy can only
/// hand it a few KiB at a time, so the rest waits in the proxy's send queue.
fn slow_reader_socket() -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    s
}

async fn connect_slow_reader(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = slow_reader_socket();
    let s = within(BOUND, "connecting", async {
        tokio::task::spawn_blocking(move || s.connect(&addr.into()).map(|()| s)).await.expect("connect task")
    })
    .await
    .expect("proxy accepts");
    s.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpStream::from_std(s.into()).expect("a tokio stream")
}

/// Waits until the peer has acknowledged everything written to `s` (the kernel's send queue is
/// empty), then closes with a reset: how nginx ends a stream with `keepalive_timeout 0`.
async fn reset_once_acknowledged(s: tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    within(BOUND, "the peer to acknowledge everything", async {
        loop {
            let mut n: libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one c_int into `n`; the descriptor is open.
            assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) }, 0, "TIOCOUTQ");
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    drop(s);
}

/// Reads everything until the end of the stream, which may be a FIN or a reset.
async fn read_all_until_end(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    within(BOUND, "the stream to end", async {
        let mut got = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e.kind())),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_gets_every_byte_a_backend_sent_before_its_reset() {
    // The backend reads a short request (a TLS close_notify, say), answers 1 MiB and ends with
    // a reset once its answer is acknowledged: nginx with `keepalive_timeout 0`.
    const RUNS: usize = 5;
    let reply = pattern(1024 * 1024, 7);
    let sent = reply.clone();
    let backend = Backend::start(move |mut s| {
        let reply = sent.clone();
        async move {
            let mut req = [0; 5];
            // Health checks connect and close without a byte.
            if s.read_exact(&mut req).await.is_err() {
                return;
            }
            s.write_all(&reply).await.expect("write the reply");
            reset_once_acknowledged(s).await;
        }
    })
    .await;
    access::capture();
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;

    for run in 0..RUNS {
        let mut client = connect_slow_reader(proxy.addr).await;
        let from = client.local_addr().expect("the client's address");
        client.write_all(b"hello").await.expect("write the request");
        // A client busy elsewhere: the reply piles up in the proxy meanwhile, and the backend's
        // reset arrives while most of it is still on its way to the client.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (got, end) = read_all_until_end(&mut client).await;
        assert_eq!(got.len(), reply.len(), "run {run}: bytes received before the end");
        assert!(got == reply, "run {run}: the reply arrived corrupted");
        // As talking to the backend directly: the data, then the reset passed on.
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "run {run}: how the stream ended");
        let line = access::line_of(from).await;
        assert_eq!(access::bytes(&line), (5, reply.len() as u64), "run {run}: {line:?}");
        assert_eq!(line["reason"], "backend_reset", "run {run}");
    }
    let runs = RUNS as f64;
    eventually("the closes to be counted", async || proxy.closed("backend_reset").await == runs).await;
    // Such a reset is how that backend ends a stream, not an error.
    assert_eq!(proxy.closed("backend_error").await, 0.0);
    assert_eq!(proxy.metric("static_ingress_tcp_errors_total{errno=\"ECONNRESET\",side=\"backend\"}").await, 0.0);
    assert_eq!(proxy.metric("static_ingress_splice_bytes_total").await > 0.0, SPLICE == "always", "the path taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gets_every_byte_a_client_sent_before_its_reset() {
    let upload = pattern(1024 * 1024, 11);
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    // A backend that reads slowly: a small receive buffer, and it starts reading late.
    let socket = slow_reader_socket();
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    socket.listen(16).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(socket.into()).expect("listener");
    let backend_addr = listener.local_addr().expect("address");
    let backend = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (got, end) = read_all_until_end(&mut s).await;
                if !got.is_empty() {
                    let _ = tx.send((got, end));
                }
            });
        }
    });
    access::capture();
    let proxy = Proxy::start(backend_addr, &with_splice(&[])).await;

    let mut client = proxy.connect().await;
    let from = client.local_addr().expect("the client's address");
    client.write_all(&upload).await.expect("write the upload");
    reset_once_acknowledged(client).await;

    let (got, end) = within(BOUND, "the backend to report", received.recv()).await.expect("a report");
    assert_eq!(got.len(), upload.len(), "bytes the backend received");
    assert!(got == upload, "the upload arrived corrupted");
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "the client's reset is passed on after the data");
    eventually("client_reset", async || proxy.closed("client_reset").await == 1.0).await;
    assert_eq!(proxy.closed("client_error").await, 0.0);
    let line = access::line_of(from).await;
    assert_eq!((line["reason"].as_str(), access::bytes(&line)), ("client_reset", (upload.len() as u64, 0)));
    assert_eq!(proxy.metric("static_ingress_splice_bytes_total").await > 0.0, SPLICE == "always", "the path taken");
    backend.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_with_bytes_still_pending_toward_it_counts_as_an_error_by_errno() {
    // Reads one byte, then resets while the client is still sending: the upload is cut short.
    let backend = Backend::start(|mut s| async move {
        if s.read_exact(&mut [0; 1]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    })
    .await;
    access::capture();
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;

    let client = proxy.connect().await;
    let from = client.local_addr().expect("the client's address");
    let (mut r, mut w) = client.into_split();
    // More than the kernel buffers on the way can hold, so some is pending when the reset comes.
    let writer = tokio::spawn(async move { w.write_all(&pattern(32 * 1024 * 1024, 5)).await });
    let (got, end) = read_all_until_end(&mut r).await;
    assert!(got.is_empty());
    let written = within(BOUND, "the writer", writer).await.expect("writer task");
    // The reset reaches whichever of the client's two halves asks first; the other then sees
    // the socket closed (end of file, or a broken pipe).
    let reset = |kind: Option<std::io::ErrorKind>| kind == Some(std::io::ErrorKind::ConnectionReset);
    assert!(
        reset(end) || reset(written.as_ref().err().map(|e| e.kind())),
        "the client sees the abort: {end:?}, {written:?}"
    );
    assert!(written.is_err(), "the upload was cut short");

    eventually("backend_error", async || proxy.closed("backend_error").await == 1.0).await;
    let reset = proxy.metric("static_ingress_tcp_errors_total{errno=\"ECONNRESET\",side=\"backend\"}").await;
    let pipe = proxy.metric("static_ingress_tcp_errors_total{errno=\"EPIPE\",side=\"backend\"}").await;
    assert_eq!(reset + pipe, 1.0, "the error is counted by its errno");
    assert_eq!(proxy.closed("backend_reset").await, 0.0);
    // The bytes read from the client, as far as the cut: some, not all, and none back.
    let line = access::line_of(from).await;
    let (to_backend, to_client) = access::bytes(&line);
    assert_eq!((line["reason"].as_str(), to_client), ("backend_error", 0));
    assert!((1..32 * 1024 * 1024).contains(&to_backend), "{line:?}");
    let counted = proxy.metric("static_ingress_proxied_bytes_total{direction=\"to_backend\"}").await;
    assert_eq!(to_backend as f64, counted, "the line and the metric count the same bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_address_is_tried_once_per_connection() {
    let proxy = Proxy::start(refusing_addr().await, &with_splice(&[("proxy.connect_timeout", "200ms")])).await;
    let (a, b) = (Blackhole::new(), Blackhole::new());
    let refusing = refusing_addr().await;
    proxy.set_backends(&[a.addr, refusing, b.addr]);

    let mut c = proxy.connect().await;
    let _ = read_until_closed(&mut c).await;
    eventually("connect_failed", async || proxy.closed("connect_failed").await == 1.0).await;
    // Three addresses, three attempts: a failed one is not tried again as "suspect".
    assert_eq!(
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"timeout\"}").await,
        2.0
    );
    assert_eq!(
        proxy.metric("static_ingress_backend_connect_errors_total{backend=\"default\",reason=\"refused\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_after_a_quiet_spell_still_gets_its_reply() {
    // Answers once the client has finished sending: the reply comes after the client's FIN.
    let backend = Backend::start(|mut s| async move {
        let mut req = Vec::new();
        if s.read_to_end(&mut req).await.is_ok() && !req.is_empty() {
            let _ = s.write_all(b"reply after the FIN").await;
        }
    })
    .await;
    let proxy =
        Proxy::start(backend.addr, &with_splice(&[("proxy.idle_timeout", "30s"), ("proxy.half_close_timeout", "300ms")])).await;
    let mut c = proxy.connect().await;
    c.write_all(b"request").await.expect("write");
    // Quiet for longer than the half-close limit (but well inside the idle one), then the FIN.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.shutdown().await.expect("half-close");
    let reply = read_until_closed(&mut c).await.expect("a clean end");
    assert_eq!(reply, b"reply after the FIN");
    eventually("completed", async || proxy.closed("completed").await == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_resets_on_the_clients_last_bytes_is_a_clean_end() {
    // nginx with `keepalive_timeout 0`: the reply, then on the client's close_notify a reset at
    // once, before any separate ACK of those last bytes.
    let backend = Backend::start(|mut s| async move {
        if s.read_exact(&mut [0; 5]).await.is_err() {
            return;
        }
        s.write_all(&pattern(200_000, 9)).await.expect("reply");
        if s.read_exact(&mut [0; 3]).await.is_ok() {
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
        }
    })
    .await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;
    const RUNS: usize = 5;
    for run in 0..RUNS {
        let mut c = proxy.connect().await;
        c.write_all(b"hello").await.expect("request");
        let mut reply = vec![0; 200_000];
        within(BOUND, "the reply", c.read_exact(&mut reply)).await.expect("the whole reply");
        assert!(reply == pattern(200_000, 9), "run {run}: reply corrupted");
        c.write_all(b"bye").await.expect("close_notify");
        let (rest, end) = read_all_until_end(&mut c).await;
        assert!(rest.is_empty(), "run {run}");
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "run {run}: the reset is passed on");
    }
    let runs = RUNS as f64;
    eventually("backend_reset", async || proxy.closed("backend_reset").await == runs).await;
    assert_eq!(proxy.closed("backend_error").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_stalled_to_take_the_tail_is_reset_and_counted_as_an_error() {
    let backend = Backend::start(|mut s| async move {
        if s.read_exact(&mut [0; 5]).await.is_err() {
            return;
        }
        s.write_all(&pattern(1024 * 1024, 7)).await.expect("write the reply");
        reset_once_acknowledged(s).await;
    })
    .await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[("proxy.half_close_timeout", "300ms")])).await;
    let mut client = connect_slow_reader(proxy.addr).await;
    client.write_all(b"hello").await.expect("request");
    // Reads nothing for longer than the drain may wait without progress.
    eventually("the drain to give up", async || proxy.closed("backend_error").await == 1.0).await;
    let (got, end) = read_all_until_end(&mut client).await;
    assert!(got.len() < 1024 * 1024, "the tail cannot have arrived");
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "a truncated stream never ends with a FIN");
    assert_eq!(proxy.closed("backend_reset").await, 0.0, "an undelivered tail is not a clean end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_with_bytes_still_owed_ends_with_a_reset_not_a_fin() {
    // Sends more than the buffers on the way hold, to a client that does not read. The reply
    // is made once, up front: making 8 MiB in the handler (a debug build, a loaded machine)
    // can take longer than the idle timeout, which then rightly ends the quiet connection.
    let reply = std::sync::Arc::new(pattern(8 * 1024 * 1024, 3));
    let backend = Backend::start(move |mut s| {
        let reply = std::sync::Arc::clone(&reply);
        async move {
            if s.read_exact(&mut [0; 5]).await.is_ok() {
                let _ = s.write_all(&reply).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    })
    .await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[("proxy.idle_timeout", "400ms")])).await;
    // On a loaded machine the backend may not answer within the idle timeout: the proxy then
    // ends the quiet connection with a FIN, rightly, since nothing was owed yet. Such a try
    // proves nothing either way, so it is made again.
    const TRIES: u32 = 5;
    for attempt in 1..=TRIES {
        let mut client = connect_slow_reader(proxy.addr).await;
        client.write_all(b"hello").await.expect("request");
        let spoke = within(BOUND, "the first byte or the end", client.peek(&mut [0; 1])).await.is_ok_and(|n| n > 0);
        eventually("idle_timeout", async || proxy.closed("idle_timeout").await == f64::from(attempt)).await;
        if !spoke {
            continue;
        }
        let (got, end) = read_all_until_end(&mut client).await;
        assert!(got.len() < 8 * 1024 * 1024);
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "the cut stream must not look complete");
        return;
    }
    panic!("in {TRIES} tries the backend never answered within the proxy's idle timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_data_mid_stream_neither_stalls_nor_truncates_the_stream() {
    // A backend that reads the whole request and sends back what it got. TCP urgent data (a
    // client's send with MSG_OOB) is not part of the stream without SO_OOBINLINE, so the proxy
    // forwards the bytes around it; splice stops at the urgent mark, and must not stall there
    // or take it for the end.
    let backend = Backend::start(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read request");
        s.write_all(&got).await.expect("write reply");
    })
    .await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[])).await;
    let client = proxy.connect().await;
    let before = pattern(200_000, 1);
    let after = pattern(200_000, 2);
    let std_client = client.into_std().expect("std socket");
    std_client.set_nonblocking(false).unwrap();
    let sock = socket2::SockRef::from(&std_client);
    std::io::Write::write_all(&mut &std_client, &before).unwrap();
    // Let the first part be forwarded (and the direction start splicing) before the mark.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sock.send_out_of_band(b"!").unwrap();
    std::io::Write::write_all(&mut &std_client, &after).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    std_client.set_nonblocking(true).unwrap();
    let mut client = tokio::net::TcpStream::from_std(std_client).unwrap();
    let reply = read_until_closed(&mut client).await.expect("a clean close after the reply");
    let mut want = before.clone();
    want.extend_from_slice(&after);
    assert_eq!(reply.len(), want.len(), "bytes around the urgent byte");
    assert!(reply == want, "the stream around the urgent byte arrived corrupted");
    eventually("completed", async || proxy.closed("completed").await == 1.0).await;
}
