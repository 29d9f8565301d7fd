//! Reading the server name a TLS client asks for (SNI, RFC 6066) from the first bytes of its
//! connection, without terminating TLS: the ClientHello, in TLS records (RFC 8446 section 5.1:
//! one handshake message may be split over several records, and the records over any number of
//! TCP segments). The caller reads into a buffer, calls [`read`] after each read and forwards
//! the whole buffer to the backend afterwards, so nothing is consumed.
//!
//! Every length is checked before it is used and nothing is indexed unchecked: any input,
//! truncated or hostile, gives an answer and never a panic (the property tests below feed it
//! random, truncated, mutated and fragmented hellos).

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// Not a TLS ClientHello (plain text, another protocol, or a malformed hello).
    NotTls,
    /// A complete ClientHello, with the server name it asks for when it names a valid one
    /// (lowercased, without a trailing dot).
    Tls(Option<String>),
}

/// TLS record content type: handshake.
const HANDSHAKE: u8 = 22;
/// Handshake message type: ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type: server_name.
const SERVER_NAME: u16 = 0;
/// The largest record payload a peer may send: 2^14 bytes (RFC 8446 section 5.1), plus the
/// expansion TLS 1.2 allows for compressed records.
const MAX_RECORD: usize = (1 << 14) + 1024;
/// Real clients send their hello in one record, rarely two; a hello in more records than this
/// is not read.
const MAX_RECORDS: usize = 16;

/// Reads a ClientHello from the start of `buf`.
pub fn read(buf: &[u8]) -> Hello {
    // Decide "not TLS" from the first bytes, so a plain-text client is not kept waiting.
    match buf {
        [] => return Hello::Incomplete,
        [t, ..] if *t != HANDSHAKE => return Hello::NotTls,
        [_, major, ..] if *major != 3 => return Hello::NotTls,
        _ => {}
    }
    // Only whole records count, and nothing is copied until they hold the whole message: a
    // client sending its hello a byte at a time costs a walk over a few record headers per
    // read, not a parse.
    let mut records: Vec<&[u8]> = Vec::new();
    let mut rest = buf;
    let mut total = 0;
    loop {
        let Some(header) = rest.get(..5) else { return Hello::Incomplete };
        let (kind, major, len) = (header[0], header[1], usize::from(u16::from_be_bytes([header[3], header[4]])));
        // Records of another type before the hello is complete, or of impossible sizes, or
        // more of them than any client uses: not a TLS client's hello.
        if kind != HANDSHAKE || major != 3 || len == 0 || len > MAX_RECORD || records.len() >= MAX_RECORDS {
            return Hello::NotTls;
        }
        let Some(payload) = rest.get(5..5 + len) else { return Hello::Incomplete };
        records.push(payload);
        total += len;
        rest = &rest[5 + len..];
        // The handshake header (type and length) may itself be split over records.
        let head: Vec<u8> = records.iter().flat_map(|r| r.iter().copied()).take(4).collect();
        if head.len() < 4 {
            continue;
        }
        if head[0] != CLIENT_HELLO {
            return Hello::NotTls;
        }
        let need = 4 + (usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]));
        if total < need {
            continue;
        }
        // The usual case, one record holding the whole hello, is parsed in place.
        let answer = match records.as_slice() {
            [only] => client_hello(only),
            many => client_hello(&many.concat()),
        };
        return answer.unwrap_or(Hello::NotTls);
    }
}

/// The answer once `message` (the handshake bytes so far) holds a whole ClientHello; `None`
/// while it does not yet.
fn client_hello(message: &[u8]) -> Option<Hello> {
    let header = message.get(..4)?;
    if header[0] != CLIENT_HELLO {
        return Some(Hello::NotTls);
    }
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    let body = message.get(4..4 + len)?;
    Some(match server_name(body) {
        Some(name) => Hello::Tls(name),
        None => Hello::NotTls,
    })
}

