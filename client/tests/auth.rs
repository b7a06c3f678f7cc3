//! Relay accounts from the client side, against the real `whispeer-relay` binary with
//! `auth = required`: the Rust client with an account key file (written by
//! `whispeer-relay account add --key-out`) or a bearer token, the refusals without or with
//! a wrong account, and the `whispeer` CLI with `--auth-key FILE`, `WHISPEER_AUTH_KEY` and
//! `--auth-token`.

mod support;

use std::process::{Command, Output, Stdio};

use futures_util::StreamExt;
use support::{
    account_add, keyring_with, relay_binary, start_relay_binary, tree, within, RelayProcess,
};
use whispeer::protocol::ErrorCode;
use whispeer::{Client, ConnectError, Encryption, RelayAuth, Tcp, WebSocket};

struct Accounts {
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
    alice_key: std::path::PathBuf,
    token: String,
}

fn accounts() -> Accounts {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("accounts.toml");
    let alice_key = dir.path().join("alice.key");
    account_add(
        &file,
        "alice",
        &["--key-out", alice_key.to_str().unwrap(), "--group", "home"],
    );
    let out = account_add(&file, "svc", &["--token", "--group", "home"]);
    let token = out.trim().lines().last().unwrap().to_string();
    Accounts {
        _dir: dir,
        file,
        alice_key,
        token,
    }
}

fn relay(a: &Accounts) -> RelayProcess {
    start_relay_binary(&["--auth", "required", "--accounts", a.file.to_str().unwrap()])
}

fn rejected_with(r: Result<Client, ConnectError>, code: ErrorCode) {
    match r {
        Err(ConnectError::Rejected { code: c, .. }) => assert_eq!(c, code),
        Err(other) => panic!("expected Rejected({code:?}), got {other}"),
        Ok(_) => panic!("connected without a valid account"),
    }
}

#[tokio::test]
async fn rust_client_authenticates_with_a_key_file_or_a_token() {
    let a = accounts();
    let relay = relay(&a);
    let t = tree("home");
    let keys = || keyring_with(&t);

    // Without an account: auth_required; with an unknown key: auth_failed.
    rejected_with(
        Client::builder()
            .with(WebSocket::new(relay.ws_url()))
            .with(Encryption::with_keyring(keys()))
            .connect()
            .await,
        ErrorCode::AuthRequired,
    );
    let stranger = RelayAuth::key(ed25519_dalek::SigningKey::from_bytes(&[3; 32]));
    rejected_with(
        Client::builder()
            .with(Tcp::new(relay.tcp_url()))
            .with(Encryption::with_keyring(keys()))
            .with(stranger)
            .connect()
            .await,
        ErrorCode::AuthFailed,
    );
    rejected_with(
        Client::builder()
            .with(Tcp::new(relay.tcp_url()))
            .with(RelayAuth::token("wsp_tok_not-a-token"))
            .connect()
            .await,
        ErrorCode::AuthFailed,
    );

    // Alice (key file) subscribes; the service (token, same group) publishes to her.
    let alice = Client::builder()
        .with(WebSocket::new(relay.ws_url()))
        .with(Encryption::with_keyring(keys()))
        .with(RelayAuth::key_file(&a.alice_key).unwrap())
        .connect()
        .await
        .expect("alice connects with her account key");
    let mut inbox = alice.subscribe::<String>("chat/lobby").await.unwrap();
    let svc = Client::builder()
        .with(Tcp::new(relay.tcp_url()))
        .with(Encryption::with_keyring(keys()))
        .with(RelayAuth::token(a.token.clone()))
        .connect()
        .await
        .expect("the service connects with its token");
    svc.publish("chat/lobby", "hello").await.unwrap();
    let m = within("the message", inbox.next())
        .await
        .expect("a message")
        .expect("opens");
    assert_eq!(m.value, "hello");
}

