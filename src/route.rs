//! Which backend a connection goes to. Without `[[route]]` tables there is one, the route
//! `default` (`backend.address`), and nothing is read before forwarding. With them, a
//! connection on a listener that some route is on is held until its TLS ClientHello arrives
//! ([`crate::proxy::sni`]); its server name picks the route: an exact name first, then the
//! longest matching `*.` wildcard; no match (or no name) goes where `proxy.unmatched` says,
//! bytes that are not TLS where `proxy.non_tls` says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::backend::Backends;
use crate::config::{Config, Fallback, RouteConfig, ServerName, routes};
use crate::metrics::{Metrics, RouteMetrics};
use crate::proxy::sni::Hello;

/// One backend: its settings, its address set and its metrics.
pub struct Upstream {
    pub config: RouteConfig,
    pub backends: Arc<Backends>,
    pub metrics: Arc<RouteMetrics>,
    /// Stops its DNS follower, health checks and address retirement (a reload removed it).
    pub stop: CancellationToken,
}

impl Upstream {
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// Every backend and how connections are matched to one.
pub struct Router {
    /// In config order: `default` first when it exists.
    pub upstreams: Vec<Arc<Upstream>>,
    default: Option<usize>,
    unmatched: Fallback,
    non_tls: Fallback,
    exact: HashMap<String, usize>,
    /// `(".example.com", route)`, longest suffix first.
    wildcards: Vec<(String, usize)>,
    /// `proxy.listen`, as configured.
    listeners: Vec<SocketAddr>,
}

/// Where the router sends a connection.
#[derive(Clone)]
pub enum Pick {
    To(Arc<Upstream>),
    /// No route takes it: reset.
    Refuse,
}

impl Router {
    pub fn new(config: &Config, metrics: &Metrics, stop: &CancellationToken) -> Router {
        Router::rebuilt(config, metrics, stop, &[]).0
    }

    /// The router for a reloaded `config`: a route whose settings did not change keeps its
    /// upstream (address set, health, open connections) from `previous`; the others are new,
    /// with the address set of a previous upstream of the same `host:port` if there is one.
    /// Also returns the new upstreams (whose tasks must start) and the previous ones no
    /// longer used (whose tasks must stop).
    pub fn rebuilt(
        config: &Config,
        metrics: &Metrics,
        stop: &CancellationToken,
        previous: &[Arc<Upstream>],
    ) -> (Router, Vec<Arc<Upstream>>, Vec<Arc<Upstream>>) {
        // First the routes that did not change keep their upstream, each previous one at most
        // once; then a changed route may take the address set of a previous upstream of the
        // same host:port that nothing kept or took yet (the same name first).
        let mut claimed = vec![false; previous.len()];
        let mut kept: Vec<Option<Arc<Upstream>>> = config
            .routes
            .iter()
            .map(|r| {
                let i = (0..previous.len()).find(|&i| !claimed[i] && previous[i].config == *r)?;
                claimed[i] = true;
                Some(Arc::clone(&previous[i]))
            })
            .collect();
        let mut sets: Vec<bool> = claimed.clone();
        let mut fresh = Vec::new();
        for (r, slot) in config.routes.iter().zip(kept.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let same_address = |i: &usize| !sets[*i] && previous[*i].config.address() == r.address();
            let reuse = (0..previous.len())
                .filter(same_address)
                .find(|&i| previous[i].config.name == r.name)
                .or_else(|| (0..previous.len()).find(same_address));
            let backends = match reuse {
                Some(i) => {
                    sets[i] = true;
                    Arc::clone(&previous[i].backends)
                }
                None => Arc::new(Backends::new(r.address().to_string())),
            };
            let u = Arc::new(Upstream {
                config: r.clone(),
                backends,
                metrics: Arc::new(metrics.route(&r.name)),
                stop: stop.child_token(),
            });
            fresh.push(Arc::clone(&u));
            *slot = Some(u);
        }
        let upstreams: Vec<Arc<Upstream>> = kept.into_iter().flatten().collect();
        let gone: Vec<Arc<Upstream>> =
            previous.iter().filter(|p| !upstreams.iter().any(|u| Arc::ptr_eq(u, p))).cloned().collect();
        let router = Router::from_upstreams(config, upstreams);
        (router, fresh, gone)
    }

