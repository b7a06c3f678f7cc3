//! The real `whispeer-relay` binary: configuration output, admin endpoints (checked with
//! promtool when installed), the `status` command, a malformed-input suite, and graceful
//! shutdown on SIGTERM.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use tokio_tungstenite::tungstenite::Message;
use whispeer_protocol::frame::{Close, Hello, Pub};
use whispeer_protocol::{ErrorCode, Frame, Qos};
use whispeer_relay::admin::{http_get, http_get_auth, Status};
use whispeer_relay::Config;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
}

#[test]
fn generate_config_prints_every_setting_with_defaults() {
    let out = bin().arg("generate-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "[listen]",
        "ws =",
        "tcp =",
        "wss =",
        "tls =",
        "admin =",
        "[tls]",
        "[limits]",
        "max_frame",
        "max_connections",
        "max_subscriptions",
        "max_filter_depth",
        "publish_rate",
        "publish_burst",
        "[queue]",
        "capacity",
        "slow_consumer",
        "[timeouts]",
        "hello_ms",
        "heartbeat_ms",
        "idle_ms",
        "drain_ms",
        "[log]",
        "filter",
        "format",
    ] {
        assert!(text.contains(key), "missing {key}");
    }
    assert_eq!(Config::from_toml(&text).unwrap(), Config::serve_default());
}

