//! The data path as a client sees it: bytes, half-close, failover, timeouts, the limit; through
//! the copy path (a user buffer), one worker. tests/proxy_splice.rs runs the same cases through
//! splice(2) with three workers.

mod common;

const SPLICE: &str = "off";
const WORKERS: &str = "1";

include!("cases/proxy.rs");
