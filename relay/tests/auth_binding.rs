//! Relay-bound sign-ins (PROTOCOL §3.5.6) against the real `whispeer-relay` binary, with
//! hand-made frames (the Rust client's side, and the forwarding attack with the real
//! client, are in `client/tests/auth_binding.rs`): a relay with `auth.names` asks for a
//! bound `Auth` and admits only one bound to a name it lists; a relay without names takes
//! both forms, and warns at start that sign-ins can be forwarded.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use ed25519_dalek::{Signer, SigningKey};
use whispeer_protocol::frame::{
    auth_bound_sig_input, auth_sig_input, Auth, Challenge, ErrFrame, Hello, Welcome,
    PROTOCOL_VERSION,
};
use whispeer_protocol::{ErrorCode, Frame};

/// An account list with one account key (from `seed`), in a fresh directory.
struct Accounts {
    dir: PathBuf,
    file: PathBuf,
    key: SigningKey,
}

impl Accounts {
    fn new(tag: &str, seed: u8) -> Self {
        let dir = temp_dir(tag);
        let file = dir.join("accounts.toml");
        let key = SigningKey::from_bytes(&[seed; 32]);
        let pk = hex::encode(key.verifying_key().as_bytes());
        account_add(&file, "alice", &["--public-key", &pk]);
        Self { dir, file, key }
    }

