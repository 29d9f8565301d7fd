//! Test harness: the real server on port 0, small real backends, a raw HTTP client for the
//! admin port, and waits that are always bounded.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod access;
pub mod dns;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use static_ingress::backend::{Backends, Resolution};
use static_ingress::lifecycle::Signal;
use static_ingress::metrics::Metrics;
use static_ingress::{Config, Exit, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The longest any single wait in a test may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` every 10 ms until it returns true, failing after [`BOUND`].
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    within(BOUND, what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Every proxy listener, in `proxy.listen` order (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// The operator's listeners (`admin.operator_listen`), as bound.
    pub operator: Vec<SocketAddr>,
    pub backends: Arc<Backends>,
    pub metrics: Arc<Metrics>,
    pub signals: mpsc::Sender<Signal>,
    pub run: JoinHandle<Exit>,
}

/// Settings every test proxy gets: loopback, port 0, no drain delay, and two workers (each
/// with its own listener), whatever this machine's CPUs would give by default.
const BASE: &[(&str, &str)] = &[
    ("proxy.listen", "127.0.0.1:0"),
    ("proxy.workers", "2"),
    ("admin.listen", "127.0.0.1:0"),
    ("lifecycle.drain_delay", "0s"),
    ("lifecycle.grace_period", "5s"),
];

impl Proxy {
    /// Starts a proxy to `backend` with `extra` settings on top of [`BASE`].
    pub async fn start(backend: SocketAddr, extra: &[(&str, &str)]) -> Proxy {
        Proxy::start_to(&backend.to_string(), extra).await
    }

    /// Starts a proxy to `backend` given as `host:port`, such as a name the test DNS serves.
    pub async fn start_to(backend: &str, extra: &[(&str, &str)]) -> Proxy {
        let mut pairs: Vec<(&str, &str)> = BASE.to_vec();
        pairs.push(("backend.address", backend));
        pairs.extend_from_slice(extra);
        let config = Config::from_pairs(pairs).expect("test config is valid");
        let server = Server::bind(config).expect("binding on port 0 succeeds");
        Proxy::running(server)
    }

    /// Starts a proxy from the config file `text` (with `[[route]]`s, say), with [`BASE`] and
    /// `extra` as flags on top.
    pub async fn start_with_file(text: &str, extra: &[(&str, &str)]) -> Proxy {
        let file = static_ingress::config::FileLayer::parse(std::path::Path::new("test.toml"), text)
            .expect("the test's config file parses");
        let overrides = Proxy::overrides(extra);
        let config = Config::from_layers(Some(&file), &overrides).expect("test config is valid").config;
        let server = Server::bind(config).expect("binding on port 0 succeeds");
        Proxy::running(server)
    }

    /// Starts a proxy from the config file at `path`, which SIGHUP (a `Signal::Reload` on
    /// `signals`) reads again, with [`BASE`] and `extra` as flags on top, as `run` does.
    pub async fn start_reloadable(path: &std::path::Path, extra: &[(&str, &str)]) -> Proxy {
        let overrides = Proxy::overrides(extra);
        let config = Config::load(Some(path), &overrides).expect("test config is valid").config;
        let file = path.to_path_buf();
        let server = Server::bind(config)
            .expect("binding on port 0 succeeds")
            .reload_with(move || Config::load(Some(&file), &overrides));
        Proxy::running(server)
    }

    /// Like [`Proxy::start_reloadable`], with `proxy.listen` left to the file (so that a reload
    /// can change it).
    pub async fn start_reloadable_listening(path: &std::path::Path, extra: &[(&str, &str)]) -> Proxy {
        let overrides: Vec<_> = Proxy::overrides(extra).into_iter().filter(|o| o.key.name != "proxy.listen").collect();
        let config = Config::load(Some(path), &overrides).expect("test config is valid").config;
        let file = path.to_path_buf();
        let server =
            Server::bind(config).expect("binding succeeds").reload_with(move || Config::load(Some(&file), &overrides));
        Proxy::running(server)
    }

    /// Runs a bound `server`, its signals on [`Proxy::signals`].
    fn running(server: Server) -> Proxy {
        let (signals, rx) = mpsc::channel(4);
        Proxy {
            addr: server.proxy_addrs()[0],
            addrs: server.proxy_addrs().to_vec(),
            admin: server.admin_addr(),
            operator: server.operator_addrs().to_vec(),
            backends: server.backends(),
            metrics: server.metrics(),
            signals,
            run: tokio::spawn(server.run(rx)),
        }
    }

    /// The flags every test proxy gets ([`BASE`]) and `extra`, as overrides.
    fn overrides(extra: &[(&str, &str)]) -> Vec<static_ingress::config::Override> {
        BASE.iter()
            .chain(extra)
            .map(|(k, v)| static_ingress::config::Override::flag(k, *v).expect("a known key"))
            .collect()
    }

    /// Replaces the backend address set, as a DNS answer would.
    pub fn set_backends(&self, addrs: &[SocketAddr]) {
        self.backends.publish(addrs.iter().copied(), Resolution::answered(None));
    }

    pub async fn connect(&self) -> TcpStream {
        within(BOUND, "connecting to the proxy", TcpStream::connect(self.addr)).await.expect("proxy accepts")
    }

    pub async fn terminate(&self) {
        self.signals.send(Signal::Terminate).await.expect("server is running");
    }

    /// Waits for `run` to return.
    pub async fn exit(self) -> Exit {
        within(BOUND, "the server to exit", self.run).await.expect("server task did not panic")
    }

    /// The value of one sample in `/metrics`, e.g. `static_ingress_tcp_close_total{reason="completed"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        sample_value(&get(self.admin, "/metrics").await.body, sample)
    }

    pub async fn closed(&self, reason: &str) -> f64 {
        self.metric(&format!("static_ingress_tcp_close_total{{reason=\"{reason}\"}}")).await
    }
}

