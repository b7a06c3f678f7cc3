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
