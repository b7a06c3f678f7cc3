//! Admission against the real `whispeer-relay` binary over real sockets: relay accounts
//! (Ed25519 challenge-response and bearer tokens), rights, key-id claims by groups (also
//! across a restart), hot reload revoking a connected account, durable owners with and
//! without auth, and an admin port that shows no key ids without its token.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use ed25519_dalek::{Signer, SigningKey};
use whispeer_protocol::frame::{
    auth_sig_input, Auth, ErrFrame, Hello, Pub, Sub, Welcome, PROTOCOL_VERSION,
};
use whispeer_protocol::{ErrorCode, Frame, Qos};
use whispeer_relay::accounts::Right;
use whispeer_relay::admin::{http_get, http_get_auth, Status};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn relay_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
}

/// Adds an account with a fresh key (written by the relay binary) and returns the key.
fn key_account(dir: &Path, file: &Path, name: &str, extra: &[&str]) -> SigningKey {
    let key_file = dir.join(format!("{name}.key"));
    let mut args = vec!["--key-out", key_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let stdout = account_add(file, name, &args);
    let sk = read_key(&key_file);
    assert!(
        stdout.contains(&hex::encode(sk.verifying_key().as_bytes())),
        "account add prints the public key: {stdout}"
    );
    sk
}

fn read_key(path: &Path) -> SigningKey {
    let text = std::fs::read_to_string(path).unwrap();
    let hex = text
        .trim()
        .strip_prefix(whispeer_relay::accounts::SECRET_PREFIX)
        .expect("account key prefix");
    let mut seed = [0u8; 32];
    hex::decode_to_slice(hex, &mut seed).unwrap();
    SigningKey::from_bytes(&seed)
}

/// Adds a token account; returns the token printed once.
fn token_account(file: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["--token"];
    args.extend_from_slice(extra);
    let out = account_add(file, name, &args);
    let t = out.trim().lines().last().unwrap().to_string();
    assert!(
        t.starts_with(whispeer_relay::accounts::TOKEN_PREFIX),
        "{out}"
    );
    t
}

fn hello(auth: Option<&str>, account: Option<[u8; 32]>) -> Frame {
    Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: u64::MAX,
        client: Some("auth-tests".into()),
        auth: auth.map(|t| Bytes::copy_from_slice(t.as_bytes())),
        account,
    })
}

/// Names the account, answers the challenge with `sign(nonce) -> sig`.
async fn key_login(
    c: &mut Client,
    account: [u8; 32],
    sign: impl FnOnce([u8; 32]) -> [u8; 64],
) -> Result<Welcome, ErrFrame> {
    c.send(&hello(None, Some(account))).await;
    let nonce = match c.recv().await {
        Frame::Challenge(ch) => ch.nonce,
        other => panic!("expected Challenge, got {other:?}"),
    };
    c.send(&Frame::Auth(Auth {
        sig: sign(nonce),
        relay: None,
    }))
    .await;
    match c.recv().await {
        Frame::Welcome(w) => Ok(w),
        Frame::Err(e) => Err(e),
        other => panic!("expected Welcome or Err, got {other:?}"),
    }
}

async fn login(addr: std::net::SocketAddr, sk: &SigningKey) -> Client {
    try_login(addr, sk).await.expect("login")
}

/// A fresh connection that logs in with the account key `sk`.
async fn try_login(addr: std::net::SocketAddr, sk: &SigningKey) -> Result<Client, ErrFrame> {
    let mut c = Client::tcp(addr).await;
    let pk = sk.verifying_key().to_bytes();
    key_login(&mut c, pk, |n| sk.sign(&auth_sig_input(&n, &pk)).to_bytes()).await?;
    Ok(c)
}

async fn token_login(addr: std::net::SocketAddr, token: &str) -> Result<Client, ErrFrame> {
    let mut c = Client::tcp(addr).await;
    c.send(&hello(Some(token), None)).await;
    match c.recv().await {
        Frame::Welcome(_) => Ok(c),
        Frame::Err(e) => Err(e),
        other => panic!("expected Welcome or Err, got {other:?}"),
    }
}

fn sub(sub_id: u64, k: u8, durable: Option<&str>, owner: Option<&[u8]>) -> Frame {
    Frame::Sub(Sub {
        sub_id,
        pattern: exact(k, &[1]),
        qos: if durable.is_some() {
            Qos::AtLeastOnce
        } else {
            Qos::AtMostOnce
        },
        durable: durable.map(String::from),
        replay: None,
        retained: false,
        credit: None,
        owner: owner.map(Bytes::copy_from_slice),
    })
}

/// Sends a Sub; Ok on SubOk, Err on Err.
async fn try_sub(c: &mut Client, f: Frame) -> Result<(), ErrFrame> {
    c.send(&f).await;
    loop {
        match c.recv().await {
            Frame::SubOk(_) => return Ok(()),
            Frame::Err(e) => return Err(e),
            // ReplayDone, retained values: not what this waits for.
            _ => continue,
        }
    }
}

/// Publishes with PubAck requested (QoS 1); Ok on PubAck, Err on Err.
async fn try_pub(c: &mut Client, k: u8, retain: bool) -> Result<(), ErrFrame> {
    c.send(&Frame::Pub(Pub {
        envelope: envelope(k, &[1]),
        flags: whispeer_protocol::frame::pub_flags::ACK
            | if retain {
                whispeer_protocol::frame::pub_flags::RETAIN
            } else {
                0
            },
        publish_id: Some([k; 16]),
        qos: Qos::AtLeastOnce,
    }))
    .await;
    loop {
        match c.recv().await {
            Frame::PubAck(_) => return Ok(()),
            Frame::Err(e) => return Err(e),
            _ => continue,
        }
    }
}

