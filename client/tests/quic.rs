//! The QUIC transport (`quic://`) against the real relay binary: round trips with
//! wildcards (Rust client, pinned certificate), the CLI over QUIC, a relay restart the
//! client reconnects across, connection migration (the client's UDP address changes
//! mid-connection and its subscription keeps delivering), and an untrusted certificate
//! refused with the same hint as `tls://`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use support::*;
use whispeer::{Client, Encryption, Quic, TlsPin};
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::frame::{Hello, Pub, Sub, PROTOCOL_VERSION};
use whispeer_protocol::{
    codec, Envelope, Frame, FrameDecoder, KeyId, PatternElem, Qos, TokenPattern, TopicToken,
};

/// The relay binary with a QUIC listener on `quic` (port 0: any).
fn serve_quic(cert: &Path, key: &Path, quic: &str) -> (RelayProcess, SocketAddr) {
    let relay = start_relay_binary(&[
        "--quic",
        quic,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(relay.dir.path().join("ready.json")).unwrap())
            .unwrap();
    let addr = v["quic"]
        .as_str()
        .expect("the ready file names the quic address")
        .parse()
        .unwrap();
    (relay, addr)
}

async fn quic_client(addr: SocketAddr, pin: &str, keys: whispeer::Keyring) -> Client {
    Client::builder()
        .with(Quic::new(format!("quic://{addr}")))
        .with(TlsPin::sha256_hex(pin).unwrap())
        .with(Encryption::with_keyring(keys))
        .with(identity())
        .connect()
        .await
        .expect("connects over QUIC")
}

#[tokio::test]
async fn quic_round_trips_with_wildcards_and_a_pinned_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = tls_generate(dir.path());
    let (relay, addr) = serve_quic(&cert, &key, "127.0.0.1:0");
    let t = tree("quic");
    let a = quic_client(addr, &hex, keyring_with(&t)).await;
    let b = quic_client(addr, &hex, keyring_with(&t)).await;
    let mut one = a.subscribe::<String>("sensors/+/temp").await.unwrap();
    let mut all = a.subscribe::<String>("sensors/#").await.unwrap();
    b.publish("sensors/kitchen/temp", "21.5").await.unwrap();
    b.publish("sensors/kitchen/humidity", "40").await.unwrap();
    let m = within("the + subscription", one.next_message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.topic.as_str(), m.value.as_str()),
        ("sensors/kitchen/temp", "21.5")
    );
    for want in ["21.5", "40"] {
        let m = within("the # subscription", all.next_message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.value, want);
    }
    // The relay counts the connections under their transport.
    let metrics = reqwest_free_get(relay.admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("transport=\"quic\"") && !l.ends_with(" 0")),
        "no QUIC connections in the metrics:\n{metrics}"
    );
}

/// `GET path` on the admin port with a plain HTTP/1.0 request.
async fn reqwest_free_get(admin: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn an_untrusted_certificate_over_quic_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = tls_generate(dir.path());
    let (_relay, addr) = serve_quic(&cert, &key, "127.0.0.1:0");
    let err = Client::builder()
        .with(Quic::new(addr.to_string()))
        .with(Encryption::with_keyring(keyring_with(&tree("untrusted"))))
        .connect()
        .await
        .expect_err("a self-signed certificate neither pinned nor trusted");
    let text = format!("{err:#}");
    assert!(text.contains("--tls-pin"), "{text}");
    // A wrong pin names the certificate the relay presented.
    let mut wrong = vec![b'0'; 64];
    wrong[0] = b'1';
    let err = Client::builder()
        .with(Quic::new(addr.to_string()))
        .with(TlsPin::sha256_hex(std::str::from_utf8(&wrong).unwrap()).unwrap())
        .with(Encryption::with_keyring(keyring_with(&tree("untrusted"))))
        .connect()
        .await
        .expect_err("a wrong pin");
    let text = format!("{err:#}");
    assert!(text.contains(&hex), "{text}");
}

