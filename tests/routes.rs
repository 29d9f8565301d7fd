//! Routes by TLS server name (`[[route]]` tables), with real TLS on both ends: `openssl
//! s_client` as the client (server name set, unset, unknown) and HAProxy terminating TLS as
//! each backend, answering with its route's name. Also the ClientHello read as the proxy does
//! it: split over many segments, slow, too large, absent, not TLS.

mod common;
#[path = "common/haproxy.rs"]
mod haproxy;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use haproxy::Haproxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A self-signed certificate and key in one PEM file (as HAProxy's `crt` takes it), in a
/// directory of the test's own.
fn certificate(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("static-ingress-routes-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=static-ingress-test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req failed");
    let pem = dir.join("both.pem");
    let both = [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat();
    std::fs::write(&pem, both).unwrap();
    pem
}

/// HAProxy terminating TLS as a backend named `name`, once it answers (its start takes a
/// moment; connections wait in its socket's queue meanwhile, but a test should not depend on
/// how long).
async fn tls_backend(pem: &std::path::Path, name: &str) -> Haproxy {
    let h = Haproxy::tls(pem, name).await;
    within(BOUND, "HAProxy to answer over TLS", async {
        while https_via(h.addr, Some("ready.example")).await != name {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    h
}

/// One HTTPS request through the proxy with `openssl s_client`, asking for `server_name`
/// (`None`: no SNI at all). The answer's body: the route's name (or, when there is none,
/// everything the client printed, to show why).
async fn https_via(proxy: std::net::SocketAddr, server_name: Option<&str>) -> String {
    let mut c = tokio::process::Command::new("openssl");
    c.args(["s_client", "-quiet", "-connect", &proxy.to_string()]);
    match server_name {
        Some(n) => c.args(["-servername", n]),
        None => c.arg("-noservername"),
    };
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = c.spawn().expect("openssl s_client starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await.unwrap();
    let out = within(BOUND, "openssl s_client's answer", child.wait_with_output()).await.unwrap();
    drop(stdin);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => format!("no answer: {text} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn routes_file(default: Option<&str>, api: &str, uploads: &str, extra_proxy: &str) -> String {
    let backend = default.map(|d| format!("[backend]\naddress = \"{d}\"\n")).unwrap_or_default();
    format!(
        "[proxy]\n{extra_proxy}\n{backend}\
         [[route]]\nname = \"api\"\nserver_names = [\"api.example.com\"]\nbackend = \"{api}\"\n\
         [[route]]\nname = \"uploads\"\nserver_names = [\"uploads.example.com\", \"*.uploads.example.com\"]\n\
         backend = \"{uploads}\"\nhealth.interval = \"200ms\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tls_clients_reach_the_backend_their_server_name_picks() {
    let pem = tokio::task::spawn_blocking(|| {
        haproxy::haproxy();
        certificate("tls")
    })
    .await
    .unwrap();
    let default = tls_backend(&pem, "default").await;
    let api = tls_backend(&pem, "api").await;
    let uploads = tls_backend(&pem, "uploads").await;
    let text = routes_file(Some(&default.addr.to_string()), &api.addr.to_string(), &uploads.addr.to_string(), "");
    let proxy = Proxy::start_with_file(&text, &[]).await;

    assert_eq!(https_via(proxy.addr, Some("api.example.com")).await, "api");
    assert_eq!(https_via(proxy.addr, Some("API.Example.COM")).await, "api", "names match without case");
    assert_eq!(https_via(proxy.addr, Some("uploads.example.com")).await, "uploads");
    assert_eq!(https_via(proxy.addr, Some("eu.uploads.example.com")).await, "uploads", "the wildcard");
    assert_eq!(https_via(proxy.addr, Some("www.example.com")).await, "default", "no route: the default");
    assert_eq!(https_via(proxy.addr, None).await, "default", "no server name: the default");

    let routed = |b: &str| format!("static_ingress_backend_connections_total{{backend=\"{b}\"}}");
    assert_eq!(proxy.metric(&routed("api")).await, 2.0);
    assert_eq!(proxy.metric(&routed("uploads")).await, 2.0);
    assert_eq!(proxy.metric(&routed("default")).await, 2.0);
    // /status has a section per backend.
    let status: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).unwrap();
    let names: Vec<&str> =
        status["backends"].as_array().unwrap().iter().map(|b| b["route"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "api", "uploads"]);
    assert_eq!(
        status["backends"][2]["server_names"],
        serde_json::json!(["uploads.example.com", "*.uploads.example.com"])
    );
    assert_eq!(status["backends"][1]["addresses"][0]["address"], api.addr.to_string());
    let _ = std::fs::remove_dir_all(pem.parent().unwrap());
}

/// A backend that records everything it is sent and answers `name` once it has a byte.
struct Capture {
    addr: std::net::SocketAddr,
    got: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Capture {
    async fn start(name: &'static str) -> Capture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&got);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { continue };
                let sink = std::sync::Arc::clone(&sink);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut answered = false;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                        if !answered {
                            answered = true;
                            let _ = s.write_all(name.as_bytes()).await;
                        }
                    }
                });
            }
        });
        Capture { addr, got }
    }

    fn got(&self) -> Vec<u8> {
        self.got.lock().unwrap().clone()
    }
}

async fn answer_of(s: &mut TcpStream, len: usize) -> String {
    let mut buf = vec![0u8; len];
    within(BOUND, "the backend's answer", s.read_exact(&mut buf)).await.expect("an answer");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_split_over_many_segments_is_routed_and_forwarded_whole() {
    let (default, api, uploads) =
        (Capture::start("default").await, Capture::start("api").await, Capture::start("uploads").await);
    let text = routes_file(Some(&default.addr.to_string()), &api.addr.to_string(), &uploads.addr.to_string(), "");
    let proxy = Proxy::start_with_file(&text, &[]).await;
    let hello = client_hello("api.example.com");
    // The hello as rustls writes it (one record), and the same message in three records, each
    // sent in pieces: a byte at a time for the first 6 bytes, then ragged ones, each its own
    // segment.
    for wire in [hello.clone(), in_records(&hello, &[3, 200])] {
        let before = api.got().len();
        let mut s = proxy.connect().await;
        s.set_nodelay(true).unwrap();
        let mut rest: &[u8] = &wire;
        for size in [1, 1, 1, 1, 1, 1, 37, 3, 150].iter().chain(std::iter::repeat(&61)) {
            if rest.is_empty() {
                break;
            }
            let n = (*size).min(rest.len());
            s.write_all(&rest[..n]).await.unwrap();
            rest = &rest[n..];
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(answer_of(&mut s, 3).await, "api");
        s.write_all(b"after").await.unwrap();
        let mut want = wire.clone();
        want.extend_from_slice(b"after");
        eventually("the api backend to get every byte", async || api.got()[before..] == want[..]).await;
    }
    assert!(default.got().is_empty() && uploads.got().is_empty());
}

/// The handshake message of `hello` (one record) re-framed into records whose payloads have
/// the given sizes (the last takes the rest).
fn in_records(hello: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut message: &[u8] = &hello[5..];
    let mut out = Vec::new();
    for size in sizes.iter().copied().chain(std::iter::once(usize::MAX)) {
        if message.is_empty() {
            break;
        }
        let n = size.min(message.len());
        out.extend([22, 3, 1]);
        out.extend((n as u16).to_be_bytes());
        out.extend(&message[..n]);
        message = &message[n..];
    }
    out
}

/// A backend that speaks first, as SMTP does: it greets each connection at once.
async fn greeter() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\r\n").await;
                let mut sink = [0u8; 64];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_reaches_the_default_once_the_hello_wait_ends() {
    let (api, uploads) = (Capture::start("api").await, Capture::start("uploads").await);
    let server_first = greeter().await.to_string();
    let text =
        routes_file(Some(&server_first), &api.addr.to_string(), &uploads.addr.to_string(), "sni_timeout = \"300ms\"\n");
    let proxy = Proxy::start_with_file(&text, &[]).await;
    let mut quiet = proxy.connect().await;
    // The client writes nothing: after proxy.sni_timeout it is routed as not TLS (to the
    // default), whose greeting then arrives.
    let started = std::time::Instant::now();
    assert_eq!(answer_of(&mut quiet, 11).await, "220 hello\r\n");
    // (The proxy's wait starts at its accept, a little before the client's connect returns.)
    assert!(started.elapsed() >= Duration::from_millis(250), "routed before the wait ended: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_on_one_listener_only_is_not_reached_through_another() {
    let (default, api, uploads, nine) = (
        Capture::start("default").await,
        Capture::start("api").await,
        Capture::start("uploads").await,
        Capture::start("nine").await,
    );
    let mut text = routes_file(Some(&default.addr.to_string()), &api.addr.to_string(), &uploads.addr.to_string(), "");
    text.push_str(&format!(
        "[[route]]\nname = \"nine\"\nserver_names = [\"nine.example.com\"]\nbackend = \"{}\"\nlisten = [\"127.0.0.2:0\"]\n",
        nine.addr
    ));
    let proxy = Proxy::start_with_file(&text, &[("proxy.listen", "127.0.0.1:0,127.0.0.2:0")]).await;
    let hello = client_hello("nine.example.com");
    let mut on_first = within(BOUND, "connect", TcpStream::connect(proxy.addrs[0])).await.unwrap();
    on_first.write_all(&hello).await.unwrap();
    assert_eq!(answer_of(&mut on_first, 7).await, "default");
    let mut on_second = within(BOUND, "connect", TcpStream::connect(proxy.addrs[1])).await.unwrap();
    on_second.write_all(&hello).await.unwrap();
    assert_eq!(answer_of(&mut on_second, 4).await, "nine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_and_oversized_hellos_go_where_the_config_says() {
    let (default, api, uploads) =
        (Capture::start("default").await, Capture::start("api").await, Capture::start("uploads").await);
    let text = routes_file(
        Some(&default.addr.to_string()),
        &api.addr.to_string(),
        &uploads.addr.to_string(),
        "sni_timeout = \"300ms\"\nsni_max_bytes = 512\n",
    );
    let proxy = Proxy::start_with_file(&text, &[]).await;

    // Plain text: not TLS, so to the default route (proxy.non_tls = "default"), bytes intact.
    let mut s = proxy.connect().await;
    s.write_all(b"PING\r\n").await.unwrap();
    assert_eq!(answer_of(&mut s, 7).await, "default");
    // A hello larger than proxy.sni_max_bytes (a big extension before the name): as unnamed.
    let mut big = client_hello("api.example.com");
    assert!(big.len() < 512, "rustls's hello is small");
    big = padded(&big, 2000);
    let mut s = proxy.connect().await;
    s.write_all(&big).await.unwrap();
    assert_eq!(answer_of(&mut s, 7).await, "default");
    eventually("the default backend to get the whole hello", async || default.got().ends_with(&big)).await;
    assert!(api.got().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_refusals_configured_unclaimed_connections_are_reset_and_counted() {
    let (api, uploads) = (Capture::start("api").await, Capture::start("uploads").await);
    let text = routes_file(
        None,
        &api.addr.to_string(),
        &uploads.addr.to_string(),
        "unmatched = \"refuse\"\nnon_tls = \"refuse\"\n",
    );
    let proxy = Proxy::start_with_file(&text, &[]).await;
    for first in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), client_hello("nowhere.example.org")] {
        let mut s = proxy.connect().await;
        s.write_all(&first).await.unwrap();
        let mut buf = [0u8; 16];
        let got = within(BOUND, "the reset", s.read(&mut buf)).await;
        assert!(matches!(got, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{got:?}");
    }
    eventually("both counted as no_route", async || proxy.closed("no_route").await == 2.0).await;
    let mut s = proxy.connect().await;
    s.write_all(&client_hello("api.example.com")).await.unwrap();
    assert_eq!(answer_of(&mut s, 3).await, "api");
}

/// `hello` (one record, one ClientHello) with an extension of `pad` bytes added in front of
/// the others, lengths fixed up.
fn padded(hello: &[u8], pad: usize) -> Vec<u8> {
    // Record header (5), handshake header (4), version (2), random (32), session id.
    let mut i = 5 + 4 + 2 + 32;
    i += 1 + hello[i] as usize;
    let suites = u16::from_be_bytes([hello[i], hello[i + 1]]) as usize;
    i += 2 + suites;
    i += 1 + hello[i] as usize;
    let ext_len = u16::from_be_bytes([hello[i], hello[i + 1]]) as usize;
    let mut body = hello[9..i].to_vec();
    body.extend(((ext_len + 4 + pad) as u16).to_be_bytes());
    body.extend([0xFF, 0x00]); // an unassigned extension type
    body.extend((pad as u16).to_be_bytes());
    body.extend(std::iter::repeat_n(0u8, pad));
    body.extend(&hello[i + 2..]);
    let mut message = vec![1];
    message.extend(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend(body);
    let mut record = vec![22, 3, 1];
    record.extend((message.len() as u16).to_be_bytes());
    record.extend(message);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_down_fails_health_only_when_configured_to() {
    let default = Capture::start("default").await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
    let uploads = Capture::start("uploads").await;
    for (policy, want) in [("all_backends_down", 200), ("any_backend_down", 503)] {
        let text = routes_file(Some(&default.addr.to_string()), &closed, &uploads.addr.to_string(), "");
        let proxy =
            Proxy::start_with_file(&text, &[("health.unhealthy_when", policy), ("health.interval", "100ms")]).await;
        eventually("the api backend to be down", async || {
            let s: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).unwrap();
            s["backends"][1]["health"]["healthy"] == false
        })
        .await;
        let r = get(proxy.admin, "/health").await;
        assert_eq!(r.status, want, "{policy}: {}", r.body);
        if want == 503 {
            assert!(r.body.contains("api: no healthy backend address"), "{}", r.body);
        }
    }
}