#[test]
fn account_key_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.key");
    std::fs::write(&f, "wsid1notakey\n").unwrap();
    let e = RelayAuth::key_file(&f).unwrap_err();
    assert!(e.to_string().contains("account add"), "{e}");
    assert!(RelayAuth::key_file(dir.path().join("missing")).is_err());
}

fn whispeer(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_whispeer"));
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
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn cli_authenticates_with_auth_key_env_and_token() {
    let a = accounts();
    let relay = relay(&a);
    let dir = tempfile::tempdir().unwrap();
    let key = whispeer(&["key", "new", "--tree", "home"], &[]);
    assert!(key.status.success());
    let key_file = dir.path().join("home.key");
    std::fs::write(&key_file, &key.stdout).unwrap();
    let kf = key_file.to_str().unwrap();
    let url = relay.tcp_url();

    // No account: a one-line error naming the refusal.
    let o = whispeer(
        &[
            "pub",
            "--relay",
            &url,
            "--key-file",
            kf,
            "a/b",
            "1",
            "--qos",
            "1",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("AuthRequired"), "{err}");

    // --auth-key FILE publishes (QoS 1: stored, acknowledged).
    let o = whispeer(
        &[
            "pub",
            "--relay",
            &url,
            "--key-file",
            kf,
            "--auth-key",
            a.alice_key.to_str().unwrap(),
            "a/b",
            "41",
            "--qos",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --auth-token publishes too.
    let o = whispeer(
        &[
            "pub",
            "--relay",
            &url,
            "--key-file",
            kf,
            "--auth-token",
            &a.token,
            "a/b",
            "42",
            "--qos",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // WHISPEER_AUTH_KEY: a subscriber replays both.
    let o = whispeer(
        &[
            "sub",
            "--relay",
            &relay.ws_url(),
            "--key-file",
            kf,
            "a/b",
            "--last",
            "2",
            "--count",
            "2",
        ],
        &[("WHISPEER_AUTH_KEY", a.alice_key.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let data: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["data"].clone())
        .collect();
    assert_eq!(data, vec![serde_json::json!(41), serde_json::json!(42)]);
}

#[tokio::test]
async fn a_removed_account_is_disconnected() {
    let a = accounts();
    let relay = relay(&a);
    let alice = Client::builder()
        .with(Tcp::new(relay.tcp_url()))
        .with(RelayAuth::key_file(&a.alice_key).unwrap())
        .connect()
        .await
        .unwrap();
    let out = Command::new(relay_binary())
        .args(["account", "remove", "alice", "--file"])
        .arg(&a.file)
        .output()
        .unwrap();
    assert!(out.status.success());
    // Polled with a deadline: the relay closes the connection at its next reload, and
    // reconnecting fails (auth_failed) so the client never gets back to Connected.
    let mut state = alice.state_changes();
    within(
        "the disconnect",
        state.wait_for(|s| *s != whispeer::ConnectionState::Connected),
    )
    .await
    .expect("the client keeps its state");
}

#[test]
fn auth_keygen_key_is_accepted_by_the_relay() {
    // The user makes the key; only the public key goes to the operator.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("me.key");
    let o = whispeer(&["auth-keygen", "--out", key_file.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let public = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert_eq!(public.len(), 64, "{public}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key file is private");
    }
    let file = dir.path().join("accounts.toml");
    account_add(&file, "me", &["--public-key", &public]);
    let relay = start_relay_binary(&["--auth", "required", "--accounts", file.to_str().unwrap()]);
    let key = whispeer(&["key", "new", "--tree", "t"], &[]);
    let kf = dir.path().join("t.key");
    std::fs::write(&kf, &key.stdout).unwrap();
    let o = whispeer(
        &[
            "pub",
            "--relay",
            &relay.ws_url(),
            "--key-file",
            kf.to_str().unwrap(),
            "x",
            "1",
            "--qos",
            "1",
        ],
        &[("WHISPEER_AUTH_KEY", key_file.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