#[test]
fn serve_reads_config_file_and_env_with_flags_winning() {
    let dir = temp_dir("cfg");
    let cfg = dir.join("relay.toml");
    std::fs::write(&cfg, "[limits]\nmax_frame = 2048\nmax_subscriptions = 7\n").unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let mut relay = BinRelay::start(&["--config", cfg_s, "--max-subscriptions", "9"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status: Status = rt.block_on(async {
        serde_json::from_slice(
            &http_get(&relay.admin().to_string(), "/status")
                .await
                .unwrap(),
        )
        .unwrap()
    });
    assert_eq!(status.limits.max_frame, 2048, "from the file");
    assert_eq!(status.limits.max_subscriptions, 9, "the flag wins");
    assert!(relay.is_running());
    let _ = std::fs::remove_dir_all(dir);

    // An environment variable sets the same thing.
    let dir = temp_dir("env");
    let mut child = bin()
        .args([
            "serve",
            "--ws",
            "off",
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--ready-file", "-"])
        .env("WHISPEER_MAX_FRAME", "3000")
        .env("WHISPEER_LOG", "warn")
        .env("WHISPEER_STORE_PATH", dir.join("relay.db"))
        .env("WHISPEER_STORE_MIN_FREE_BYTES", "0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addrs = wait_ready(&mut child);
    assert!(addrs.ws.is_none(), "ws is off");
    let status: Status = rt.block_on(async {
        serde_json::from_slice(
            &http_get(&addrs.admin.unwrap().to_string(), "/status")
                .await
                .unwrap(),
        )
        .unwrap()
    });
    assert_eq!(status.limits.max_frame, 3000);
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(dir);

    // Invalid settings are refused at startup with a non-zero exit.
    let out = bin()
        .args(["serve", "--max-filter-depth", "99", "--ws", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_filter_depth"));
}

#[tokio::test]
async fn admin_endpoints_metrics_pass_promtool_and_status_command() {
    let relay = BinRelay::start(&[]);
    let admin = relay.admin().to_string();
    // Some traffic so counters and the histogram are non-trivial.
    let mut sub = subscriber_tcp(relay.tcp(), exact(1, &[1])).await;
    let mut publ = Client::ws(relay.ws()).await;
    publ.hello().await;
    publ.publish(envelope(1, &[1])).await;
    sub.expect_msg().await;
    let mut bad = Client::tcp(relay.tcp()).await;
    bad.send_raw(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    bad.expect_fatal(ErrorCode::Malformed).await;

    assert_eq!(&http_get(&admin, "/healthz").await.unwrap()[..], b"ok\n");
    let status: Status =
        serde_json::from_slice(&http_get(&admin, "/status").await.unwrap()).unwrap();
    assert_eq!(status.traffic.messages_in, 1);
    assert_eq!(status.traffic.messages_out, 1);
    assert!(status.traffic.connections >= 2);
    assert_eq!(status.listeners, relay.addrs);
    assert!(http_get(&admin, "/nope").await.is_err());

    let metrics = http_get(&admin, "/metrics").await.unwrap();
    let text = String::from_utf8(metrics.to_vec()).unwrap();
    for name in [
        "whispeer_relay_connections{transport=\"tcp\"}",
        "whispeer_relay_subscriptions 1",
        "whispeer_relay_messages_in_total 1",
        "whispeer_relay_messages_out_total 1",
        "whispeer_relay_bytes_in_total",
        "whispeer_relay_bytes_out_total",
        "whispeer_relay_dropped_messages_total 0",
        "whispeer_relay_errors_total{kind=\"malformed\"} 1",
        "whispeer_relay_routing_seconds_bucket{le=\"+Inf\"} 1",
        "whispeer_relay_routing_seconds_count 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool not installed (apt-get install prometheus); skipped that check");
        }
        Err(e) => panic!("running promtool: {e}"),
    }

    let admin_url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args(["status", "--admin", &admin_url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(summary.contains("whispeer-relay"), "{summary}");
    assert!(summary.contains("messages     in 1  out 1"), "{summary}");
}

/// A tiny deterministic generator for the random-bytes case (no RNG crate needed).
fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn prefixed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A `Sub` with a filter of `levels` `+` elements, encoded by hand (the protocol crate
/// refuses to build such a pattern).
fn deep_sub(levels: u16) -> Vec<u8> {
    let mut v = vec![0xa4, 0x00, 0x03, 0x01, 0x01, 0x02, 0x50];
    v.extend_from_slice(&[1u8; 16]);
    v.extend_from_slice(&[0x03, 0x99]);
    v.extend_from_slice(&levels.to_be_bytes());
    v.extend(std::iter::repeat_n(0x01, levels as usize));
    v
}

enum Expect {
    Err(ErrorCode),
    /// A typed fatal Err or a clean close, whichever the bytes lead to.
    ErrOrClose,
}

async fn bad_stream_client(
    relay: &BinRelay,
    greet: bool,
    bytes: &[u8],
    expect: Expect,
    case: &str,
) {
    let mut c = Client::tcp(relay.tcp()).await;
    if greet {
        c.hello().await;
    }
    let _ = c.send_raw(bytes).await;
    c.shutdown_write().await;
    let (frames, clean) = c.drain_to_end().await;
    let err = frames.iter().find_map(|f| match f {
        Frame::Err(e) => Some(e.clone()),
        _ => None,
    });
    match expect {
        Expect::Err(code) => {
            let e = err.unwrap_or_else(|| panic!("{case}: no Err frame in {frames:?}"));
            assert_eq!(e.code, code, "{case}: {e:?}");
            assert!(e.fatal, "{case}");
        }
        Expect::ErrOrClose => {
            if let Some(e) = err {
                assert!(e.fatal, "{case}: {e:?}");
            } else {
                assert!(clean, "{case}: neither an Err frame nor a clean close");
            }
        }
    }
}

#[tokio::test]
async fn malformed_input_suite_against_the_binary() {
    let mut relay = BinRelay::start(&[]);
    let mut probe = Probe::new(relay.tcp()).await;
    probe.check("start").await;

    let cases: Vec<(&str, bool, Vec<u8>, Expect)> = vec![
        (
            "random bytes",
            false,
            pseudo_random(7, 4096),
            Expect::ErrOrClose,
        ),
        (
            "random bytes after hello",
            true,
            pseudo_random(99, 100_000),
            Expect::ErrOrClose,
        ),
        ("truncated prefix", true, vec![0, 0], Expect::ErrOrClose),
        (
            "truncated frame",
            true,
            {
                let mut v = 100u32.to_be_bytes().to_vec();
                v.extend_from_slice(&[0xa1; 50]);
                v
            },
            Expect::ErrOrClose,
        ),
        (
            "4 GiB length prefix",
            false,
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            Expect::Err(ErrorCode::FrameTooLarge),
        ),
        (
            "zero length prefix",
            true,
            vec![0, 0, 0, 0],
            Expect::Err(ErrorCode::Malformed),
        ),
        (
            "invalid CBOR",
            false,
            prefixed(&[0xff, 0xfe, 0x00]),
            Expect::Err(ErrorCode::Malformed),
        ),
        (
            "indefinite-length map",
            false,
            prefixed(&[0xbf, 0x00, 0x01, 0xff]),
            Expect::Err(ErrorCode::Malformed),
        ),
        (
            "CBOR that is not a map",
            true,
            prefixed(&[0x83, 1, 2, 3]),
            Expect::Err(ErrorCode::Malformed),
        ),
        (
            "unknown frame type",
            true,
            prefixed(&[0xa1, 0x00, 0x18, 0x63]),
            Expect::Err(ErrorCode::UnknownFrame),
        ),
        (
            "unknown frame type before hello",
            false,
            prefixed(&[0xa1, 0x00, 0x18, 0x63]),
            Expect::Err(ErrorCode::UnknownFrame),
        ),
        (
            "wrong version (1, the wave-1 format)",
            false,
            whispeer_protocol::codec::encode_prefixed(&Frame::Hello(Hello {
                versions: vec![1],
                features: 0,
                client: None,
                auth: None,
                account: None,
            }))
            .to_vec(),
            Expect::Err(ErrorCode::UnsupportedVersion),
        ),
        (
            "filter with 10,000 levels",
            true,
            prefixed(&deep_sub(10_000)),
            Expect::Err(ErrorCode::InvalidFilter),
        ),
        (
            "envelope with a bad header",
            true,
            {
                let mut env = envelope(1, &[1]).as_bytes().to_vec();
                env[1] = 9; // unknown suite
                            // Pub {0: 6, 1: env} with a 2-byte byte-string length.
                let mut f = vec![0xa2, 0x00, 0x06, 0x01, 0x59];
                f.extend_from_slice(&(env.len() as u16).to_be_bytes());
                f.extend_from_slice(&env);
                prefixed(&f)
            },
            Expect::Err(ErrorCode::InvalidEnvelope),
        ),
        (
            "flood of subscriptions",
            true,
            {
                let mut v = Vec::new();
                for i in 0..5000u64 {
                    v.extend_from_slice(&whispeer_protocol::codec::encode_prefixed(&sub_frame(
                        i,
                        exact(3, &[(i % 251) as u8, (i / 251) as u8]),
                    )));
                }
                v
            },
            Expect::Err(ErrorCode::TooManySubscriptions),
        ),
    ];
    for (case, greet, bytes, expect) in cases {
        bad_stream_client(&relay, greet, &bytes, expect, case).await;
        assert!(relay.is_running(), "relay died after {case}");
        probe.check(case).await;
    }

    // WebSocket-specific cases.
    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    c.send_ws_message(Message::Text("hello?".into())).await;
    c.expect_fatal(ErrorCode::ProtocolViolation).await;
    probe.check("ws text frame").await;

    let mut c = Client::ws(relay.ws()).await;
    c.send_ws_message(Message::Binary(vec![0xff, 0xfe].into()))
        .await;
    c.expect_fatal(ErrorCode::Malformed).await;
    probe.check("ws invalid CBOR").await;

    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    c.send_ws_message(Message::Binary(deep_sub(10_000).into()))
        .await;
    c.expect_fatal(ErrorCode::InvalidFilter).await;
    probe.check("ws deep filter").await;

    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    let big = Frame::Pub(Pub {
        envelope: envelope_sized(1, &[1], 2 << 20),
        flags: 0,
        publish_id: None,
        qos: Qos::AtMostOnce,
    })
    .to_bytes();
    // The relay refuses the message from its length and closes at once, so the rest of our
    // 2 MiB may meet a reset; either way nothing else may come back but that fatal Err.
    let sent = c.send_raw(&big).await;
    let (frames, clean) = c.drain_to_end().await;
    match frames.as_slice() {
        [Frame::Err(e), ..] => {
            assert_eq!(e.code, ErrorCode::FrameTooLarge, "{e:?}");
            assert!(e.fatal);
        }
        // A reset may discard the Err before we read it; a clean close without it is wrong.
        [] => assert!(
            sent.is_err() || !clean,
            "an oversized frame was closed cleanly with no Err"
        ),
        other => panic!("unexpected answer to an oversized frame: {other:?}"),
    }
    probe.check("ws oversized").await;

    // Raw garbage instead of a WebSocket upgrade: the handshake fails, nothing else.
    let mut c = Client::tcp(relay.ws()).await;
    let _ = c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    c.shutdown_write().await;
    let _ = c.drain_to_end().await;
    probe.check("bad ws upgrade").await;

    assert!(relay.is_running());
    let status: Status = serde_json::from_slice(
        &http_get(&relay.admin().to_string(), "/status")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(status.traffic.errors >= 15, "{:?}", status.traffic);
}

#[tokio::test]
async fn sigterm_sends_close_to_clients_and_exits_zero() {
    let mut relay = BinRelay::start(&["--drain-ms", "10000"]);
    let mut tcp = subscriber_tcp(relay.tcp(), exact(1, &[1])).await;
    let mut ws = subscriber_ws(relay.ws(), exact(1, &[1])).await;
    // A queued message is delivered before the Close.
    let mut publ = Client::tcp(relay.tcp()).await;
    publ.hello().await;
    publ.publish(envelope(1, &[1])).await;
    tcp.expect_msg().await;
    ws.expect_msg().await;

    relay.sigterm();
    for (name, c) in [("tcp", &mut tcp), ("ws", &mut ws), ("publisher", &mut publ)] {
        let (frames, clean) = c.drain_to_end().await;
        assert!(
            matches!(
                frames.last(),
                Some(Frame::Close(Close {
                    code: ErrorCode::ShuttingDown,
                    ..
                }))
            ),
            "{name}: {frames:?}"
        );
        assert!(clean, "{name}: clean close");
    }
    drop((tcp, ws, publ));
    let status = tokio::task::spawn_blocking(move || {
        let s = relay.wait_exit();
        (s, relay)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "exit status {status}");
}

/// Partial large frames cannot pile up in the relay's memory: with a budget of two 256 KiB
/// frames, two connections (from two source addresses: one address alone claims at most
/// half the budget) that announce such frames and never finish them hold all of it;
/// a third connection's large frame (TCP) and a large WebSocket message are then not read
/// (they wait, counted) while small frames from anyone still flow; once the holders go,
/// the waiting frames are read and delivered whole, and the budget is all given back. Fails if large partial frames are buffered without limit (no wait is
/// counted and the budget gauge never fills) or if small frames wait too.
#[tokio::test]
async fn partial_large_frames_are_bounded_by_the_frame_budget() {
    const BIG: usize = 256 * 1024;
    let mut relay = BinRelay::start_logged(&[
        "--store",
        "none",
        "--max-frame",
        &BIG.to_string(),
        "--large-frame-budget",
        &(2 * BIG).to_string(),
        "--log",
        "warn,whispeer_relay::transport::frame_budget=debug",
    ]);
    let admin = relay.admin();
    let mut sub = subscriber_tcp(relay.tcp(), exact(1, &[1])).await;
    let large = |body: usize| {
        whispeer_protocol::codec::encode_prefixed(&pub_frame(envelope_sized(1, &[1], body)))
    };
    // Two holders: a frame just under max_frame announced, 1,000 bytes of it sent.
    let mut holders = Vec::new();
    for i in 0..2 {
        let mut c = Client::tcp_from(relay.tcp(), &format!("127.0.0.{}", i + 2)).await;
        c.hello().await;
        let f = large(BIG - 200);
        assert!(f.len() - 4 <= BIG && f.len() - 4 > BIG / 2);
        c.send_raw(&f[..1004]).await.unwrap();
        relay.wait_log(&["large frame took budget"]).await;
        holders.push(c);
    }
    let held = metric(admin, "whispeer_relay_frame_budget_bytes").await;
    assert!(held > BIG as u64 && held <= 2 * BIG as u64, "{held}");

    // A third large frame, sent whole: the relay does not read it yet.
    let mut third = Client::tcp(relay.tcp()).await;
    third.hello().await;
    third.send_raw(&large(BIG / 2)).await.unwrap();
    relay.wait_log(&["large frame waits for budget"]).await;

    // A large WebSocket message waits for the same budget.
    let mut ws = Client::ws(relay.ws()).await;
    ws.hello().await;
    ws.send_ws_message(Message::Binary(
        whispeer_protocol::codec::encode_prefixed(&pub_frame(envelope_sized(1, &[1], 100_000)))
            .slice(4..),
    ))
    .await;
    relay.wait_log(&["large frame waits for budget"]).await;
    assert_eq!(
        metric(admin, "whispeer_relay_frame_budget_waits_total").await,
        2
    );

    // Small frames flow meanwhile, on a connection of their own.
    let mut small = Client::tcp(relay.tcp()).await;
    small.hello().await;
    small.publish(envelope_sized(1, &[1], 100)).await;
    let m = sub.expect_msg().await;
    assert!(m.envelope.len() < 1024, "the small message comes first");

    // The holders go: the waiting frames are read and delivered.
    drop(holders);
    let mut sizes = [sub.expect_msg().await, sub.expect_msg().await].map(|m| m.envelope.len());
    sizes.sort();
    assert!(
        sizes[0] > 100_000 && sizes[1] > BIG / 2,
        "then the large ones: {sizes:?}"
    );
    // Every lease is given back: the holders' two and the two frames that waited.
    for _ in 0..4 {
        relay.wait_log(&["large frame budget given back"]).await;
    }
    assert_eq!(metric(admin, "whispeer_relay_frame_budget_bytes").await, 0);
    drop((third, ws));
}

/// Subscriptions are capped per tenant (here the source address) and in all, not only per
/// connection: one address cannot hold more than its share over many connections, another
/// address is not affected by it until the relay-wide cap, and a refused `Sub` is a
/// non-fatal `Err(too_many_subscriptions)` naming it — the connection carries on, and room
/// freed by a closed connection is usable again. Fails if a tenant can exceed its cap by
/// opening more connections, or if the refusal ends the connection.
#[tokio::test]
async fn subscriptions_are_capped_per_source_address_and_in_all() {
    let mut relay = BinRelay::start_logged(&[
        "--store",
        "none",
        "--tenant-max-subscriptions",
        "3",
        "--max-total-subscriptions",
        "5",
        "--log",
        "warn,whispeer_relay::session=debug",
    ]);
    let refused = |e: whispeer_protocol::frame::ErrFrame, sub_id: u64, why: &str| {
        assert_eq!(e.code, ErrorCode::TooManySubscriptions, "{e:?}");
        assert!(!e.fatal, "{e:?}");
        assert_eq!(e.sub_id, Some(sub_id), "{e:?}");
        assert!(e.message.contains(why), "{e:?}");
    };
    // 127.0.0.1: three subscriptions over two connections, then no more on either.
    let mut a1 = Client::tcp(relay.tcp()).await;
    a1.hello().await;
    a1.subscribe(1, exact(1, &[1])).await;
    a1.subscribe(2, exact(1, &[2])).await;
    let mut a2 = Client::tcp(relay.tcp()).await;
    a2.hello().await;
    a2.subscribe(1, exact(1, &[3])).await;
    a2.send(&sub_frame(2, exact(1, &[4]))).await;
    refused(a2.expect_err().await, 2, "per source address");
    a1.send(&sub_frame(3, exact(1, &[4]))).await;
    refused(a1.expect_err().await, 3, "per source address");
    // Replacing a subscription (the same id) is not one more.
    a1.subscribe(2, exact(1, &[5])).await;

    // 127.0.0.2 has its own share, until the relay-wide cap of five.
    let mut b = Client::tcp_from(relay.tcp(), "127.0.0.2").await;
    b.hello().await;
    b.subscribe(1, exact(2, &[1])).await;
    b.subscribe(2, exact(2, &[2])).await;
    b.send(&sub_frame(3, exact(2, &[3]))).await;
    refused(b.expect_err().await, 3, "relay holds");

    // The refused connections still route: a publish reaches a1's subscription 1.
    b.publish(envelope(1, &[1])).await;
    assert_eq!(a1.expect_msg().await.envelope, envelope(1, &[1]));

    // a2 goes: its subscription is given back to the address and to the total.
    drop(a2);
    relay
        .wait_log(&["connection's subscriptions given back", "subscriptions=1"])
        .await;
    a1.subscribe(3, exact(1, &[4])).await;
}

/// Review finding: the relay-wide subscription cap was first-come to the end — with the
/// total four times a tenant's cap, four addresses filled it and every other tenant's
/// `Sub` got `Err(too_many_subscriptions)`. The last part of the total is now a reserve
/// (`--subscription-reserve-percent`) for tenants holding at most their share of it
/// (`--subscription-reserve-tenants`): the four fill only the rest, the fourth is refused
/// naming the reserve, and a fifth address still subscribes. Fails without the reserve
/// (the fifth is refused: "the relay holds its limit").
#[tokio::test]
async fn a_few_tenants_cannot_take_the_whole_subscription_total() {
    let relay = BinRelay::start(&[
        "--store",
        "none",
        "--tenant-max-subscriptions",
        "10",
        "--max-total-subscriptions",
        "40",
        "--subscription-reserve-percent",
        "10",
        "--subscription-reserve-tenants",
        "2",
    ]);
    // Common part 36, reserve 4 (a share of 2 for each tenant below it). Four addresses
    // try 10 subscriptions each (their cap).
    let mut clients = Vec::new();
    let mut held = Vec::new();
    for i in 11..=14u8 {
        let mut c = Client::tcp_from(relay.tcp(), &format!("127.0.0.{i}")).await;
        c.hello().await;
        let mut n = 0;
        for id in 0..10u8 {
            c.send(&sub_frame(u64::from(id) + 1, exact(i, &[id]))).await;
            match c.recv().await {
                Frame::SubOk(_) => n += 1,
                Frame::Err(e) => {
                    assert_eq!(e.code, ErrorCode::TooManySubscriptions, "{e:?}");
                    assert!(!e.fatal, "{e:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        held.push(n);
        clients.push(c);
    }
    // A fifth address gets in (up to its share of the reserve).
    let mut fifth = Client::tcp_from(relay.tcp(), "127.0.0.15").await;
    fifth.hello().await;
    fifth.subscribe(1, exact(15, &[1])).await;
    assert_eq!(held, [10, 10, 10, 6], "the four fill only the common part");
    let last = clients.last_mut().unwrap();
    last.send(&sub_frame(11, exact(14, &[11]))).await;
    let e = last.expect_err().await;
    assert!(e.message.contains("kept for tenants"), "{e:?}");
    fifth.subscribe(2, exact(15, &[2])).await;
    fifth.send(&sub_frame(3, exact(15, &[3]))).await;
    let e = fifth.expect_err().await;
    assert!(e.message.contains("kept for tenants"), "{e:?}");
}

/// Deep filters cost the relay a routing-index node per level, so a tenant's subscriptions
/// are also capped by what they may cost (`--tenant-subscription-bytes`, each filter
/// counted 512 + 544 bytes per level): three 32-level filters fit in 60,000 bytes, a fourth
/// does not, shallow ones still do, and a shallow filter cannot be swapped for a deep one
/// past the cap. Fails if depth is not counted (the fourth deep filter would be taken).
#[tokio::test]
async fn deep_filters_are_capped_by_the_memory_they_cost() {
    let relay = BinRelay::start(&["--store", "none", "--tenant-subscription-bytes", "60000"]);
    let deep = |i: u8| exact(1, &[i; 32]);
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    for i in 1..=3 {
        c.subscribe(u64::from(i), deep(i)).await;
    }
    c.send(&sub_frame(4, deep(4))).await;
    let e = c.expect_err().await;
    assert_eq!(e.code, ErrorCode::TooManySubscriptions, "{e:?}");
    assert!(!e.fatal && e.message.contains("memory limit"), "{e:?}");
    c.subscribe(5, exact(1, &[5])).await;
    c.send(&sub_frame(5, deep(5))).await;
    let e = c.expect_err().await;
    assert!(e.message.contains("memory limit"), "{e:?}");
}

/// The relay raises its open-file limit to the hard limit: started with a soft limit of
/// 256 (as a shell or service manager may leave it), 4 addresses at their default cap would
/// have pushed `accept` into EMFILE long before `max_connections`.
#[test]
fn serve_raises_its_open_file_limit_to_the_hard_limit() {
    use std::io::BufRead;
    let limit = |pid: u32| -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files")
            .to_string();
        let mut f = line.split_whitespace().skip(3);
        (f.next().unwrap().to_string(), f.next().unwrap().to_string())
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" serve --tcp 127.0.0.1:0 --store none --ready-file -")
        .arg(env!("CARGO_BIN_EXE_whispeer-relay"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the relay under sh");
    // The ready line: the limit was set before the relay bound anything.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("ready line");
    let (soft, hard) = limit(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("tcp"), "not ready: {line:?}");
    assert_ne!(soft, "256", "the soft limit was left at 256");
    assert_eq!(soft, hard, "raised to the hard limit");
}

/// An admin token configured with a trailing newline (an env file, `$(cat token)` in a unit
/// file) matches the token without it: it never matched, locking the operator out.
#[tokio::test]
async fn an_admin_token_with_a_trailing_newline_still_matches() {
    let relay = BinRelay::start(&["--admin-token", "admin-token-0123456789abcdef\n"]);
    let admin = relay.admin().to_string();
    let full = http_get_auth(&admin, "/status", Some("admin-token-0123456789abcdef"))
        .await
        .unwrap();
    let st: Status = serde_json::from_slice(&full).unwrap();
    assert!(st.detail, "the token was accepted");
}

/// `--workers N` is the number of runtime threads that run connections (the default, one
/// per core, is tokio's); the relay serves with one as with many.
#[tokio::test]
async fn workers_sets_the_runtime_threads_and_one_still_serves() {
    let runtime_threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim() == "tokio-rt-worker")
            .count()
    };
    for n in [1usize, 3] {
        let relay = BinRelay::start(&["--workers", &n.to_string()]);
        assert_eq!(runtime_threads(relay.child.id()), n, "--workers {n}");
        // Serves: a publish reaches a subscriber through it.
        let mut s = Client::tcp(relay.tcp()).await;
        s.hello().await;
        s.send(&sub_frame(1, pattern(7, &[], true))).await;
        assert!(matches!(s.recv().await, Frame::SubOk(_)));
        let mut p = Client::tcp(relay.tcp()).await;
        p.hello().await;
        p.send(&pub_frame(envelope(7, &[1]))).await;
        let m = s.expect_msg().await;
        assert_eq!(m.envelope.token_path().key_id(), &key(7));
    }
}

/// A secret given as a flag (`--admin-token`, `--cluster-password`, `--cluster-token`) is
/// visible to every user of the host (`ps`, `/proc/PID/cmdline`): the relay warns at start,
/// naming the flag and the environment variable to use instead, never the value. Given in
/// that variable, no warning (the client warns alike for `--auth-token`).
#[tokio::test]
async fn secrets_given_as_flags_are_warned_about_at_start() {
    const ADMIN: &str = "admin-secret-0123456789abcdef";
    const NATS: &str = "nats-token-0123456789";
    let mut relay = BinRelay::start_logged(&["--admin-token", ADMIN, "--cluster-token", NATS]);
    let line = relay
        .wait_log(&["WARN", "--admin-token", "WHISPEER_ADMIN_TOKEN"])
        .await;
    assert!(!line.contains(ADMIN), "{line}");
    let line = relay
        .wait_log(&["WARN", "--cluster-token", "WHISPEER_CLUSTER_TOKEN"])
        .await;
    assert!(!line.contains(NATS), "{line}");

    // The admin token from its variable: the start warns about the flag given (the cluster
    // token, logged after the admin token's would be) and nothing before it names the
    // admin token.
    let mut child = bin()
        .args([
            "serve",
            "--ws",
            "off",
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "off",
        ])
        .args(["--store", "none"])
        .args(["--cluster-token", NATS, "--ready-file", "-"])
        .env_remove("RUST_LOG")
        .env("WHISPEER_LOG", "warn")
        .env("WHISPEER_ADMIN_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut before = Vec::new();
    loop {
        let line = rx
            .recv_timeout(TIMEOUT)
            .expect("a warning about --cluster-token");
        if line.contains("--cluster-token") {
            break;
        }
        before.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !before
            .iter()
            .any(|l| l.contains("admin-token") || l.contains(ADMIN)),
        "{before:?}"
    );
}

/// A stranger cannot flood the log at the default filter: 500 rounds of connect, `Hello`
/// naming the client "\x7f" × 1,024 (each char escaped to 6 bytes before the fix: ~6 KB a
/// line), `Welcome`, close — 1,000 connection lines — add less than 64 KiB to the log
/// (about 3 MB before): each client name is cut to 64 chars with U+FFFD for control chars,
/// and past a relay-wide budget the lines are left out and counted. The wait ends once
/// every connection line was written or counted in a "suppressed" summary line.
#[tokio::test]
async fn a_connection_flood_adds_a_bounded_amount_to_the_log() {
    const ROUNDS: u64 = 500;
    let mut relay = BinRelay::start_logged(&["--log", "info"]);
    relay.skip_log();
    let hello = Frame::Hello(Hello {
        versions: vec![whispeer_protocol::frame::PROTOCOL_VERSION],
        features: 0,
        client: Some("\x7f".repeat(1024)),
        auth: None,
        account: None,
    });
    for _ in 0..ROUNDS {
        let mut c = Client::tcp(relay.tcp()).await;
        c.send(&hello).await;
        match c.recv().await {
            Frame::Welcome(_) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
    let log = relay.log.as_mut().expect("logged");
    let (mut bytes, mut written, mut suppressed, mut summaries) = (0usize, 0u64, 0u64, 0);
    let counted = tokio::time::timeout(TIMEOUT, async {
        while written + suppressed < 2 * ROUNDS {
            let line = log.recv().await.expect("the relay's stderr ended");
            bytes += line.len() + 1;
            if line.contains("client connected") || line.contains("client disconnected") {
                written += 1;
            } else if line.contains("connection log lines suppressed") {
                let n = line
                    .split("suppressed=")
                    .nth(1)
                    .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no count in {line:?}"));
                suppressed += n;
                summaries += 1;
            }
        }
    })
    .await;
    eprintln!(
        "log: {bytes} bytes; {written} connection lines written, {suppressed} suppressed in \
         {summaries} summary lines"
    );
    assert!(
        counted.is_ok(),
        "not every connection line written or counted within {TIMEOUT:?}"
    );
    assert!(bytes < 64 * 1024, "the log grew by {bytes} bytes");
    assert!(summaries >= 1 && suppressed > 0);
    assert_eq!(written + suppressed, 2 * ROUNDS);
}

/// Accepts failing for want of file descriptors (`EMFILE`, retried every 50 ms while it
/// lasts) are logged at most once every 10 s, and once when they succeed again: the
/// relay's open-file limit lowered (prlimit) to just what it holds, connections wait in
/// the listen queue unaccepted. The relay's per-failure `trace` line (target
/// `whispeer_relay::accept_failures`, enabled here only) numbers the failures as they
/// happen: until the 20th, the `warn` "accept failed" lines number at most 1 + 20 / 10 —
/// the first, and one per 10 s, which 20 failures 50 ms apart take ~1 s to fill (one line
/// per failure before the fix). Once the connections close an "accepting again after N
/// failures" line counts them all (N ≥ 20) and a client is welcomed.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_accepts_add_a_bounded_number_of_lines_to_the_log() {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    const FAILURES: u64 = 20;
    let mut relay = BinRelay::start_logged(&[
        "--log",
        "info,whispeer_relay::accept_failures=trace",
        "--store",
        "none",
        "--hello-ms",
        "60000",
    ]);
    relay.skip_log();
    // Wholly started: "listening" is logged before the relay starts its light runtime
    // (an epoll, an eventfd and threads: descriptors a limit set too early would deny).
    // A client welcomed and gone (its descriptor closed) says every part is up.
    let mut probe = Client::tcp(relay.tcp()).await;
    probe.hello().await;
    drop(probe);
    relay
        .wait_status("the probe's close", |s| s.sockets == 0)
        .await;
    let pid = relay.child.id();
    // Its descriptors and what they are. Those it opened itself (sockets, epoll, eventfd)
    // come lowest-first; one inherited from whoever runs the tests (CI's own pipes and
    // files, at any number) is not among them and must not set the limit, or thousands of
    // free numbers below it would have to be filled first (CI failed so: per-address caps
    // met before the limit).
    let fds: Vec<(u64, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the relay's descriptors")
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_str()?.parse().ok()?;
            let what = std::fs::read_link(e.path()).ok()?;
            Some((n, what.to_string_lossy().into_owned()))
        })
        .collect();
    let top = fds
        .iter()
        .filter(|(_, what)| what.starts_with("socket:") || what.starts_with("anon_inode:"))
        .map(|(n, _)| *n)
        .max()
        .expect("the relay's sockets");
    // Room for 4 more descriptors above them (those open above the limit stay open): the
    // free numbers below it (`gaps`, at least those 4) are accepted — closing them later
    // is what gives accepts room again — and the 4 connections beyond wait in the listen
    // queue.
    let limit = top + 1 + 4;
    let gaps = limit - fds.iter().filter(|(n, _)| *n < limit).count() as u64;
    prlimit(
        Some(Pid::from_child(&relay.child)),
        Resource::Nofile,
        Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .expect("lower the relay's open-file limit");
    let mut held = Vec::new();
    for _ in 0..gaps + 4 {
        held.push(tokio::net::TcpStream::connect(relay.tcp()).await.unwrap());
    }
    // The log up to the FAILURES-th failed accept: how many "accept failed" lines.
    let log = relay.log.as_mut().expect("logged");
    let (mut failures, mut lines) = (0u64, 0u64);
    tokio::time::timeout(TIMEOUT, async {
        while failures < FAILURES {
            let line = log.recv().await.expect("the relay's stderr ended");
            assert!(
                !line.contains("accepting again"),
                "accepts succeeded: {line}"
            );
            if let Some(rest) = line.split("accept failure ").nth(1) {
                failures = rest
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no count in {line:?}"));
            } else if line.contains("WARN") && line.contains("accept failed") {
                lines += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {failures} failed accepts within {TIMEOUT:?}"));
    eprintln!("{lines} \"accept failed\" lines for {failures} failed accepts");
    assert!(
        (1..=1 + failures / 10).contains(&lines),
        "{lines} \"accept failed\" lines for {failures} failed accepts"
    );
    // The connections close: their descriptors come back, and accepts succeed again.
    drop(held);
    let line = relay.wait_log(&["INFO", "accepting again after"]).await;
    let n: u64 = line
        .split("accepting again after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    assert!(n >= failures, "only {n} failed accepts counted: {line}");
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
}

/// A peer's bytes in a handshake failure's `debug` line are escaped: a QUIC client closes
/// its connection before opening its stream, with a close reason holding a newline, a
/// forged log line and an ANSI colour code; the relay's "connection dropped during
/// handshake" line holds the whole reason, escaped, and no ESC byte. Before, the reason
/// (in quinn's error text as the peer sent it) was written raw: the line ended at the
/// newline and the forged one followed, coloured on a terminal.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_bytes_in_a_handshake_failure_cannot_forge_a_log_line() {
    let (cert, quic) = quic_relay_args(&temp_dir("quic-reason"));
    let mut args: Vec<&str> = quic.iter().map(String::as_str).collect();
    args.extend(["--log", "whispeer_relay=debug", "--store", "none"]);
    let mut relay = BinRelay::start_logged(&args);
    let endpoint = quic_endpoint(&cert, "127.0.0.1");
    let conn = endpoint
        .connect(relay.addrs.quic.expect("quic"), "localhost")
        .unwrap()
        .await
        .unwrap();
    let reason = "bye\n2099-01-01T00:00:00.000000Z  WARN whispeer_relay: forged\x1b[31m";
    conn.close(7u32.into(), reason.as_bytes());
    let line = relay
        .wait_log(&["connection dropped during handshake", "quic"])
        .await;
    assert!(line.contains("forged"), "the reason was cut: {line:?}");
    assert!(!line.contains('\x1b'), "an ESC in the log: {line:?}");
    drop(endpoint);
}
