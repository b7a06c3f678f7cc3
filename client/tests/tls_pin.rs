//! TLS a user can set up: `whispeer-relay tls generate` writes a self-signed end-entity
//! certificate and prints its SHA-256 fingerprint; the real relay binary serves `tls://`
//! and `wss://` with it; the Rust client pins it by that fingerprint (and the CLI with
//! `--tls-pin`). A wrong pin, an unpinned self-signed certificate and a CA certificate
//! used as the server's own (what `openssl req -x509` makes) fail with errors that say
//! why and what to do.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;
use whispeer::{Client, Encryption, Tcp, TlsPin, TlsRoot, WebSocket};

fn generate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (cert, key, hex) = tls_generate(dir);
    // The fingerprint is the certificate's: check it independently.
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap()
    };
    assert_eq!(TlsPin::of_cert_der(&der), TlsPin::sha256_hex(&hex).unwrap());
    // Run again without --force: refuses to overwrite.
    let again = Command::new(relay_binary())
        .args(["tls", "generate", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    (cert, key, hex)
}

fn tls_addrs(relay: &RelayProcess) -> (String, String) {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(relay.dir.path().join("ready.json")).unwrap())
            .unwrap();
    (
        v["tls"].as_str().unwrap().to_owned(),
        v["wss"].as_str().unwrap().to_owned(),
    )
}

fn serve_with(cert: &Path, key: &Path) -> RelayProcess {
    start_relay_binary(&[
        "--tls",
        "127.0.0.1:0",
        "--wss",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
}

async fn round_trip(a: Client, b: Client) {
    let mut sub = a.subscribe::<String>("tls/check").await.unwrap();
    b.publish("tls/check", "pinned").await.unwrap();
    let m = within("a message over pinned TLS", sub.next_message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.value, "pinned");
}

#[tokio::test]
async fn generated_certificate_is_pinned_by_its_fingerprint_over_tls_and_wss() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = generate(dir.path());
    let relay = serve_with(&cert, &key);
    let (tls, wss) = tls_addrs(&relay);
    let t = tree("pinned");
    let pin = TlsPin::sha256_hex(&hex).unwrap();
    let a = Client::builder()
        .with(Tcp::new(format!("tls://{tls}")))
        .with(pin)
        .with(Encryption::with_keyring(keyring_with(&t)))
        .connect()
        .await
        .expect("pinned tls:// connects");
    // Colon-separated upper case (openssl's format) works too, over wss://.
    let colons: Vec<String> = hex
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let b = Client::builder()
        .with(WebSocket::new(format!("wss://{wss}")))
        .with(TlsPin::sha256_hex(&colons.join(":")).unwrap())
        .with(Encryption::with_keyring(keyring_with(&t)))
        .connect()
        .await
        .expect("pinned wss:// connects");
    round_trip(a, b).await;

    // A wrong pin is refused, naming the fingerprint the relay presented.
    let mut wrong = [0u8; 32];
    wrong[0] = 1;
    let wrong_hex: String = wrong.iter().map(|b| format!("{b:02x}")).collect();
    let err = Client::builder()
        .with(Tcp::new(format!("tls://{tls}")))
        .with(TlsPin::sha256_hex(&wrong_hex).unwrap())
        .with(Encryption::with_keyring(keyring_with(&t)))
        .connect()
        .await
        .expect_err("wrong pin");
    let text = format!("{err:#}");
    assert!(
        text.contains("not the pinned one") && text.contains(&hex),
        "{text}"
    );

    // Neither pinned nor trusted: says how to trust or pin it.
    let err = Client::builder()
        .with(Tcp::new(format!("tls://{tls}")))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .connect()
        .await
        .expect_err("untrusted self-signed");
    let text = format!("{err:#}");
    assert!(text.contains("--tls-pin"), "{text}");

    // Trusting the generated certificate as a root works as well (it is an end entity).
    Client::builder()
        .with(Tcp::new(format!("tls://{tls}")))
        .with(TlsRoot::pem_file(&cert).unwrap())
        .with(Encryption::with_keyring(keyring_with(&t)))
        .connect()
        .await
        .expect("trusted generated certificate connects");

    // Malformed pins are typed errors.
    assert!(TlsPin::sha256_hex("abc").is_err());
    assert!(TlsPin::sha256_hex(&"zz".repeat(32)).is_err());
}

#[tokio::test]
async fn ca_certificate_as_end_entity_gets_an_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("ca.crt");
    let key = dir.path().join("ca.key");
    // The "obvious" certificate: openssl req -x509 (basicConstraints CA:TRUE).
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "{out:?}");
    let relay = serve_with(&cert, &key);
    let (tls, _) = tls_addrs(&relay);
    let err = Client::builder()
        .with(Tcp::new(format!("tls://{tls}")))
        .with(TlsRoot::pem_file(&cert).unwrap())
        .with(Encryption::with_keyring(keyring_with(&tree("ca"))))
        .connect()
        .await
        .expect_err("CA as end entity is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("CaUsedAsEndEntity")
            && text.contains("CA certificate")
            && text.contains("whispeer-relay tls generate"),
        "{text}"
    );
}