struct Setup {
    dir: PathBuf,
    accounts: PathBuf,
    state: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let dir = temp_dir(tag);
        Self {
            accounts: dir.join("accounts.toml"),
            state: dir.join("auth-state"),
            dir,
        }
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--auth",
            "required",
            "--accounts",
            self.accounts.to_str().unwrap(),
            "--auth-state",
            self.state.to_str().unwrap(),
            "--accounts-reload-ms",
            "50",
        ];
        args.extend_from_slice(extra);
        args
    }

    fn relay(&self, extra: &[&str]) -> BinRelay {
        BinRelay::start(&self.args(extra))
    }

    /// [`relay`](Self::relay) with its log lines readable (`BinRelay::wait_log`).
    /// Writes a list of one legacy entry (no id, as before ids) with a key from `seed`.
    fn legacy_key_account(&self, name: &str, seed: u8) -> SigningKey {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        std::fs::write(
            &self.accounts,
            format!(
                "[[account]]\nname = \"{name}\"\nkey = \"{}\"\n",
                hex::encode(sk.verifying_key().as_bytes())
            ),
        )
        .unwrap();
        sk
    }

    fn relay_logged(&self, extra: &[&str]) -> BinRelay {
        BinRelay::start_logged(&self.args(extra))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn no_auth_is_refused_when_required() {
    let s = Setup::new("noauth");
    key_account(&s.dir, &s.accounts, "alice", &[]);
    let relay = s.relay(&[]);
    // Neither a token nor an account: auth_required, then the connection ends.
    let mut c = Client::tcp(relay.tcp()).await;
    c.send(&hello(None, None)).await;
    c.expect_fatal(ErrorCode::AuthRequired).await;
    // Nothing else is accepted before authentication either.
    let mut c = Client::ws(relay.ws()).await;
    c.send(&sub(1, 1, None, None)).await;
    c.expect_fatal(ErrorCode::ProtocolViolation).await;
}

/// A stranger cannot make the relay hold a large partial frame before proving an account:
/// until `Welcome` a length prefix over the handshake cap (4 KiB) is refused as soon as its
/// 4 bytes arrive (over WebSocket: at the message's header) — before `Hello`, and while a
/// challenge is pending — and an admitted
/// account may then send frames up to `max_frame` (1 MiB by default). Fails if the relay
/// buffers a frame body before admission (the refusal would wait for the body, which is
/// never sent) or keeps the small cap after it.
#[tokio::test]
async fn a_stranger_cannot_park_a_large_frame_before_the_handshake() {
    use whispeer_protocol::limits::{DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME};
    let s = Setup::new("handshake-cap");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let relay = s.relay(&[]);
    let prefix = |len: usize| (len as u32).to_be_bytes();

    // Before Hello: a declared max_frame body is refused without waiting for it.
    let mut c = Client::tcp(relay.tcp()).await;
    c.send_raw(&prefix(DEFAULT_MAX_FRAME)).await.unwrap();
    let e = c.expect_fatal(ErrorCode::FrameTooLarge).await;
    assert!(e.message.contains("before the handshake"), "{e:?}");
    assert!(
        e.message.contains(&HANDSHAKE_MAX_FRAME.to_string()),
        "{e:?}"
    );

    // Over WebSocket: a message over the cap is refused at its header, with the same
    // answer (the client sends it whole; the relay does not buffer it).
    let mut c = Client::ws(relay.ws()).await;
    c.send_ws_message(tokio_tungstenite::tungstenite::Message::Binary(
        vec![0u8; 100_000].into(),
    ))
    .await;
    let e = c.expect_fatal(ErrorCode::FrameTooLarge).await;
    assert!(e.message.contains("before the handshake"), "{e:?}");

    // The same for an upgrade request in the other forms the relay's HTTP parser accepts
    // (leading empty lines, bare LF line ends): the relay follows the frames after it in
    // step, or it would miss the oversized header and wait for the body instead.
    let request = b"\r\n\nGET / HTTP/1.1\nHost: relay\nUpgrade: websocket\nConnection: Upgrade\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n\n";
    let mut c = Client::ws_with_request(relay.ws(), request)
        .await
        .expect("upgraded");
    c.send_ws_message(tokio_tungstenite::tungstenite::Message::Binary(
        vec![0u8; 100_000].into(),
    ))
    .await;
    c.expect_fatal(ErrorCode::FrameTooLarge).await;

    // Challenge pending (the account named, not yet proved): the same.
    let mut c = Client::tcp(relay.tcp()).await;
    c.send(&hello(None, Some(alice.verifying_key().to_bytes())))
        .await;
    assert!(matches!(c.recv().await, Frame::Challenge(_)));
    c.send_raw(&prefix(HANDSHAKE_MAX_FRAME + 1)).await.unwrap();
    c.expect_fatal(ErrorCode::FrameTooLarge).await;

    // Admitted: a 100 KiB publish is taken (PubAck), well over the handshake cap.
    let mut c = login(relay.tcp(), &alice).await;
    c.send(&Frame::Pub(Pub {
        envelope: envelope_sized(1, &[1], 100 * 1024),
        flags: whispeer_protocol::frame::pub_flags::ACK,
        publish_id: Some([1; 16]),
        qos: Qos::AtLeastOnce,
    }))
    .await;
    loop {
        match c.recv().await {
            Frame::PubAck(_) => break,
            Frame::Err(e) => panic!("an admitted account's large frame refused: {e:?}"),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn unknown_account_bad_signature_and_replayed_signature_fail() {
    let s = Setup::new("keys");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let relay = s.relay(&[]);
    let pk = alice.verifying_key().to_bytes();

    // An account key that is not listed, correctly signed: auth_failed.
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let spk = stranger.verifying_key().to_bytes();
    let mut c = Client::tcp(relay.tcp()).await;
    let e = key_login(&mut c, spk, |n| {
        stranger.sign(&auth_sig_input(&n, &spk)).to_bytes()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);
    assert!(e.fatal);

    // Alice's key named, signed by someone else: auth_failed.
    let mut c = Client::tcp(relay.tcp()).await;
    let e = key_login(&mut c, pk, |n| {
        stranger.sign(&auth_sig_input(&n, &pk)).to_bytes()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);

    // Alice's own signature over the wrong context (another account key bound in): fails.
    let mut c = Client::tcp(relay.tcp()).await;
    let e = key_login(&mut c, pk, |n| {
        alice.sign(&auth_sig_input(&n, &spk)).to_bytes()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);

    // A valid login, and its signature replayed on a new connection: the nonce differs.
    let mut seen = None;
    let mut c = Client::tcp(relay.tcp()).await;
    key_login(&mut c, pk, |n| {
        let sig = alice.sign(&auth_sig_input(&n, &pk)).to_bytes();
        seen = Some(sig);
        sig
    })
    .await
    .expect("alice logs in");
    let replayed = seen.unwrap();
    let mut c2 = Client::ws(relay.ws()).await;
    let e = key_login(&mut c2, pk, |_| replayed).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);
    // The first connection still works.
    try_sub(&mut c, sub(1, 1, None, None)).await.unwrap();
}

#[tokio::test]
async fn bearer_tokens_work_and_wrong_ones_fail() {
    let s = Setup::new("tokens");
    let token = token_account(&s.accounts, "svc", &[]);
    // Only the hash is stored.
    let text = std::fs::read_to_string(&s.accounts).unwrap();
    assert!(!text.contains(&token), "the token is stored in clear");
    let relay = s.relay(&[]);
    let mut c = token_login(relay.tcp(), &token).await.expect("token login");
    try_pub(&mut c, 3, false).await.expect("publish");
    let mut wrong = token.clone();
    wrong.pop();
    wrong.push('x');
    let e = token_login(relay.tcp(), &wrong).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::AuthFailed);
}

#[tokio::test]
async fn key_ids_are_claimed_by_groups_and_claims_survive_a_restart() {
    let s = Setup::new("claims");
    let a1 = key_account(&s.dir, &s.accounts, "a1", &["--group", "home"]);
    let a2 = key_account(&s.dir, &s.accounts, "a2", &["--group", "home"]);
    let b = key_account(&s.dir, &s.accounts, "b", &["--group", "other"]);
    let relay = s.relay(&[]);
    let mut c1 = login(relay.tcp(), &a1).await;
    // a1 uses key id 1 first: its group claims it. A new epoch's key id (2) needs no
    // operator edit: a1 claims it the same way.
    try_pub(&mut c1, 1, false)
        .await
        .expect("a1 publishes on key 1");
    try_sub(&mut c1, sub(1, 2, None, None))
        .await
        .expect("a1 claims key 2");
    // A claim is answered only once it is on disk (the state file is synced by its own
    // thread; the request waits for it, not a tokio worker).
    let state = std::fs::read_to_string(&s.state).unwrap();
    for k in [1u8, 2] {
        assert!(
            state.contains(&format!("\"key_id\":\"{}\"", hex::encode([k; 16]))),
            "claim of key {k} answered before it was written: {state}"
        );
    }
    // A member of the same group shares both key ids.
    let mut c2 = login(relay.tcp(), &a2).await;
    try_sub(&mut c2, sub(1, 1, None, None)).await.expect("a2");
    try_pub(&mut c2, 2, false).await.expect("a2 publishes on 2");
    // Another group may neither read nor write them.
    let mut cb = login(relay.tcp(), &b).await;
    let e = try_sub(&mut cb, sub(1, 1, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    let e = try_pub(&mut cb, 2, false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    // …but claims its own.
    try_pub(&mut cb, 7, false).await.expect("b claims key 7");
    drop((c1, c2, cb, relay));

    // Restart on the same state file: the claims hold.
    let relay = s.relay(&[]);
    let mut cb = login(relay.tcp(), &b).await;
    let e = try_sub(&mut cb, sub(1, 1, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "after restart: {e:?}");
    let mut c1 = login(relay.tcp(), &a1).await;
    let e = try_pub(&mut c1, 7, false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "after restart: {e:?}");
    try_pub(&mut c1, 1, false)
        .await
        .expect("a1 still owns key 1");
}

#[tokio::test]
async fn rights_are_enforced() {
    let s = Setup::new("rights");
    // The publisher joins the reader's group by its explicit name (an account's own
    // default group is `account-id:…`, which no other account can name).
    let reader = key_account(
        &s.dir,
        &s.accounts,
        "reader",
        &["--rights", "subscribe", "--group", "reader"],
    );
    // The relay's "account list reloaded" log line is the event this test waits for.
    let mut relay = s.relay_logged(&["--log", "warn,whispeer_relay::accounts=info"]);
    let mut c = login(relay.tcp(), &reader).await;
    try_sub(&mut c, sub(1, 4, None, None))
        .await
        .expect("subscribe");
    let e = try_pub(&mut c, 4, false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);
    assert!(e.message.contains("publish"), "{e:?}");
    let e = try_sub(&mut c, sub(2, 4, Some("d"), None))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);
    assert!(e.message.contains("durable"), "{e:?}");
    let publisher = key_account(
        &s.dir,
        &s.accounts,
        "pubr",
        &["--rights", "publish", "--group", "reader"],
    );
    // The file changed: wait for the relay's reload (polled) that sees both accounts.
    relay
        .wait_log(&["account list reloaded", "accounts=2"])
        .await;
    let mut c = login(relay.tcp(), &publisher).await;
    try_pub(&mut c, 4, false).await.expect("plain publish");
    let e = try_pub(&mut c, 4, true).await.unwrap_err();
    assert_eq!(
        e.code,
        ErrorCode::AuthFailed,
        "retain needs the retain right"
    );
}

/// A `Sub` asking for history needs the `replay` right beside `subscribe` (a replay reads
/// the store; README "Accounts"): an account with `subscribe` alone is refused, not fatally,
/// naming the right and the subscription, and its live subscription on the same key id is
/// still taken.
#[tokio::test]
async fn a_replaying_sub_needs_the_replay_right() {
    use whispeer_protocol::frame::Replay;
    let s = Setup::new("replay-right");
    let reader = key_account(&s.dir, &s.accounts, "reader", &["--rights", "subscribe"]);
    let relay = s.relay(&[]);
    let mut c = login(relay.tcp(), &reader).await;
    let mut replaying = sub(1, 4, None, None);
    if let Frame::Sub(s) = &mut replaying {
        s.replay = Some(Replay::FromSeq(0));
    }
    let e = try_sub(&mut c, replaying).await.unwrap_err();
    assert_eq!(
        (e.code, e.fatal, e.sub_id),
        (ErrorCode::AuthFailed, false, Some(1)),
        "{e:?}"
    );
    assert!(e.message.contains("replay"), "{e:?}");
    try_sub(&mut c, sub(2, 4, None, None))
        .await
        .expect("live subscribe");
}

#[tokio::test]
async fn removing_an_account_closes_its_connections_at_once() {
    let s = Setup::new("revoke");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let token = token_account(&s.accounts, "bob", &[]);
    let relay = s.relay(&[]);
    let mut ca = login(relay.tcp(), &alice).await;
    try_sub(&mut ca, sub(1, 5, None, None)).await.unwrap();
    let mut cb = token_login(relay.tcp(), &token).await.unwrap();
    let out = relay_bin()
        .args(["account", "remove", "alice", "--file"])
        .arg(&s.accounts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Alice's open connection gets a fatal auth_failed and ends.
    let e = ca.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("removed"), "{e:?}");
    // She cannot come back.
    let e = try_login(relay.tcp(), &alice).await.err().expect("refused");
    assert_eq!(e.code, ErrorCode::AuthFailed);
    // Bob is untouched.
    try_sub(&mut cb, sub(1, 6, None, None))
        .await
        .expect("bob still works");
}

#[tokio::test]
async fn sighup_reloads_the_account_list() {
    let s = Setup::new("sighup");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    // A long poll interval: only SIGHUP can make the change visible quickly.
    let relay = BinRelay::start(&[
        "--auth",
        "required",
        "--accounts",
        s.accounts.to_str().unwrap(),
        "--accounts-reload-ms",
        "3600000",
    ]);
    let mut ca = login(relay.tcp(), &alice).await;
    // Rewrite the file without alice, keeping the same size and mtime is not needed:
    // the poll is an hour away, so the close below comes from SIGHUP.
    let out = relay_bin()
        .args(["account", "remove", "alice", "--file"])
        .arg(&s.accounts)
        .output()
        .unwrap();
    assert!(out.status.success());
    let ok = Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    ca.expect_fatal(ErrorCode::AuthFailed).await;
}

#[tokio::test]
async fn durables_belong_to_their_account() {
    let s = Setup::new("dur-auth");
    let a1 = key_account(&s.dir, &s.accounts, "a1", &["--group", "home"]);
    let a2 = key_account(&s.dir, &s.accounts, "a2", &["--group", "home"]);
    let b = key_account(&s.dir, &s.accounts, "b", &["--group", "other"]);
    let relay = s.relay(&[]);
    let mut c1 = login(relay.tcp(), &a1).await;
    try_sub(&mut c1, sub(1, 1, Some("d"), None))
        .await
        .expect("a1 creates d");
    // Hang up and wait for the relay's end of it: the session finished (and released the
    // name) before the relay closes its side.
    c1.shutdown_write().await;
    c1.drain_to_end().await;
    // Another account — even of the same group, even with an owner secret — cannot
    // resume, ack or squat a1's durable.
    let mut c2 = login(relay.tcp(), &a2).await;
    let e = try_sub(&mut c2, sub(1, 1, Some("d"), Some(&[1; 32])))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotAllowed, "{e:?}");
    assert!(e.message.contains("belongs"), "{e:?}");
    let mut cb = login(relay.tcp(), &b).await;
    let e = try_sub(&mut cb, sub(1, 1, Some("d"), None))
        .await
        .unwrap_err();
    assert_eq!(
        e.code,
        ErrorCode::AuthFailed,
        "another group may not use the key id: {e:?}"
    );
    assert!(!e.fatal);
    // a1 resumes it.
    let mut c1 = login(relay.tcp(), &a1).await;
    try_sub(&mut c1, sub(1, 1, Some("d"), None))
        .await
        .expect("a1 resumes d");
}

#[tokio::test]
async fn durables_belong_to_their_owner_secret_without_auth() {
    let dir = temp_dir("dur-open");
    let state = dir.join("auth-state");
    let start = || BinRelay::start(&["--auth-state", state.to_str().unwrap()]);
    let relay = start();
    let (owner, c) = owner_creates_d(&relay).await;
    drop(c);
    strangers_are_refused_d(&relay).await;
    drop(relay);
    // After a restart the owner is still known (only the hash was kept).
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        !text.contains("owner-secret"),
        "the secret is stored in clear"
    );
    let relay = start();
    strangers_are_refused_d(&relay).await;
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    try_sub(&mut c, sub(1, 1, Some("d"), Some(owner)))
        .await
        .expect("owner resumes d");
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The owner's secret of durable "d" (key 1), and its connection that created it.
async fn owner_creates_d(relay: &BinRelay) -> (&'static [u8], Client) {
    let owner: &'static [u8] = b"0123456789abcdef-owner-secret";
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    try_sub(&mut c, sub(1, 1, Some("d"), Some(owner)))
        .await
        .expect("owner creates d");
    (owner, c)
}

/// A stranger who knows the key id and the name "d" (key 1) — without the owner's secret,
/// and with another one — is refused as not its owner.
async fn strangers_are_refused_d(relay: &BinRelay) {
    for attempt in [None, Some(&b"another-secret-of-16+"[..])] {
        let mut s = Client::tcp(relay.tcp()).await;
        s.hello().await;
        let e = try_sub(&mut s, sub(1, 1, Some("d"), attempt))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAllowed, "{attempt:?}: {e:?}");
        assert!(e.message.contains("belongs"), "{e:?}");
    }
}

/// Ownership is checked before anything else about the durable: while its owner holds it,
/// a stranger's `Sub` (without the secret, or with another one) is refused `not_allowed`
/// as when it is idle — never the retryable `busy` ("active on another connection"),
/// which would tell a stranger the owner is connected and invite it to retry. The owner's
/// subscription is untouched.
#[tokio::test]
async fn a_stranger_is_refused_as_not_the_owner_while_the_owner_holds_the_durable() {
    let dir = temp_dir("dur-held");
    let state = dir.join("auth-state");
    let relay = BinRelay::start(&["--auth-state", state.to_str().unwrap()]);
    let (_, mut c) = owner_creates_d(&relay).await;
    strangers_are_refused_d(&relay).await;
    // The owner still holds d: a publish to it arrives.
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    try_pub(&mut p, 1, false).await.expect("stored");
    let m = c.expect_msg().await;
    assert_eq!(m.envelope.token_path().key_id(), &key(1));
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Review finding 18: a durable owner (or key-id claim) the auth-state file could not take
/// (a full disk) was answered anyway and lost at the next restart, when someone else could
/// take the name. Now the request waits until the line is written (retried), and the owner
/// survives the restart.
#[tokio::test]
async fn an_owner_is_answered_only_once_the_auth_state_file_holds_it() {
    let Some(disk) = SmallDisk::mount("authstate-full") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    let state = disk.dir.join("auth-state");
    let args = ["--auth-state", state.to_str().unwrap()];
    let mut relay = BinRelay::start_logged(&args);
    let owner: &[u8] = b"0123456789abcdef-owner-secret";
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    let filler = disk.fill("filler");
    c.send(&sub(1, 1, Some("d"), Some(owner))).await;
    relay.wait_log(&["cannot write the auth state file"]).await;
    std::fs::remove_file(&filler).unwrap();
    match c.recv().await {
        Frame::SubOk(_) => {}
        other => panic!("expected SubOk once the disk has room, got {other:?}"),
    }
    drop(c);
    drop(relay);
    let relay = BinRelay::start(&args);
    let mut s = Client::tcp(relay.tcp()).await;
    s.hello().await;
    let e = try_sub(
        &mut s,
        sub(1, 1, Some("d"), Some(&b"another-secret-of-16+"[..])),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotAllowed, "after restart: {e:?}");
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    try_sub(&mut c, sub(1, 1, Some("d"), Some(owner)))
        .await
        .expect("owner resumes d");
}

/// `hello_ms` counts once, from the connection's start, for the whole admission — the
/// challenge included: a `Hello` sent late buys no fresh `hello_ms` to answer it. The
/// delays are the slow client under test, not waits for the relay: `hello_ms` 4 s, the
/// `Hello` at 2 s, a valid `Auth` at 5 s — past the deadline, so the relay has already
/// answered `idle_timeout` ("no Auth within"), never a `Welcome`. Counted from the last
/// frame read, the `Auth` would be in time (until 6 s) and welcomed. Each step has a
/// second or more of margin (a loaded machine's late accept or late send).
#[tokio::test]
async fn a_late_hello_gets_no_fresh_hello_ms_to_answer_its_challenge() {
    let s = Setup::new("late-hello");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let relay = s.relay(&["--hello-ms", "4000"]);
    let start = tokio::time::Instant::now();
    let mut c = Client::tcp(relay.tcp()).await;
    let ms = std::time::Duration::from_millis;
    tokio::time::sleep_until(start + ms(2_000)).await;
    let pk = alice.verifying_key().to_bytes();
    c.send(&hello(None, Some(pk))).await;
    let nonce = match c.recv().await {
        Frame::Challenge(ch) => ch.nonce,
        other => panic!("expected Challenge, got {other:?}"),
    };
    tokio::time::sleep_until(start + ms(5_000)).await;
    // The relay drains after its fatal `Err`: the write is taken (and discarded).
    c.send(&Frame::Auth(Auth {
        sig: alice.sign(&auth_sig_input(&nonce, &pk)).to_bytes(),
        relay: None,
    }))
    .await;
    match c.recv().await {
        Frame::Err(e) => {
            assert!(e.fatal, "{e:?}");
            assert_eq!(e.code, ErrorCode::IdleTimeout, "{e:?}");
            assert!(e.message.contains("no Auth within 4000 ms"), "{e:?}");
        }
        other => panic!("an Auth 5 s after connecting with hello_ms 4 s got {other:?}"),
    }
}

#[tokio::test]
async fn admin_status_shows_no_key_ids_without_the_token() {
    let relay = BinRelay::start(&["--admin-token", ADMIN_TOKEN]);
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    // Store something on a recognisable key id (0xab…).
    try_pub(&mut c, 0xab, false).await.unwrap();
    let admin = relay.admin().to_string();
    let anon = http_get(&admin, "/status").await.unwrap();
    let text = String::from_utf8_lossy(&anon);
    assert!(!text.contains("abababab"), "key id leaked: {text}");
    let st: Status = serde_json::from_slice(&anon).unwrap();
    assert!(!st.detail && st.store.paths.is_empty());
    assert!(st.store.messages >= 1, "counts are still shown");
    // With the admin token: detail.
    let full = http_get_auth(&admin, "/status", Some(ADMIN_TOKEN))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&full).contains("abababab"));
    // A wrong token is the same as none.
    let wrong = http_get_auth(&admin, "/status", Some("admin-token-wrong-0123456"))
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&wrong).contains("abababab"));
}

/// `whispeer-relay serve` with its admin port on every address (WebSocket on loopback, no
/// store), printing its ready line on stdout.
fn public_admin_relay() -> Command {
    let mut c = relay_bin();
    c.args([
        "serve",
        "--ws",
        "127.0.0.1:0",
        "--tcp",
        "off",
        "--admin",
        "0.0.0.0:0",
        "--store",
        "none",
        "--ready-file",
        "-",
    ]);
    c
}

#[test]
fn admin_port_off_loopback_needs_a_token() {
    let mut child = public_admin_relay()
        .env_remove("WHISPEER_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Either the relay refuses to start (its stdout closes with nothing on it) or it starts
    // and prints its ready line: then it is stopped and the test fails — it never hangs on
    // a relay that wrongly serves.
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    if !ready.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("started without an admin token: {ready}");
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "exited 0 without serving");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin_token"), "{err}");
}

#[tokio::test]
async fn admin_port_off_loopback_refuses_requests_without_the_token() {
    let dir = temp_dir("admin-public");
    let mut child = KillOnDrop(
        public_admin_relay()
            .args(["--admin-token", ADMIN_TOKEN])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let addrs = wait_ready(&mut child);
    let admin = format!("127.0.0.1:{}", addrs.admin.unwrap().port());
    let e = http_get(&admin, "/status").await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let e = http_get(&admin, "/metrics").await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    assert!(http_get(&admin, "/healthz").await.is_ok());
    assert!(http_get_auth(&admin, "/metrics", Some(ADMIN_TOKEN))
        .await
        .is_ok());
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Also the ready-file mode: the file is in place when the "listening" line is logged.
#[test]
fn auth_off_beyond_loopback_warns_loudly() {
    use std::io::BufRead;
    let dir = temp_dir("warn");
    let mut child = KillOnDrop(
        relay_bin()
            .args([
                "serve",
                "--ws",
                "0.0.0.0:0",
                "--tcp",
                "off",
                "--admin",
                "off",
                "--store",
                "none",
                "--ready-file",
            ])
            .arg(dir.join("ready.json"))
            .env("WHISPEER_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    while !log.contains("whispeer-relay listening") {
        let line = rx
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("no 'listening' line ({e:?}): {log}"));
        log.push_str(&line);
        log.push('\n');
    }
    let addrs: whispeer_relay::BoundAddrs =
        serde_json::from_slice(&std::fs::read(dir.join("ready.json")).unwrap()).unwrap();
    assert!(addrs.ws.is_some() && addrs.tcp.is_none(), "{addrs:?}");
    assert!(log.contains("WARNING: auth is off"), "{log}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay process started by hand, stopped when the test ends — also when it fails
/// before its own cleanup, so no relay outlives a failed test.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Logs in as `sk` over TCP from the loopback address `ip` (a different source address per
/// connection, so per-address buckets do not apply).
async fn login_from(ip: &str, addr: std::net::SocketAddr, sk: &SigningKey) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    stream.set_nodelay(true).ok();
    let mut c = Client::over_stream(Box::new(stream));
    let pk = sk.verifying_key().to_bytes();
    key_login(&mut c, pk, |n| sk.sign(&auth_sig_input(&n, &pk)).to_bytes())
        .await
        .expect("login");
    c
}

/// Sends `frames` then a Ping, and waits for its Pong: every frame was read by then.
async fn send_all_then_ping(c: &mut Client, frames: Vec<Frame>) {
    for f in &frames {
        c.send(f).await;
    }
    c.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 9 }))
        .await;
    loop {
        match c.recv().await {
            Frame::Pong(p) if p.nonce == 9 => return,
            Frame::Err(e) => panic!("rate limits never refuse or disconnect: {e:?}"),
            _ => continue,
        }
    }
}

/// One account's connections from six different addresses share one publish, one sub and
/// one ack budget (per-connection rates off): each phase of 60 requests is slowed to the
/// account's rate, never refused.
#[tokio::test]
async fn an_accounts_connections_share_its_rate_buckets() {
    let s = Setup::new("acct-rates");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let relay = s.relay(&[
        "--publish-rate",
        "0",
        "--sub-rate",
        "0",
        "--ack-rate",
        "0",
        "--account-publish-rate",
        "40",
        "--account-publish-burst",
        "5",
        "--account-sub-rate",
        "40",
        "--account-sub-burst",
        "5",
        "--account-ack-rate",
        "40",
        "--account-ack-burst",
        "5",
    ]);
    let mut conns = Vec::new();
    for i in 2..8 {
        conns.push(login_from(&format!("127.0.0.{i}"), relay.tcp(), &alice).await);
    }
    type Make = fn(u8, u8) -> Frame;
    let kinds: [(&str, Make); 3] = [
        ("publish", |c, i| pub_frame(envelope(1, &[c, i]))),
        ("sub", |c, i| sub_frame(u64::from(i), exact(1, &[c, i]))),
        ("ack", |_, i| {
            Frame::Ack(whispeer_protocol::frame::Ack {
                seqs: vec![u64::from(i) + 1],
            })
        }),
    ];
    for (name, make) in kinds {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (c, mut conn) in conns.drain(..).enumerate() {
            let frames: Vec<Frame> = (0..10u8).map(|i| make(c as u8, i)).collect();
            tasks.push(tokio::spawn(async move {
                send_all_then_ping(&mut conn, frames).await;
                conn
            }));
        }
        for t in tasks {
            conns.push(t.await.unwrap());
        }
        let elapsed = started.elapsed();
        // 60 requests, a burst of 5, at 40/s; the last of each connection can land together.
        assert!(
            elapsed >= std::time::Duration::from_millis(1_200),
            "{name}: the account's bucket was not shared: 60 requests in {elapsed:?}"
        );
    }
}

/// The (name, id) of every entry of the account file.
fn account_ids(file: &Path) -> Vec<(String, Option<String>)> {
    whispeer_relay::accounts::AccountFile::load(file)
        .unwrap()
        .account
        .into_iter()
        .map(|e| (e.name, e.id))
        .collect()
}

/// Rewrites the account file as the `account` commands do (a temporary file renamed over
/// it), applying `edit` to its entries: the relay sees the old list or the new one, never
/// a half-written file.
fn edit_accounts(file: &Path, edit: impl FnOnce(&mut Vec<whispeer_relay::accounts::AccountEntry>)) {
    let mut list = whispeer_relay::accounts::AccountFile::load(file).unwrap();
    edit(&mut list.account);
    list.save(file).unwrap();
}

/// Publishes an envelope on `[k, 1]` at QoS 1 with `publish_id`; returns its sequence.
async fn publish_seq(c: &mut Client, k: u8, publish_id: u8) -> u64 {
    match try_publish_stored(c, k, publish_id).await {
        Ok(seq) => seq,
        Err(e) => panic!("publish refused: {e:?}"),
    }
}

/// Sends a Ping and returns every frame the relay sent before its Pong: whatever the relay
/// had queued for this connection when it read the Ping.
async fn frames_until_pong(c: &mut Client, nonce: u64) -> Vec<Frame> {
    c.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce }))
        .await;
    let mut seen = Vec::new();
    loop {
        match c.recv().await {
            Frame::Pong(p) if p.nonce == nonce => return seen,
            f => seen.push(f),
        }
    }
}

