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

/// [`bind`] for a proxy listener, with TCP_NODELAY and keepalive set before it listens: Linux
/// copies them to each connection when its handshake completes (not at accept), so every
/// connection, those queued before the first accept included, has them without a system call
/// of its own.
pub fn bind_proxy(addr: SocketAddr, keepalive: Duration) -> Result<TcpListener, BindError> {
    open(addr, Some(keepalive)).map_err(|source| BindError { role: "proxy", addr, hint: hint(addr, &source), source })
}

fn open(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted proxy bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
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
    TcpListener::from_std(socket.into())
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
        let listener = bind_proxy("127.0.0.1:0".parse().unwrap(), Duration::from_secs(77)).unwrap();
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
    async fn a_sub_second_keepalive_is_set_as_one_second_not_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        tune(&client, Duration::from_millis(500));
        assert!(SockRef::from(&client).keepalive().unwrap());
        assert_eq!(SockRef::from(&client).tcp_keepalive_time().unwrap(), Duration::from_secs(1));
    }
}