    /// A relay with `auth = required` over this list, plus `extra`.
    fn relay(&self, extra: &[&str], logged: bool) -> BinRelay {
        let state = self.dir.join("auth-state");
        let mut args = vec![
            "--auth",
            "required",
            "--accounts",
            self.file.to_str().unwrap(),
            "--auth-state",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        if logged {
            BinRelay::start_logged(&args)
        } else {
            BinRelay::start(&args)
        }
    }

    fn pk(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the test client answers the challenge.
enum Answer<'a> {
    /// The legacy form (no relay name).
    Legacy,
    /// Bound to this name, signed over it.
    Bound(&'a str),
    /// Carries `carried`, signed over `signed` (a rewritten name).
    Rewritten { carried: &'a str, signed: &'a str },
}

/// Signs in over TCP with `key` as account `account`: the relay's `Challenge`, then its
/// answer to the `Auth`.
async fn sign_in(
    addr: std::net::SocketAddr,
    account: [u8; 32],
    key: &SigningKey,
    answer: Answer<'_>,
) -> (Challenge, Result<Welcome, ErrFrame>) {
    let mut c = Client::tcp(addr).await;
    c.send(&Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: 0,
        client: Some("auth-binding-tests".into()),
        auth: None,
        account: Some(account),
    }))
    .await;
    let ch = match c.recv().await {
        Frame::Challenge(ch) => ch,
        other => panic!("expected Challenge, got {other:?}"),
    };
    let n = ch.nonce;
    let (relay, signed) = match answer {
        Answer::Legacy => (None, auth_sig_input(&n, &account)),
        Answer::Bound(name) => (
            Some(name),
            auth_bound_sig_input(&n, &account, name).unwrap(),
        ),
        Answer::Rewritten { carried, signed } => (
            Some(carried),
            auth_bound_sig_input(&n, &account, signed).unwrap(),
        ),
    };
    c.send(&Frame::Auth(Auth {
        sig: key.sign(&signed).to_bytes(),
        relay: relay.map(str::to_owned),
    }))
    .await;
    let answer = match c.recv().await {
        Frame::Welcome(w) => Ok(w),
        Frame::Err(e) => {
            assert!(e.fatal, "{e:?}");
            assert_eq!(c.drain_to_end().await.0, vec![], "the relay hangs up");
            Err(e)
        }
        other => panic!("expected Welcome or Err, got {other:?}"),
    };
    (ch, answer)
}

fn refused(r: Result<Welcome, ErrFrame>, why: &str) -> ErrFrame {
    let e = r.expect_err("refused");
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    assert!(e.message.contains(why), "{:?} lacks {why:?}", e.message);
    e
}

/// With names, the relay asks for a bound sign-in and admits the account only when its
/// `Auth` names one of them (a `host` entry: any port; a `host:port` entry: that port),
/// signed over that name. The legacy form, another name (the forwarding attack's
/// signature: the victim signs the name it dialed, the forwarding relay's), another port,
/// or a name rewritten after signing are fatal `auth_failed` — the name escaped in the
/// message. Names come from `--auth-name` (repeatable) and `WHISPEER_AUTH_NAMES`.
#[tokio::test]
async fn a_relay_with_names_asks_for_and_checks_bound_sign_ins() {
    let a = Accounts::new("bind-names", 0x31);
    let relay = a.relay(
        &[
            "--auth-name",
            "127.0.0.1",
            "--auth-name",
            "Relay.Example.COM:443",
        ],
        false,
    );
    let (addr, pk, key) = (relay.tcp(), a.pk(), &a.key);
    let here = format!("127.0.0.1:{}", addr.port());

    let (ch, r) = sign_in(addr, pk, key, Answer::Bound(&here)).await;
    assert_eq!(
        ch.bound,
        Some(true),
        "the Challenge asks for a bound sign-in"
    );
    r.expect("bound to a listed host, any port");
    sign_in(addr, pk, key, Answer::Bound("relay.example.com:443"))
        .await
        .1
        .expect("bound to a listed host:port (listed in another case)");

    let (_, r) = sign_in(addr, pk, key, Answer::Legacy).await;
    refused(r, "names no relay");
    let (_, r) = sign_in(addr, pk, key, Answer::Bound("evil.example:443")).await;
    let e = refused(r, "not this relay's");
    assert!(e.message.contains("\"evil.example:443\""), "{e:?}");
    let (_, r) = sign_in(addr, pk, key, Answer::Bound("relay.example.com:8443")).await;
    refused(r, "not this relay's");
    let (_, r) = sign_in(
        addr,
        pk,
        key,
        Answer::Rewritten {
            carried: &here,
            signed: "evil.example:443",
        },
    )
    .await;
    refused(r, "bad signature");
    // A name is client text: escaped in the answer (and the log).
    let hostile = "evil\u{1b}]0;owned\u{7}\r\nWARN x:443";
    let (_, r) = sign_in(addr, pk, key, Answer::Bound(hostile)).await;
    let e = refused(r, "not this relay's");
    assert!(
        !e.message.contains(['\u{1b}', '\u{7}', '\r', '\n']),
        "{:?}",
        e.message
    );
    assert!(
        e.message.contains("\\u{1b}]0;owned\\u{7}\\r\\nWARN"),
        "{e:?}"
    );
    // An unlisted key bound to a listed name: refused as any unknown account.
    let stranger = SigningKey::from_bytes(&[0x32; 32]);
    let (_, r) = sign_in(
        addr,
        stranger.verifying_key().to_bytes(),
        &stranger,
        Answer::Bound(&here),
    )
    .await;
    refused(r, "unknown account or bad signature");
    drop(relay);

    // The same names from the environment (comma separated).
    let out = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
        .args(["serve", "--print-config"])
        .env("WHISPEER_AUTH_NAMES", "relay.example.com,[::1]:7070")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(r#"names = ["relay.example.com", "[::1]:7070"]"#),
        "{text}"
    );
}

/// A name that is none refuses the start, saying which and why.
#[test]
fn a_name_that_is_none_refuses_the_start() {
    for bad in ["relay.example.com:x", "2001:db8::1", "bücher.example"] {
        let out = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
            .args(["serve", "--print-config", "--auth-name", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {out:?}");
        assert!(
            err.contains("auth.names") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

/// Without names the relay asks for nothing and takes both forms — a bound `Auth` is
/// verified over the name it carries, whatever it is: the hole relay binding closes only
/// where names are set — and says so at start when account keys sign in.
#[tokio::test]
async fn a_relay_without_names_takes_both_forms_and_warns() {
    let a = Accounts::new("bind-none", 0x33);
    let mut relay = a.relay(&[], true);
    let line = relay
        .wait_log(&["auth.names is empty", "sign in here as that client"])
        .await;
    assert!(line.contains("--auth-name"), "{line}");
    let (addr, pk, key) = (relay.tcp(), a.pk(), &a.key);
    let (ch, r) = sign_in(addr, pk, key, Answer::Legacy).await;
    assert_eq!(ch.bound, None, "no names: the Challenge asks for nothing");
    r.expect("the legacy form");
    sign_in(addr, pk, key, Answer::Bound("evil.example:443"))
        .await
        .1
        .expect("a bound sign-in, any name");
    let (_, r) = sign_in(
        addr,
        pk,
        key,
        Answer::Rewritten {
            carried: "relay.example.com:443",
            signed: "evil.example:443",
        },
    )
    .await;
    refused(r, "bad signature");
}