/// The sequences of the `Msg` frames among `frames`.
fn msg_seqs(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Msg(m) => Some(m.seq),
            _ => None,
        })
        .collect()
}

/// The first `Err` the relay sends (skipping deliveries and other frames).
async fn next_err(c: &mut Client) -> ErrFrame {
    loop {
        if let Frame::Err(e) = c.recv().await {
            return e;
        }
    }
}

/// Review finding 7: an account's key replaced in place (same name, same file length)
/// closes the connections that authenticated with the old key, at the reload; the new key
/// logs in as the same account; another account's connection is untouched. Before, the
/// relay compared only account names, so the old key's connection kept every right.
#[tokio::test]
async fn replacing_an_accounts_key_closes_connections_that_used_the_old_key() {
    let s = Setup::new("rotate-key");
    let k1 = key_account(&s.dir, &s.accounts, "alice", &["--group", "home"]);
    let bob = key_account(&s.dir, &s.accounts, "bob", &["--group", "home"]);
    let relay = s.relay(&[]);
    let mut old = login(relay.tcp(), &k1).await;
    try_sub(&mut old, sub(1, 5, None, None))
        .await
        .expect("alice subscribes");
    let mut cb = login(relay.tcp(), &bob).await;
    try_sub(&mut cb, sub(1, 5, None, None))
        .await
        .expect("bob subscribes");

    let k2 = SigningKey::from_bytes(&[42; 32]);
    let before = std::fs::metadata(&s.accounts).unwrap().len();
    edit_accounts(&s.accounts, |list| {
        let alice = list.iter_mut().find(|e| e.name == "alice").unwrap();
        alice.key = Some(hex::encode(k2.verifying_key().as_bytes()));
    });
    assert_eq!(
        std::fs::metadata(&s.accounts).unwrap().len(),
        before,
        "the edit keeps the file's length"
    );
    // The connection that proved K1 is closed with a fatal auth_failed.
    let e = old.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("key or token"), "{e:?}");
    // K2 is alice now (same group: key id 5 is hers), K1 is refused.
    let mut new = login(relay.tcp(), &k2).await;
    try_sub(&mut new, sub(1, 5, None, None))
        .await
        .expect("alice with the new key subscribes");
    let mut c = Client::tcp(relay.tcp()).await;
    let pk1 = k1.verifying_key().to_bytes();
    let e = key_login(&mut c, pk1, |n| {
        k1.sign(&auth_sig_input(&n, &pk1)).to_bytes()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);
    // Bob's connection and subscription are untouched.
    let seq = publish_seq(&mut new, 5, 1).await;
    assert_eq!(msg_seqs(&frames_until_pong(&mut cb, 1).await), vec![seq]);
}

