//! The proxy out of file descriptors while connecting to the backend: the client is told at
//! once, and the backend is not blamed. A test binary of its own, because it exhausts the
//! descriptors of the whole process.

mod common;

use std::fs::File;

use common::*;
use static_ingress::metrics::CloseReason;
use tokio::io::AsyncReadExt;

/// Open files asked for at most while exhausting the limit: bounds the loop below.
const MAX_FILLER: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_while_connecting_is_fd_limit_not_a_backend_error() {
    // An echo backend that reports each connection it has closed.
    let (ended, mut ends) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut s| {
        let ended = ended.clone();
        async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            drop(s);
            let _ = ended.send(());
        }
    })
    .await;
    let proxy = Proxy::start(backend.addr, &[("health.interval", "1h")]).await;
    let addr = std::sync::Arc::clone(&proxy.backends.current().addrs[0]);
    // The first health check is over at both ends: no descriptor is in use but the test's own.
    eventually("the first health check", async || addr.last_check().is_some()).await;
    within(BOUND, "the backend to close the health check's connection", ends.recv()).await;

    // A scrape before the shortage, as Prometheus makes every few seconds.
    let before = proxy.metrics.render();
    assert!(before.contains("process_open_fds "), "{before}");

    let (soft, hard) = rlimit::Resource::NOFILE.get().expect("getrlimit");
    let open = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count() as u64;
    rlimit::Resource::NOFILE.set(open + 64, hard).expect("lower the soft limit");
    let mut filler: Vec<File> = Vec::new();
    while filler.len() < MAX_FILLER {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "opening /dev/null: {e}");
                break;
            }
        }
    }
    // Two descriptors left: the client's socket and the one the proxy accepts. None is left for
    // the proxy's socket to the backend.
    filler.truncate(filler.len() - 2);
    let connected = tokio::net::TcpStream::connect(proxy.addr).await;
    let outcome = match connected {
        Ok(mut client) => within(BOUND, "the client to be told", client.read(&mut [0; 16])).await.map_err(|e| e.kind()),
        Err(e) => Err(e.kind()),
    };
    let closes = proxy.metrics.close_count(CloseReason::FdLimit);
    // A scrape now cannot read /proc: the process metrics keep their last values, flagged.
    let during = proxy.metrics.render();

    drop(filler);
    rlimit::Resource::NOFILE.set(soft, hard).expect("restore the soft limit");

    assert_eq!(outcome, Err(std::io::ErrorKind::ConnectionReset), "the client is reset at once");
    // (The accept loop's next accept, with no descriptor left, fails too and backs off: that is
    // counted apart, in accept_errors_total.)
    assert_eq!(closes, 1, "counted as fd_limit");
    assert_eq!(proxy.closed("connect_failed").await, 0.0);
    for reason in ["refused", "timeout", "unreachable", "other"] {
        let sample = format!("static_ingress_backend_connect_errors_total{{backend=\"default\",reason=\"{reason}\"}}");
        assert_eq!(proxy.metric(&sample).await, 0.0, "{sample}");
    }
    assert!(!addr.is_suspect(), "the backend address was blamed for the proxy's own shortage");

    assert!(during.contains("process_open_fds "), "process_open_fds vanished while out of descriptors:\n{during}");
    assert!(during.contains("static_ingress_process_metrics_stale 1"), "{during}");
    assert_eq!(proxy.metric("static_ingress_process_metrics_stale").await, 0.0);

    // With descriptors back, the same address serves.
    let mut c = proxy.connect().await;
    assert_eq!(round_trip(&mut c, b"again").await, b"again");
}
