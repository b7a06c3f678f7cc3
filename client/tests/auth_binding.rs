//! Relay-bound sign-ins (PROTOCOL §3.5.6) with the real client and the real
//! `whispeer-relay` binary: the client signs the name of the relay it dialed and a relay
//! with `auth.names` admits it; `require_bound_auth` refuses a relay without names with a
//! typed error; and the forwarding attack end to end — a relay M (a raw socket in the test)
//! that the client signs in to passes an honest relay H's challenge on: with names at H it
//! gets no sign-in there, without names it does (the hole relay binding closes only where
//! names are set).

mod support;

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use support::raw::{read_frame, write_frame};
use support::{account_add, keyring_with, start_relay_binary, tree, within, RelayProcess};
use tokio::net::{TcpListener, TcpStream};
use whispeer::protocol::frame::{Hello, PROTOCOL_VERSION};
use whispeer::protocol::{ErrorCode, Frame};
use whispeer::{AuthNotBound, Client, ConnectError, Encryption, RelayAuth, Tcp, WebSocket};

/// The account key every test signs in with (listed at the relays).
fn alice() -> SigningKey {
    SigningKey::from_bytes(&[0x5a; 32])
}

/// An account list naming alice's key, and a relay over it with `extra` arguments.
struct Honest {
    _dir: tempfile::TempDir,
    relay: RelayProcess,
}

fn honest(extra: &[&str]) -> Honest {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("accounts.toml");
    let pk = hex::encode(alice().verifying_key().as_bytes());
    account_add(&file, "alice", &["--public-key", &pk]);
    let mut args = vec!["--auth", "required", "--accounts", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    Honest {
        relay: start_relay_binary(&args),
        _dir: dir,
    }
}

async fn connect(url: &str, require_bound: bool) -> Result<Client, ConnectError> {
    let t = tree("home");
    Client::builder()
        .with(Tcp::new(url))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(RelayAuth::key(alice()))
        .require_bound_auth(require_bound)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
}

/// A relay with `--auth-name 127.0.0.1` admits the client dialing it as `127.0.0.1` (over
/// TCP and WebSocket, any port: a host entry), also with `require_bound_auth`; dialed as
/// `localhost` — a name it does not list — the client's bound sign-in is refused with the
/// name in the error.
#[tokio::test]
async fn the_client_signs_the_dialed_name_and_a_relay_with_names_admits_it() {
    let h = honest(&["--auth-name", "127.0.0.1"]);
    for require in [false, true] {
        let c = connect(&h.relay.tcp_url(), require)
            .await
            .expect("bound to 127.0.0.1:PORT");
        c.close().await;
    }
    let t = tree("home");
    let c = Client::builder()
        .with(WebSocket::new(h.relay.ws_url()))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(RelayAuth::key(alice()))
        .connect()
        .await
        .expect("over WebSocket too");
    c.close().await;
    let other = format!("tcp://localhost:{}", h.relay.tcp.port());
    match connect(&other, false).await {
        Err(ConnectError::Rejected { code, message }) => {
            assert_eq!(code, ErrorCode::AuthFailed);
            assert!(
                message.contains("not this relay's")
                    && message.contains(&format!("\"localhost:{}\"", h.relay.tcp.port())),
                "{message}"
            );
        }
        Err(e) => panic!("expected auth_failed, got {e}"),
        Ok(_) => panic!("a name the relay does not list was admitted"),
    }
}

/// `require_bound_auth` keeps the key away from a relay that sets no names: the connect
/// fails with `ConnectError::AuthNotBound` naming the relay, before anything is signed;
/// without the option the same relay is joined with the legacy form.
#[tokio::test]
async fn require_bound_auth_refuses_a_relay_without_names() {
    let h = honest(&[]);
    match connect(&h.relay.tcp_url(), true).await {
        Err(ConnectError::AuthNotBound(AuthNotBound::NotOffered { relay })) => {
            assert_eq!(relay, Some(format!("127.0.0.1:{}", h.relay.tcp.port())));
        }
        Err(e) => panic!("expected AuthNotBound, got {e}"),
        Ok(_) => panic!("connected to a relay without names"),
    }
    let e = connect(&h.relay.tcp_url(), true).await.err().unwrap();
    assert!(e.to_string().contains("auth.names"), "{e}");
    connect(&h.relay.tcp_url(), false)
        .await
        .expect("without the option: the legacy form")
        .close()
        .await;
}

/// What relay M got at H with the sign-in the client made for M.
#[derive(Debug)]
enum AtH {
    /// H admitted M as the client.
    SignedIn,
    /// H refused, with this message.
    Refused(String),
}

/// Relay M, listening on 127.0.0.2 (so its relay name, `127.0.0.2:PORT`, is not H's): it
/// takes the client's connection, opens one to H naming the client's account key, passes
/// H's `Challenge` on as its own — with `bound` as M chooses (`None`: as H sent it) — and
/// sends the client's `Auth` on to H.
async fn forward_through_m(h: SocketAddr, bound: Option<Option<bool>>) -> (AtH, Frame) {
    let m = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let m_url = format!("tcp://{}", m.local_addr().unwrap());
    // The victim: the real client, dialing M (its connect never completes: M never greets).
    let victim = tokio::spawn(async move { connect(&m_url, false).await.map(|_| ()) });
    let (mut from_client, _) = within("the client at M", m.accept()).await.unwrap();
    let Some(Frame::Hello(hello)) = read_frame(&mut from_client).await else {
        panic!("the client's Hello")
    };
    let account = hello.account.expect("the client names its account key");
    let mut to_h = TcpStream::connect(h).await.unwrap();
    write_frame(
        &mut to_h,
        &Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            features: hello.features,
            client: Some("relay M".into()),
            auth: None,
            account: Some(account),
        }),
    )
    .await;
    let Some(Frame::Challenge(mut ch)) = read_frame(&mut to_h).await else {
        panic!("H's Challenge")
    };
    if let Some(b) = bound {
        ch.bound = b;
    }
    write_frame(&mut from_client, &Frame::Challenge(ch)).await;
    let auth = within("the client's Auth", read_frame(&mut from_client))
        .await
        .expect("the client answers M's challenge");
    assert!(matches!(auth, Frame::Auth(_)), "{auth:?}");
    write_frame(&mut to_h, &auth).await;
    let at_h = match within("H's answer", read_frame(&mut to_h)).await {
        Some(Frame::Welcome(_)) => AtH::SignedIn,
        Some(Frame::Err(e)) => {
            assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
            AtH::Refused(e.message)
        }
        other => panic!("expected Welcome or Err from H, got {other:?}"),
    };
    victim.abort();
    (at_h, auth)
}

