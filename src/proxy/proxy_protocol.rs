//! The PROXY protocol, version 2 (HAProxy's `doc/proxy-protocol.txt`, section 2.2): a binary
//! header sent to the backend before any byte of the client's, carrying the client's address
//! and port and the address and port it connected to. Only the `PROXY` command over TCP, with
//! no TLVs: what HAProxy's `send-proxy-v2` sends for a plain TCP connection.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The twelve bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The longest header this writes (TCP over IPv6).
pub const MAX_LEN: usize = 16 + 36;

/// The header for a connection from `client` to `local` (the proxy's address the client
/// connected to). IPv4 addresses that reach a dual-stack listener as IPv4-mapped IPv6 are sent
/// as IPv4; a pair of different families is sent as IPv6 (IPv4 mapped).
pub fn v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = (canonical(client.ip()), canonical(local.ip()));
    let mut h = Vec::with_capacity(MAX_LEN);
    h.extend_from_slice(&SIGNATURE);
    h.push(V2_PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(TCP4);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (s, d) => {
            h.push(TCP6);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&as_v6(s).octets());
            h.extend_from_slice(&as_v6(d).octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&local.port().to_be_bytes());
    h
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_connection_has_the_twelve_byte_address_block() {
        let h = v2_header("192.0.2.10:51000".parse().unwrap(), "10.0.0.5:443".parse().unwrap());
        let mut want = SIGNATURE.to_vec();
        want.extend([0x21, 0x11, 0x00, 0x0C, 192, 0, 2, 10, 10, 0, 0, 5, 0xC7, 0x38, 0x01, 0xBB]);
        assert_eq!(h, want);
    }

    #[test]
    fn an_ipv6_connection_has_the_thirty_six_byte_address_block() {
        let h = v2_header("[2001:db8::1]:40000".parse().unwrap(), "[2001:db8::2]:443".parse().unwrap());
        assert_eq!(h.len(), MAX_LEN);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(&h[16..32], &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&h[32..48], &"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&h[48..], &[0x9C, 0x40, 0x01, 0xBB]);
    }

    #[test]
    fn ipv4_through_a_dual_stack_listener_is_sent_as_ipv4() {
        let mapped = v2_header("[::ffff:192.0.2.10]:51000".parse().unwrap(), "[::ffff:10.0.0.5]:443".parse().unwrap());
        let plain = v2_header("192.0.2.10:51000".parse().unwrap(), "10.0.0.5:443".parse().unwrap());
        assert_eq!(mapped, plain);
        // Different families: both as IPv6, the IPv4 one mapped.
        let mixed = v2_header("192.0.2.10:1".parse().unwrap(), "[2001:db8::2]:443".parse().unwrap());
        assert_eq!(mixed[13], 0x21);
        assert_eq!(&mixed[16..32], &"::ffff:192.0.2.10".parse::<Ipv6Addr>().unwrap().octets());
    }
}