/// The value of one sample in a `/metrics` body; fails the test when it is missing.
pub fn sample_value(body: &str, sample: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("metric {sample} not found in:\n{body}"))
        .trim()
        .parse()
        .expect("metric value is a number")
}

/// A response from the admin server.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    within(BOUND, "an admin response", async {
        let mut s = TcpStream::connect(addr).await.expect("admin accepts");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
        Response { status, head: head.to_string(), body: body.to_string() }
    })
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path).await
}

/// A backend: a real listener on port 0 whose connections are handled by `handler`.
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        Backend::serve(listener, handler)
    }

    fn serve<F, Fut>(listener: TcpListener, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().expect("backend address");
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(handler(stream));
            }
        });
        Backend { addr, task }
    }

    /// Sends back everything it receives, and closes its side after the client closes.
    pub async fn echo() -> Backend {
        Backend::start(|mut s| async move {
            let (mut r, mut w) = s.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        })
        .await
    }

    /// Greets every connection with `name` and a newline, then echoes.
    pub async fn named(addr: SocketAddr, name: &'static str) -> std::io::Result<Backend> {
        Ok(Backend::named_on(TcpListener::bind(addr).await?, name))
    }

    /// [`Backend::named`] on a listener the test already holds.
    pub fn named_on(listener: TcpListener, name: &'static str) -> Backend {
        Backend::serve(listener, move |mut s| async move {
            if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        })
    }

    /// One named backend per loopback IP, all on the same port (as an ELB's addresses are).
    pub async fn fleet(ips: &[std::net::Ipv4Addr], names: &[&'static str]) -> (u16, Vec<Backend>) {
        'port: for _ in 0..20 {
            let first = Backend::named(SocketAddr::from((ips[0], 0)), names[0]).await.expect("bind");
            let port = first.addr.port();
            let mut fleet = vec![first];
            for (ip, name) in ips.iter().zip(names.iter()).skip(1) {
                match Backend::named(SocketAddr::from((*ip, port)), name).await {
                    Ok(b) => fleet.push(b),
                    Err(_) => continue 'port,
                }
            }
            return (port, fleet);
        }
        panic!("no port free on every backend IP");
    }

    /// Holds connections open without reading or writing.
    pub async fn silent() -> Backend {
        Backend::start(|s| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        })
        .await
    }
}

/// A client socket bound to a loopback port before it connects, and that port: the address
/// the proxy will log a connection from, known even when the connect itself is reset.
pub fn bound_client() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

/// An address where nothing listens: connects are refused. The port stays bound (without
/// listening) for the rest of the test binary's life, so no other test can start listening on
/// it; a port closed and handed on could be taken by a parallel test's listener at once.
pub async fn refusing_addr() -> SocketAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    let addr = socket.local_addr().expect("address").as_socket().expect("an IP address");
    // Kept open on purpose, one descriptor per call: a bound socket that never listens is what
    // makes the kernel refuse connects to its port.
    std::mem::forget(socket);
    addr
}

/// A listener whose accept queue is full, so further SYNs are dropped and connects hang: the
/// loopback stand-in for an address that does not answer. Keep it alive while in use.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: std::net::TcpListener,
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
        socket.listen(0).expect("listen");
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().expect("address");
        let mut queued = Vec::new();
        for _ in 0..4 {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                queued.push(s);
            }
        }
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "the blackhole listener still accepts connections"
        );
        Blackhole { addr, _listener: listener, _queued: queued }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Connects through the proxy and returns the backend's greeting line (see [`Backend::named`]).
pub async fn greeting(proxy: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    within(BOUND, "a greeting", async {
        let mut s = TcpStream::connect(proxy).await?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if s.read(&mut byte).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        Ok((String::from_utf8_lossy(&line).into_owned(), s))
    })
    .await
}

/// Writes one message and reads exactly as many bytes back.
pub async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    within(BOUND, "an echo round trip", async {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0; msg.len()];
        s.read_exact(&mut back).await.expect("read echo");
        back
    })
    .await
}

/// Reads until the peer closes; Ok(bytes) on a FIN, Err on a reset.
pub async fn read_until_closed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    within(BOUND, "the connection to close", async {
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map(|_| buf)
    })
    .await
}

/// A real TLS client's first flight (rustls): its ClientHello, asking for `name`.
pub fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("a valid server name");
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("a client connection");
    let mut wire = Vec::new();
    client.write_tls(&mut wire).expect("writing to a Vec does not fail");
    wire
}