/// The forwarding attack against a relay with names: M passes H's challenge on (asking for
/// a bound sign-in, as H does); the client signs M's name, the name it dialed; H refuses
/// it. M dropping the request gets the legacy form from the client, which H refuses too.
#[tokio::test]
async fn a_forwarded_challenge_gets_no_sign_in_at_a_relay_with_names() {
    let h = honest(&["--auth-name", "127.0.0.1"]);
    let (at_h, auth) = forward_through_m(h.relay.tcp, None).await;
    let Frame::Auth(a) = auth else { unreachable!() };
    assert!(
        a.relay
            .as_deref()
            .is_some_and(|n| n.starts_with("127.0.0.2:")),
        "the client signed the name it dialed: {a:?}"
    );
    match at_h {
        AtH::Refused(m) => assert!(m.contains("not this relay's"), "{m}"),
        AtH::SignedIn => panic!("M signed in at H as the client"),
    }
    let (at_h, auth) = forward_through_m(h.relay.tcp, Some(None)).await;
    assert!(matches!(auth, Frame::Auth(ref a) if a.relay.is_none()));
    match at_h {
        AtH::Refused(m) => assert!(m.contains("names no relay"), "{m}"),
        AtH::SignedIn => panic!("M signed in at H as the client"),
    }
}

/// The hole, at a relay without names: M passes H's challenge on and signs in at H as the
/// client — with the legacy form, and with a bound one naming M (H has nothing to compare
/// the name to). The relay warns about this at start (`relay/tests/auth_binding.rs`);
/// `require_bound_auth` keeps a client away from such relays.
#[tokio::test]
async fn a_forwarded_challenge_signs_in_at_a_relay_without_names() {
    let h = honest(&[]);
    let (at_h, _) = forward_through_m(h.relay.tcp, None).await;
    assert!(matches!(at_h, AtH::SignedIn), "{at_h:?}");
    let (at_h, auth) = forward_through_m(h.relay.tcp, Some(Some(true))).await;
    assert!(matches!(auth, Frame::Auth(ref a) if a.relay.is_some()));
    assert!(matches!(at_h, AtH::SignedIn), "{at_h:?}");
}

/// Runs the `whispeer` CLI with a clean environment.
fn whispeer_cli(args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_whispeer"));
    for v in [
        "WHISPEER_KEY",
        "WHISPEER_IDENTITY",
        "WHISPEER_RELAY",
        "WHISPEER_AUTH_KEY",
        "WHISPEER_AUTH_TOKEN",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c.args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// The CLI's `--require-bound-auth`: a relay without names fails the command with the
/// reason; one with names is joined.
#[tokio::test]
async fn the_cli_requires_bound_auth_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let key = whispeer_cli(&["key", "new", "--tree", "home"]);
    assert!(key.status.success());
    let key_file = dir.path().join("home.key");
    std::fs::write(&key_file, &key.stdout).unwrap();
    let auth_file = dir.path().join("alice.key");
    std::fs::write(
        &auth_file,
        format!(
            "{}{}\n",
            whispeer::ACCOUNT_KEY_PREFIX,
            hex::encode(alice().to_bytes())
        ),
    )
    .unwrap();
    let publish = |url: &str| {
        whispeer_cli(&[
            "pub",
            "--relay",
            url,
            "--key-file",
            key_file.to_str().unwrap(),
            "--auth-key",
            auth_file.to_str().unwrap(),
            "--require-bound-auth",
            "a/b",
            "1",
            "--qos",
            "1",
        ])
    };
    let without = honest(&[]);
    let o = publish(&without.relay.tcp_url());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("does not ask for a sign-in bound to its name") && err.contains("auth.names"),
        "{err}"
    );
    let with = honest(&["--auth-name", "127.0.0.1"]);
    let o = publish(&with.relay.tcp_url());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