#[tokio::test]
async fn a_quic_client_resubscribes_after_the_relay_restarts_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = tls_generate(dir.path());
    let (relay, addr) = serve_quic(&cert, &key, "127.0.0.1:0");
    let t = tree("restart");
    let a = quic_client(addr, &hex, keyring_with(&t)).await;
    let b = quic_client(addr, &hex, keyring_with(&t)).await;
    let mut sub = a.subscribe::<u32>("after/restart").await.unwrap();
    b.publish("after/restart", &1u32).await.unwrap();
    assert_eq!(
        within("before the restart", sub.next_message())
            .await
            .unwrap()
            .unwrap()
            .value,
        1
    );
    drop(relay); // SIGKILL
    let (_relay, again) = serve_quic(&cert, &key, &addr.to_string());
    assert_eq!(again, addr);
    // Both clients notice (QUIC idle or the reconnect attempt) and come back; the
    // subscription is renewed, so a publish after the restart arrives.
    until_stats(&a, "a reconnected", |s| s.reconnects >= 1).await;
    until_stats(&b, "b reconnected", |s| s.reconnects >= 1).await;
    // The renewed subscription is sent before any new one on the fresh connection, so
    // a new subscription's SubOk means the relay holds the renewed one too.
    let _barrier = within("a barrier subscription", a.subscribe::<u32>("barrier"))
        .await
        .unwrap();
    b.publish("after/restart", &2u32).await.unwrap();
    assert_eq!(
        within("after the restart", sub.next_message())
            .await
            .unwrap()
            .unwrap()
            .value,
        2
    );
}

/// A raw QUIC connection: Hello sent, Welcome read.
struct RawQuic {
    endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl RawQuic {
    async fn connect(addr: SocketAddr, cert: &Path) -> Self {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_file(cert).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"whispeer".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("QUIC handshake");
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut c = RawQuic {
            endpoint,
            send,
            recv,
            dec: FrameDecoder::new(1 << 20),
        };
        c.send(&Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            features: 0,
            client: Some("quic-raw".into()),
            auth: None,
            account: None,
        }))
        .await;
        match c.recv().await {
            Frame::Welcome(_) => c,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    async fn send(&mut self, f: &Frame) {
        self.send
            .write_all(&codec::encode_prefixed(f))
            .await
            .expect("write");
    }

    async fn recv(&mut self) -> Frame {
        within("a frame over QUIC", async {
            loop {
                if let Some(f) = self.dec.next_decoded().unwrap() {
                    return f;
                }
                let mut buf = [0u8; 4096];
                let n = self
                    .recv
                    .read(&mut buf)
                    .await
                    .unwrap()
                    .expect("stream open");
                self.dec.push(&buf[..n]);
            }
        })
        .await
    }
}

fn envelope(key: [u8; 16], i: u8) -> Envelope {
    let tokens = [TopicToken::from_bytes([7; 16])];
    let mut out = Vec::new();
    HeaderFields {
        flags: 0,
        key_id: KeyId::from_bytes(key),
        nonce: [3; 24],
        commit: [4; 32],
        tokens: &tokens,
    }
    .write_prefix(48, &mut out);
    out.extend_from_slice(&[0x5a; 48]);
    out.extend_from_slice(&[i; 32]);
    Envelope::from_bytes(bytes::Bytes::from(out)).unwrap()
}

#[tokio::test]
async fn a_quic_connection_survives_a_change_of_the_client_address() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = tls_generate(dir.path());
    let (_relay, addr) = serve_quic(&cert, &key, "127.0.0.1:0");
    const K: [u8; 16] = [0x5c; 16];
    let mut sub = RawQuic::connect(addr, &cert).await;
    sub.send(&Frame::Sub(Sub {
        sub_id: 1,
        pattern: TokenPattern::new(KeyId::from_bytes(K), vec![PatternElem::Rest]).unwrap(),
        qos: Qos::AtMostOnce,
        replay: None,
        durable: None,
        retained: false,
        credit: None,
        owner: None,
    }))
    .await;
    assert!(matches!(sub.recv().await, Frame::SubOk(_)));
    let mut publisher = RawQuic::connect(addr, &cert).await;
    let publish = |i: u8| {
        Frame::Pub(Pub {
            envelope: envelope(K, i),
            flags: 0,
            publish_id: None,
            qos: Qos::AtMostOnce,
        })
    };
    publisher.send(&publish(1)).await;
    let Frame::Msg(m) = sub.recv().await else {
        panic!("expected a Msg")
    };
    assert_eq!(m.envelope.ciphertext()[0], 1);

