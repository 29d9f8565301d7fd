//! SIGHUP reload: the config file is read again and its routes, backends and `[proxy]`
//! timeouts apply to new connections, while every open connection goes on; an invalid file
//! changes nothing and is counted. Driven through the server's signal channel, as the signal
//! handler does (tests/cli.rs covers the real signal).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use static_ingress::lifecycle::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers each connection with its `name` (5 bytes), then echoes.
async fn named_echo(name: &'static str) -> SocketAddr {
    assert_eq!(name.len(), 5);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut answered = false;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply: &[u8] = if answered { &buf[..n] } else { name.as_bytes() };
                    answered = true;
                    if s.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A new connection asking for `name`: which backend answered.
async fn ask(proxy: SocketAddr, name: &str) -> std::io::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&client_hello(name)).await?;
    let mut who = [0u8; 5];
    tokio::time::timeout(BOUND, s.read_exact(&mut who)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    Ok((String::from_utf8_lossy(&who).into_owned(), s))
}

fn config_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("static-ingress-reload-{name}-{}.toml", std::process::id()))
}

fn routes(default: SocketAddr, api: SocketAddr, uploads: Option<SocketAddr>, extra: &str) -> String {
    let mut text = format!(
        "[backend]\naddress = \"{default}\"\n{extra}\n[[route]]\nname = \"api\"\nserver_names = [\"api.example.com\"]\nbackend = \"{api}\"\n"
    );
    if let Some(u) = uploads {
        text.push_str(&format!(
            "[[route]]\nname = \"uploads\"\nserver_names = [\"uploads.example.com\"]\nbackend = \"{u}\"\n"
        ));
    }
    text
}

