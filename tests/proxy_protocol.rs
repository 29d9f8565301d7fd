//! `backend.proxy_protocol = "v2"` against a real receiver: HAProxy (Debian's package,
//! installed by `scripts/install-system-packages.sh` when missing) with `accept-proxy`, which
//! answers every request with the client address it read from the header.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Installs HAProxy once per test binary when it is missing; the path of the binary.
fn haproxy() -> &'static str {
    static BIN: OnceLock<Result<String, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/install-system-packages.sh");
        let status = std::process::Command::new(&script)
            .arg("haproxy")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("{} does not run: {e}", script.display()))?;
        if !status.success() {
            return Err(format!("{} haproxy failed ({status})", script.display()));
        }
        Ok("/usr/sbin/haproxy".to_string())
    });
    found.as_deref().unwrap_or_else(|e| panic!("{e}"))
}

/// HAProxy on a listening socket of the test's own (passed to it as fd 3: no port to guess),
/// answering each HTTP request with `src:src_port dst:dst_port` as the PROXY header told it.
/// Killed (by its PID) when dropped.
struct Receiver {
    addr: SocketAddr,
    _child: tokio::process::Child,
    _dir: PathBuf,
}

impl Receiver {
    async fn start(bind: &str) -> Receiver {
        let bin = tokio::task::spawn_blocking(haproxy).await.expect("the install does not panic");
        let listener = std::net::TcpListener::bind(bind).expect("bind the receiver's socket");
        let addr = listener.local_addr().unwrap();
        let dir = std::env::temp_dir().join(format!("static-ingress-haproxy-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            "global\n  maxconn 100\n\
             defaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 5s\n\
             frontend receiver\n  bind fd@3 accept-proxy\n\
             \x20 http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port] %[dst]:%[dst_port]\"\n",
        )
        .unwrap();
        let fd = listener.as_raw_fd();
        let mut command = tokio::process::Command::new(bin);
        command.args(["-db", "-f"]).arg(&config).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
        // The listening socket becomes the child's fd 3 (dup2 clears close-on-exec on the copy).
        unsafe {
            command
                .pre_exec(move || if libc::dup2(fd, 3) == 3 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
        }
        let child = command.spawn().expect("haproxy starts");
        drop(listener);
        Receiver { addr, _child: child, _dir: dir }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// One HTTP request on `client`, a connection through the proxy: the body of the answer, or
/// `None` if the connection closed without one.
async fn request_through(client: &mut TcpStream) -> Option<String> {
    client.write_all(b"GET / HTTP/1.1\r\nHost: receiver\r\nConnection: close\r\n\r\n").await.ok()?;
    let mut raw = Vec::new();
    within(BOUND, "the receiver's answer", client.read_to_end(&mut raw)).await.ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_reads_the_clients_address_from_the_v2_header() {
    let receiver = Receiver::start("127.0.0.1:0").await;
    let proxy = Proxy::start(receiver.addr, &[("backend.proxy_protocol", "v2")]).await;
    // Several connections, each with its own source port.
    for _ in 0..3 {
        let mut client = proxy.connect().await;
        let me = client.local_addr().unwrap();
        let seen = request_through(&mut client).await.expect("HAProxy accepted the header and answered");
        assert_eq!(seen, format!("{}:{} {}:{}", me.ip(), me.port(), proxy.addr.ip(), proxy.addr.port()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_sent_as_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        panic!("this machine has no IPv6 loopback, which the test needs");
    }
    let receiver = Receiver::start("127.0.0.1:0").await;
    let proxy = Proxy::start(receiver.addr, &[("backend.proxy_protocol", "v2"), ("proxy.listen", "[::1]:0")]).await;
    let mut client = within(BOUND, "connect", TcpStream::connect(proxy.addr)).await.unwrap();
    let me = client.local_addr().unwrap();
    let seen = request_through(&mut client).await.expect("HAProxy accepted the header and answered");
    assert_eq!(seen, format!("::1:{} ::1:{}", me.port(), proxy.addr.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_nothing_is_sent_before_the_clients_bytes() {
    // The receiver insists on a header: without one it closes the connection unanswered.
    let receiver = Receiver::start("127.0.0.1:0").await;
    let proxy = Proxy::start(receiver.addr, &[]).await;
    let mut client = proxy.connect().await;
    assert_eq!(request_through(&mut client).await, None, "HAProxy answered a connection without a header");
    // And with the header on, the same receiver answers: the refusal above was the header's.
    let with = Proxy::start(receiver.addr, &[("backend.proxy_protocol", "v2")]).await;
    assert!(request_through(&mut with.connect().await).await.is_some());
}
