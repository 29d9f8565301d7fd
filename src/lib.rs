//! static-ingress: a TCP passthrough proxy that gives a backend addressed by DNS (an AWS ELB,
//! blue/green flipped) a small fixed set of public IPs.
//!
//! Modules, from the outside in:
//! - [`cli`]: the command line (`run`, `check-config`, `claim-eip`) and exit codes.
//! - [`config`]: keys and defaults, file + flags + environment, checked once into [`config::Config`].
//! - [`server`]: binds every listener, starts the parts, and drains them in one fixed order.
//! - [`lifecycle`]: Unix signals, systemd readiness and watchdog, file-descriptor limits.
//! - [`accept`]: the accept loop both listeners share (never dies, backs off when out of descriptors).
//! - [`proxy`]: the data path: accept loop, connection limit, connect, two-way copy.
//! - [`route`]: which backend a connection goes to (by TLS server name, with `[[route]]`s).
//! - [`backend`]: the backend's current address set and the order connections try it in.
//! - [`health`]: active TCP checks of every backend address (interval, rise, fall).
//! - [`dns`]: follows the backend's DNS name (TTL schedule, hold through failures).
//! - [`eip`]: claims this instance's Elastic IP (IMDSv2, EC2) and keeps checking it holds it.
//! - [`admin`]: the HTTP server for `/health`, `/live`, `/metrics` and `/status`.
//! - [`metrics`]: Prometheus metrics, all named `static_ingress_*`.
//! - [`logging`]: text or JSON logs, and a throttle for per-connection warnings.

pub mod accept;
pub mod admin;
pub mod backend;
pub mod cli;
pub mod config;
pub mod dns;
pub mod eip;
pub mod health;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod server;

pub use config::Config;
pub use server::{Exit, Server};
