//! The running appliance: binds every listener, starts the parts, and on a signal drains them
//! in one fixed order (written once, in [`Server::run`]).

use std::net::SocketAddr;
use std::sync::Arc;

use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::backend::{Backends, Resolution};
use crate::config::{Config, ConfigErrors, Loaded};
use crate::dns::{self, Follower, hickory::HickoryLookup};
use crate::eip::{self, Eip};
use crate::health::Checker;
use crate::lifecycle::{self, Signal};
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy, socket::BindError};
use crate::route::Router;

/// How long a reload waits for a new backend name's first DNS answer before it applies anyway.
const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a reload waits for a removed listener's accept loops to stop.
const LISTENER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the proxy waits for connections it has just cut to finish closing.
const CUT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Dns(#[from] dns::hickory::SetupError),
    #[error("cannot start the proxy's worker threads")]
    Workers(#[source] std::io::Error),
}

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The drain ran to its end.
    Drained,
    /// A second terminate signal cut the drain short.
    Forced,
}

/// Every listener bound, nothing served yet. Tests bind on port 0 and read the addresses.
pub struct Server {
    config: Arc<Config>,
    /// Each bound listener with its address as `proxy.listen` writes it; `run` starts them.
    proxy_listeners: Vec<(Vec<std::net::TcpListener>, SocketAddr)>,
    /// The data path's threads: each accepts on one listener of every group and runs what it
    /// accepted.
    workers: proxy::workers::Workers,
    /// The listeners accepting now (`run` fills it; a reload adds and removes).
    listening: std::sync::Mutex<Vec<Listening>>,
    /// Taken by `run`: the admin port, then the operator's listeners.
    admin_listeners: Vec<(TcpListener, admin::Exposure)>,
    proxy_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    operator_addrs: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    state: Arc<admin::State>,
    stop_sources: CancellationToken,
    stop_accepting: CancellationToken,
    /// Cancelled when Auto Scaling is terminating this instance ([`eip::retire`]).
    retire: CancellationToken,
    /// Re-reads the configuration on SIGHUP.
    reloader: Option<Box<dyn Fn() -> Result<Loaded, ConfigErrors> + Send + Sync>>,
}

/// One proxy listener's accept loop.
struct Listening {
    /// The address as `proxy.listen` writes it.
    configured: SocketAddr,
    /// The address it is bound to (differs for port 0).
    local: SocketAddr,
    /// Stops this listener alone (a reload removed it); a child of the drain's.
    stop: CancellationToken,
    /// One accept loop per worker.
    tasks: Vec<JoinHandle<()>>,
}

/// One backend's address source, health checks and retirement, ready to start.
struct Sources {
    upstream: Arc<crate::route::Upstream>,
    follower: Option<Follower<HickoryLookup>>,
}

/// What follows `upstream`'s backend; fails only if its DNS resolver cannot be made.
fn sources(upstream: &Arc<crate::route::Upstream>) -> Result<Sources, dns::hickory::SetupError> {
    let target = upstream.config.address();
    let follower = match dns::hickory::literal(&target.host, target.port) {
        // An IP address needs no DNS: publish it once.
        Some(addr) => {
            upstream.backends.publish([addr], Resolution::answered(None));
            None
        }
        None => Some(Follower {
            lookup: HickoryLookup::new(&upstream.config.dns)?,
            host: target.host.clone(),
            port: target.port,
            config: upstream.config.dns.clone(),
            backends: Arc::clone(&upstream.backends),
            metrics: Arc::clone(&upstream.metrics),
        }),
    };
    Ok(Sources { upstream: Arc::clone(upstream), follower })
}

impl Sources {
    /// Starts them, until the upstream's own stop (a reload) or the server's.
    fn spawn(self) {
        let u = self.upstream;
        let checker = Checker {
            config: u.config.health.clone(),
            backends: Arc::clone(&u.backends),
            failures: u.metrics.health_check_failures_total.clone(),
        };
        tokio::spawn(checker.run(u.stop.clone()));
        tokio::spawn(crate::backend::retire_removed(
            Arc::clone(&u.backends),
            u.config.backend.removed_grace,
            u.stop.clone(),
        ));
        if let Some(follower) = self.follower {
            tokio::spawn(follower.run(u.stop.clone()));
        }
    }
}