/// The ClientHello body's server name: `None` when the body is malformed, `Some(None)` when it
/// names no valid host.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session = r.u8()?;
    if session > 32 {
        return None;
    }
    r.take(usize::from(session))?;
    let suites = r.u16()?;
    if suites == 0 || suites % 2 != 0 {
        return None;
    }
    r.take(usize::from(suites))?;
    let compression = r.u8()?;
    r.take(usize::from(compression))?;
    if r.0.is_empty() {
        return Some(None); // no extensions (TLS 1.2 allows it)
    }
    let mut extensions = Reader(r.vector16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vector16()?;
        if kind == SERVER_NAME {
            return Some(host_name(data));
        }
    }
    Some(None)
}

/// The first `host_name` entry of a server_name extension, if it is a valid DNS name.
fn host_name(data: &[u8]) -> Option<String> {
    let mut r = Reader(data);
    let mut list = Reader(r.vector16()?);
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let name = list.vector16()?;
        if kind == 0 {
            return valid_name(name);
        }
    }
    None
}

/// `name` lowercased and without one trailing dot, if it is a DNS host name: 1 to 253
/// characters, labels of 1 to 63 letters, digits, hyphens or underscores, not starting or
/// ending with a hyphen.
pub fn valid_name(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let ok = name.split(|&b| b == b'.').all(|label| {
        (1..=63).contains(&label.len())
            && !label.starts_with(b"-")
            && !label.ends_with(b"-")
            && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    ok.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Big-endian reads off the front of a slice, each checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 16-bit length in front (TLS's `opaque x<0..2^16-1>`).
    fn vector16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello handshake message (not yet in records) from its parts.
    fn hello(session: &[u8], suites: &[u16], extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(session.len() as u8);
        body.extend(session);
        body.extend(((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend(s.to_be_bytes());
        }
        body.extend([1, 0]); // one compression method: null
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        (SERVER_NAME, data)
    }

    /// `message` in TLS records whose payloads have the given sizes (the last takes the rest).
    fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        let mut sizes = sizes.iter();
        while !rest.is_empty() {
            let n = sizes.next().map_or(rest.len(), |&s| s.clamp(1, rest.len()));
            out.extend([HANDSHAKE, 3, 1]);
            out.extend((n as u16).to_be_bytes());
            out.extend(&rest[..n]);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn the_server_name_is_read_from_a_single_record() {
        let wire =
            records(&hello(&[1; 32], &[0x1301, 0xC02F], &[(10, vec![0, 2, 0, 29]), sni("API.Example.com.")]), &[]);
        assert_eq!(read(&wire), Hello::Tls(Some("api.example.com".into())));
        // Every strict prefix asks for more; trailing bytes (the client's next record) are ignored.
        for cut in 0..wire.len() {
            assert_eq!(read(&wire[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        let mut more = wire.clone();
        more.extend([23, 3, 3, 0, 1, 0]);
        assert_eq!(read(&more), Hello::Tls(Some("api.example.com".into())));
    }

    #[test]
    fn a_hello_in_more_records_than_any_client_uses_is_not_read() {
        let message = hello(&[], &[0x1301], &[sni("api.example.com")]);
        assert_eq!(read(&records(&message, &[1; MAX_RECORDS - 1])), Hello::Tls(Some("api.example.com".into())));
        assert_eq!(read(&records(&message, &[1; MAX_RECORDS])), Hello::NotTls);
        // Even the handshake header split over records is read.
        assert_eq!(read(&records(&message, &[1, 1, 1, 1])), Hello::Tls(Some("api.example.com".into())));
    }

    #[test]
    fn a_hello_without_a_valid_name_is_tls_without_one() {
        let no_ext = records(&hello(&[], &[0x1301], &[]), &[]);
        assert_eq!(read(&no_ext), Hello::Tls(None));
        for bad in ["", "a..b", "-.", "with space.example", &"x".repeat(64), "ünï.example"] {
            let wire = records(&hello(&[], &[0x1301], &[sni(bad)]), &[]);
            assert_eq!(read(&wire), Hello::Tls(None), "{bad:?}");
        }
        // An IP address as a name is not a host name either way here: digits are allowed.
        let wire = records(&hello(&[], &[0x1301], &[sni("192.0.2.1")]), &[]);
        assert_eq!(read(&wire), Hello::Tls(Some("192.0.2.1".into())));
    }

    #[test]
    fn plain_text_and_other_protocols_are_not_tls_at_once() {
        assert_eq!(read(b"G"), Hello::NotTls);
        assert_eq!(read(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(read(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        assert_eq!(read(&[22, 2]), Hello::NotTls, "SSLv2-style or garbage version");
        assert_eq!(read(&[22]), Hello::Incomplete);
        // An alert record, a server's hello, a zero-length record: not a client's hello.
        assert_eq!(read(&[21, 3, 3, 0, 2, 2, 40]), Hello::NotTls);
        assert_eq!(read(&records(&[2, 0, 0, 1, 0], &[])), Hello::NotTls);
        assert_eq!(read(&[22, 3, 1, 0, 0]), Hello::NotTls);
        // A record claiming more than TLS allows.
        assert_eq!(read(&[22, 3, 1, 0xFF, 0xFF]), Hello::NotTls);
    }

    #[test]
    fn a_hello_from_a_real_tls_client_is_read() {
        // rustls, as a real client writes its first flight (TLS 1.3 and 1.2 offered).
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("uploads.example.com").unwrap();
        let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        assert_eq!(read(&wire), Hello::Tls(Some("uploads.example.com".into())));
        for cut in 0..wire.len() {
            assert_eq!(read(&wire[..cut]), Hello::Incomplete, "cut at {cut}");
        }
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn host() -> impl Strategy<Value = String> {
        proptest::collection::vec(label(), 1..5).prop_map(|labels| labels.join("."))
    }

    fn other_extensions() -> impl Strategy<Value = Vec<(u16, Vec<u8>)>> {
        proptest::collection::vec((1u16..=0xFFFF, proptest::collection::vec(any::<u8>(), 0..300)), 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A valid hello, anywhere among other extensions, in records of any sizes and read in
        /// segments of any sizes: every prefix asks for more, the whole gives the name.
        #[test]
        fn fragmented_hellos_give_their_name(
            name in proptest::option::of(host()),
            session in proptest::collection::vec(any::<u8>(), 0..=32),
            suites in proptest::collection::vec(any::<u16>(), 1..40),
            before in other_extensions(),
            after in other_extensions(),
            sizes in proptest::collection::vec(1usize..600, 0..MAX_RECORDS),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut extensions = before;
            if let Some(n) = &name {
                extensions.push(sni(n));
            }
            extensions.extend(after);
            let message = hello(&session, &suites, &extensions);
            prop_assume!(message.len() < 60_000);
            let wire = records(&message, &sizes);
            for cut in cuts {
                let at = cut.index(wire.len());
                prop_assert_eq!(read(&wire[..at]), Hello::Incomplete);
            }
            prop_assert_eq!(read(&wire), Hello::Tls(name));
        }

        /// Random bytes, and valid hellos with bytes changed or cut: an answer, never a panic.
        #[test]
        fn any_input_gets_an_answer(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = read(&bytes);
            let mut tls = vec![HANDSHAKE, 3, 1];
            tls.extend(&bytes);
            let _ = read(&tls);
        }

        #[test]
        fn mutated_hellos_get_an_answer(
            name in host(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = records(&hello(&[9; 8], &[0x1301, 0x1302], &[sni(&name)]), &[]);
            for (at, byte) in flips {
                let i = at.index(wire.len());
                wire[i] = byte;
            }
            let _ = read(&wire);
            let _ = read(&wire[..cut.index(wire.len())]);
        }
    }
}
