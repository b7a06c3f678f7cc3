//! Connecting to a relay: `ws://`, `wss://`, `tcp://`, `tls://` and `quic://` URLs, each turned into a
//! frame writer plus a [`Reader`] of incoming frames that the connection driver reads
//! itself (cancel-safe, so it can `select!` on it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use whispeer_protocol::codec::LEN_PREFIX;
use whispeer_protocol::{Frame, FrameDecoder};

use crate::error::ConnectError;

/// Where and how to reach a relay ([`Endpoint::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// The URL as given.
    pub url: String,
    /// WebSocket (`ws`, `wss`) or length-prefixed stream (`tcp`, `tls`).
    pub websocket: bool,
    /// TLS on top.
    pub tls: bool,
    /// QUIC (`quic`): one bidirectional stream of length-prefixed frames, TLS 1.3.
    pub quic: bool,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The relay's name as dialed (`host:port`, PROTOCOL §3.5.6): what a relay-bound
    /// sign-in signs. `None` when the host makes no relay name.
    pub relay_name: Option<String>,
}

impl Endpoint {
    /// Parses `ws://host[:port][/path]`, `wss://…`, `tcp://host[:port]`, `tls://host:port`,
    /// `quic://host:port`
    /// (with the `url` crate: IPv6 as `[::1]`, international names, percent-encoding).
    /// Without a port, `ws` and `wss` use 80 and 443 as browsers do, and `tcp` the relay's
    /// default TCP port 7481; `tls` and `quic` have no default and need one.
    ///
    /// A URL needs its scheme: `relay.example:443` is refused, with the fix in the error
    /// (only [`Relays`](crate::Relays) reads a scheme-less loopback address as `ws://`).
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        let bad = |reason: &str| ConnectError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
            source: None,
        };
        if !url.contains("://") {
            return Err(bad(&no_scheme(url)));
        }
        let u = url::Url::parse(url).map_err(|e| ConnectError::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        let (websocket, tls, default_port) = match u.scheme() {
            "ws" => (true, false, Some(80)),
            "wss" => (true, true, Some(443)),
            "tcp" => (false, false, Some(DEFAULT_TCP_PORT)),
            "tls" | "quic" => (false, true, None),
            _ => return Err(bad("scheme must be ws, wss, tcp, tls or quic")),
        };
        let quic = u.scheme() == "quic";
        let host = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            _ => return Err(bad("missing host")),
        };
        let port = u
            .port()
            .or(default_port)
            .ok_or_else(|| bad("missing :port (tls:// and quic:// relays have no default port)"))?;
        Ok(Endpoint {
            url: url.to_owned(),
            websocket,
            tls,
            quic,
            host,
            port,
            relay_name: relay_name(&u, port),
        })
    }
}

/// The relay name of URL `u` dialed at `port` (PROTOCOL §3.5.6): its host as the WHATWG URL
/// parser gives it for a `ws://` URL — `tcp://`, `tls://` and `quic://` are not special
/// schemes, so their host is parsed again that way (lowercase, IDNA, IPv4 forms) — then
/// `:port`. `None` when that host makes no relay name.
fn relay_name(u: &url::Url, port: u16) -> Option<String> {
    let host = match u.host()? {
        url::Host::Domain(d) => url::Host::parse(d).ok()?.to_string(),
        // The URL's own serialization: brackets, and IPv6 as WHATWG writes it (never
        // with an embedded IPv4 part, unlike `Ipv6Addr`'s `Display`).
        _ => u.host_str()?.to_owned(),
    };
    whispeer_protocol::relay_name::name(&host, port).ok()
}

/// Why a scheme-less relay address is refused, and what to write instead.
pub(crate) fn no_scheme(addr: &str) -> String {
    format!("has no scheme: write wss://{addr} (TLS) or ws://{addr} / tcp://{addr} for plaintext")
}