/// Review finding 7: `account rotate --token` (before finding 17 the only rotation was
/// `remove` then `add`, which now makes a new identity: see
/// `a_name_removed_and_added_again_is_a_new_identity`). The relay sees the same account
/// before and after (one SIGHUP, the poll an hour away), yet the connection that proved the
/// old token is closed; the new token works as the same account (its group's key id); bob's
/// key connection (a credential that did not change) stays open.
#[tokio::test]
async fn rotating_a_token_closes_connections_that_used_the_old_token() {
    let s = Setup::new("rotate-token");
    let bob_key = SigningKey::from_bytes(&[43; 32]);
    let bob_pk = hex::encode(bob_key.verifying_key().as_bytes());
    let t1 = token_account(&s.accounts, "bob", &["--public-key", &bob_pk]);
    let relay = BinRelay::start(&[
        "--auth",
        "required",
        "--accounts",
        s.accounts.to_str().unwrap(),
        "--auth-state",
        s.state.to_str().unwrap(),
        "--accounts-reload-ms",
        "3600000",
    ]);
    let mut by_token = token_login(relay.tcp(), &t1).await.expect("t1 login");
    try_sub(&mut by_token, sub(1, 6, None, None)).await.unwrap();
    let mut by_key = login(relay.tcp(), &bob_key).await;
    try_sub(&mut by_key, sub(1, 6, None, None)).await.unwrap();

    let id_before = account_ids(&s.accounts);
    let out = relay_cli(&[
        "account",
        "rotate",
        "bob",
        "--token",
        "--file",
        s.accounts.to_str().unwrap(),
    ]);
    let t2 = out.trim().lines().last().unwrap().to_string();
    assert!(
        t2.starts_with(whispeer_relay::accounts::TOKEN_PREFIX),
        "{out}"
    );
    assert_eq!(account_ids(&s.accounts), id_before, "rotate keeps the id");
    relay.signal("HUP");

    let e = by_token.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("key or token"), "{e:?}");
    let e = token_login(relay.tcp(), &t1)
        .await
        .err()
        .expect("t1 refused");
    assert_eq!(e.code, ErrorCode::AuthFailed);
    let mut c2 = token_login(relay.tcp(), &t2).await.expect("t2 login");
    // The key connection still has its subscription and its rights.
    let seq = publish_seq(&mut c2, 6, 1).await;
    assert_eq!(
        msg_seqs(&frames_until_pong(&mut by_key, 1).await),
        vec![seq]
    );
    try_sub(&mut by_key, sub(2, 6, None, None))
        .await
        .expect("bob's key connection keeps its rights");
}

/// Session 26 review, finding 3: `account rotate --key-out FILE --force` on the key file in
/// use writes the new secret beside it and moves it over FILE only once the list names the
/// new key: FILE comes out a fresh mode-0600 file even when it was world-readable or a
/// symlink (whose target is left alone), and a rotation that fails leaves FILE as it was.
#[cfg(unix)]
#[test]
fn rotating_into_a_key_file_replaces_it_whole_and_only_after_the_list() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new("rotate-key-file");
    let key_file = s.dir.join("carol.key");
    let old = key_account(&s.dir, &s.accounts, "carol", &[]);
    let file = s.accounts.to_str().unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listed_key = || {
        let text = std::fs::read_to_string(&s.accounts).unwrap();
        let list: whispeer_relay::accounts::AccountFile = toml::from_str(&text).unwrap();
        list.account[0].key.clone().unwrap()
    };

    // A rotation that fails (no such account) leaves the file and stages nothing.
    let out = relay_bin()
        .args(["account", "rotate", "nobody", "--force", "--file", file])
        .arg("--key-out")
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(read_key(&key_file).to_bytes(), old.to_bytes());
    assert!(!s.dir.join("carol.key.new").exists());

    let rotate_into = |out: &Path| {
        relay_cli(
            &[
                "account",
                "rotate",
                "carol",
                "--force",
                "--file",
                file,
                "--key-out",
            ][..]
                .iter()
                .copied()
                .chain([out.to_str().unwrap()])
                .collect::<Vec<_>>(),
        )
    };
    rotate_into(&key_file);
    let new = read_key(&key_file);
    assert_ne!(new.to_bytes(), old.to_bytes());
    assert_eq!(listed_key(), hex::encode(new.verifying_key().as_bytes()));
    assert_eq!(
        mode(&key_file),
        0o600,
        "a fresh file, not the old one's mode"
    );
    assert!(!s.dir.join("carol.key.new").exists());

    // Through a symlink: the link is replaced, its target untouched.
    let target = s.dir.join("elsewhere");
    std::fs::write(&target, "keep").unwrap();
    let link = s.dir.join("link.key");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    rotate_into(&link);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    assert!(!std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(mode(&link), 0o600);
    assert_eq!(
        listed_key(),
        hex::encode(read_key(&link).verifying_key().as_bytes())
    );
}

