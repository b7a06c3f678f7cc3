//! TLS for the `wss`, `tls` and `quic` listeners: rustls with the *ring* provider, certificate
//! chain and key from PEM files; `whispeer-relay tls generate` (a self-signed end-entity
//! certificate and its SHA-256 fingerprint for clients to pin).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate file holds no usable certificate.
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    /// The key file holds no usable private key.
    #[error("no PEM private key (PKCS#8, PKCS#1 or SEC1) in {0}")]
    NoKey(PathBuf),
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    /// A file to write exists already.
    #[error("{0} exists; remove it or pass --force to overwrite it")]
    Exists(PathBuf),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TLS configuration cannot carry QUIC (it needs TLS 1.3).
    #[error("QUIC needs TLS 1.3: {0}")]
    Quic(String),
}

/// SHA-256 of a certificate's DER bytes: the fingerprint clients pin (`--tls-pin`).
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut out = [0u8; 32];
    if let Some(suite) = TLS13_AES_128_GCM_SHA256.tls13() {
        out.copy_from_slice(suite.common.hash_provider.hash(der).as_ref());
    }
    out
}

/// A generated certificate: PEM texts and the fingerprint.
#[derive(Debug)]
pub struct Generated {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
    /// SHA-256 of the certificate's DER bytes.
    pub sha256: [u8; 32],
}

/// A self-signed *end-entity* certificate (not a CA: `basicConstraints CA:FALSE`, key usage
/// digitalSignature, extended key usage serverAuth) for `names` (DNS names or IP
/// addresses), with a fresh ECDSA P-256 key. TLS clients accept it as a server
/// certificate when they trust or pin it; a CA certificate (what `openssl req -x509`
/// makes) is refused by them as `CaUsedAsEndEntity`.
pub fn generate(names: &[String]) -> Result<Generated, TlsError> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = CertificateParams::new(names.to_vec()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "whispeer relay");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(Generated {
        sha256: cert_sha256(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes `text` to `path`, a new file: mode 0600 on Unix when `secret` (set explicitly,
/// whatever the umask). Without `force` anything already at `path`, a symbolic link
/// included, is refused ([`TlsError::Exists`]; `O_EXCL`). With `force` the text is written
/// to a new file beside `path` (`O_EXCL`, so never through a symbolic link) that is then
/// renamed over it: a symbolic link at `path` is replaced, never written through, and an
/// existing file's owner and mode are not kept (security review: it opened `path` with
/// create + truncate, so a planted link's target was overwritten and a planted 0666 key
/// file kept its mode, readable by whoever planted it).
pub fn write_pem(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), TlsError> {
    if !force {
        return write_new(path, text, secret).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_owned())
            } else {
                TlsError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        });
    }
    let write_err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut attempt = 0u32;
    let tmp = loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}-{stamp:08x}-{attempt}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        match write_new(&tmp, text, secret) {
            Ok(()) => break tmp,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 64 => {
                attempt += 1;
            }
            Err(e) => return Err(write_err(e)),
        }
    };
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e)
    })
}