    fn from_upstreams(config: &Config, upstreams: Vec<Arc<Upstream>>) -> Router {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, u) in upstreams.iter().enumerate() {
            for name in &u.config.server_names {
                match name {
                    ServerName::Exact(n) => {
                        exact.insert(n.clone(), i);
                    }
                    ServerName::Wildcard(suffix) => wildcards.push((suffix.clone(), i)),
                }
            }
        }
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Router {
            default: upstreams.iter().position(|u| u.name() == routes::DEFAULT),
            upstreams,
            unmatched: config.proxy.unmatched,
            non_tls: config.proxy.non_tls,
            exact,
            wildcards,
            listeners: config.proxy.listen.clone(),
        }
    }

    /// Whether any connection can reach the route `default`: it exists, and some listener
    /// reads no hello, or a fallback leads to it.
    pub fn default_serves(&self) -> bool {
        self.default.is_some()
            && (self.unmatched == Fallback::Default
                || self.non_tls == Fallback::Default
                || self.listeners.iter().any(|l| !self.reads_hello(*l)))
    }

    /// The backends that can be reached, which `/health` counts: all but a `default` that no
    /// connection can reach (with both fallbacks `refuse` on routed listeners, it only stands
    /// for `backend.address`, which the fleet template always sets).
    pub fn reachable(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        let skip = self.default.filter(|_| !self.default_serves());
        self.upstreams.iter().enumerate().filter(move |(i, _)| Some(*i) != skip).map(|(_, u)| u)
    }

    /// Whether connections on `listener` wait for their ClientHello: some route with server
    /// names is on it.
    pub fn reads_hello(&self, listener: SocketAddr) -> bool {
        self.upstreams.iter().any(|u| !u.config.server_names.is_empty() && u.config.on(listener))
    }

    /// The backend for a connection whose first bytes are not read (on a listener no route
    /// with server names is on, see [`Router::reads_hello`]): the route `default`.
    pub fn direct(&self) -> Pick {
        self.fallback(Fallback::Default)
    }

    /// The backend for a connection on `listener` whose first bytes say `hello` (complete, or
    /// given up on: `Hello::Incomplete` is a hello too large to read, routed as unnamed).
    pub fn pick(&self, listener: SocketAddr, hello: &Hello) -> Pick {
        let name = match hello {
            Hello::NotTls => return self.fallback(self.non_tls),
            Hello::Tls(Some(name)) => name,
            Hello::Tls(None) | Hello::Incomplete => return self.fallback(self.unmatched),
        };
        let on = |i: &usize| self.upstreams[*i].config.on(listener);
        let found = self.exact.get(name.as_str()).filter(|i| on(i)).or_else(|| {
            self.wildcards
                .iter()
                .find(|(suffix, i)| on(i) && name.len() > suffix.len() && name.ends_with(suffix))
                .map(|(_, i)| i)
        });
        match found {
            Some(&i) => Pick::To(Arc::clone(&self.upstreams[i])),
            None => self.fallback(self.unmatched),
        }
    }