/// A backend a reload no longer uses: its sources stop now; with `close`, its open connections
/// close when they end or when its `backend.removed_grace` has passed.
fn retire_upstream(u: &Arc<crate::route::Upstream>, close: bool) {
    u.stop.cancel();
    if !close {
        return;
    }
    let (u, grace) = (Arc::clone(u), u.config.backend.removed_grace);
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        u.backends.retire_all();
    });
}

/// The keys that differ between `running` (with `workers` data-path threads) and `new` but
/// only apply at start.
fn needs_restart(running: &Config, workers: usize, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    // The count running against the one the new value asks for: 0 (one per two CPUs) and the
    // count it gives are the same workers.
    differs("proxy.workers", workers != crate::proxy::workers::resolve(new.proxy.workers));
    differs("[admin]", running.admin != new.admin);
    differs("[lifecycle]", running.lifecycle != new.lifecycle);
    differs("[eip]", running.eip != new.eip);
    differs("log.format", running.log.format != new.log.format);
    differs("log.level", running.log.filter != new.log.filter);
    differs("health.unhealthy_when", running.health.unhealthy_when != new.health.unhealthy_when);
    keys
}

/// The backend for the "serving" line: its `host:port`, or with routes `name=host:port,...`.
fn backends_line(router: &Router) -> String {
    match router.upstreams.as_slice() {
        [only] if only.name() == crate::config::routes::DEFAULT => only.backends.name.clone(),
        all => all.iter().map(|u| format!("{}={}", u.name(), u.backends.name)).collect::<Vec<_>>().join(","),
    }
}

/// What a handoff of the Elastic IP drains: the proxy and `/health`.
struct Serving {
    state: Arc<admin::State>,
    proxy: Arc<Proxy>,
}

impl eip::handoff::Serving for Serving {
    fn set_handoff(&self, why: Option<String>) {
        self.state.set_handoff(why, true);
    }

    fn handed_off(&self, to: &str) {
        self.state.set_handoff(Some(format!("the Elastic IP was handed over to {to}")), false);
    }

    fn ready(&self) -> bool {
        self.state.backend_proven()
    }

    fn open_connections(&self) -> usize {
        self.proxy.active()
    }

    fn cut_open(&self) {
        self.proxy.cut_open();
    }
}