/// `text` in a new file at `path` (`O_EXCL`: nothing already there is opened, a symbolic
/// link included), 0600 when `secret`; removed again if it cannot be written in full.
fn write_new(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    let mut written = || -> std::io::Result<()> {
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        #[cfg(not(unix))]
        let _ = secret;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    written().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificate chain and key from PEM files.
fn load(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_pem = read(cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key_pem = read(key)?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey(key.to_owned()))?;
    Ok((certs, key_der))
}

/// Builds the acceptor shared by both TLS listeners.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let (certs, key_der) = load(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The ALPN protocol id of whispeer over QUIC (`quic://`).
pub const QUIC_ALPN: &[u8] = b"whispeer";

/// The most bytes a QUIC peer may send before the relay reads them: the stream receive
/// window, and the largest connection receive window (see [`quic_server`]; each
/// connection's is shared out of `limits.quic_receive_window_total`).
pub const QUIC_RECEIVE_WINDOW: u32 = 512 << 10;

/// The smallest connection receive window: what every connection's handshake grants, and
/// what a connection keeps when `limits.quic_receive_window_total` is spent (~650 KB/s at
/// 50 ms RTT: slowed, never refused).
pub const QUIC_RECEIVE_WINDOW_MIN: u32 = 32 << 10;

/// Bytes a QUIC connection attempt may buffer before the relay accepts it (see
/// [`quic_server`]).
pub const QUIC_INCOMING_BUFFER: u64 = 64 << 10;

/// Bytes all QUIC connection attempts together may buffer before the relay accepts them.
pub const QUIC_INCOMING_BUFFER_TOTAL: u64 = 8 << 20;

/// The QUIC listener's configuration: TLS 1.3 only (QUIC has no other), ALPN
/// [`QUIC_ALPN`], connection migration on (a client whose address changes — Wi-Fi to
/// mobile, a NAT rebinding — keeps its connection), and an idle timeout of `idle`: the
/// relay's own idle timer answers first with `Err(idle_timeout)`, QUIC's closes what is left.
pub fn quic_server(
    cert: &Path,
    key: &Path,
    idle: std::time::Duration,
    max_incoming: usize,
) -> Result<quinn::ServerConfig, TlsError> {
    let (certs, key_der) = load(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One bidirectional stream per connection carries every frame; nothing else is opened.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // quinn buffers in the relay's own memory what a peer may send before the relay reads
    // (its receive window) and what the relay sent and the peer has not acknowledged (its
    // send window) — TCP's equivalents are kernel buffers under `tcp_mem`. quinn's defaults
    // (1.25 MB and 10 MB) let every stalled connection (a frame waiting for the large-frame
    // budget, a publisher paused by its rate) hold that much; 512 KiB in (at 50 ms RTT still
    // ~10 MB/s for one connection) and 2 MiB out, at most. The connection receive window
    // (which bounds the one stream's) starts at the floor: what the handshake grants cannot
    // be taken back, so each connection's grows with use, out of
    // `limits.quic_receive_window_total` (`quic::ReceiveWindows`).
    transport.stream_receive_window(QUIC_RECEIVE_WINDOW.into());
    transport.receive_window(QUIC_RECEIVE_WINDOW_MIN.into());
    // The send window each connection gets is set after its handshake, from
    // `limits.quic_send_window_total` (`quic::SendWindows`); this is the most.
    transport.send_window(crate::quic::SEND_WINDOW_MAX);
    // No unreliable datagrams: the relay never reads them, and quinn would keep up to its
    // default 1.25 MB of them per connection (each pinning its whole packet buffer).
    transport.datagram_receive_buffer_size(None);
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle + std::time::Duration::from_secs(5))
            .map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    server.transport_config(Arc::new(transport));
    server.migration(true);
    // A connection attempt (`Incoming`) buffers the packets that arrive before the relay
    // accepts it — while its address waits for a connect slot (`connect_wait`) — up to
    // quinn's defaults of 10 MiB each and 100 MiB together, and up to 65,536 attempts: a
    // client that validated its address could park that much in the relay without ever
    // completing a handshake. The relay takes no 0-RTT data, so a handshake's few packets
    // fit in 64 KiB; attempts beyond the connection cap would be refused anyway.
    server.incoming_buffer_size(QUIC_INCOMING_BUFFER);
    server.incoming_buffer_size_total(QUIC_INCOMING_BUFFER_TOTAL);
    server.max_incoming(max_incoming.max(1));
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test's own under the system temporary directory.
    #[cfg(unix)]
    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("whispeer-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    /// Security review (broker F1): `write_pem(force)` replaces what is at the path — a
    /// symbolic link is not written through, a planted 0666 file does not keep its mode —
    /// and without `force` nothing existing is opened, a dangling link included.
    #[cfg(unix)]
    #[test]
    fn write_pem_never_writes_through_a_link_nor_keeps_a_planted_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("write-pem");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;

        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = d.join("cert.pem");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        write_pem(&link, "CERT", false, true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "CERT");

        let key = d.join("key.pem");
        std::fs::write(&key, "planted").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_pem(&key, "KEY", true, true).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY");
        assert_eq!(mode(&key), 0o600);

        // Without force: refused, untouched (a dangling link too).
        assert!(matches!(
            write_pem(&key, "X", true, false),
            Err(TlsError::Exists(_))
        ));
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY");
        let dangling = d.join("dangling.pem");
        std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            write_pem(&dangling, "X", true, false),
            Err(TlsError::Exists(_))
        ));
        assert!(!d.join("nowhere").exists());
        // A new file: 0600 when secret.
        let fresh = d.join("fresh.pem");
        write_pem(&fresh, "NEW", true, false).unwrap();
        assert_eq!(mode(&fresh), 0o600);
        // No temporary file is left behind.
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["cert.pem", "dangling.pem", "fresh.pem", "key.pem", "victim"]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The QUIC listener's memory bounds are set (90ea234): a connection attempt buffers
    /// at most 64 KiB before it is accepted, all attempts together 8 MiB, and no more
    /// attempts wait than the connection cap — quinn's defaults (10 MiB each, 100 MiB
    /// together, 65,536 attempts) let clients park that much without finishing a
    /// handshake; and datagrams are off (quinn would buffer 1.25 MB of them per
    /// connection). quinn exposes the values only through `Debug`.
    #[test]
    fn the_quic_listener_bounds_what_connection_attempts_and_peers_can_buffer() {
        let g = generate(&["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("wsp-quic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, &g.cert_pem).unwrap();
        std::fs::write(&key, &g.key_pem).unwrap();
        let sc = quic_server(&cert, &key, std::time::Duration::from_secs(60), 1234);
        std::fs::remove_dir_all(&dir).ok();
        let sc = sc.unwrap();
        let shown = format!("{sc:?}");
        for want in [
            format!("max_incoming: {}", 1234),
            format!("incoming_buffer_size: {QUIC_INCOMING_BUFFER}"),
            format!("incoming_buffer_size_total: {QUIC_INCOMING_BUFFER_TOTAL}"),
            format!("stream_receive_window: {QUIC_RECEIVE_WINDOW}"),
            format!(" receive_window: {QUIC_RECEIVE_WINDOW_MIN}"),
            "datagram_receive_buffer_size: None".to_owned(),
            "migration: true".to_owned(),
        ] {
            assert!(shown.contains(&want), "{want} not in {shown}");
        }
    }
}