/// Session 26 review, findings 1 and 2: the CLI says when it writes the first account id
/// into a list of legacy entries (relays from before ids cannot read it), and when it
/// removes a legacy entry whose group — its plain name — keeps the key ids it claimed.
#[test]
fn the_cli_warns_about_the_first_id_and_about_removing_a_legacy_group() {
    let s = Setup::new("legacy-notes");
    s.legacy_key_account("old", 61);
    let run = |args: &[&str]| {
        let out = relay_bin().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let file = s.accounts.to_str().unwrap();
    let err = run(&["account", "add", "new", "--token", "--file", file]);
    assert!(
        err.contains("relays older than this version cannot read"),
        "{err}"
    );
    // The second id is no news.
    let err = run(&["account", "add", "newer", "--token", "--file", file]);
    assert!(!err.contains("relays older"), "{err}");
    let err = run(&["account", "remove", "old", "--file", file]);
    assert!(err.contains("now retired"), "{err}");
    assert!(
        err.contains("cannot read a list with retired_groups"),
        "{err}"
    );
    // Removing an account with an id says nothing of the kind.
    let err = run(&["account", "remove", "new", "--file", file]);
    assert!(!err.contains("legacy entry"), "{err}");
}

/// Session 26 review, finding 2: removing the last member of a legacy entry's group (its
/// plain name, which keeps the key ids it claimed) retires the group. `account add --group`
/// with it is refused, and so is a hand-edited list that gives it to someone: a running
/// relay keeps its previous list, so a stranger named into the group gets nothing.
/// `--adopt-retired-group` takes the group, and its claims, back on purpose. Before, an
/// account later given `--group alice` inherited legacy alice's key ids silently.
#[tokio::test]
async fn a_removed_legacy_group_is_retired_and_adopted_only_on_purpose() {
    let s = Setup::new("retired");
    let alice = s.legacy_key_account("alice", 71);
    let bob = key_account(&s.dir, &s.accounts, "bob", &[]);
    let mut relay = s.relay_logged(&["--log", "warn,whispeer_relay::accounts=info"]);
    let mut ca = login(relay.tcp(), &alice).await;
    try_sub(&mut ca, sub(1, 9, None, None))
        .await
        .expect("legacy alice claims key id 9 for group alice");

    let file = s.accounts.to_str().unwrap();
    let out = relay_bin()
        .args(["account", "remove", "alice", "--file", file])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("now retired"),
        "{out:?}"
    );
    relay
        .wait_log(&["account list reloaded", "accounts=1"])
        .await;

    // The CLI refuses the retired group, and writes nothing.
    let before = std::fs::read(&s.accounts).unwrap();
    let out = relay_bin()
        .args(["account", "add", "mallory", "--token", "--group", "alice"])
        .args(["--file", file])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is retired"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&s.accounts).unwrap(), before, "file changed");

    // A hand edit that names the retired group is refused by the relay: it keeps the list
    // it has (bob alone), so mallory cannot even log in.
    let mallory = SigningKey::from_bytes(&[72; 32]);
    let mut text = String::from_utf8(before.clone()).unwrap();
    text.push_str(&format!(
        "\n[[account]]\nname = \"mallory\"\nid = \"{}\"\ngroup = \"alice\"\nkey = \"{}\"\n",
        hex::encode([7u8; 16]),
        hex::encode(mallory.verifying_key().as_bytes())
    ));
    std::fs::write(&s.accounts, &text).unwrap();
    relay.wait_log(&["is retired"]).await;
    let e = try_login(relay.tcp(), &mallory)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    std::fs::write(&s.accounts, &before).unwrap();

    // Adopted on purpose: carol gets group alice and the key id it claimed.
    let carol = key_account(
        &s.dir,
        &s.accounts,
        "carol",
        &["--group", "alice", "--adopt-retired-group"],
    );
    relay
        .wait_log(&["account list reloaded", "accounts=2"])
        .await;
    let mut cc = login(relay.tcp(), &carol).await;
    try_sub(&mut cc, sub(1, 9, None, None))
        .await
        .expect("carol adopted group alice and its key id");
    let mut cb = login(relay.tcp(), &bob).await;
    let e = try_sub(&mut cb, sub(1, 9, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    // Nothing left to adopt.
    let out = relay_bin()
        .args(["account", "add", "dan", "--token", "--group", "alice"])
        .args(["--adopt-retired-group", "--file", file])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not retired"),
        "{out:?}"
    );
}

/// Review finding 8: taking a right away (or moving the account to another group) ends the
/// open subscriptions that needed it, with a non-fatal `Err(auth_failed)` naming each, at
/// the reload; messages published afterwards do not reach them, and the other
/// subscriptions and accounts are untouched. Before, rights were checked only at `Sub`
/// and deliveries went on for as long as the connection lived.
#[tokio::test]
async fn taking_a_right_away_ends_the_subscriptions_that_needed_it() {
    let s = Setup::new("revoke-right");
    let home = ["--group", "home"];
    let dave = key_account(&s.dir, &s.accounts, "dave", &home);
    let carol = key_account(&s.dir, &s.accounts, "carol", &home);
    let erin = key_account(&s.dir, &s.accounts, "erin", &home);
    let grace = key_account(&s.dir, &s.accounts, "grace", &home);
    let frank = key_account(&s.dir, &s.accounts, "frank", &home);
    let relay = s.relay(&[]);
    let mut cd = login(relay.tcp(), &dave).await;
    // Dave claims key id 4 for the group.
    let seq1 = publish_seq(&mut cd, 4, 1).await;
    let mut cc = login(relay.tcp(), &carol).await;
    try_sub(&mut cc, sub(1, 4, None, None)).await.unwrap();
    let mut ce = login(relay.tcp(), &erin).await;
    try_sub(&mut ce, sub(1, 4, None, None)).await.unwrap();
    let mut cg = login(relay.tcp(), &grace).await;
    try_sub(&mut cg, sub(1, 4, None, None)).await.unwrap();
    try_sub(&mut cg, sub(2, 4, Some("g"), None)).await.unwrap();
    let mut cf = login(relay.tcp(), &frank).await;
    try_sub(&mut cf, sub(1, 4, None, None)).await.unwrap();
    let seq2 = publish_seq(&mut cd, 4, 2).await;
    assert!(seq2 > seq1);
    for c in [&mut cc, &mut ce, &mut cf] {
        assert_eq!(msg_seqs(&frames_until_pong(c, 1).await), vec![seq2]);
    }

    edit_accounts(&s.accounts, |list| {
        for e in list.iter_mut() {
            match e.name.as_str() {
                "carol" => e.rights = vec![Right::Publish],
                "erin" => e.group = Some("guests".into()),
                "grace" => e.rights.retain(|r| *r != Right::Durable),
                _ => {}
            }
        }
    });
    // Each connection gets one non-fatal Err naming the subscription that ended.
    for (c, sub_id, why) in [
        (&mut cc, 1, "subscribe"),
        (&mut ce, 1, "another group"),
        (&mut cg, 2, "durable"),
    ] {
        let e = next_err(c).await;
        assert_eq!(
            (e.code, e.fatal, e.sub_id),
            (ErrorCode::AuthFailed, false, Some(sub_id)),
            "{e:?}"
        );
        assert!(e.message.contains(why), "{e:?}");
    }

    // Published after the reload: only the subscriptions that kept their rights get it.
    let seq3 = publish_seq(&mut cd, 4, 3).await;
    for (who, c) in [("carol", &mut cc), ("erin", &mut ce)] {
        let seen = frames_until_pong(c, 2).await;
        assert!(msg_seqs(&seen).is_empty(), "{who} still receives: {seen:?}");
    }
    assert!(msg_seqs(&frames_until_pong(&mut cg, 2).await).contains(&seq3));
    assert_eq!(msg_seqs(&frames_until_pong(&mut cf, 2).await), vec![seq3]);

    // And later requests are refused as for a new connection.
    let e = try_sub(&mut cc, sub(3, 4, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    let e = try_sub(&mut ce, sub(3, 4, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    let e = try_sub(&mut cg, sub(3, 4, Some("g"), None))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    let e = try_pub(&mut ce, 4, false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
}

/// A cluster with local stores keeps key-id claims per relay: with auth required the relay
/// says so at start (the JetStream store shares them). An unreachable NATS does not stop it.
#[tokio::test]
async fn a_cluster_with_local_stores_and_auth_warns_that_claims_are_per_relay() {
    let s = Setup::new("cluster-claims");
    key_account(&s.dir, &s.accounts, "alice", &[]);
    let mut relay = s.relay_logged(&["--cluster", "nats://127.0.0.1:1"]);
    let line = relay.wait_log(&["key-id claims are kept per relay"]).await;
    assert!(line.contains("jetstream"), "{line}");
}

/// Publishes an envelope on `[k, 1]` at QoS 1 (stored) with `publish_id`; its sequence, or
/// the relay's `Err`.
async fn try_publish_stored(c: &mut Client, k: u8, publish_id: u8) -> Result<u64, ErrFrame> {
    c.send(&Frame::Pub(Pub {
        envelope: envelope(k, &[1]),
        flags: whispeer_protocol::frame::pub_flags::ACK,
        publish_id: Some([publish_id; 16]),
        qos: Qos::AtLeastOnce,
    }))
    .await;
    loop {
        match c.recv().await {
            Frame::PubAck(a) => return Ok(a.seq),
            Frame::Err(e) => return Err(e),
            _ => continue,
        }
    }
}

/// Stores two messages on key id `k` (publish ids `ids`), then a third is refused as over
/// the message quota (2).
async fn fill_message_quota(c: &mut Client, k: u8, ids: [u8; 2], why: &str) {
    for id in ids {
        try_publish_stored(c, k, id).await.expect(why);
    }
    let e = try_publish_stored(c, k, ids[1] + 1).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}");
}

/// Review finding 17: an account removed and added again under the same name (with a new
/// key, as `account add` does; possibly for another person) is a new identity: it may not
/// use the key ids the old one's group claimed (`auth_failed`), an account sharing the old
/// one's explicit group may not resume the old one's durable (`not_allowed`: another
/// owner), and its store usage starts at zero (the old one filled its tenant's message
/// quota; the new one stores as many again). An account whose explicit `group` is the
/// name "alice" gets neither the old alice's claims nor the new one's. The old identity's
/// connection is closed as removed. Before, the name was the identity: the new "alice"
/// inherited all of it, and `group = "alice"` joined alice's group.
#[tokio::test]
async fn a_name_removed_and_added_again_is_a_new_identity() {
    let s = Setup::new("readd");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let carol = key_account(&s.dir, &s.accounts, "carol", &["--group", "home"]);
    // The relay's "account list reloaded" log line is the event the logins wait for.
    let mut relay = s.relay_logged(&[
        "--tenant-max-messages",
        "2",
        "--log",
        "warn,whispeer_relay::accounts=info",
    ]);
    let mut ca = login(relay.tcp(), &alice).await;
    // Alice claims key id 1 and fills her tenant's message quota (2).
    fill_message_quota(&mut ca, 1, [1, 2], "alice stores").await;
    // Carol (group "home") creates durable d on key id 5, then hangs up.
    let mut cc = login(relay.tcp(), &carol).await;
    try_sub(&mut cc, sub(1, 5, Some("d"), None))
        .await
        .expect("carol creates d");
    cc.shutdown_write().await;
    cc.drain_to_end().await;

    for name in ["alice", "carol"] {
        relay_cli(&[
            "account",
            "remove",
            name,
            "--file",
            s.accounts.to_str().unwrap(),
        ]);
    }
    let e = ca.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("removed"), "{e:?}");
    let alice2 = key_account(&s.dir, &s.accounts, "alice", &["--force"]);
    let carol2 = key_account(
        &s.dir,
        &s.accounts,
        "carol",
        &["--group", "home", "--force"],
    );
    let mallory = key_account(&s.dir, &s.accounts, "mallory", &["--group", "alice"]);
    // The file changed: wait for the relay's reload (polled) that sees the three accounts.
    relay
        .wait_log(&["account list reloaded", "accounts=3"])
        .await;

    let mut ca2 = login(relay.tcp(), &alice2).await;
    let e = try_sub(&mut ca2, sub(1, 1, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "old alice's key id: {e:?}");
    assert!(e.message.contains("another group"), "{e:?}");
    // A fresh tenant: two more stored messages fit (on a key id of her own), a third not.
    fill_message_quota(
        &mut ca2,
        2,
        [4, 5],
        "the new alice's store usage starts at zero",
    )
    .await;

    let mut cc2 = login(relay.tcp(), &carol2).await;
    let e = try_sub(&mut cc2, sub(1, 5, Some("d"), None))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotAllowed, "old carol's durable: {e:?}");
    assert!(e.message.contains("belongs"), "{e:?}");
    // The key id itself is the group's ("home" is an explicit group name: kept).
    try_sub(&mut cc2, sub(2, 5, None, None))
        .await
        .expect("carol's group still holds key id 5");

    let mut cm = login(relay.tcp(), &mallory).await;
    for k in [1, 2] {
        let e = try_sub(&mut cm, sub(u64::from(k), k, None, None))
            .await
            .unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::AuthFailed,
            "group \"alice\", key {k}: {e:?}"
        );
    }
}

/// Review finding 17, backward compatibility: entries without `id` (account files from
/// before ids) keep the name-based identity — a state file holding the claim of group
/// "alice" and the durable owner `account:alice`, as the relay wrote them before, still
/// belongs to the legacy account "alice"; an account with an id gets neither. `account
/// list` marks the legacy entry and says how to migrate; the relay does not rewrite the
/// file.
#[tokio::test]
async fn a_legacy_entry_without_id_keeps_its_name_based_identity() {
    let s = Setup::new("legacy");
    let alice = SigningKey::from_bytes(&[51; 32]);
    let carol = SigningKey::from_bytes(&[52; 32]);
    let legacy = format!(
        "[[account]]\nname = \"alice\"\nkey = \"{}\"\n\n\
         [[account]]\nname = \"carol\"\ngroup = \"alice\"\nkey = \"{}\"\n",
        hex::encode(alice.verifying_key().as_bytes()),
        hex::encode(carol.verifying_key().as_bytes()),
    );
    std::fs::write(&s.accounts, &legacy).unwrap();
    let dave = key_account(&s.dir, &s.accounts, "dave", &[]);
    let before = std::fs::read(&s.accounts).unwrap();
    let k9 = hex::encode([9u8; 16]);
    std::fs::write(
        &s.state,
        format!(
            "{{\"t\":\"claim\",\"key_id\":\"{k9}\",\"group\":\"alice\"}}\n\
             {{\"t\":\"owner\",\"key_id\":\"{k9}\",\"name\":\"d\",\"owner\":\"account:alice\"}}\n"
        ),
    )
    .unwrap();
    let relay = s.relay(&[]);
    let mut ca = login(relay.tcp(), &alice).await;
    try_sub(&mut ca, sub(1, 9, Some("d"), None))
        .await
        .expect("legacy alice holds key id 9 and owns d");
    // Carol is in alice's (legacy) group: the key id, not alice's durable.
    let mut cc = login(relay.tcp(), &carol).await;
    try_sub(&mut cc, sub(1, 9, None, None))
        .await
        .expect("carol shares group alice");
    let e = try_sub(&mut cc, sub(2, 9, Some("d"), None))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotAllowed, "{e:?}");
    let mut cd = login(relay.tcp(), &dave).await;
    let e = try_pub(&mut cd, 9, false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
    drop(relay);
    assert_eq!(
        std::fs::read(&s.accounts).unwrap(),
        before,
        "file rewritten"
    );

    let out = relay_bin()
        .args(["account", "list", "--file"])
        .arg(&s.accounts)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("{name} not listed: {stdout}"))
            .to_string()
    };
    assert!(line("alice").ends_with("\tlegacy"), "{stdout}");
    assert!(line("alice").contains("\tgroup=alice\t"), "{stdout}");
    let d = line("dave");
    assert!(
        d.contains("\tgroup=account-id:") && d.contains("\tid="),
        "{stdout}"
    );
    assert!(
        stderr.contains("legacy")
            && stderr.contains("account remove")
            && stderr.contains("alice, carol"),
        "{stderr}"
    );
}

/// Review 28 finding 6: more relay accounts than the store reserve is divided among
/// (`store.reserve_tenants`, read at start) is warned, at start and when a reload grows the
/// list past it: once the store passes the reserve's line, some accounts would not be sure
/// of a share.
#[tokio::test]
async fn more_accounts_than_reserve_shares_is_warned_when_the_list_grows() {
    let s = Setup::new("reserve-accounts");
    key_account(&s.dir, &s.accounts, "alice", &[]);
    key_account(&s.dir, &s.accounts, "bob", &[]);
    let mut relay = s.relay_logged(&["--reserve-tenants", "2"]);
    // Two accounts, two shares: nothing to say. A third account, then the reload.
    key_account(&s.dir, &s.accounts, "carol", &[]);
    let line = relay
        .wait_log(&["more relay accounts than store.reserve_tenants"])
        .await;
    assert!(line.contains("accounts=3"), "warned only once over: {line}");
    assert!(line.contains("reserve_tenants=2"), "{line}");
}

// Lapsing claims (`auth.claim_idle_ms`): a group at `auth.max_claims_per_group` that asks
// for a new key id gets one of its claims released once it is unused — no subscription,
// no durable, nothing stored, no publish or subscribe for `claim_idle_ms` — so a member
// filling the group's quota with junk key ids stops the group's new epochs only for a
// while. Each test runs the real relay with `--claim-idle-ms 200` and waits on the event
// (the new claim accepted), never on a fixed sleep.

/// Publishes at QoS 0 with `PubAck` asked for: claims (or uses) key id `k`, stores nothing.
async fn try_pub_live(c: &mut Client, k: u8) -> Result<(), ErrFrame> {
    c.send(&Frame::Pub(Pub {
        envelope: envelope(k, &[1]),
        flags: whispeer_protocol::frame::pub_flags::ACK,
        publish_id: Some([k; 16]),
        qos: Qos::AtMostOnce,
    }))
    .await;
    loop {
        match c.recv().await {
            Frame::PubAck(_) => return Ok(()),
            Frame::Err(e) => return Err(e),
            _ => continue,
        }
    }
}

/// Subscribes `c` on key `k` again and again until the relay accepts — once one of the
/// group's claims has lapsed; every refusal meanwhile must be `quota_exceeded`. Bounded by
/// [`TIMEOUT`].
async fn sub_once_a_claim_lapses(c: &mut Client, sub_id: u64, k: u8) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match try_sub(c, sub(sub_id, k, None, None)).await {
            Ok(()) => return,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}");
                assert!(
                    Instant::now() < deadline,
                    "no claim lapsed within {TIMEOUT:?}: {e:?}"
                );
            }
        }
        // The poll's pace (each try is answered at once), not a wait for the lapse.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Accounts of a lapsing-claims test: `a` and `b` in group "home", `e` in group "other".
