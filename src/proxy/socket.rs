//! Binding listeners with errors an operator can act on, and the socket options both sides of
//! a proxied connection get.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

/// Listen backlog; the kernel caps it at `net.core.somaxconn` (4096 on current kernels), which
/// the AMI raises so bursts of new connections are queued instead of dropped.
const BACKLOG: i32 = 65_535;
/// Keepalive probe interval and count once probing starts: a dead peer is noticed within a
/// minute after `proxy.tcp_keepalive`.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the {role}{hint}")]
pub struct BindError {
    pub role: &'static str,
    pub addr: SocketAddr,
    hint: &'static str,
    #[source]
    pub source: io::Error,
}

/// Binds a TCP listener on `addr`. `role` ("proxy", "admin server") names it in errors.
pub fn bind(addr: SocketAddr, role: &'static str) -> Result<TcpListener, BindError> {
    open(addr, None).map_err(|source| BindError { role, addr, hint: hint(addr, &source), source })
}

/// [`bind`] for a proxy listener, `count` times on one address (one listener per worker,
/// with SO_REUSEPORT when more than one), with TCP_NODELAY and keepalive set before they
/// listen: Linux copies them to each connection when its handshake completes (not at accept),
/// so every connection, those queued before the first accept included, has them without a
/// system call of its own. The listeners are not yet registered with a runtime: each worker
/// does that with its own.
pub fn bind_proxy(
    addr: SocketAddr,
    keepalive: Duration,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    open_group(addr, keepalive, count.max(1)).map_err(|source| BindError {
        role: "proxy",
        addr,
        hint: hint(addr, &source),
        source,
    })
}

fn open_group(addr: SocketAddr, keepalive: Duration, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if count == 1 {
        return Ok(vec![open_socket(addr, Some(keepalive), false)?.into()]);
    }
    // Another process's SO_REUSEPORT listener of the same user would take a share of the
    // connections without a word; a probe bound without the option fails on it (or on any
    // listener) with EADDRINUSE, as a single listener would. It also settles port 0 to one
    // port for the whole group, and holds the port (bound, not listening: SO_REUSEADDR lets
    // the group bind beside it) until the group listens. A process that binds with
    // SO_REUSEPORT later, as the same user, can still join: the unit's DynamicUser= keeps
    // other services out.
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())?;
    let port = probe.local_addr()?.as_socket().map_or(addr.port(), |a| a.port());
    let addr = SocketAddr::new(addr.ip(), port);
    let group = (0..count).map(|_| open_socket(addr, Some(keepalive), true).map(Into::into)).collect();
    drop(probe);
    group
}

fn open(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<TcpListener> {
    TcpListener::from_std(open_socket(addr, keepalive, false)?.into())
}

fn open_socket(addr: SocketAddr, keepalive: Option<Duration>, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted proxy bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]:443` and `0.0.0.0:443` may both be listed; without this they would collide.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    if let Some(keepalive) = keepalive {
        tune_socket(SockRef::from(&socket), keepalive, true);
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

fn hint(addr: SocketAddr, e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) if addr.port() < 1024 => {
            " (ports below 1024 need CAP_NET_BIND_SERVICE: run as root, grant the capability, or pick a port from 1024 up)"
        }
        Some(libc::EADDRINUSE) => " (another process is already listening there)",
        Some(libc::EADDRNOTAVAIL) => " (no network interface of this machine has that address)",
        _ => "",
    }
}

/// True for accept errors that mean the process or machine is out of descriptors or memory:
/// retrying at once would spin, so accept loops back off.
pub fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// TCP_NODELAY (the proxy forwards what it reads at once; Nagle would only add latency to TLS
/// handshakes) and keepalive.
pub fn tune(stream: &TcpStream, keepalive: Duration) {
    tune_socket(SockRef::from(stream), keepalive, false);
}

/// [`tune`] on a listener: Linux copies these options to each connection it completes, so
/// client sockets need no system call of their own for them (five fewer per connection).
pub fn tune_listener(listener: &TcpListener, keepalive: Duration) {
    tune_socket(SockRef::from(listener), keepalive, true);
}

/// `listener`: a failure is worth a warning, since every connection it accepts goes untuned.
fn tune_socket(sock: SockRef<'_>, keepalive: Duration, listener: bool) {
    // The kernel counts keepalive idle time in whole seconds and refuses 0: a sub-second
    // setting means "as soon as possible", which is one second.
    let keepalive = keepalive.max(Duration::from_secs(1));
    let ka = TcpKeepalive::new().with_time(keepalive).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_RETRIES);
    // Failing to tune a socket that works is not worth dropping the connection for.
    if let Err(e) = sock.set_tcp_nodelay(true).and_then(|()| sock.set_tcp_keepalive(&ka)) {
        if listener {
            tracing::warn!(error = %e, "could not set TCP_NODELAY and keepalive on a listener; its connections go without");
        } else {
            tracing::debug!(error = %e, "could not set socket options");
        }
    }
}

/// Closes with a reset instead of a FIN: used to pass an abort on to the other side, and to
/// refuse connections over the limit without leaving sockets in TIME_WAIT.
pub fn reset(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "could not set SO_LINGER; the socket will close with a FIN");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let [listener] =
            <[_; 1]>::try_from(bind_proxy("127.0.0.1:0".parse().unwrap(), Duration::from_secs(77), 1).unwrap())
                .unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        // Connected before anything accepts: the kernel made the socket at the handshake.
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(77));
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
    }

    #[tokio::test]
    async fn a_group_shares_one_port_spreads_connections_and_refuses_a_second_group() {
        let group = bind_proxy("127.0.0.1:0".parse().unwrap(), Duration::from_secs(60), 2).unwrap();
        let addrs: Vec<SocketAddr> = group.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(addrs[0], addrs[1], "port 0 is settled once for the whole group");
        // Another proxy (or this one twice) on the same port is refused, not let in to share it.
        let err = bind_proxy(addrs[0], Duration::from_secs(60), 2).unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::EADDRINUSE), "{err}");
        assert!(err.to_string().contains("another process is already listening there"), "{err}");
        assert!(bind_proxy(addrs[0], Duration::from_secs(60), 1).is_err());
        let listeners: Vec<TcpListener> = group.into_iter().map(|l| TcpListener::from_std(l).unwrap()).collect();
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(TcpStream::connect(addrs[0]).await.unwrap());
        }
        let mut accepted = [0usize; 2];
        for (i, l) in listeners.iter().enumerate() {
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), l.accept()).await {
                accepted[i] += 1;
            }
        }
        assert_eq!(accepted[0] + accepted[1], 64, "every connection is accepted by one of them: {accepted:?}");
        assert!(accepted.iter().all(|&n| n > 0), "the kernel spreads connections over the group: {accepted:?}");
    }

    #[tokio::test]
    async fn a_sub_second_keepalive_is_set_as_one_second_not_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        tune(&client, Duration::from_millis(500));
        assert!(SockRef::from(&client).keepalive().unwrap());
        assert_eq!(SockRef::from(&client).tcp_keepalive_time().unwrap(), Duration::from_secs(1));
    }
}