/// A host name or address (as [`Endpoint::host`] holds it, IPv6 with or without brackets)
/// that never leaves the machine: `localhost`, 127.0.0.0/8, `::1` and IPv4-mapped
/// 127.0.0.0/8. Nothing a resolver might send elsewhere (`a.localhost`, `localhost.`).
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match h.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => a.is_loopback(),
        Ok(std::net::IpAddr::V6(a)) => {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// Whether a relay address without a scheme (`host:port`, `[::1]:port`, `host`) names a
/// loopback host — the only case where [`Relays`](crate::Relays) still reads it as `ws://`.
pub(crate) fn scheme_less_is_loopback(addr: &str) -> bool {
    match url::Url::parse(&format!("ws://{addr}")) {
        Ok(u) => match u.host() {
            Some(url::Host::Domain(d)) => is_loopback_host(d),
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => is_loopback_host(&a.to_string()),
            None => false,
        },
        Err(_) => false,
    }
}

/// The relay's default TCP listener port (`whispeer-relay serve`), used by `tcp://host`.
const DEFAULT_TCP_PORT: u16 = 7481;

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Writes frames; `flush` sends what was written (many frames per flush).
pub(crate) enum FrameWriter {
    Ws(futures_util::stream::SplitSink<WebSocketStream<Box<dyn Io>>, WsMessage>),
    Stream(BufWriter<WriteHalf<Box<dyn Io>>>),
    /// An in-process relay: whole frames over a channel (`None` once closed).
    #[cfg(feature = "in-process")]
    Channel(Option<mpsc::Sender<Bytes>>),
}

impl FrameWriter {
    /// Queues one encoded frame.
    pub(crate) async fn write(&mut self, frame: Bytes) -> std::io::Result<()> {
        match self {
            FrameWriter::Ws(s) => s
                .feed(WsMessage::Binary(frame))
                .await
                .map_err(std::io::Error::other),
            FrameWriter::Stream(w) => {
                w.write_all(&(frame.len() as u32).to_be_bytes()).await?;
                w.write_all(&frame).await
            }
            #[cfg(feature = "in-process")]
            FrameWriter::Channel(tx) => match tx {
                Some(tx) => tx.send(frame).await.map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "in-process relay stopped")
                }),
                None => Err(std::io::ErrorKind::NotConnected.into()),
            },
        }
    }
    /// Sends everything queued.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            FrameWriter::Ws(s) => s.flush().await.map_err(std::io::Error::other),
            FrameWriter::Stream(w) => w.flush().await,
            #[cfg(feature = "in-process")]
            FrameWriter::Channel(_) => Ok(()),
        }
    }
    /// Closes the write side politely.
    pub(crate) async fn close(&mut self) {
        let _ = match self {
            FrameWriter::Ws(s) => s.close().await.map_err(std::io::Error::other),
            FrameWriter::Stream(w) => w.shutdown().await,
            #[cfg(feature = "in-process")]
            FrameWriter::Channel(tx) => {
                tx.take(); // dropping the sender ends the relay's side of the connection
                Ok(())
            }
        };
    }
}

/// What a connection's reader yields.
pub(crate) enum Incoming {
    Frame(Frame),
    /// The connection ended (EOF, error, undecodable frame); the text says why.
    Closed(String),
}

/// An open connection: a writer and its incoming frames.
pub(crate) struct Connection {
    pub(crate) writer: FrameWriter,
    pub(crate) incoming: Reader,
}

/// Frames a socket delivers, read by the connection driver itself: a reader task between
/// socket and driver cost each received frame one more task wake-up and channel hop.
/// [`Reader::recv`] is cancel-safe (the driver `select!`s on it): a read that loses the
/// race has read nothing, and what was read is queued here. The in-process relay keeps a
/// reader task (its frames arrive on a channel already).
pub(crate) enum Reader {
    /// A reader task's channel (the in-process relay).
    #[cfg_attr(not(feature = "in-process"), allow(dead_code))]
    Channel(mpsc::Receiver<Incoming>),
    /// A length-prefixed byte stream (TCP, TLS, QUIC).
    Stream {
        r: tokio::io::ReadHalf<Box<dyn Io>>,
        dec: FrameDecoder,
        ready: VecDeque<Frame>,
        end: Option<String>,
    },
    /// A WebSocket: one frame per binary message.
    Ws {
        stream: futures_util::stream::SplitStream<WebSocketStream<Box<dyn Io>>>,
        ready: VecDeque<Frame>,
        end: Option<String>,
    },
}

