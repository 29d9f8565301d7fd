//! An HTTP proxy in front of moto that makes it behave more like EC2, for the claim's race
//! tests: moto applies every call at once and every read shows it, while EC2's calls take
//! their time and its reads lag its writes. It also answers the one Auto Scaling call moto
//! lacks, CompleteLifecycleAction, recording it. Each claim under test gets its own proxy (so one
//! side can be slowed down); the proxies of one test share what they saw (so reads lag every
//! side's writes, as EC2's do).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the proxies of one test saw, shared between them.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every DescribeAddresses answer moto gave: when, the request body, the answer.
    answers: Vec<(Instant, Bytes, Answer)>,
    /// When moto answered each AssociateAddress (that is when it took effect).
    writes: Vec<Instant>,
    /// The holder (instance id) in each DescribeAddresses answer moto gave, in order.
    pub holders: Vec<Option<String>>,
    /// How many reads were answered from before the latest write.
    pub stale_answers: usize,
    /// The requests of every CompleteLifecycleAction, as (when, form body): moto has no such
    /// call, so the proxy answers it itself, as Auto Scaling does.
    pub lifecycle_actions: Vec<(Instant, String)>,
}

#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    content_type: Option<hyper::header::HeaderValue>,
    body: Bytes,
}

/// How a proxy bends moto.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lag {
    /// Each AssociateAddress waits this long before it is passed on.
    pub associate: Duration,
    /// For this long after a write, DescribeAddresses answers as it did before that write.
    pub stale_reads: Duration,
}

/// One proxy: its endpoint for `--eip-ec2-endpoint`, and the calls it passed, by action.
pub struct Ec2Proxy {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<HashMap<String, u32>>>,
    serve: tokio::task::JoinHandle<()>,
}

impl Ec2Proxy {
    /// A proxy to moto at `upstream` (`http://127.0.0.1:port`), recording into `seen`.
    pub async fn start(upstream: &str, lag: Lag, seen: Arc<Mutex<Seen>>) -> Ec2Proxy {
        let upstream: SocketAddr =
            upstream.trim_start_matches("http://").parse().expect("moto's endpoint is http://IP:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the EC2 proxy");
        let addr = listener.local_addr().expect("the EC2 proxy's address");
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let counted = Arc::clone(&calls);
        let serve = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (seen, calls) = (Arc::clone(&seen), Arc::clone(&counted));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (seen, calls) = (Arc::clone(&seen), Arc::clone(&calls));
                        async move { Ok::<_, std::convert::Infallible>(pass(req, upstream, lag, &seen, &calls).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ec2Proxy { addr, calls, serve }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many calls of `action` went through this proxy.
    pub fn count(&self, action: &str) -> u32 {
        self.calls.lock().unwrap().get(action).copied().unwrap_or(0)
    }

    /// Every EC2 call that went through, read-only ones (Describe*) and the rest.
    pub fn reads_and_writes(&self) -> (u32, u32) {
        let calls = self.calls.lock().unwrap();
        let reads = calls.iter().filter(|(a, _)| a.starts_with("Describe")).map(|(_, n)| n).sum();
        let writes = calls.iter().filter(|(a, _)| !a.starts_with("Describe")).map(|(_, n)| n).sum();
        (reads, writes)
    }
}

impl Drop for Ec2Proxy {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

async fn pass(
    req: Request<Incoming>,
    upstream: SocketAddr,
    lag: Lag,
    seen: &Mutex<Seen>,
    calls: &Mutex<HashMap<String, u32>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, Bytes::new());
    };
    let action = form_value(&body, "Action").unwrap_or_default();
    *calls.lock().unwrap().entry(action.clone()).or_default() += 1;
    if action == "CompleteLifecycleAction" {
        seen.lock().unwrap().lifecycle_actions.push((Instant::now(), String::from_utf8_lossy(&body).into_owned()));
        let mut response = reply(StatusCode::OK, Bytes::from_static(COMPLETE_LIFECYCLE_ACTION));
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/xml"));
        return response;
    }
    if action == "AssociateAddress" && !lag.associate.is_zero() {
        tokio::time::sleep(lag.associate).await;
    }
    let answer = match forward(&parts, body.clone(), upstream).await {
        Ok(answer) => answer,
        Err(e) => return reply(StatusCode::BAD_GATEWAY, Bytes::from(e)),
    };
    let now = Instant::now();
    let mut s = seen.lock().unwrap();
    let answer = match action.as_str() {
        "AssociateAddress" => {
            s.writes.push(now);
            answer
        }
        "DescribeAddresses" if answer.status.is_success() => {
            s.holders.push(xml_value(&answer.body, "instanceId"));
            s.answers.push((now, body.clone(), answer.clone()));
            // Reads lag the earliest write of the last `stale_reads`: answer as before it.
            let lagging = s.writes.iter().find(|w| now.duration_since(**w) < lag.stale_reads).copied();
            let before = lagging
                .and_then(|w| s.answers.iter().rev().find(|(t, b, _)| *t < w && *b == body).map(|(_, _, a)| a.clone()));
            match before {
                Some(old) => {
                    s.stale_answers += 1;
                    old
                }
                None => answer,
            }
        }
        _ => answer,
    };
    drop(s);
    let mut response = reply(answer.status, answer.body);
    if let Some(ct) = answer.content_type {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
    }
    response
}

/// Auto Scaling's answer to CompleteLifecycleAction (an empty result).
const COMPLETE_LIFECYCLE_ACTION: &[u8] = b"<CompleteLifecycleActionResponse \
xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><CompleteLifecycleActionResult/>\
<ResponseMetadata><RequestId>7c6e177f-f082-11e1-ac58-3714bEXAMPLE</RequestId></ResponseMetadata>\
</CompleteLifecycleActionResponse>";

async fn forward(parts: &hyper::http::request::Parts, body: Bytes, upstream: SocketAddr) -> Result<Answer, String> {
    let stream = TcpStream::connect(upstream).await.map_err(|e| format!("connect to moto: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(parts.method.clone()).uri(parts.uri.clone());
    for (name, value) in &parts.headers {
        req = req.header(name, value);
    }
    let req = req.body(Full::new(body)).map_err(|e| format!("request: {e}"))?;
    let res = sender.send_request(req).await.map_err(|e| format!("send to moto: {e}"))?;
    let status = res.status();
    let content_type = res.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let body = res.into_body().collect().await.map_err(|e| format!("read moto's answer: {e}"))?.to_bytes();
    Ok(Answer { status, content_type, body })
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r
}

/// The value of `key` in a form-encoded body (EC2's query protocol).
fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

/// The text of the first `<tag>` in an XML answer, if it is not empty.
fn xml_value(body: &[u8], tag: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + text[start..].find(&format!("</{tag}>"))?;
    Some(text[start..end].trim().to_string()).filter(|s| !s.is_empty())
}