impl Server {
    /// Binds the proxy and admin listeners and starts following the backend. Fails if any
    /// address cannot be bound, naming it.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let config = Arc::new(config);
        let workers = proxy::workers::resolve(config.proxy.workers);
        let mut proxy_listeners = Vec::new();
        let mut proxy_addrs = Vec::new();
        for &addr in &config.proxy.listen {
            let l = proxy::socket::bind_proxy(addr, config.proxy.tcp_keepalive, workers)?;
            proxy_addrs.push(l[0].local_addr().unwrap_or(addr));
            // With its address as configured: routes name listeners that way.
            proxy_listeners.push((l, addr));
        }
        let admin_listener = proxy::socket::bind(config.admin.listen, "admin server")?;
        let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.listen);
        let mut operator_addrs = Vec::new();
        let mut admin_listeners = vec![(
            admin_listener,
            if config.admin.operator_listen.is_empty() { admin::Exposure::All } else { admin::Exposure::HealthOnly },
        )];
        for &addr in &config.admin.operator_listen {
            let l = proxy::socket::bind(addr, "operator's listener (admin.operator_listen)")?;
            operator_addrs.push(l.local_addr().unwrap_or(addr));
            admin_listeners.push((l, admin::Exposure::All));
        }

        let metrics = Arc::new(Metrics::new(env!("CARGO_PKG_VERSION")));
        let stop_sources = CancellationToken::new();
        let router = Arc::new(Router::new(&config, &metrics, &stop_sources));
        let proxy =
            Arc::new(Proxy::new(config.proxy.clone(), config.log.access, Arc::clone(&router), Arc::clone(&metrics)));
        let state = Arc::new(admin::State::new(
            Arc::clone(&config),
            Arc::clone(&metrics),
            Arc::clone(&proxy),
            Arc::new(Eip::new(config.eip.enabled, metrics.eip_associated.clone(), &metrics.eip_state)),
            proxy_addrs.clone(),
        ));
        // Everything that can fail comes before anything is spawned: a failed start leaves no
        // task behind claiming the Elastic IP or checking backends.
        let sources = router.upstreams.iter().map(sources).collect::<Result<Vec<_>, _>>()?;
        let workers = proxy::workers::Workers::start(workers).map_err(StartError::Workers)?;
        let stop_accepting = CancellationToken::new();
        let retire = CancellationToken::new();
        if config.eip.enabled {
            tokio::spawn(eip::retire::watch(config.eip.clone(), retire.clone(), stop_sources.clone()));
            let serving = Arc::new(Serving { state: Arc::clone(&state), proxy: Arc::clone(&proxy) });
            let timing = eip::handoff::Timing {
                drain_delay: config.lifecycle.drain_delay,
                grace_period: config.lifecycle.grace_period,
            };
            tokio::spawn(eip::keep(config.eip.clone(), timing, serving, Arc::clone(&state.eip), stop_sources.clone()));
        }
        for s in sources {
            s.spawn();
        }
        Ok(Server {
            config,
            proxy_listeners,
            workers,
            listening: std::sync::Mutex::new(Vec::new()),
            admin_listeners,
            proxy_addrs,
            admin_addr,
            operator_addrs,
            metrics,
            proxy,
            state,
            stop_sources,
            stop_accepting,
            retire,
            reloader: None,
        })
    }

    /// Applies a valid reloaded configuration (see [`Server::reload`]); `Err` when a backend's
    /// DNS resolver cannot be made, before anything changed.
    async fn apply(
        &self,
        mut new: Config,
    ) -> Result<(Vec<Arc<crate::route::Upstream>>, Vec<Arc<crate::route::Upstream>>, Vec<&'static str>), Vec<String>>
    {
        let restart = needs_restart(&self.config, self.workers.count(), &new);
        // What only a restart applies keeps its running value, so that nothing computed from
        // it (the routes' health policy) describes what is not running.
        new.health.unhealthy_when = self.config.health.unhealthy_when;
        new.proxy.workers = self.config.proxy.workers;
        for r in &mut new.routes {
            r.health.unhealthy_when = self.config.health.unhealthy_when;
        }
        // New listeners are bound first: a port that cannot be bound fails the reload before
        // anything changes.
        let running: Vec<SocketAddr> = self.listening().iter().map(|l| l.configured).collect();
        let removed: Vec<SocketAddr> = running.iter().copied().filter(|a| !new.proxy.listen.contains(a)).collect();
        let mut added = Vec::new();
        for &addr in new.proxy.listen.iter().filter(|a| !running.contains(a)) {
            match proxy::socket::bind_proxy(addr, new.proxy.tcp_keepalive, self.workers.count()) {
                Ok(l) => added.push((l, addr)),
                Err(e) => {
                    // Linux lets no two listeners share a port when one is a wildcard: this
                    // proxy's own may be the one in the way.
                    let own = running.iter().find(|r| r.port() == addr.port());
                    let message = match own {
                        Some(own) if e.source.raw_os_error() == Some(libc::EADDRINUSE) => format!(
                            "proxy.listen: cannot listen on {addr}: this proxy's listener on {own} holds the port{}",
                            if removed.contains(own) {
                                " until this reload removes it: remove it in one reload, then add the new address in the next"
                            } else {
                                ""
                            }
                        ),
                        _ => format!("proxy.listen: {e}"),
                    };
                    return Err(vec![message]);
                }
            }
        }
        let previous = self.proxy.router();
        let (router, fresh, gone) = Router::rebuilt(&new, &self.metrics, &self.stop_sources, &previous.upstreams);
        // A DNS resolver that cannot be made fails the reload before anything changes (the
        // listeners bound above close as they drop).
        let started = fresh.iter().map(sources).collect::<Result<Vec<_>, _>>().map_err(|e| vec![e.to_string()])?;
        for s in started {
            s.spawn();
        }
        // A new backend name gets a moment to resolve before connections are sent to it.
        let unresolved = |u: &Arc<crate::route::Upstream>| u.backends.current().addrs.is_empty();
        let waiting: Vec<_> = fresh.iter().filter(|u| unresolved(u)).cloned().collect();
        let until = tokio::time::Instant::now() + FIRST_ANSWER_WAIT;
        while waiting.iter().any(unresolved) && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        for u in waiting.iter().filter(|u| unresolved(u)) {
            tracing::warn!(route = u.name(), backend = %u.backends.name,
                "the reloaded route's backend has no address yet: its connections fail until it resolves");
        }
        if new.proxy.max_connections > self.proxy.max_connections() {
            lifecycle::raise_fd_limit(
                new.proxy.max_connections,
                proxy::workers::descriptors(self.workers.count(), new.proxy.listen.len()),
            );
        }
        self.proxy.set_max_connections(new.proxy.max_connections);
        // Removed listeners stop before the routes change (nothing is accepted there under
        // routes that no longer know them), and are closed before the reload is reported
        // done, so their ports are free by then. Their open connections go on as any other.
        let stopped: Vec<Listening> = {
            let mut listening = self.listening();
            let (gone, kept) =
                std::mem::take(&mut *listening).into_iter().partition(|l| removed.contains(&l.configured));
            *listening = kept;
            gone
        };
        for l in stopped {
            l.stop.cancel();
            for task in l.tasks {
                match tokio::time::timeout(LISTENER_STOP_WAIT, task).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "accept loop task failed"),
                    Err(_) => tracing::error!(listen = %l.configured,
                        "a worker did not stop its accept loop in time (stuck?); the reload goes on"),
                }
            }
            tracing::info!(listen = %l.configured, "reload: listener removed; its open connections go on");
        }
        self.proxy.reconfigure(new.proxy.clone(), new.log.access, Arc::new(router));
        let router = self.proxy.router();
        // New listeners accept once the routes that name them are in place.
        for (l, addr) in added {
            tracing::info!(listen = %addr, "reload: new listener accepting");
            self.start_listener(l, addr);
        }
        self.state.set_listen(self.listening().iter().map(|l| l.local).collect());
        for u in &gone {
            // Its address set may live on in a route that only changed settings.
            let kept = router.upstreams.iter().any(|n| Arc::ptr_eq(&n.backends, &u.backends));
            retire_upstream(u, !kept);
            if !router.upstreams.iter().any(|n| n.name() == u.name()) {
                self.metrics.forget_route(u.name());
            }
        }
        Ok((fresh, gone, restart))
    }

    /// The listeners accepting now.
    fn listening(&self) -> std::sync::MutexGuard<'_, Vec<Listening>> {
        self.listening.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts accepting on `group` (one listener per worker, each accepted on by its own)
    /// until the drain, or until a reload removes it.
    fn start_listener(&self, group: Vec<std::net::TcpListener>, configured: SocketAddr) {
        let stop = self.stop_accepting.child_token();
        let local = group.first().and_then(|l| l.local_addr().ok()).unwrap_or(configured);
        let tasks = group
            .into_iter()
            .enumerate()
            .map(|(i, listener)| {
                let (proxy, stop) = (Arc::clone(&self.proxy), stop.clone());
                self.workers.spawn(i, async move {
                    // Registered with the worker's own runtime, which then serves its connections.
                    match TcpListener::from_std(listener) {
                        Ok(listener) => proxy.accept_loop(listener, configured, stop).await,
                        Err(e) => tracing::error!(listen = %configured, error = %e, "cannot accept on a listener"),
                    }
                })
            })
            .collect();
        self.listening().push(Listening { configured, local, stop, tasks });
    }

    /// How SIGHUP re-reads the configuration (the config file and, through it, everything
    /// that can change live). Without one, SIGHUP is logged and ignored.
    pub fn reload_with(mut self, load: impl Fn() -> Result<Loaded, ConfigErrors> + Send + Sync + 'static) -> Server {
        self.reloader = Some(Box::new(load));
        self
    }

    /// Re-reads the configuration and applies what can change live to new connections: the
    /// routes and their backends (a route whose settings did not change keeps its addresses,
    /// health and open connections; a removed or changed one keeps its open connections until
    /// they end or its `backend.removed_grace` passes), and the `[proxy]` timeouts and bounds.
    /// An invalid configuration changes nothing: every error is logged and counted. Keys that
    /// only a restart applies are named.
    async fn reload(&self) {
        let Some(load) = &self.reloader else {
            tracing::warn!("SIGHUP received, but this server has no configuration to reload");
            return;
        };
        tracing::info!("SIGHUP received: reloading the configuration");
        self.state.reload_started();
        lifecycle::notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
        ]);
        let (result, shadowed) = match load() {
            Err(e) => (Err(("invalid", e.0.iter().map(ToString::to_string).collect::<Vec<_>>())), Vec::new()),
            Ok(new) => (self.apply(new.config).await.map_err(|e| ("failed", e)), new.shadowed),
        };
        for line in &shadowed {
            tracing::warn!("reload: {line}; a reload re-reads the files only");
        }
        match result {
            Ok((fresh, gone, restart)) => {
                self.metrics.config_reload(true);
                let names =
                    |us: &[Arc<crate::route::Upstream>]| us.iter().map(|u| u.name().to_string()).collect::<Vec<_>>();
                tracing::info!(started = ?names(&fresh), retired = ?names(&gone), "configuration reloaded");
                for key in &restart {
                    tracing::warn!(key = %key, "changed in the configuration, but only a restart applies it; still running the old value");
                }
                self.state.reloaded("applied", Vec::new(), restart.iter().map(ToString::to_string).collect(), shadowed);
                lifecycle::notify(&[NotifyState::Ready, NotifyState::Status("serving (configuration reloaded)")]);
            }
            Err((result, errors)) => {
                self.metrics.config_reload(false);
                let what = if result == "invalid" { "invalid configuration" } else { "cannot apply the configuration" };
                for e in &errors {
                    tracing::error!(error = %e, "reload: {what}");
                }
                tracing::error!(
                    errors = errors.len(),
                    "configuration reload failed; still running the previous configuration"
                );
                self.state.reloaded(result, errors, Vec::new(), shadowed);
                lifecycle::notify(&[
                    NotifyState::Ready,
                    NotifyState::Status("serving (last reload failed; see the log)"),
                ]);
            }
        }
    }

    /// Watches the admin server and reports the instance unhealthy to its Auto Scaling group
    /// when it stops answering for `eip.report_unhealthy_after` ([`eip::unhealthy`]).
    pub fn watch_own_failures(&self) {
        let eip = &self.config.eip;
        if !eip.enabled || eip.report_unhealthy_after.is_zero() {
            return;
        }
        let state = Arc::clone(&self.state);
        tokio::spawn(eip::unhealthy::watch(
            eip.clone(),
            self.admin_addr,
            move || state.is_draining(),
            self.stop_sources.clone(),
        ));
    }

    pub fn proxy_addrs(&self) -> &[SocketAddr] {
        &self.proxy_addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The operator's listeners as bound (port 0 resolved).
    pub fn operator_addrs(&self) -> &[SocketAddr] {
        &self.operator_addrs
    }

    /// The first backend's address set (the only one without routes): the seam where
    /// address sources plug in.
    pub fn backends(&self) -> Arc<Backends> {
        Arc::clone(&self.proxy.router().upstreams[0].backends)
    }

    /// Every backend and the routing between them, as connections see them now.
    pub fn router(&self) -> Arc<Router> {
        self.proxy.router()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves until a [`Signal::Terminate`] arrives, then drains:
    ///
    /// 1. `/health` turns 503 `draining`; the proxy keeps accepting for `drain_delay`, long
    ///    enough for Route 53 to stop handing out this IP;
    /// 2. the proxy listeners close (new connections are refused);
    /// 3. open connections get up to `grace_period` to finish;
    /// 4. those still open are cut, the admin server stops, and `run` returns.
    ///
    /// A second `Terminate` at any point skips to the end and returns [`Exit::Forced`].
    pub async fn run(mut self, mut signals: mpsc::Receiver<Signal>) -> Exit {
        let stop_accepting = self.stop_accepting.clone();
        for (l, configured) in std::mem::take(&mut self.proxy_listeners) {
            self.start_listener(l, configured);
        }
        let stop_admin = CancellationToken::new();
        if self.admin_listeners.is_empty() {
            tracing::error!("run called twice");
            return Exit::Forced;
        }
        let admin: Vec<_> = std::mem::take(&mut self.admin_listeners)
            .into_iter()
            .map(|(l, exposure)| tokio::spawn(admin::serve(l, exposure, Arc::clone(&self.state), stop_admin.clone())))
            .collect();

        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            proxy = ?self.proxy_addrs,
            admin = %self.admin_addr,
            operator = ?self.operator_addrs,
            backend = %backends_line(&self.proxy.router()),
            "serving"
        );
        lifecycle::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
        lifecycle::spawn_watchdog(self.workers.heartbeat());

        // Wait for the first terminate, or for Auto Scaling to retire the instance. A closed
        // channel means nobody can ask us to stop.
        let mut closed = false;
        let retiring = loop {
            tokio::select! {
                signal = signals.recv(), if !closed => match signal {
                    Some(Signal::Terminate) => break false,
                    Some(Signal::Reload) => self.reload().await,
                    None => closed = true,
                },
                () = self.retire.cancelled() => break true,
            }
        };

        let lifecycle = &self.config.lifecycle;
        let forced = async {
            loop {
                match signals.recv().await {
                    Some(Signal::Terminate) | None => return,
                    Some(Signal::Reload) => tracing::warn!("SIGHUP ignored: draining, a reload does nothing now"),
                }
            }
        };
        tokio::pin!(forced);

        // 1. Fail health checks, keep serving.
        self.state.start_draining();
        if retiring {
            // Not STOPPING: systemd would time the unit's stop from here, and the process stays
            // up, drained, until the instance goes.
            lifecycle::notify(&[NotifyState::Status("draining: Auto Scaling is terminating this instance")]);
        } else {
            lifecycle::notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
        }
        tracing::info!(drain_delay = ?lifecycle.drain_delay, grace_period = ?lifecycle.grace_period,
            "draining: /health answers 503; still accepting until the drain delay ends (signal again to exit now)");
        let exit = 'drain: {
            // After a handoff nothing reaches this instance any more: no delay to wait out.
            let delay = if self.state.eip.status().state == eip::State::HandedOff {
                std::time::Duration::ZERO
            } else {
                lifecycle.drain_delay
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut forced => break 'drain Exit::Forced,
            }

            // 2. Stop accepting.
            stop_accepting.cancel();
            let loops: Vec<Listening> = std::mem::take(&mut *self.listening());
            let stopped = async {
                for handle in loops.into_iter().flat_map(|l| l.tasks) {
                    if let Err(e) = handle.await {
                        tracing::error!(error = %e, "accept loop task failed");
                    }
                }
            };
            // A worker stuck in a connection cannot end its accept loop; a second signal still ends the drain.
            tokio::select! {
                () = stopped => {}
                () = &mut forced => break 'drain Exit::Forced,
            }
            self.proxy.tracker.close();
            tracing::info!(open = self.proxy.active(), "listeners closed; waiting for open connections");

            // 3. Let open connections finish.
            tokio::select! {
                () = self.proxy.tracker.wait() => {}
                () = tokio::time::sleep(lifecycle.grace_period) => {
                    tracing::warn!(open = self.proxy.active(), "grace period over; closing the remaining connections");
                }
                () = &mut forced => break 'drain Exit::Forced,
            }
            Exit::Drained
        };

        // A handoff under way moves the address itself, with its own drain: stopping the
        // keeper now would leave the address on an instance about to go (its requester would
        // take it only once this one is gone).
        let mut exit = exit;
        if exit == Exit::Drained && self.state.eip.status().state == eip::State::HandingOff {
            tracing::info!("a handoff of the Elastic IP is under way: letting it move the address before stopping");
            let bound = lifecycle.drain_delay + lifecycle.grace_period + std::time::Duration::from_secs(30);
            let moved = async {
                while self.state.eip.status().state == eip::State::HandingOff {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(bound, moved) => {}
                () = &mut forced => exit = Exit::Forced,
            }
        }

        // 4. Cut what is left and stop the admin server.
        if exit == Exit::Forced {
            tracing::warn!(open = self.proxy.active(), "second signal: exiting now, closing open connections");
        }
        stop_accepting.cancel();
        self.stop_sources.cancel();
        self.proxy.cut.cancel();
        self.proxy.tracker.close();
        if tokio::time::timeout(CUT_WAIT, self.proxy.tracker.wait()).await.is_err() {
            tracing::warn!(open = self.proxy.active(), "connections still closing at exit");
        }
        if retiring && exit == Exit::Drained {
            // Exiting would have systemd start the proxy again, claim the address and turn
            // healthy on an instance about to go: stay drained, /health 503, until it stops.
            tracing::info!("drained for Auto Scaling's termination; waiting for the instance to stop (SIGTERM exits)");
            lifecycle::notify(&[NotifyState::Status("drained: Auto Scaling is terminating this instance")]);
            let complete = eip::retire::complete(&self.config.eip);
            tokio::select! {
                () = complete => (&mut forced).await,
                () = &mut forced => {}
            }
        }
        stop_admin.cancel();
        for task in admin {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "admin server task failed");
            }
        }
        tracing::info!(?exit, "stopped");
        exit
    }
}
