//! The data-path cases of tests/proxy.rs on three workers, with every byte through splice(2) (`proxy.splice =
//! "always"`), and what `auto` does: small exchanges through a buffer, bulk through pipes,
//! and no pipe held by a connection that has gone quiet.

mod common;

const SPLICE: &str = "always";
const WORKERS: &str = "3";

include!("cases/proxy.rs");

async fn spliced(proxy: &Proxy) -> f64 {
    proxy.metric("static_ingress_splice_bytes_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_splices_a_direction_once_it_has_moved_bulk_data_and_holds_no_pipe_when_quiet() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("proxy.splice", "auto"), ("proxy.max_connections", "1000")]).await;
    assert!(proxy.metric("static_ingress_splice_pipes_limit").await > 0.0, "no pipe pool under this test's limits");
    let mut c = proxy.connect().await;
    // An API-sized exchange: through the buffer.
    for i in 0..10u64 {
        let msg = pattern(1000, i);
        assert_eq!(round_trip(&mut c, &msg).await, msg);
    }
    assert_eq!(spliced(&proxy).await, 0.0, "small exchanges went through pipes");
    // A bulk transfer: past 128 KiB each direction goes through a pipe.
    let bulk = pattern(4 << 20, 7);
    let (mut r, mut w) = c.into_split();
    let sent = bulk.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        w
    });
    let mut back = vec![0u8; bulk.len()];
    within(BOUND, "the echo", r.read_exact(&mut back)).await.expect("echoed");
    assert!(back == bulk, "bytes differ");
    let mut w = writer.await.expect("writer");
    let through_pipes = spliced(&proxy).await;
    // Each direction copied up to 128 KiB (and the 10 KB before) before it spliced.
    assert!(through_pipes >= 2.0 * (bulk.len() as f64 - 256.0 * 1024.0), "{through_pipes}");
    // Quiet now, still open: the pipes are back in the pool.
    eventually("the pipes to be back in the pool", async || {
        proxy.metric("static_ingress_splice_pipes{state=\"in_use\"}").await == 0.0
    })
    .await;
    assert!(proxy.metric("static_ingress_splice_pipes{state=\"free\"}").await >= 1.0);
    // And the connection still works, and ends cleanly.
    w.write_all(b"after").await.unwrap();
    let mut tail = [0u8; 5];
    within(BOUND, "the echo", r.read_exact(&mut tail)).await.unwrap();
    assert_eq!(&tail, b"after");
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(BOUND, "the end", r.read_to_end(&mut rest)).await.unwrap();
    eventually("completed", async || proxy.closed("completed").await == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_room_for_pipes_every_byte_is_copied() {
    // The default limit of 10,000 connections takes every descriptor this test process may
    // have (at most 20,000): the pool is empty and splice is never tried.
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &[("proxy.splice", "always")]).await;
    let limit = proxy.metric("static_ingress_splice_pipes_limit").await;
    let mut c = proxy.connect().await;
    let msg = pattern(300_000, 3);
    assert_eq!(round_trip(&mut c, &msg).await, msg);
    if limit == 0.0 {
        assert_eq!(spliced(&proxy).await, 0.0);
    } else {
        // A machine with a higher open-file limit has room: then it splices.
        assert_eq!(spliced(&proxy).await, 2.0 * msg.len() as f64);
    }
}
