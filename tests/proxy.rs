//! The data path as a client sees it: bytes, half-close, failover, timeouts, the limit; through
//! the copy path (a user buffer), one worker. tests/proxy_splice.rs runs the same cases through
//! splice(2) with three workers.

mod common;

const SPLICE: &str = "off";
const WORKERS: &str = "1";

include!("cases/proxy.rs");

/// A flood of connections over the limit gets so many access-log lines a second, not one each:
/// it must not crowd the served connections' lines out of the log's buffer. The metric still
/// counts every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_the_limit_is_counted_whole_but_logged_a_hundred_a_second() {
    access::capture();
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, &with_splice(&[("proxy.max_connections", "1")])).await;
    let mut held = proxy.connect().await;
    assert_eq!(round_trip(&mut held, b"x").await, b"x");

    // Enough that the connects outrun the budget: at 100 a second it would take 20 s.
    const FLOOD: usize = 2000;
    let started = Instant::now();
    let mut refused = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let (s, from) = bound_client();
        refused.push(from);
        let _ = within(BOUND, "a refused connect", s.connect(proxy.addr)).await;
    }
    eventually("every refusal counted", async || proxy.closed("over_limit").await == FLOOD as f64).await;
    let seconds = started.elapsed().as_secs() + 1;
    assert!(seconds < 10, "{FLOOD} connects took {seconds} s: too slow to exceed the budget");
    // The last lines are out once the flood's own are: wait for the budget's first.
    let _ = access::line_of(refused[0]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logged = refused.iter().filter(|&&a| access::find(a).is_some()).count() as u64;
    assert!(logged >= 100, "the first hundred of a second are logged: {logged}");
    assert!(logged <= 100 * (seconds + 1), "{logged} lines for {FLOOD} refusals in {seconds} s");
    assert_eq!(round_trip(&mut held, b"y").await, b"y", "the served connection is untouched");
}
