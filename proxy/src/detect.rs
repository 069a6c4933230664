//! Protocol detection: what a connection speaks, from its first bytes.
//!
//! The bytes read are kept and replayed by [`Prefixed`], so the server that takes the
//! connection sees it from its first byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a connection's first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (the client preface), as gRPC clients and proxies speak.
    Http2,
    /// A TLS ClientHello.
    Tls,
    /// Anything else, or silence until the timeout (a server-speaks-first protocol).
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1",
            Protocol::Http2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Enough for the preface and any method; detection never reads more.
const MAX_PEEK: usize = 64;

/// The size of a TLS record's header: type, version, length.
const TLS_HEADER: usize = 5;
/// The largest TLS record a peer may send (RFC 8446 §5.2: 2^14 plus expansion).
const TLS_MAX_RECORD: usize = 16384 + 256;

/// Reads until `buf` holds a whole first TLS record (the ClientHello). The buffer grows with
/// the bytes that arrive, never ahead of them, so a peer that announces a large record and
/// stalls costs what it sent.
pub async fn read_first_record<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
) -> io::Result<()> {
    loop {
        let missing = match tls_record_missing(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        buf.reserve(missing.min(1024));
        if io.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed in the middle of a TLS record",
            ));
        }
    }
}

/// How many bytes the first TLS record in `buf` still lacks (at least one while its header
/// is incomplete), or an error when it cannot be a TLS record.
pub fn tls_record_missing(buf: &[u8]) -> io::Result<usize> {
    if buf.len() < TLS_HEADER {
        return Ok(TLS_HEADER - buf.len());
    }
    if buf[0] != 0x16 || buf[1] != 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a TLS handshake record",
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > TLS_MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a TLS record larger than the protocol allows",
        ));
    }
    Ok((TLS_HEADER + len).saturating_sub(buf.len()))
}

/// Classifies what has been read so far, or `None` while more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf[0] == 0x16 {
        // A TLS record of type handshake; the version bytes follow.
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Protocol::Http1);
        }
        if buf.len() < m.len() && m.starts_with(buf) {
            return None;
        }
    }
    Some(Protocol::Opaque)
}

/// Reads from `io` into `buf` until the protocol is clear, `timeout` passes or the peer closes.
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Protocol> {
    let read_until_clear = async {
        loop {
            if let Some(p) = classify(buf) {
                return Ok(p);
            }
            if buf.len() >= MAX_PEEK {
                return Ok(Protocol::Opaque);
            }
            buf.reserve(MAX_PEEK - buf.len());
            if io.read_buf(buf).await? == 0 {
                return Ok(classify(buf).unwrap_or(Protocol::Opaque));
            }
        }
    };
    match tokio::time::timeout(timeout, read_until_clear).await {
        Ok(result) => result,
        Err(_) => Ok(classify(buf).unwrap_or(Protocol::Opaque)),
    }
}

pin_project_lite::pin_project! {
    /// An I/O that first yields bytes already read from it.
    #[derive(Debug)]
    pub struct Prefixed<T> {
        prefix: BytesMut,
        #[pin]
        inner: T,
    }
}

impl<T> Prefixed<T> {
    pub fn new(prefix: BytesMut, inner: T) -> Self {
        Self { prefix, inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, out)
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"POST /x HTTP/1.0\r\n", Some(Protocol::Http1)),
            (b"GE", None),
            (b"PR", None),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0",
                Some(Protocol::Http2),
            ),
            (b"PRI * HTTP/2.0\r\n", None),
            (b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n", Some(Protocol::Opaque)),
            (b"\x16\x03\x01\x02\x00", Some(Protocol::Tls)),
            (b"\x16", None),
            (b"\x16\x07", Some(Protocol::Opaque)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Protocol::Opaque)),
            (b"get / HTTP/1.1", Some(Protocol::Opaque)),
            (b"SSH-2.0-OpenSSH", Some(Protocol::Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test]
    async fn detects_across_partial_reads_and_replays_the_bytes() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in [&b"PRI * HTTP/2"[..], b".0\r\n\r\nSM\r\n\r\nrest"] {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let mut buf = BytesMut::new();
        let p = detect(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http2);
        let _client = writer.await.unwrap();
        let mut replay = Prefixed::new(buf, server);
        let mut out = vec![0; H2_PREFACE.len() + 4];
        replay.read_exact(&mut out).await.unwrap();
        assert_eq!(&out[..H2_PREFACE.len()], H2_PREFACE);
        assert_eq!(&out[H2_PREFACE.len()..], b"rest");
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let p = detect(&mut server, &mut buf, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert!(buf.is_empty());
    }

    proptest::proptest! {
        /// An answer, once given, holds however many more bytes arrive; and no input panics.
        #[test]
        fn classification_is_stable_as_bytes_arrive(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
        ) {
            let mut first = None;
            for n in 0..=bytes.len() {
                match (first, classify(&bytes[..n])) {
                    (None, Some(p)) => first = Some(p),
                    (Some(p), q) => proptest::prop_assert_eq!(Some(p), q),
                    (None, None) => {}
                }
            }
            let _ = tls_record_missing(&bytes);
        }

        /// A TLS record is complete exactly when its announced length has arrived.
        #[test]
        fn tls_records_complete_at_their_length(
            len in 0usize..20_000,
            have in 0usize..20_000,
        ) {
            let mut buf = vec![0x16, 3, 1, (len >> 8) as u8, len as u8];
            buf.resize(5 + have, 0);
            match tls_record_missing(&buf) {
                Ok(missing) => {
                    proptest::prop_assert!(len <= TLS_MAX_RECORD);
                    proptest::prop_assert_eq!(missing, (5 + len).saturating_sub(5 + have));
                }
                Err(_) => proptest::prop_assert!(len > TLS_MAX_RECORD),
            }
        }
    }
}