/// Bytes read from a WebSocket's socket at once (a buffer under tungstenite).
const WS_READ_AHEAD: usize = 64 * 1024;

/// Bytes a stream read may take at once: when less than [`STREAM_READ_MIN`] is free in the
/// decoder's buffer, room for this much is made first. A subscriber in a process of its
/// own (`whispeer bench --sub-process`, 1 KiB, TCP) read ~5 frames per 8 KiB read and
/// parked and woke its workers every few frames; with 64 KiB reads it delivered 73–82k
/// instead of 59–70k msg/s batch-signed and 106–116k instead of 89–94k unsigned
/// (alternated runs). Publisher and subscriber in one process sharing a runtime lose by it
/// (75–80k against 86–98k; a pool taking seal jobs first did not change that): the
/// separate processes are what the issue measures and users deploy.
const STREAM_READ_AHEAD: usize = 64 * 1024;
/// See [`STREAM_READ_AHEAD`].
const STREAM_READ_MIN: usize = 8 * 1024;

/// Frames taken from a WebSocket at once without waiting (what tungstenite has buffered
/// or the socket holds), so the driver sees a backlog as it did through a reader task.
const WS_DRAIN: usize = 64;

/// One read from a stream into the decoder's buffer, room made by the decoder
/// ([`FrameDecoder::reserve_read`]): `BytesMut::reserve` on its buffer would move it to an
/// allocation the decoder does not know, and every frame cut out of that is copied (one
/// allocation and `memcpy` per message received). Cancel-safe: nothing is read unless
/// this completes.
async fn read_stream<R: AsyncRead + Unpin>(
    r: &mut R,
    dec: &mut FrameDecoder,
) -> std::io::Result<usize> {
    let buf = dec.buffer_mut();
    if buf.capacity() - buf.len() < STREAM_READ_MIN {
        dec.reserve_read(STREAM_READ_AHEAD);
    }
    r.read_buf(dec.buffer_mut()).await
}

impl Reader {
    /// The next frame, or why the connection ended (`Closed`, after the frames read before
    /// it). Not to be called again after `Closed`: the driver drops the connection then.
    pub(crate) async fn recv(&mut self) -> Option<Incoming> {
        match self {
            Reader::Channel(rx) => rx.recv().await,
            Reader::Stream { r, dec, ready, end } => loop {
                if let Some(i) = take_ready(ready, end) {
                    return Some(i);
                }
                // Cancel-safe: nothing is read unless this completes.
                match read_stream(r, dec).await {
                    Ok(0) => *end = Some("connection closed".to_owned()),
                    Ok(_) => loop {
                        match dec.next_decoded() {
                            Ok(Some(f)) => ready.push_back(f),
                            Ok(None) => break,
                            Err(e) => {
                                *end = Some(format!("undecodable frame from relay: {e}"));
                                break;
                            }
                        }
                    },
                    Err(e) => *end = Some(format!("read error: {e}")),
                }
            },
            Reader::Ws { stream, ready, end } => loop {
                if let Some(i) = take_ready(ready, end) {
                    return Some(i);
                }
                let first = stream.next().await;
                ws_item(first, ready, end);
                // What is there already comes along (polled once each, no waiting).
                while end.is_none() && ready.len() < WS_DRAIN {
                    match futures_util::FutureExt::now_or_never(stream.next()) {
                        Some(item) => ws_item(item, ready, end),
                        None => break,
                    }
                }
            },
        }
    }

    /// A frame already received, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Incoming> {
        match self {
            Reader::Channel(rx) => rx.try_recv().ok(),
            Reader::Stream { ready, end, .. } | Reader::Ws { ready, end, .. } => {
                take_ready(ready, end)
            }
        }
    }

    /// Frames received and not yet taken.
    pub(crate) fn len(&self) -> usize {
        match self {
            Reader::Channel(rx) => rx.len(),
            Reader::Stream { ready, .. } | Reader::Ws { ready, .. } => ready.len(),
        }
    }
}

