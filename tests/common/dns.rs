//! A real authoritative DNS server (hickory-server) on loopback, whose answers a test changes
//! while it runs: addresses and TTL, failure modes, and the UDP size at which answers truncate.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

/// What the server does with the next query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Answer,
    NxDomain,
    /// NOERROR with no records.
    NoData,
    ServFail,
    Refused,
    /// No reply at all: the client times out.
    Drop,
}

#[derive(Debug)]
pub struct Zone {
    pub mode: Mode,
    pub ttl: u32,
    pub a: Vec<Ipv4Addr>,
    pub aaaa: Vec<Ipv6Addr>,
    /// The largest UDP answer sent; larger ones go out truncated (TC) and the client must retry
    /// over TCP. 512 is the classic limit without EDNS.
    pub max_udp: u16,
    pub udp_queries: usize,
    pub tcp_queries: usize,
}

/// The server's state, shared with the test.
#[derive(Clone)]
pub struct Dns(Arc<Mutex<Zone>>);

impl Dns {
    pub fn set(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.0.lock().expect("zone lock"));
    }

    pub fn queries(&self) -> (usize, usize) {
        let z = self.0.lock().expect("zone lock");
        (z.udp_queries, z.tcp_queries)
    }
}

/// A running server. Dropping it stops it (its tasks are aborted).
pub struct DnsServer {
    pub addr: SocketAddr,
    pub zone: Dns,
    _server: Server<Dns>,
}

impl DnsServer {
    /// Answers `a` with `ttl` for every name, over UDP and TCP on one loopback port.
    pub async fn start(a: &[Ipv4Addr], ttl: u32) -> DnsServer {
        let zone = Dns(Arc::new(Mutex::new(Zone {
            mode: Mode::Answer,
            ttl,
            a: a.to_vec(),
            aaaa: Vec::new(),
            max_udp: 1232,
            udp_queries: 0,
            tcp_queries: 0,
        })));
        for _ in 0..20 {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
            let addr = udp.local_addr().expect("udp address");
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                let mut server = Server::new(zone.clone());
                server.register_socket(udp);
                server.register_listener(tcp, Duration::from_secs(5), 64);
                return DnsServer { addr, zone, _server: server };
            }
        }
        panic!("no port free for both UDP and TCP");
    }
}

#[async_trait::async_trait]
impl RequestHandler for Dns {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let udp = request.protocol() == Protocol::Udp;
        let (mode, ttl, a, aaaa, max_udp) = {
            let mut z = self.0.lock().expect("zone lock");
            if udp {
                z.udp_queries += 1;
            } else {
                z.tcp_queries += 1;
            }
            (z.mode, z.ttl, z.a.clone(), z.aaaa.clone(), z.max_udp)
        };
        let mut md = Metadata::response_from_request(&request.metadata);
        md.authoritative = true;
        if mode == Mode::Drop {
            return ResponseInfo::from(Header { metadata: md, counts: HeaderCounts::default() });
        }
        // The server truncates a UDP answer to the response's EDNS payload size and sets TC.
        let edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload().min(max_udp));
            r
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let Some(q) = request.queries.queries().first() else {
            return response
                .send_response(builder.error_msg(&request.metadata, ResponseCode::FormErr))
                .await
                .expect("send");
        };
        let name = q.original().name().clone();
        let answers: Vec<Record> = match (mode, q.query_type()) {
            (Mode::Answer, RecordType::A) => {
                a.iter().map(|ip| Record::from_rdata(name.clone(), ttl, RData::A(A(*ip)))).collect()
            }
            (Mode::Answer, RecordType::AAAA) => {
                aaaa.iter().map(|ip| Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(*ip)))).collect()
            }
            _ => vec![],
        };
        md.response_code = match mode {
            Mode::NxDomain => ResponseCode::NXDomain,
            Mode::ServFail => ResponseCode::ServFail,
            Mode::Refused => ResponseCode::Refused,
            _ => ResponseCode::NoError,
        };
        let soa = Record::from_rdata(
            Name::from_ascii("test.").expect("name"),
            30,
            RData::SOA(SOA::new(
                Name::from_ascii("ns.test.").expect("name"),
                Name::from_ascii("admin.test.").expect("name"),
                1,
                3600,
                600,
                86400,
                30,
            )),
        );
        let negative: &[Record] = if answers.is_empty() { std::slice::from_ref(&soa) } else { &[] };
        response.send_response(builder.build(md, answers.iter(), &[], negative.iter(), &[])).await.expect("send")
    }
}
