//! Process lifecycle: Unix signals turned into [`Signal`]s, systemd readiness and watchdog.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit; a second one exits at once.
    Terminate,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// Listens for SIGTERM, SIGINT and SIGHUP. Installing the handlers also stops SIGHUP from
/// killing the process, its default action.
pub fn signals() -> std::io::Result<mpsc::Receiver<Signal>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                Some(()) = term.recv() => Signal::Terminate,
                Some(()) = int.recv() => Signal::Terminate,
                Some(()) = hup.recv() => Signal::Reload,
                else => return,
            };
            if tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Tells systemd (when run under `Type=notify`) what state the service is in. Without systemd
/// this does nothing.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

/// Feeds the systemd watchdog from the runtime, at half its interval, once every data-path
/// worker has answered too, so a wedged runtime or worker gets the service restarted. Does
/// nothing when `WatchdogSec=` is not set.
pub fn spawn_watchdog(workers: crate::proxy::workers::Heartbeat) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(?interval, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if workers.all_answer(period).await {
                notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "a proxy worker thread did not answer within {period:?}; the systemd watchdog is not fed"
                );
            }
        }
    });
}

/// Highest descriptor limit asked for, in case the hard limit is unlimited (the kernel would
/// refuse more than `fs.nr_open`, 1048576 by default).
const FD_LIMIT_CAP: u64 = 1 << 20;
/// Descriptors kept for everything besides proxied connections: listeners, admin, logs, DNS.
const FD_RESERVE: u64 = 256;

/// Raises the soft open-file limit to the hard one, and warns when it is still too low for
/// `max_connections` (each proxied connection holds two descriptors) and `workers` more.
pub fn raise_fd_limit(max_connections: usize, workers: u64) {
    let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() else {
        return;
    };
    let target = hard.min(FD_LIMIT_CAP);
    let mut current = soft;
    if soft < target && rlimit::Resource::NOFILE.set(target, hard).is_ok() {
        current = target;
    }
    let needed = 2 * max_connections as u64 + FD_RESERVE + workers;
    if current < needed {
        tracing::warn!(
            limit = current,
            needed,
            "the open-file limit is too low for proxy.max_connections (2 per connection) and proxy.workers: \
             accepts will back off when it runs out; raise LimitNOFILE or lower proxy.max_connections"
        );
    }
}