struct Lapse {
    s: Setup,
    a: SigningKey,
    b: SigningKey,
    e: SigningKey,
}

impl Lapse {
    fn new(tag: &str) -> Self {
        let s = Setup::new(tag);
        let a = key_account(&s.dir, &s.accounts, "a", &["--group", "home"]);
        let b = key_account(&s.dir, &s.accounts, "b", &["--group", "home"]);
        let e = key_account(&s.dir, &s.accounts, "e", &["--group", "other"]);
        Self { s, a, b, e }
    }

    /// The relay with at most `max` claims per group (and per member), lapsing after
    /// `idle_ms`.
    fn relay(&self, max: &str, idle_ms: &str) -> BinRelay {
        self.s.relay(&[
            "--max-claims",
            max,
            "--max-claims-per-account",
            max,
            "--claim-idle-ms",
            idle_ms,
        ])
    }
}

/// Review finding (claims never released): a member with only the `subscribe` right fills
/// its group's claim quota with junk key ids; while it holds them the group's new key id
/// is refused (naming the way out), and once it left and they went unused for
/// `claim_idle_ms` one lapses and another member claims the new epoch's key id. Exactly
/// one is released (the longest unused), counted in the metric. The filler ends its
/// subscriptions one at a time, 11 first (each answered by a Pong before the next): 11 is
/// then the longest unused whatever the clock's resolution (equal last uses go by key id).
/// (Before, the three holds were given back with the connection, in the session's
/// HashMap order, and a coarse clock tick between two of them could make 12 or 13 the
/// longest unused.)
#[tokio::test]
async fn a_members_junk_claims_lapse_and_the_group_claims_a_new_key_id() {
    let l = Lapse::new("lapse-junk");
    let filler = key_account(
        &l.s.dir,
        &l.s.accounts,
        "filler",
        &["--group", "home", "--rights", "subscribe"],
    );
    let relay = l.relay("3", "200");
    let mut f = login(relay.tcp(), &filler).await;
    for (i, k) in [11u8, 12, 13].into_iter().enumerate() {
        try_sub(&mut f, sub(i as u64, k, None, None))
            .await
            .expect("the filler claims a junk key id");
    }
    let mut b = login(relay.tcp(), &l.b).await;
    let e = try_sub(&mut b, sub(1, 20, None, None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}");
    assert!(
        e.message.contains("auth.claim_idle_ms") && e.message.contains("claims release"),
        "the refusal names the way out: {e:?}"
    );
    for sub_id in 0..3u64 {
        f.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
            sub_id,
            delete: None,
        }))
        .await;
        frames_until_pong(&mut f, sub_id).await;
    }
    drop(f);
    sub_once_a_claim_lapses(&mut b, 1, 20).await;
    assert_eq!(
        metric(relay.admin(), "whispeer_relay_claims_released_total").await,
        1
    );
    // The longest unused (11, left first) is anyone's again; the other two are still the
    // group's.
    let mut e = login(relay.tcp(), &l.e).await;
    try_sub(&mut e, sub(1, 11, None, None))
        .await
        .expect("key 11 lapsed");
    for k in [12u8, 13] {
        let err = try_sub(&mut e, sub(2, k, None, None)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::AuthFailed, "key {k}: {err:?}");
    }
}

/// Review (M1): claims held by live subscriptions never lapse, and the group's limit
/// (10,000) was no more than one member could fill with QoS 0 `Sub`s on junk key ids over
/// its connections, kept alive with Pings — the group stayed at its limit for good. Now
/// one member of a shared group claims at most `auth.max_claims_per_account` (a quarter of
/// `max_claims_per_group` by default: here 2 of 8) while it stays connected, and the other
/// members still claim new key ids. The refusal and an info line (no key id) name the
/// account holding the most; with the relay stopped `claims release --by` releases that
/// account's claims.
#[tokio::test]
async fn a_member_staying_connected_cannot_exhaust_its_groups_claims() {
    let l = Lapse::new("member-cap");
    let filler = key_account(
        &l.s.dir,
        &l.s.accounts,
        "filler",
        &["--group", "home", "--rights", "subscribe"],
    );
    let filler_id = account_ids(&l.s.accounts)
        .into_iter()
        .find(|(n, _)| n == "filler")
        .and_then(|(_, id)| id)
        .unwrap();
    let args = l.s.args(&[
        "--max-claims",
        "8",
        "--max-claims-per-account",
        "2",
        "--log",
        "info",
    ]);
    let mut relay = BinRelay::start_logged(&args);
    let mut f = login(relay.tcp(), &filler).await;
    let mut f2 = login(relay.tcp(), &filler).await;
    try_sub(&mut f, sub(1, 11, None, None)).await.unwrap();
    try_sub(&mut f2, sub(1, 12, None, None)).await.unwrap();
    for (i, k) in [13u8, 14, 15].into_iter().enumerate() {
        let c = if i % 2 == 0 { &mut f } else { &mut f2 };
        let e = try_sub(c, sub(2 + i as u64, k, None, None))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}");
        assert!(
            e.message.contains("auth.max_claims_per_account = 2")
                && e.message.contains("this account, with 2")
                && !e.message.contains(&filler_id.to_string()),
            "{e:?}"
        );
    }
    let line = relay
        .wait_log(&[
            "new key-id claim refused",
            "filler",
            &format!("account-id:{filler_id}"),
            "max_claims_per_account",
        ])
        .await;
    for k in [11u8, 12, 13] {
        assert!(
            !line.contains(&hex::encode([k; 16])),
            "no key id at info: {line}"
        );
    }
    // The filler stays connected (its holds stay); the other members still claim.
    frames_until_pong(&mut f, 1).await;
    frames_until_pong(&mut f2, 2).await;
    let mut a = login(relay.tcp(), &l.a).await;
    try_pub_live(&mut a, 21)
        .await
        .expect("a claims a new key id");
    let mut b = login(relay.tcp(), &l.b).await;
    try_sub(&mut b, sub(1, 22, None, None))
        .await
        .expect("b claims a new key id");
    frames_until_pong(&mut f, 3).await;
    drop((f, f2, a, b, relay));

    // The operator releases the named account's claims, with the relay stopped.
    let state = l.s.state.to_str().unwrap();
    let by = format!("account-id:{filler_id}");
    let listed = relay_cli(&["claims", "list", "--state", state, "--group", "home"]);
    assert_eq!(listed.matches(&format!("by={by}\t")).count(), 2, "{listed}");
    let out = relay_cli(&[
        "claims", "release", "--state", state, "--group", "home", "--by", &by,
    ]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let relay = l.s.relay(&[]);
    let mut e = login(relay.tcp(), &l.e).await;
    try_sub(&mut e, sub(1, 11, None, None))
        .await
        .expect("the filler's claims were released");
    let err = try_sub(&mut e, sub(2, 21, None, None)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthFailed, "a's claim stays: {err:?}");
}