/// Queued frames first, then the end (once).
fn take_ready(ready: &mut VecDeque<Frame>, end: &mut Option<String>) -> Option<Incoming> {
    match ready.pop_front() {
        Some(f) => Some(Incoming::Frame(f)),
        None => end.take().map(Incoming::Closed),
    }
}

fn ws_item(
    item: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    ready: &mut VecDeque<Frame>,
    end: &mut Option<String>,
) {
    match item {
        Some(Ok(WsMessage::Binary(b))) => match Frame::decode(&b) {
            Ok(f) => ready.push_back(f),
            Err(e) => *end = Some(format!("undecodable frame from relay: {e}")),
        },
        Some(Ok(WsMessage::Close(c))) => *end = Some(format!("relay closed the WebSocket: {c:?}")),
        Some(Ok(_)) => {}
        Some(Err(e)) => *end = Some(format!("WebSocket error: {e}")),
        None => *end = Some("connection closed".to_owned()),
    }
}

/// TLS settings for `wss://` and `tls://` (built by the [`TlsRoot`](crate::TlsRoot) and
/// [`TlsPin`](crate::TlsPin) engines).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct TlsSettings {
    /// Extra trusted roots (PEM certificates), e.g. a relay's self-signed certificate.
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// SHA-256 fingerprints of relay certificates to accept (pinning). When any is set,
    /// the relay's certificate must be one of them (roots are not consulted) and the
    /// handshake signature is still verified with that certificate's key.
    pub pins: Vec<[u8; 32]>,
}

/// SHA-256 of a certificate's DER bytes (the fingerprint `whispeer-relay tls generate`
/// prints), through the TLS provider's own hash.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut out = [0u8; 32];
    if let Some(suite) = TLS13_AES_128_GCM_SHA256.tls13() {
        let h = suite.common.hash_provider.hash(der);
        out.copy_from_slice(h.as_ref());
    }
    out
}

/// Accepts exactly the pinned certificates; verifies handshake signatures normally.
#[derive(Debug)]
struct PinVerifier {
    pins: Vec<[u8; 32]>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let got = cert_sha256(end_entity);
        if self.pins.contains(&got) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the relay's certificate has SHA-256 fingerprint {} which is not the pinned one",
                hex::encode(got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn tls_connector(settings: &TlsSettings) -> Result<tokio_rustls::TlsConnector, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls_client(
        settings, provider, builder,
    )?)))
}

/// The client TLS configuration for `settings`: the web PKI roots plus extra ones, or
/// exactly the pinned certificates.
fn tls_client(
    settings: &TlsSettings,
    provider: Arc<rustls::crypto::CryptoProvider>,
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>,
) -> Result<rustls::ClientConfig, ConnectError> {
    let config = if settings.pins.is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for c in &settings.extra_roots {
            roots.add(c.clone()).map_err(tls_error)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pins: settings.pins.clone(),
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth()
    };
    Ok(config)
}

/// The ALPN protocol id of whispeer over QUIC (the relay's `tls::QUIC_ALPN`).
const QUIC_ALPN: &[u8] = b"whispeer";