#[test]
fn cli_tls_pin_flag_connects_to_the_pinned_relay_and_refuses_bad_pins() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = generate(dir.path());
    let relay = serve_with(&cert, &key);
    let (tls, _) = tls_addrs(&relay);
    let whispeer = env!("CARGO_BIN_EXE_whispeer");
    let keyfile = dir.path().join("tree.key");
    let out = Command::new(whispeer)
        .args(["key", "new", "--tree", "pin-tree"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&keyfile, &out.stdout).unwrap();
    let url = format!("tls://{tls}");
    let publish = |pin: &str| {
        Command::new(whispeer)
            .env_remove("WHISPEER_RELAY")
            .env_remove("WHISPEER_KEY")
            .args(["pub", "--relay", &url, "--tls-pin", pin, "--key-file"])
            .arg(&keyfile)
            .args(["pin/topic", "1"])
            .output()
            .unwrap()
    };
    let ok = publish(&hex);
    assert!(ok.status.success(), "{ok:?}");
    let bad = publish(&"00".repeat(32));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not the pinned one"),
        "{bad:?}"
    );
    let malformed = publish("xyz");
    assert!(!malformed.status.success());
    assert!(
        String::from_utf8_lossy(&malformed.stderr).contains("64 hex digits"),
        "{malformed:?}"
    );
}

/// A server that resolves every handshake to one certificate chain and signing key.
#[derive(Debug)]
struct Presents(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Presents {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A TLS front on 127.0.0.1:0 for `upstream` (a relay's plaintext TCP or WebSocket
/// listener), speaking only TLS `version`: it presents `cert` but signs the handshake with
/// `key`, which need not be the certificate's. Each handshake's outcome (the version
/// negotiated, or why it failed) is reported on the receiver; only a completed handshake
/// reaches the relay.
async fn tls_front(
    upstream: std::net::SocketAddr,
    cert: &str,
    key: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<rustls::ProtocolVersion, String>>,
) {
    use rustls_pki_types::pem::PemObject;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let signer = provider
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
        .unwrap();
    // `CertifiedKey::new` does not check that the key is the certificate's.
    let certified = rustls::sign::CertifiedKey::new(chain, signer);
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(std::sync::Arc::new(Presents(std::sync::Arc::new(
            certified,
        ))));
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let _ = tx.send(Ok(tls.get_ref().1.protocol_version().unwrap()));
                        let mut relay = tokio::net::TcpStream::connect(upstream).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut relay).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A pin covers the certificate, and the certificate the key: the client still checks the
/// handshake's signature with the pinned certificate's public key. A server that copied
/// the relay's certificate but not its key (here: the pinned certificate, the handshake
/// signed by another key) is refused over `tls://` and `wss://`, in TLS 1.3 and in TLS 1.2
/// (the client offers both), before a byte of the whispeer handshake; the same front with
/// the right key connects. Mutation review: `PinVerifier::verify_tls13_signature` /
/// `verify_tls12_signature` returning `HandshakeSignatureValid::assertion()` unchecked
/// failed no test.
#[tokio::test]
async fn the_pinned_certificate_with_a_handshake_signed_by_another_key_is_refused() {
    let relay = TestRelay::start().await;
    let names = ["127.0.0.1".to_owned()];
    let real = whispeer_relay::tls::generate(&names).unwrap();
    let copied_without_key = whispeer_relay::tls::generate(&names).unwrap();
    let pin = TlsPin::of_cert_der(&{
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(real.cert_pem.as_bytes()).unwrap()
    });
    let t = tree("pin-signature");
    for (version, name) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        for wss in [false, true] {
            let (upstream, scheme) = if wss {
                (relay.addrs.ws.unwrap(), "wss")
            } else {
                (relay.addrs.tcp.unwrap(), "tls")
            };
            let connect = |addr: std::net::SocketAddr| {
                let url = format!("{scheme}://{addr}");
                let b = Client::builder();
                let b = if wss {
                    b.with(WebSocket::new(url))
                } else {
                    b.with(Tcp::new(url))
                };
                b.with(pin)
                    .with(Encryption::with_keyring(keyring_with(&t)))
                    .connect()
            };
            let case = format!("{scheme}:// in {name:?}");
            // The certificate's own key: the front is sound, and connects.
            let (addr, mut outcomes) =
                tls_front(upstream, &real.cert_pem, &real.key_pem, version).await;
            let c = within("the real key connects", connect(addr))
                .await
                .unwrap_or_else(|e| panic!("{case}, the real key: {e:#}"));
            let got = within("the front's handshake", outcomes.recv()).await;
            assert_eq!(got, Some(Ok(name)), "{case}");
            c.close().await;
            // Another key: the handshake's signature does not verify.
            let (addr, mut outcomes) = tls_front(
                upstream,
                &real.cert_pem,
                &copied_without_key.key_pem,
                version,
            )
            .await;
            let err = within("another key is refused", connect(addr))
                .await
                .expect_err(&format!("{case}: a handshake signed by another key"));
            let text = format!("{err:#}");
            assert!(
                matches!(err, whispeer::ConnectError::Tls { .. }) && text.contains("BadSignature"),
                "{case}: {text}"
            );
            // The front's handshake failed too: nothing reached the relay.
            let got = within("the front's handshake", outcomes.recv()).await;
            assert!(matches!(got, Some(Err(_))), "{case}: {got:?}");
        }
    }
    relay.stop().await;
}