/// A claim a live subscription holds never lapses, however long ago it was claimed: the
/// unheld one lapses instead, and the subscription still gets what is published.
#[tokio::test]
async fn a_claim_with_a_live_subscription_does_not_lapse() {
    let l = Lapse::new("lapse-held");
    let relay = l.relay("2", "200");
    let mut a = login(relay.tcp(), &l.a).await;
    try_sub(&mut a, sub(1, 11, None, None)).await.unwrap();
    try_sub(&mut a, sub(2, 12, None, None)).await.unwrap();
    a.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
        sub_id: 2,
        delete: None,
    }))
    .await;
    frames_until_pong(&mut a, 1).await;
    let mut b = login(relay.tcp(), &l.b).await;
    sub_once_a_claim_lapses(&mut b, 1, 20).await;
    let mut e = login(relay.tcp(), &l.e).await;
    let err = try_sub(&mut e, sub(1, 11, None, None)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthFailed, "key 11 is held: {err:?}");
    try_sub(&mut e, sub(2, 12, None, None))
        .await
        .expect("key 12 lapsed");
    try_pub_live(&mut b, 11).await.unwrap();
    assert!(matches!(a.recv().await, Frame::Msg(_)));
}

/// A claim with a retained value or history in the (SQLite) store never lapses: the
/// next group to claim the key id would read them.
#[tokio::test]
async fn a_claim_with_stored_messages_does_not_lapse() {
    let l = Lapse::new("lapse-stored");
    let relay = l.relay("3", "200");
    let mut a = login(relay.tcp(), &l.a).await;
    try_pub(&mut a, 11, true).await.expect("a retained value");
    try_publish_stored(&mut a, 12, 1)
        .await
        .expect("a stored message");
    try_pub_live(&mut a, 13).await.expect("nothing stored");
    drop(a);
    let mut b = login(relay.tcp(), &l.b).await;
    sub_once_a_claim_lapses(&mut b, 1, 20).await;
    let mut e = login(relay.tcp(), &l.e).await;
    for k in [11u8, 12] {
        let err = try_sub(&mut e, sub(1, k, None, None)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::AuthFailed, "key {k}: {err:?}");
    }
    try_sub(&mut e, sub(2, 13, None, None))
        .await
        .expect("key 13 lapsed");
}

/// A durable subscription keeps its key id claimed while the durable exists, also with
/// nobody subscribed to it.
#[tokio::test]
async fn a_durables_key_id_does_not_lapse() {
    let l = Lapse::new("lapse-durable");
    let relay = l.relay("2", "200");
    let mut a = login(relay.tcp(), &l.a).await;
    try_sub(&mut a, sub(1, 11, Some("d"), None))
        .await
        .expect("a durable");
    // Ended (the durable stays): key 11 is the longest unused from here.
    a.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
        sub_id: 1,
        delete: None,
    }))
    .await;
    frames_until_pong(&mut a, 1).await;
    try_pub_live(&mut a, 12).await.unwrap();
    drop(a);
    let mut b = login(relay.tcp(), &l.b).await;
    sub_once_a_claim_lapses(&mut b, 1, 20).await;
    let mut e = login(relay.tcp(), &l.e).await;
    let err = try_sub(&mut e, sub(1, 11, None, None)).await.unwrap_err();
    assert_eq!(
        err.code,
        ErrorCode::AuthFailed,
        "key 11 has a durable: {err:?}"
    );
    try_sub(&mut e, sub(2, 12, None, None))
        .await
        .expect("key 12 lapsed");
}

/// A released claim stays released after a restart (the state file's `release` line), and
/// the claim made in its place stays.
#[tokio::test]
async fn a_released_claim_stays_released_after_a_restart() {
    let l = Lapse::new("lapse-restart");
    let relay = l.relay("2", "200");
    let mut a = login(relay.tcp(), &l.a).await;
    try_pub_live(&mut a, 11).await.unwrap();
    try_pub_live(&mut a, 12).await.unwrap();
    let mut b = login(relay.tcp(), &l.b).await;
    sub_once_a_claim_lapses(&mut b, 1, 20).await;
    drop((a, b, relay));

    let relay = l.relay("2", "200");
    let mut e = login(relay.tcp(), &l.e).await;
    try_sub(&mut e, sub(1, 11, None, None))
        .await
        .expect("key 11 was released before the restart");
    for k in [12u8, 20] {
        let err = try_sub(&mut e, sub(2, k, None, None)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::AuthFailed, "key {k}: {err:?}");
    }
}

/// `--claim-idle-ms 0` keeps claims for good (as before claims could lapse), and so does a
/// cluster (here with local stores and an unreachable NATS) whatever `claim_idle_ms` says:
/// beside a relay where the same claims lapse (started last, so no older), the group stays
/// at its limit, and the refusal says why.
#[tokio::test]
async fn claims_never_lapse_with_claim_idle_ms_0_or_in_a_cluster() {
    let never = Lapse::new("lapse-never");
    let cluster = Lapse::new("lapse-cluster");
    let lapsing = Lapse::new("lapse-control");
    let mut relays = Vec::new();
    let mut members = Vec::new();
    for (l, extra) in [
        (&never, &["--claim-idle-ms", "0"][..]),
        (
            &cluster,
            &["--claim-idle-ms", "200", "--cluster", "nats://127.0.0.1:1"][..],
        ),
        (&lapsing, &["--claim-idle-ms", "200"][..]),
    ] {
        let mut args = vec!["--max-claims", "2", "--max-claims-per-account", "2"];
        args.extend_from_slice(extra);
        let relay = l.s.relay(&args);
        let mut a = login(relay.tcp(), &l.a).await;
        try_pub_live(&mut a, 11).await.unwrap();
        try_pub_live(&mut a, 12).await.unwrap();
        members.push(login(relay.tcp(), &l.b).await);
        relays.push(relay);
    }
    sub_once_a_claim_lapses(&mut members[2], 1, 20).await;
    for (i, b) in members[..2].iter_mut().enumerate() {
        let err = try_sub(b, sub(1, 20, None, None)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded, "relay {i}: {err:?}");
        assert!(
            err.message.contains("auth.claim_idle_ms = 0, or a cluster"),
            "relay {i}: {err:?}"
        );
    }
}

/// `whispeer-relay claims list` reads the state file; `claims release` refuses while the
/// relay runs (it holds the file's lock) and, with the relay stopped, releases the claims
/// asked for — which a restarted relay no longer holds.
#[tokio::test]
async fn the_claims_cli_lists_and_releases_claims_with_the_relay_stopped() {
    let l = Lapse::new("lapse-cli");
    let state = l.s.state.to_str().unwrap();
    let relay = l.relay("10", "0");
    let mut a = login(relay.tcp(), &l.a).await;
    try_pub_live(&mut a, 11).await.unwrap();
    try_pub_live(&mut a, 12).await.unwrap();
    let listed = relay_cli(&["claims", "list", "--state", state, "--group", "home"]);
    let k = |b: u8| hex::encode([b; 16]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].starts_with(&format!("{}\tgroup=home\t", k(11))),
        "{listed}"
    );
    let k11 = k(11);
    let release = [
        "claims", "release", "--state", state, "--group", "home", "--key-id", &k11,
    ];
    let out = relay_bin().args(release).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop the relay first"), "{err}");
    drop((a, relay));

    // --all looks at the auth-state file only (never the store): it needs --force.
    let all = [
        "claims", "release", "--state", state, "--group", "home", "--all",
    ];
    let out = relay_bin().args(all).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force") && err.contains("store"), "{err}");
    // A group the file holds no claim of (a typo) is an error, not "released 0".
    let typo = [
        "claims", "release", "--state", state, "--group", "hmoe", "--all", "--force",
    ];
    let out = relay_bin().args(typo).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no claim of group \"hmoe\"") && err.contains("home"),
        "{err}"
    );
    let listed = relay_cli(&["claims", "list", "--state", state, "--group", "home"]);
    assert_eq!(listed.lines().count(), 2, "nothing released: {listed}");

    let out = relay_cli(&release);
    assert!(
        out.starts_with(&format!("released\t{}\tgroup=home", k(11))),
        "{out}"
    );
    let relay = l.relay("10", "0");
    let mut e = login(relay.tcp(), &l.e).await;
    try_sub(&mut e, sub(1, 11, None, None))
        .await
        .expect("key 11 was released");
    let err = try_sub(&mut e, sub(2, 12, None, None)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthFailed, "{err:?}");
    drop((e, relay));
    let mut all = all.to_vec();
    all.push("--force");
    let out = relay_cli(&all);
    assert!(
        out.starts_with(&format!("released\t{}\tgroup=home", k(12))),
        "{out}"
    );
}