/// A QUIC connection's one bidirectional stream as a byte stream, keeping its endpoint and
/// connection alive for as long as the stream is used.
struct QuicIo {
    io: tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    _connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl AsyncRead for QuicIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Dials `quic://host:port`: a client endpoint on an ephemeral UDP port, the TLS 1.3
/// handshake (same roots and pins as `tls://`), and the one stream every frame travels on.
async fn dial_quic(
    ep: &Endpoint,
    settings: &TlsSettings,
    addr: &str,
) -> Result<Box<dyn Io>, ConnectError> {
    let io_err = |source: std::io::Error| ConnectError::Io {
        addr: addr.to_owned(),
        source,
    };
    let remote = tokio::net::lookup_host(addr)
        .await
        .map_err(io_err)?
        .next()
        .ok_or_else(|| io_err(std::io::ErrorKind::NotFound.into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?;
    let mut crypto = tls_client(settings, provider, builder)?;
    crypto.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // NAT bindings for UDP expire fast: keep packets flowing even when the app is quiet.
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    // A relay that died (or restarted without answering for the old connection) is
    // noticed after 10 s of silence; while it lives, the keep-alives answer well within.
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).map_err(tls_error)?,
    ));
    // Everything travels on the one stream the client opens: the relay may open none (by
    // quinn's defaults it could open 100 of each kind, nobody reading them, each buffering
    // up to its 1.25 MB window — some 250 MB per connection of the relay's choosing), and
    // no datagrams are taken.
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    let local: std::net::SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(io_err)?;
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(remote, &ep.host)
        .map_err(tls_error)?
        .await
        .map_err(|e| quic_failure(addr, e))?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| quic_failure(addr, e))?;
    Ok(Box::new(QuicIo {
        io: tokio::io::join(recv, send),
        _connection: connection,
        _endpoint: endpoint,
    }))
}

/// A failed QUIC connection: TLS problems get the same hints as `tls://`.
fn quic_failure(addr: &str, e: quinn::ConnectionError) -> ConnectError {
    match e {
        // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100..=0x1ff (RFC 9000 §20.1).
        quinn::ConnectionError::TransportError(ref t) if u64::from(t.code) >> 8 == 1 => {
            tls_failure(std::io::Error::other(e))
        }
        quinn::ConnectionError::TimedOut => ConnectError::Io {
            addr: addr.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no QUIC answer (is a quic listener there, and UDP let through?)",
            ),
        },
        other => ConnectError::Io {
            addr: addr.to_owned(),
            source: std::io::Error::other(other),
        },
    }
}

/// A TLS error that keeps its source; its message is the source's.
fn tls_error(e: impl std::error::Error + Send + Sync + 'static) -> ConnectError {
    ConnectError::Tls {
        message: e.to_string(),
        source: Some(Box::new(e)),
    }
}

/// Turns a TLS handshake failure into an error that says why and what to do.
fn tls_failure(e: std::io::Error) -> ConnectError {
    let text = e.to_string();
    let hint = if text.contains("CaUsedAsEndEntity") {
        format!(
            "{text}: the relay presents a CA certificate (basicConstraints CA:TRUE, what \
             `openssl req -x509` makes) as its own server certificate, which TLS clients \
             refuse. Give the relay an end-entity certificate: `whispeer-relay tls generate` \
             writes one and prints its SHA-256 fingerprint; trust it with --ca CERT.pem or pin \
             it with --tls-pin SHA256HEX"
        )
    } else if text.contains("UnknownIssuer") {
        format!(
            "{text}: the relay's certificate is not signed by a trusted authority. For a \
             self-signed relay certificate, trust it with --ca CERT.pem or pin its SHA-256 \
             fingerprint (printed by `whispeer-relay tls generate`) with --tls-pin SHA256HEX"
        )
    } else {
        text
    };
    ConnectError::Tls {
        message: hint,
        source: Some(Box::new(e)),
    }
}

/// How the connection task reaches its relay, again and again after each loss.
#[derive(Clone, Debug)]
pub(crate) enum Dialer {
    /// Over the network: a URL and TLS settings.
    Net { ep: Endpoint, tls: TlsSettings },
    /// A relay embedded in this process (no sockets).
    #[cfg(feature = "in-process")]
    InProcess(whispeer_relay::RelayHandle),
}

impl Dialer {
    /// The relay name a relay-bound sign-in signs on a connection it opens (`None`: an
    /// in-process relay, or a host that makes no relay name).
    pub(crate) fn relay_name(&self) -> Option<String> {
        match self {
            Dialer::Net { ep, .. } => ep.relay_name.clone(),
            #[cfg(feature = "in-process")]
            Dialer::InProcess(_) => None,
        }
    }

    /// What to call the relay in logs and errors.
    pub(crate) fn describe(&self) -> &str {
        match self {
            Dialer::Net { ep, .. } => &ep.url,
            #[cfg(feature = "in-process")]
            Dialer::InProcess(_) => "in-process relay",
        }
    }