    fn fallback(&self, how: Fallback) -> Pick {
        match (how, self.default) {
            (Fallback::Default, Some(i)) => Pick::To(Arc::clone(&self.upstreams[i])),
            _ => Pick::Refuse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileLayer;

    fn router(text: &str) -> Router {
        let file = FileLayer::parse(std::path::Path::new("t.toml"), text).unwrap();
        let config = Config::from_layers(Some(&file), &[]).unwrap().config;
        Router::new(&config, &Metrics::new("test"), &CancellationToken::new())
    }

    fn to(p: Pick) -> String {
        match p {
            Pick::To(u) => u.name().to_string(),
            Pick::Refuse => "refused".into(),
        }
    }

    const ROUTES: &str = r#"
[proxy]
listen = ["127.0.0.1:8443", "127.0.0.1:9443"]
[backend]
address = "default.example:443"
[[route]]
name = "api"
server_names = ["api.example.com", "*.api.example.com"]
backend = "api-elb.example:443"
[[route]]
name = "wild"
server_names = ["*.example.com"]
backend = "wild-elb.example:443"
[[route]]
name = "only-9443"
server_names = ["nine.example.com"]
backend = "nine-elb.example:443"
listen = ["127.0.0.1:9443"]
"#;

    #[test]
    fn exact_names_then_the_longest_wildcard_then_the_default() {
        let r = router(ROUTES);
        let l: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let sni = |n: &str| Hello::Tls(Some(n.into()));
        assert_eq!(to(r.pick(l, &sni("api.example.com"))), "api");
        assert_eq!(to(r.pick(l, &sni("v2.api.example.com"))), "api", "the longer wildcard wins");
        assert_eq!(to(r.pick(l, &sni("www.example.com"))), "wild");
        assert_eq!(to(r.pick(l, &sni("example.com"))), "default");
        assert_eq!(to(r.pick(l, &sni("other.org"))), "default");
        assert_eq!(to(r.pick(l, &Hello::Tls(None))), "default");
        assert_eq!(to(r.pick(l, &Hello::NotTls)), "default");
        // A route on another listener only: not here (the wildcard takes it instead).
        assert_eq!(to(r.pick(l, &sni("nine.example.com"))), "wild");
        assert_eq!(to(r.pick("127.0.0.1:9443".parse().unwrap(), &sni("nine.example.com"))), "only-9443");
        assert!(r.reads_hello(l));
        assert_eq!(r.upstreams.iter().map(|u| u.name()).collect::<Vec<_>>(), ["default", "api", "wild", "only-9443"]);
    }

    #[test]
    fn refusals_as_configured() {
        let text = ROUTES
            .replace("[backend]\naddress = \"default.example:443\"\n", "")
            .replace("[proxy]\n", "[proxy]\nunmatched = \"refuse\"\nnon_tls = \"refuse\"\n");
        let r = router(&text);
        let l: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert_eq!(to(r.pick(l, &Hello::Tls(Some("other.org".into())))), "refused");
        assert_eq!(to(r.pick(l, &Hello::NotTls)), "refused");
        assert_eq!(to(r.pick(l, &Hello::Tls(Some("api.example.com".into())))), "api");
    }

    #[test]
    fn a_default_no_connection_reaches_is_not_counted() {
        let refuse = ROUTES.replace("[proxy]\n", "[proxy]\nunmatched = \"refuse\"\nnon_tls = \"refuse\"\n");
        let r = router(&refuse);
        assert!(!r.default_serves());
        assert_eq!(r.reachable().map(|u| u.name()).collect::<Vec<_>>(), ["api", "wild", "only-9443"]);
        let r = router(ROUTES);
        assert!(r.default_serves());
        assert_eq!(r.reachable().count(), 4);
    }

    #[test]
    fn a_reload_keeps_unchanged_upstreams_and_gives_each_address_set_to_one_route() {
        let stop = CancellationToken::new();
        let metrics = Metrics::new("test");
        let config = |b_extra: &str, a_name: &str| {
            let text = format!(
                "[backend]\naddress = \"10.0.0.9:443\"\n\
                 [[route]]\nname = \"{a_name}\"\nserver_names = [\"a.example\"]\nbackend = \"10.0.0.1:443\"\n\
                 [[route]]\nname = \"b\"\nserver_names = [\"b.example\"]\nbackend = \"10.0.0.1:443\"\n{b_extra}"
            );
            let file = FileLayer::parse(std::path::Path::new("t.toml"), &text).unwrap();
            Config::from_layers(Some(&file), &[]).unwrap().config
        };
        let v1 = Router::new(&config("", "a"), &metrics, &stop);
        let find = |r: &Router, name: &str| Arc::clone(r.upstreams.iter().find(|u| u.name() == name).unwrap());
        // b changes a setting: a and default stay as they were; b gets its own old set back,
        // not a's, which shares its host:port.
        let (v2, fresh, gone) =
            Router::rebuilt(&config("health.interval = \"7s\"\n", "a"), &metrics, &stop, &v1.upstreams);
        assert!(Arc::ptr_eq(&find(&v2, "a"), &find(&v1, "a")));
        assert!(Arc::ptr_eq(&find(&v2, "default"), &find(&v1, "default")));
        assert!(!Arc::ptr_eq(&find(&v2, "b"), &find(&v1, "b")));
        assert!(Arc::ptr_eq(&find(&v2, "b").backends, &find(&v1, "b").backends));
        assert!(!Arc::ptr_eq(&find(&v2, "b").backends, &find(&v1, "a").backends));
        assert_eq!((fresh.len(), gone.len()), (1, 1));
        assert_eq!(gone[0].name(), "b");
        // a is renamed c: c takes a's set (a is gone, its set lives on); b is unchanged.
        let (v3, fresh, gone) =
            Router::rebuilt(&config("health.interval = \"7s\"\n", "c"), &metrics, &stop, &v2.upstreams);
        assert!(Arc::ptr_eq(&find(&v3, "c").backends, &find(&v2, "a").backends));
        assert!(Arc::ptr_eq(&find(&v3, "b"), &find(&v2, "b")));
        assert_eq!((fresh.len(), gone.len()), (1, 1));
    }

    #[test]
    fn without_routes_nothing_is_read() {
        let r = router("[backend]\naddress = \"b.example:443\"\n");
        assert!(!r.reads_hello("127.0.0.1:443".parse().unwrap()));
        assert_eq!(to(r.direct()), "default");
    }
}