    // The subscriber moves to another UDP port (as on a network change): same connection.
    let before = sub.endpoint.local_addr().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sub.endpoint.rebind(socket).unwrap();
    let after = sub.endpoint.local_addr().unwrap();
    assert_ne!(before.port(), after.port());
    // A ping from the new address lets the relay validate the new path.
    sub.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 9 }))
        .await;
    assert!(matches!(sub.recv().await, Frame::Pong(_)));
    publisher.send(&publish(2)).await;
    let Frame::Msg(m) = sub.recv().await else {
        panic!("expected a Msg after the move")
    };
    assert_eq!(m.envelope.ciphertext()[0], 2);
}

#[tokio::test]
async fn the_cli_publishes_and_subscribes_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = tls_generate(dir.path());
    let (_relay, addr) = serve_quic(&cert, &key, "127.0.0.1:0");
    let t = tree("cli-quic");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, t.to_key_string()).unwrap();
    let url = format!("quic://{addr}");
    let mut sub = tokio::process::Command::new(env!("CARGO_BIN_EXE_whispeer"))
        .args(["sub", "--relay", &url, "--tls-pin", &hex, "--count", "1"])
        .arg("--key-file")
        .arg(&keys)
        .arg("cli/quic")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for its `ready:` line (it is subscribed), then publish once.
    let mut stderr = tokio::io::BufReader::new(sub.stderr.take().unwrap());
    within("the CLI subscriber's ready line", async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stderr.read_line(&mut line).await.unwrap() > 0, "sub ended");
            if line.starts_with("ready:") {
                break;
            }
        }
    })
    .await;
    let a = quic_client(addr, &hex, keyring_with(&t)).await;
    a.publish("cli/quic", "over quic").await.unwrap();
    let out = within("the CLI subscriber over QUIC", sub.wait_with_output())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(out.contains("over quic"), "{out}");
}

/// Everything travels on the one stream the client opens, so a relay may open none of its
/// own and send no datagrams: by quinn's defaults it could open 100 streams of each kind
/// that nobody reads, each buffering up to its 1.25 MB window (some 250 MB per connection,
/// of the relay's choosing). Checked from a QUIC server of the test's own, which sees the
/// limits the client announced in its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_may_open_no_streams_of_its_own_nor_send_datagrams() {
    use futures_util::FutureExt;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hex) = tls_generate(dir.path());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap()],
            rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"whispeer".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let client =
        tokio::spawn(async move { quic_client(addr, &hex, keyring_with(&tree("q"))).await });
    let conn = within("the client's connection", server.accept())
        .await
        .unwrap()
        .await
        .unwrap();
    // The handshake over the client's stream: its Hello read, a Welcome written.
    let (mut send, mut recv) = within("its stream", conn.accept_bi()).await.unwrap();
    let len = recv.read_u32().await.unwrap() as usize;
    let mut hello = vec![0; len];
    recv.read_exact(&mut hello).await.unwrap();
    send.write_all(&codec::encode_prefixed(&support::raw::welcome(0)))
        .await
        .unwrap();
    let c = within("connect", client).await.unwrap();
    // Stream credit is the peer's to give: opening one completes at once when it does.
    assert!(
        conn.open_uni().now_or_never().is_none(),
        "the client gives the relay no unidirectional stream"
    );
    assert!(
        conn.open_bi().now_or_never().is_none(),
        "nor a second bidirectional one"
    );
    assert_eq!(conn.max_datagram_size(), None, "nor datagrams");
    conn.close(0u32.into(), b"done");
    within("close", c.close()).await;
}