    /// Opens a new connection.
    pub(crate) async fn dial(
        &self,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Connection, ConnectError> {
        match self {
            Dialer::Net { ep, tls } => connect(ep, tls, max_frame, timeout).await,
            #[cfg(feature = "in-process")]
            Dialer::InProcess(relay) => Ok(in_process(relay)),
        }
    }
}

/// Connects to an embedded relay: frames travel over channels, already delimited.
#[cfg(feature = "in-process")]
fn in_process(relay: &whispeer_relay::RelayHandle) -> Connection {
    let (to_relay, mut from_relay) = relay.connect_in_process();
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let why = loop {
            match from_relay.recv().await {
                Some(b) => match Frame::decode(&b) {
                    Ok(f) => {
                        if tx.send(Incoming::Frame(f)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => break format!("undecodable frame from relay: {e}"),
                },
                None => break "in-process relay closed the connection".to_owned(),
            }
        };
        let _ = tx.send(Incoming::Closed(why)).await;
    });
    Connection {
        writer: FrameWriter::Channel(Some(to_relay)),
        incoming: Reader::Channel(rx),
    }
}

/// Opens a connection (socket, TLS, WebSocket handshake) and frames it.
pub(crate) async fn connect(
    ep: &Endpoint,
    tls: &TlsSettings,
    max_frame: usize,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    tokio::time::timeout(timeout, connect_inner(ep, tls, max_frame))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

async fn connect_inner(
    ep: &Endpoint,
    tls: &TlsSettings,
    max_frame: usize,
) -> Result<Connection, ConnectError> {
    let addr = match ep.host.contains(':') {
        true => format!("[{}]:{}", ep.host, ep.port),
        false => format!("{}:{}", ep.host, ep.port),
    };
    let io: Box<dyn Io> = if ep.quic {
        dial_quic(ep, tls, &addr).await?
    } else {
        dial_tcp(ep, tls, &addr).await?
    };
    connect_io(ep, io, max_frame).await
}

/// The largest TCP segment a client announces (`TCP_MAXSEG`, set before connecting), as
/// the relay's listeners do (`whispeer_relay::LISTEN_MSS`, whose documentation has the
/// measurement): on the loopback interface (MTU 65536) a receive window that shrank below one
/// 64 KiB segment stalled the sender for Linux's 200 ms persist timer. The client's own cap
/// covers a server on the same host that does not cap (a local proxy in front of a relay).
/// Real links' segments are smaller: there it changes nothing.
const SEGMENT_CAP: u32 = 16 * 1024;

/// `TcpStream::connect` (each resolved address in turn) with [`SEGMENT_CAP`].
async fn connect_tcp(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Best effort: a platform without TCP_MAXSEG keeps its default segment size.
        let _ = socket2::SockRef::from(&sock).set_tcp_mss(SEGMENT_CAP);
        match sock.connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "could not resolve to any address",
        )
    }))
}

/// A TCP connection, with TLS on top for `wss://` and `tls://`.
async fn dial_tcp(
    ep: &Endpoint,
    tls: &TlsSettings,
    addr: &str,
) -> Result<Box<dyn Io>, ConnectError> {
    let tcp = connect_tcp(addr).await.map_err(|source| ConnectError::Io {
        addr: addr.to_owned(),
        source,
    })?;
    let _ = tcp.set_nodelay(true);
    Ok(if ep.tls {
        let name = rustls_pki_types::ServerName::try_from(ep.host.clone()).map_err(tls_error)?;
        Box::new(
            tls_connector(tls)?
                .connect(name, tcp)
                .await
                .map_err(tls_failure)?,
        )
    } else {
        Box::new(tcp)
    })
}