/// Writes the account file as TOML text `text`, atomically (a temporary file renamed over
/// it), as an editor that saves whole files would.
fn write_accounts_text(file: &Path, text: &str) {
    let tmp = file.with_extension("edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// An operator removes bob from the account list by hand and makes a typo in alice's
/// rights in the same edit: the list is invalid and the previous one stays in force —
/// visibly (`whispeer_relay_account_list_valid` 0, the error counter) — but bob, whom the
/// text no longer names, is revoked anyway (before, he stayed admitted, with only a log
/// line to tell). Alice keeps working; a valid list brings the gauge back.
#[tokio::test]
async fn an_invalid_account_list_is_visible_and_still_revokes_a_removed_account() {
    let s = Setup::new("invalid-list");
    let alice = key_account(&s.dir, &s.accounts, "alice", &["--group", "home"]);
    let bob = key_account(&s.dir, &s.accounts, "bob", &["--group", "home"]);
    let relay = s.relay(&[]);
    let mut ca = login(relay.tcp(), &alice).await;
    let mut cb = login(relay.tcp(), &bob).await;
    let admin = relay.admin();
    assert_eq!(metric(admin, "whispeer_relay_account_list_valid").await, 1);
    let mut list = whispeer_relay::accounts::AccountFile::load(&s.accounts).unwrap();
    list.account.retain(|e| e.name != "bob");
    let valid = list.to_toml().unwrap();
    write_accounts_text(&s.accounts, &valid.replacen("\"publish\"", "\"pubish\"", 1));
    let e = cb.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("removed"), "{e:?}");
    assert_eq!(
        metric(admin, "whispeer_relay_account_reload_errors_total").await,
        1
    );
    assert_eq!(metric(admin, "whispeer_relay_account_list_valid").await, 0);
    try_pub_live(&mut ca, 3)
        .await
        .expect("alice's entry stays in force");
    assert!(try_login(relay.tcp(), &bob).await.is_err(), "bob is out");
    write_accounts_text(&s.accounts, &valid);
    wait_metric(admin, "whispeer_relay_account_list_valid", 1).await;
}

/// Review (L1): a relay takes its auth-state file's lock before it reads (or cuts) the
/// file and refuses to start while another process holds it — here the test itself, by
/// `flock` as the relay and `claims release` take it — naming the file and the likely
/// holder. (Before, it replayed and truncated the file first and then only warned, and
/// ran beside the other writer.) Once the lock is free it starts.
#[test]
fn a_relay_refuses_to_start_while_its_auth_state_file_is_locked() {
    let s = Setup::new("state-locked");
    key_account(&s.dir, &s.accounts, "alice", &[]);
    std::fs::write(&s.state, "").unwrap();
    let held = std::fs::File::open(&s.state).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let mut args = vec![
        "serve",
        "--ws",
        "127.0.0.1:0",
        "--tcp",
        "off",
        "--admin",
        "off",
    ];
    args.extend(["--store", "none", "--ready-file", "-"]);
    args.extend(s.args(&[]));
    let mut child = KillOnDrop(
        relay_bin()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Either the relay refuses (stdout closes with nothing on it) or it prints its ready
    // line and the test fails — it never waits on a relay that wrongly serves.
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert!(
        ready.is_empty(),
        "started beside the lock's holder: {ready}"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(
        stderr.contains(s.state.to_str().unwrap())
            && stderr.contains("another relay")
            && stderr.contains("claims release"),
        "{stderr}"
    );
    drop(held);
    let relay = s.relay(&[]);
    drop(relay);
}

/// Review (L2): a held claim's last use reaches the state file at a stop. A claim that a
/// subscription held until the relay stopped has its only `used` line written as the
/// hold is given back at shutdown; the relay waits for the auth-state writer before it
/// exits (before, `run` returned without waiting and the line could be lost: after a
/// restart the claim counted as unused since it was claimed, weeks ago, and could lapse
/// within the hour). The claim comes from an older state file (no last use written); with
/// `--claim-idle-ms 600000` the refresh step is a minute, so the `Sub` right after the
/// start writes no `used` line of its own: only the stop's can. `disk`: the state file on a
/// small tmpfs, full when the relay stops and freed once the writer reports it cannot
/// write — the relay must wait for it.
async fn a_held_claims_last_use_is_written_at_the_stop(tag: &str, disk: Option<&SmallDisk>) {
    let s = Setup::new(tag);
    let a = key_account(&s.dir, &s.accounts, "a", &["--group", "home"]);
    let state_path = match disk {
        Some(d) => d.dir.join("auth-state"),
        None => s.state.clone(),
    };
    let k11 = hex::encode([11u8; 16]);
    let mut text = format!("{{\"t\":\"claim\",\"key_id\":\"{k11}\",\"group\":\"home\"}}\n");
    // Blank lines up to a whole page: on the full tmpfs the next line needs a new one.
    text.push_str(&"\n".repeat(4096 - text.len()));
    std::fs::write(&state_path, text).unwrap();
    let state = state_path.to_str().unwrap();
    let listed = || relay_cli(&["claims", "list", "--state", state, "--group", "home"]);
    assert!(listed().contains("used=unknown"), "{}", listed());
    let mut args = s.args(&["--claim-idle-ms", "600000"]);
    let at = args.iter().position(|a| *a == "--auth-state").unwrap();
    args[at + 1] = state;
    let mut relay = BinRelay::start_logged(&args);
    let mut c = login(relay.tcp(), &a).await;
    try_sub(&mut c, sub(1, 11, None, None))
        .await
        .expect("the group's claim");
    let filler = disk.map(|d| d.fill("filler"));
    relay.sigterm();
    // Read to the end (the relay's Close) and close: the stop's drain ends at once.
    c.drain_to_end().await;
    drop(c);
    if let Some(filler) = filler {
        relay.wait_log(&["cannot write the auth state file"]).await;
        std::fs::remove_file(&filler).unwrap();
    }
    let status = tokio::task::spawn_blocking(move || {
        let st = relay.wait_exit();
        drop(relay);
        st
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    let out = listed();
    let ago: u64 = out
        .split("used=")
        .nth(1)
        .and_then(|r| r.split("s-ago").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no last use written at the stop: {out}"));
    assert!(ago < 3600, "the last use is the stop's: {out}");
}

#[tokio::test]
async fn a_held_claims_last_use_is_on_disk_when_the_relay_has_stopped() {
    a_held_claims_last_use_is_written_at_the_stop("flush-used", None).await;
}

/// The same with the disk full at the stop until the writer has reported it: the relay
/// exits only once the line is written (without waiting, it exits while the writer
/// waits to retry: deterministic, where the plain stop is a race the writer usually wins).
#[tokio::test]
async fn a_held_claims_last_use_is_on_disk_even_after_a_full_disk_at_the_stop() {
    let Some(disk) = SmallDisk::mount("flush-used-full") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    a_held_claims_last_use_is_written_at_the_stop("flush-used-disk", Some(&disk)).await;
}

/// Review (M2), on the real relay: in one hand edit the operator deletes bob's lines but
/// leaves his `[[account]]` header, and misspells `id` as `idd` in alice's entry. Before,
/// the nameless header made the list unreadable for pruning (bob stayed admitted) and
/// `idd` read as another identity (alice was revoked, her connection closed). Now each
/// entry is read on its own: bob is revoked (once the same text has been read twice, a
/// reload period apart), alice is kept as she was.
#[tokio::test]
async fn a_left_over_header_and_a_typo_in_the_kept_entry_revoke_exactly_the_removed_account() {
    let s = Setup::new("invalid-typos");
    let alice = key_account(&s.dir, &s.accounts, "alice", &["--group", "home"]);
    let bob = key_account(&s.dir, &s.accounts, "bob", &["--group", "home"]);
    let relay = s.relay(&[]);
    let mut ca = login(relay.tcp(), &alice).await;
    let mut cb = login(relay.tcp(), &bob).await;
    let text = std::fs::read_to_string(&s.accounts).unwrap();
    let bob_at = text
        .find("[[account]]\nname = \"bob\"")
        .expect("bob's entry");
    let bob_end = text[bob_at + 1..]
        .find("[[account]]")
        .map_or(text.len(), |e| bob_at + 1 + e);
    let edited = format!("{}[[account]]\n{}", &text[..bob_at], &text[bob_end..])
        .replacen("\nid = ", "\nidd = ", 1);
    assert!(edited.contains("name = \"alice\"\nidd = "), "{edited}");
    write_accounts_text(&s.accounts, &edited);
    let e = cb.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("removed"), "{e:?}");
    assert_eq!(
        metric(relay.admin(), "whispeer_relay_account_list_valid").await,
        0
    );
    try_pub_live(&mut ca, 3)
        .await
        .expect("alice's entry stays in force");
    login(relay.tcp(), &alice).await;
}

/// The account file cut at an entry boundary — an editor writing it in place, a truncated
/// copy — is a valid list. Before, the relay's first read of it revoked every account after
/// the cut at once: bob's connection was closed though the write went on. Now what a valid
/// list revokes waits until a read a reload period later still revokes it (a log line,
/// `whispeer_relay_account_revocations_deferred_total`): the whole list read meanwhile
/// revokes nobody. An operator's real removal still takes effect, a reload period later.
#[tokio::test]
async fn a_valid_prefix_of_the_account_list_revokes_nothing_until_read_again() {
    let s = Setup::new("valid-cut");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let bob = key_account(&s.dir, &s.accounts, "bob", &[]);
    let whole = std::fs::read_to_string(&s.accounts).unwrap();
    // A reload period long enough that the test writes the whole list back well before the
    // cut's confirming read.
    let mut relay = BinRelay::start_logged(&[
        "--auth",
        "required",
        "--accounts",
        s.accounts.to_str().unwrap(),
        "--auth-state",
        s.state.to_str().unwrap(),
        "--accounts-reload-ms",
        "1000",
        "--log",
        "warn,whispeer_relay::accounts=info",
    ]);
    let admin = relay.admin();
    let mut ca = login(relay.tcp(), &alice).await;
    let mut cb = login(relay.tcp(), &bob).await;
    try_sub(&mut cb, sub(1, 5, None, None))
        .await
        .expect("bob subscribes");

    // The file cut right before bob's entry: a valid list of alice alone.
    let cut = &whole[..whole
        .find("[[account]]\nname = \"bob\"")
        .expect("bob's entry")];
    std::fs::write(&s.accounts, cut).unwrap();
    let line = relay.wait_log(&["account list"]).await;
    assert!(
        line.contains("revocations wait"),
        "the cut list was put in force at once: {line}"
    );
    // The write goes on: the whole list.
    std::fs::write(&s.accounts, &whole).unwrap();
    relay
        .wait_log(&["account list reloaded", "accounts=2"])
        .await;
    try_sub(&mut cb, sub(2, 6, None, None))
        .await
        .expect("bob was never revoked");
    // One deferral at least (the cut; a read of the file emptied by the write, too).
    let deferred = metric(admin, "whispeer_relay_account_revocations_deferred_total").await;
    assert!(deferred >= 1, "{deferred}");

    // The operator removes bob for real: a reload period later he is out.
    relay_cli(&[
        "account",
        "remove",
        "bob",
        "--file",
        s.accounts.to_str().unwrap(),
    ]);
    relay.wait_log(&["revocations wait"]).await;
    let e = cb.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("removed"), "{e:?}");
    relay
        .wait_log(&["account list reloaded", "accounts=1"])
        .await;
    assert!(try_login(relay.tcp(), &bob).await.is_err(), "bob is out");
    try_pub_live(&mut ca, 3).await.expect("alice is untouched");
    assert!(metric(admin, "whispeer_relay_account_revocations_deferred_total").await > deferred);
}

/// Session 42's note: a removed account's own group (`account-id:…`) kept the key ids it
/// claimed until an operator stopped the relay and ran `claims release` — claims lapse only
/// for a member's new key id, and no member is left — so bob, in another group, was refused
/// the key ids alice had used (an epoch they share) for good. Now bob's request releases a
/// revoked account's own group's claim, once no subscription holds it (alice's ended as her
/// connection was closed), no durable is recorded under it and nothing is stored under it.
#[tokio::test]
async fn a_removed_accounts_key_ids_can_be_claimed_by_another_group() {
    let s = Setup::new("revoked-claims");
    let alice = key_account(&s.dir, &s.accounts, "alice", &[]);
    let bob = key_account(&s.dir, &s.accounts, "bob", &[]);
    let relay = s.relay(&[]);
    let mut ca = login(relay.tcp(), &alice).await;
    try_sub(&mut ca, sub(1, 7, None, None))
        .await
        .expect("alice claims key id 7, held by her subscription");
    try_pub_live(&mut ca, 8)
        .await
        .expect("alice claims key id 8, storing nothing");
    let mut cb = login(relay.tcp(), &bob).await;
    for k in [7, 8] {
        let e = try_pub_live(&mut cb, k).await.unwrap_err();
        assert!(e.message.contains("another group"), "{e:?}");
    }

    relay_cli(&[
        "account",
        "remove",
        "alice",
        "--file",
        s.accounts.to_str().unwrap(),
    ]);
    let e = ca.expect_fatal(ErrorCode::AuthFailed).await;
    assert!(e.message.contains("removed"), "{e:?}");
    try_sub(&mut cb, sub(1, 8, None, None))
        .await
        .expect("alice's claim of key id 8 is released for bob");
    // Key id 7 goes once alice's session has ended (its subscription's hold with it): the
    // close is the event; polled with a deadline, each try answered at once.
    let deadline = Instant::now() + TIMEOUT;
    while let Err(e) = try_sub(&mut cb, sub(2, 7, None, None)).await {
        assert!(e.message.contains("another group"), "{e:?}");
        assert!(Instant::now() < deadline, "key id 7 never released: {e:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(
            relay.admin(),
            "whispeer_relay_claims_released_revoked_total"
        )
        .await,
        2
    );
}
