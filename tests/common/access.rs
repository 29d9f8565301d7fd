//! The access log as the tests read it: a subscriber, installed once per test binary, that
//! keeps every `static_ingress::access` event's fields, found again by the client's address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, Once};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// One access-log line's fields, each as the text format writes it.
pub type Fields = BTreeMap<String, String>;

static LINES: Mutex<Vec<Fields>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Starts keeping access-log lines (before the proxy under test starts).
pub fn capture() {
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(Keep);
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber in this test binary");
    });
}

/// The line of the connection from `client`, once logged (waits up to [`super::BOUND`]).
pub async fn line_of(client: SocketAddr) -> Fields {
    let mut found = None;
    super::eventually(&format!("the access-log line of {client}"), async || {
        found = find(client);
        found.is_some()
    })
    .await;
    found.expect("found")
}

/// The line of the connection from `client`, if logged yet.
pub fn find(client: SocketAddr) -> Option<Fields> {
    let client = client.to_string();
    LINES.lock().unwrap().iter().find(|f| f.get("client") == Some(&client)).cloned()
}

/// `to_backend` and `to_client` of a line, as numbers.
pub fn bytes(line: &Fields) -> (u64, u64) {
    let n = |k: &str| line.get(k).unwrap_or_else(|| panic!("no {k} in {line:?}")).parse::<u64>().expect("a count");
    (n("to_backend"), n("to_client"))
}

struct Keep;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Keep {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != static_ingress::logging::ACCESS {
            return;
        }
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        LINES.lock().unwrap().push(fields);
    }
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}
