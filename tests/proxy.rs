//! The data path as a client sees it: bytes, half-close, failover, timeouts, the limit; through
//! the copy path (a user buffer). tests/proxy_splice.rs runs the same cases through splice(2).

mod common;

const SPLICE: &str = "off";

include!("cases/proxy.rs");