/// Frames the connection on an open byte stream (WebSocket handshake first for `ws`).
async fn connect_io(
    ep: &Endpoint,
    io: Box<dyn Io>,
    max_frame: usize,
) -> Result<Connection, ConnectError> {
    if ep.websocket {
        let mut cfg = WebSocketConfig::default();
        cfg.max_message_size = Some(max_frame + LEN_PREFIX);
        cfg.max_frame_size = Some(max_frame + LEN_PREFIX);
        // Bounded (tungstenite's default is unbounded): a relay sending WebSocket pings
        // without reading queued a pong per ping for good; past the bound they coalesce
        // into one. A frame of ours always fits: the buffer is flushed beyond
        // `write_buffer_size` before the next frame goes in.
        cfg.max_write_buffer_size = cfg.write_buffer_size + max_frame + LEN_PREFIX + 64 * 1024;
        let ws_url = ep.url.replacen("wss://", "ws://", 1);
        // tungstenite reads into what is left of its buffer after the frames it split off,
        // often little more than the next frame: without a buffer under it a stream of
        // 1 KiB messages took ~0.7 `recvfrom` calls per message.
        let io: Box<dyn Io> = Box::new(tokio::io::BufReader::with_capacity(WS_READ_AHEAD, io));
        let (ws, _) = tokio_tungstenite::client_async_with_config(ws_url, io, Some(cfg))
            .await
            .map_err(|e| ConnectError::WebSocket {
                source: Box::new(e),
            })?;
        let (sink, stream) = ws.split();
        Ok(Connection {
            writer: FrameWriter::Ws(sink),
            incoming: Reader::Ws {
                stream,
                ready: VecDeque::new(),
                end: None,
            },
        })
    } else {
        let (r, w) = tokio::io::split(io);
        Ok(Connection {
            writer: FrameWriter::Stream(BufWriter::with_capacity(64 * 1024, w)),
            incoming: Reader::Stream {
                r,
                dec: FrameDecoder::new(max_frame),
                ready: VecDeque::new(),
                end: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding (copied frames): the read loop grew the decoder's buffer with
    /// `BytesMut::reserve`, an allocation the decoder did not make (of unknown size), so
    /// frames read into it were all copied, large ones too (one allocation and `memcpy`
    /// per message on the subscriber's path). Read as `Reader::recv` reads (through
    /// [`read_stream`]) from a stream the peer writes as it is read: 1 KiB frames, then
    /// 130 KiB and 300 KiB ones among 1 KiB ones. Every large frame (at least half of any
    /// read allocation: the decoder's grow to at most 256 KiB for small frames) is cut out
    /// of the read buffer (its bytes are the buffer's, no copy); every frame is intact.
    /// Before, some 15 of the 100 were copied (which depends on how reads fall; streams of
    /// 100 or 300 KiB frames alone: 92 and 98 of 100 copied).
    #[tokio::test]
    async fn large_frames_read_from_a_stream_are_not_copied() {
        let mut wire = Vec::new();
        let mut lens = Vec::new();
        for i in 0..200usize {
            let len = match i {
                _ if i < 50 || i % 3 == 0 => 1024 + i,
                _ if i % 3 == 1 => (130 << 10) + i,
                _ => (300 << 10) + i,
            };
            let body: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
            whispeer_protocol::codec::write_prefixed(&body, &mut wire);
            lens.push(len);
        }
        let (mut tx, mut rx) = tokio::io::duplex(64 << 10);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await.unwrap() });
        let mut dec = FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        let mut shared = Vec::new();
        while got.len() < lens.len() {
            assert!(read_stream(&mut rx, &mut dec).await.unwrap() > 0);
            loop {
                let buf = dec.buffer_mut();
                let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
                let Some(f) = dec.next_frame().unwrap() else {
                    break;
                };
                let at = f.as_ptr() as usize;
                shared.push(at >= start && at < end);
                got.push(f);
            }
        }
        writer.await.unwrap();
        assert_eq!(got.iter().map(Bytes::len).collect::<Vec<_>>(), lens);
        for (i, f) in got.iter().enumerate() {
            assert!(
                f.iter().enumerate().all(|(j, b)| *b == (i + j) as u8),
                "frame {i}"
            );
        }
        let copied: Vec<usize> = (0..lens.len())
            .filter(|&i| lens[i] >= 130 << 10 && !shared[i])
            .collect();
        assert!(copied.is_empty(), "large frames copied: {copied:?}");
    }

    #[test]
    fn urls() {
        let e = Endpoint::parse("ws://127.0.0.1:7070").unwrap();
        assert!(e.websocket && !e.tls && e.port == 7070 && e.host == "127.0.0.1");
        let e = Endpoint::parse("tls://relay.example:443").unwrap();
        assert!(!e.websocket && e.tls);
        let e = Endpoint::parse("wss://[::1]:9/path").unwrap();
        assert_eq!(e.host, "::1");
        assert!(Endpoint::parse("http://x:1").is_err());
        assert!(Endpoint::parse("tcp://:80").is_err());
        assert!(Endpoint::parse("ws://").is_err());
        assert!(Endpoint::parse("ws://x:99999").is_err());
        assert!(
            Endpoint::parse("tls://relay.example").is_err(),
            "tls needs a port"
        );
        // Without a port: browsers' defaults for WebSocket, the relay's for TCP.
        assert_eq!(Endpoint::parse("ws://relay.example").unwrap().port, 80);
        assert_eq!(Endpoint::parse("wss://relay.example/ws").unwrap().port, 443);
        assert_eq!(Endpoint::parse("tcp://relay.example").unwrap().port, 7481);
        assert_eq!(Endpoint::parse("ws://[::1]").unwrap().host, "::1");
        // No scheme: refused, with what to write instead.
        let e = Endpoint::parse("relay.example:443")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no scheme") && e.contains("wss://relay.example:443"),
            "{e}"
        );
    }

    /// The relay name each URL signs (PROTOCOL §3.5.6), as the vector `ok_relay_names`
    /// lists them: host as the WHATWG URL parser gives it for `ws://` whatever the scheme
    /// (lowercase, IDNA, IPv4 forms, IPv6 compressed in brackets), and the port dialed.
    #[test]
    fn relay_names_of_urls_are_the_vectors() {
        let v: serde_json::Value = serde_json::from_str(include_str!(
            "../../protocol/tests/vectors/ok_relay_names.json"
        ))
        .unwrap();
        let urls = v["urls"].as_array().unwrap();
        assert!(urls.len() >= 10);
        for u in urls {
            let (url, name) = (u["url"].as_str().unwrap(), u["name"].as_str().unwrap());
            let e = Endpoint::parse(url).unwrap();
            assert_eq!(e.relay_name.as_deref(), Some(name), "{url}");
        }
        // No relay name: a host the normalizer refuses (a URL parser takes more).
        assert_eq!(Endpoint::parse("tcp://a*b:1").unwrap().relay_name, None);
    }

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "LocalHost", "127.0.0.1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["127.9.8.7", "::1", "[::1]", "::ffff:127.0.0.1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "relay.example",
            "localhost.example",
            "a.localhost",
            "localhost.",
            "10.0.0.1",
            "::",
            "0.0.0.0",
            "::2",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
        for a in [
            "127.0.0.1:7070",
            "localhost:1",
            "[::1]:9",
            "localhost",
            "127.1.2.3",
        ] {
            assert!(scheme_less_is_loopback(a), "{a}");
        }
        for a in [
            "relay.example:443",
            "c:3",
            "192.0.2.1:80",
            "[2001:db8::1]:1",
            "",
        ] {
            assert!(!scheme_less_is_loopback(a), "{a}");
        }
        // Userinfo does not make a host loopback.
        assert!(!scheme_less_is_loopback("localhost@relay.example:443"));
    }

    #[test]
    fn a_refused_url_keeps_the_parser_error_as_its_source() {
        use std::error::Error;
        let e = Endpoint::parse("ws://x:99999").unwrap_err();
        let source = e.source().expect("the url crate's error");
        assert!(source.downcast_ref::<url::ParseError>().is_some());
        assert_eq!(
            e.to_string(),
            format!("invalid relay URL \"ws://x:99999\": {source}")
        );
        // Refused by us, not the parser: no source.
        assert!(Endpoint::parse("http://x:1")
            .unwrap_err()
            .source()
            .is_none());
    }
}
