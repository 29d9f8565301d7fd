//! An accept loop that never gives up: a failed accept is skipped, and a shortage of
//! descriptors or memory backs off instead of spinning.
//! Shared by the proxy's and the admin server's listeners.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::proxy::socket::out_of_resources;

/// Backoff after accept fails for lack of descriptors or memory: start small so service
/// resumes quickly once one is freed, cap at one second so a lasting shortage does not spin.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub struct Acceptor {
    listener: TcpListener,
    backoff: Duration,
}

impl Acceptor {
    pub fn new(listener: TcpListener) -> Acceptor {
        Acceptor { listener, backoff: BACKOFF_MIN }
    }

    /// Sets the options accepted sockets inherit ([`crate::proxy::socket::tune_listener`]).
    pub fn tune(&self, keepalive: Duration) {
        crate::proxy::socket::tune_listener(&self.listener, keepalive);
    }

    /// The next connection, or `None` once `stop` fires. `failed` sees every accept error with
    /// whether it is a shortage (the loop then backs off), to count and log it.
    pub async fn next(
        &mut self,
        stop: &CancellationToken,
        mut failed: impl FnMut(&io::Error, bool),
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok(conn) => {
                    self.backoff = BACKOFF_MIN;
                    return Some(conn);
                }
                Err(e) => {
                    let exhausted = out_of_resources(&e);
                    failed(&e, exhausted);
                    if exhausted {
                        tokio::select! {
                            () = stop.cancelled() => return None,
                            () = tokio::time::sleep(self.backoff) => {}
                        }
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }
}