async fn reload(proxy: &Proxy, path: &std::path::Path, text: &str, result: &str, count: f64) {
    std::fs::write(path, text).unwrap();
    proxy.signals.send(Signal::Reload).await.unwrap();
    let sample = format!("static_ingress_config_reloads_total{{result=\"{result}\"}}");
    eventually("the reload to be counted", async || proxy.metric(&sample).await == count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_change_routes_for_new_connections_and_break_none() {
    let (default, one, two, up) =
        (named_echo("deflt").await, named_echo("one..").await, named_echo("two..").await, named_echo("up...").await);
    let path = config_file("routes");
    std::fs::write(&path, routes(default, one, None, "")).unwrap();
    let proxy = Proxy::start_reloadable(&path, &[]).await;

    // A long transfer through route api (backend one), kept going across every reload.
    let (who, mut long) = ask(proxy.addr, "api.example.com").await.unwrap();
    assert_eq!(who, "one..");
    // New connections all the while (four clients, one after another each), each of which
    // must be served.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served, failed, addr) =
                (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&failed), proxy.addr);
            tokio::spawn(async move {
                // Bounded: 5,000 connections each at most.
                for _ in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match ask(addr, "api.example.com").await {
                        Ok((who, _)) if who == "one.." || who == "two.." => served.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("a connection during the reloads failed: {:?}", other.map(|(w, _)| w));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    // Traffic before, between and after the reloads.
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    settle().await;
    let mut chunk = 0u32;
    let mut echo = async |long: &mut TcpStream| {
        chunk += 1;
        let msg = format!("chunk {chunk:06}");
        long.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within(BOUND, "the long transfer's echo", long.read_exact(&mut back)).await.expect("the long transfer goes on");
        assert_eq!(back, msg.as_bytes());
    };
    echo(&mut long).await;

    // 1. Route api moves to backend two, and a route uploads appears.
    reload(&proxy, &path, &routes(default, two, Some(up), ""), "ok", 1.0).await;
    settle().await;
    assert_eq!(ask(proxy.addr, "api.example.com").await.unwrap().0, "two..");
    assert_eq!(ask(proxy.addr, "uploads.example.com").await.unwrap().0, "up...");
    echo(&mut long).await;

    // 2. An invalid file: nothing changes.
    reload(&proxy, &path, "[proxy\nthis is not toml", "failed", 1.0).await;
    settle().await;
    assert_eq!(ask(proxy.addr, "api.example.com").await.unwrap().0, "two..");
    assert_eq!(ask(proxy.addr, "uploads.example.com").await.unwrap().0, "up...");
    echo(&mut long).await;

    // 3. Route uploads goes away (its name now falls to the default), and a timeout changes.
    reload(&proxy, &path, &routes(default, two, None, "[proxy]\nidle_timeout = \"300s\"\n"), "ok", 2.0).await;
    settle().await;
    assert_eq!(ask(proxy.addr, "uploads.example.com").await.unwrap().0, "deflt");
    echo(&mut long).await;

    stop.store(true, Ordering::Relaxed);
    for task in load {
        within(BOUND, "the load to stop", task).await.unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    println!("{served} connections served during three reloads");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "connections failed during the reloads");
    assert!(served >= 100, "only {served} connections during the reloads");
    assert_eq!(proxy.metric("static_ingress_config_reloads_total{result=\"failed\"}").await, 1.0);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_backend_a_reload_removed_close_when_its_grace_ends() {
    let (default, one, two) = (named_echo("deflt").await, named_echo("one..").await, named_echo("two..").await);
    let path = config_file("grace");
    let grace = "[backend]\nremoved_grace = \"1s\"\n";
    let text = |api| routes(default, api, None, "").replacen("[backend]\n", grace, 1);
    std::fs::write(&path, text(one)).unwrap();
    access::capture();
    let proxy = Proxy::start_reloadable(&path, &[]).await;
    let (who, mut open) = ask(proxy.addr, "api.example.com").await.unwrap();
    let from = open.local_addr().unwrap();
    assert_eq!(who, "one..");

    // A reload that only changes the route's settings, not its backend: nothing is closed.
    let changed = text(one) + "health.interval = \"3s\"\n";
    reload(&proxy, &path, &changed, "ok", 1.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    open.write_all(b"alive").await.unwrap();
    let mut back = [0u8; 5];
    within(BOUND, "the echo", open.read_exact(&mut back)).await.expect("still open after a settings-only reload");
    assert_eq!(proxy.closed("backend_retired").await, 0.0);

    reload(&proxy, &path, &text(two), "ok", 2.0).await;
    // Still open right after the reload...
    open.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    within(BOUND, "the echo", open.read_exact(&mut back)).await.unwrap();
    // ...and reset once the removed backend's grace (1s) has passed.
    let mut buf = [0u8; 8];
    let end = within(BOUND, "the cut", open.read(&mut buf)).await;
    assert!(matches!(end, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{end:?}");
    eventually("counted as backend_retired", async || proxy.closed("backend_retired").await == 1.0).await;
    // The ClientHello read for routing counts toward the backend once it was sent there.
    let line = access::line_of(from).await;
    let hello = client_hello("api.example.com").len() as u64;
    assert_eq!(access::bytes(&line), (hello + 10, 15), "{line:?}");
    assert_eq!((line["reason"].as_str(), line["route"].as_str()), ("backend_retired", "api"));
    assert_eq!(line["backend"], one.to_string());
    let _ = std::fs::remove_file(&path);
}

/// A loopback address with a port nobody listens on now.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn active(proxy: &Proxy) -> u64 {
    let status: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).unwrap();
    status["connections"]["active"].as_u64().unwrap()
}

/// Whether a new connection to `addr` is served (the backend's name comes back).
async fn served(addr: SocketAddr) -> Option<TcpStream> {
    ask(addr, "x").await.ok().map(|(who, s)| {
        assert_eq!(who, "deflt");
        s
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_listeners_and_changes_the_limit_without_closing_anything() {
    let default = named_echo("deflt").await;
    let (a, b) = (free_addr(), free_addr());
    let path = config_file("listen");
    let text = |listen: &[SocketAddr], max: usize| {
        let listen = listen.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", ");
        format!("[proxy]\nlisten = [{listen}]\nmax_connections = {max}\n[backend]\naddress = \"{default}\"\n")
    };
    std::fs::write(&path, text(&[a], 3)).unwrap();
    let proxy = Proxy::start_reloadable_listening(&path, &[]).await;
    let mut one = served(a).await.expect("served on a");
    let mut two = served(a).await.expect("served on a");

    // Listener a goes, b comes, and the limit drops below what is open.
    reload(&proxy, &path, &text(&[b], 1), "ok", 1.0).await;
    let refused = TcpStream::connect(a).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "a removed listener still accepts");
    for s in [&mut one, &mut two] {
        s.write_all(b"still").await.unwrap();
        let mut back = [0u8; 5];
        within(BOUND, "the echo", s.read_exact(&mut back)).await.expect("open through the removed listener");
        assert_eq!(&back, b"still");
    }
    // Two open, limit one: b accepts, and resets as over the limit, until enough have ended.
    assert!(served(b).await.is_none(), "served past the lowered limit");
    assert_eq!(proxy.closed("over_limit").await, 1.0);
    let status: serde_json::Value = serde_json::from_str(&get(proxy.admin, "/status").await.body).unwrap();
    assert_eq!(status["listen"], serde_json::json!([b.to_string()]), "{status}");
    let c = &status["connections"];
    assert_eq!((&c["active"], &c["limit"], &c["accepted_total"]), (&2.into(), &1.into(), &3.into()), "{status}");
    assert_eq!(c["closed"]["over_limit"], 1, "{status}");
    drop((one, two));
    eventually("the two to close", async || active(&proxy).await == 0).await;
    let first = served(b).await.expect("served on b under the limit");
    assert!(served(b).await.is_none(), "a second connection served at limit 1");

    // Both listeners, and room for three.
    reload(&proxy, &path, &text(&[a, b], 3), "ok", 2.0).await;
    let more = [served(a).await, served(b).await];
    assert!(more.iter().all(Option::is_some), "not served under the raised limit");
    assert!(served(a).await.is_none(), "a fourth connection served at limit 3");
    assert_eq!(active(&proxy).await, 3);
    drop((first, more));
    let _ = std::fs::remove_file(&path);
}
