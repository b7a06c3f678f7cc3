//! Publish/subscribe over every transport, across transports, and in process.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use whispeer_protocol::frame::{pub_flags, Ping, Pub, Unsub};
use whispeer_protocol::{ErrorCode, Frame, Qos};
use whispeer_relay::config::ListenAddr;
use whispeer_relay::Config;

#[tokio::test]
async fn ws_pubsub() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut sub = subscriber_ws(relay.ws(), exact(1, &[1, 2])).await;
    let mut publ = Client::ws(relay.ws()).await;
    publ.hello().await;
    let env = envelope(1, &[1, 2]);
    publ.publish(env.clone()).await;
    let msg = sub.expect_msg().await;
    assert_eq!(msg.envelope, env);
    assert!(msg.seq > 0);
}

#[tokio::test]
async fn tcp_pubsub_with_pub_ack_and_increasing_sequences() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut sub = subscriber_tcp(relay.tcp(), exact(1, &[1])).await;
    let mut publ = Client::tcp(relay.tcp()).await;
    publ.hello().await;
    let mut last = 0;
    for i in 0..20u8 {
        let env = envelope_sized(1, &[1], 16 + i as usize);
        publ.send(&Frame::Pub(Pub {
            envelope: env.clone(),
            flags: pub_flags::ACK,
            publish_id: Some([i; 16]),
            qos: Qos::AtMostOnce,
        }))
        .await;
        let ack = match publ.recv().await {
            Frame::PubAck(a) => a,
            other => panic!("expected PubAck, got {other:?}"),
        };
        assert_eq!(ack.publish_id, [i; 16]);
        let msg = sub.expect_msg().await;
        assert_eq!(msg.envelope, env);
        assert_eq!(msg.seq, ack.seq);
        assert!(msg.seq > last, "sequence numbers strictly increase");
        last = msg.seq;
    }
}

#[tokio::test]
async fn ws_and_tcp_clients_see_each_other() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut ws = subscriber_ws(relay.ws(), exact(3, &[9])).await;
    let mut tcp = subscriber_tcp(relay.tcp(), exact(3, &[9])).await;
    let a = envelope_sized(3, &[9], 100);
    ws.publish(a.clone()).await;
    assert_eq!(tcp.expect_msg().await.envelope, a);
    assert_eq!(
        ws.expect_msg().await.envelope,
        a,
        "publishers receive their own messages"
    );
    let b = envelope_sized(3, &[9], 200);
    tcp.publish(b.clone()).await;
    assert_eq!(ws.expect_msg().await.envelope, b);
    assert_eq!(tcp.expect_msg().await.envelope, b);
}

#[tokio::test]
async fn one_encoded_msg_frame_for_every_subscriber_and_once_per_connection() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut a = Client::tcp(relay.tcp()).await;
    a.hello().await;
    // Three overlapping subscriptions on one connection: the message arrives once.
    a.subscribe(1, exact(4, &[1, 2])).await;
    a.subscribe(2, pattern(4, &[Some(1)], true)).await;
    a.subscribe(3, pattern(4, &[None, None], false)).await;
    let mut b = subscriber_ws(relay.ws(), pattern(4, &[], true)).await;
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    p.publish(envelope(4, &[1, 2])).await;
    // A marker on a path only subscription 2 and b match: it must be the next frame.
    let marker = envelope(4, &[1, 3]);
    p.publish(marker.clone()).await;
    let fa = a.recv_bytes().await;
    let fb = b.recv_bytes().await;
    assert_eq!(fa, fb, "byte-identical Msg frames for all subscribers");
    assert_eq!(
        a.expect_msg().await.envelope,
        marker,
        "no duplicate delivery"
    );
    assert_eq!(b.expect_msg().await.envelope, marker);
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_unknown_unsub_is_a_typed_error() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut s = Client::tcp(relay.tcp()).await;
    s.hello().await;
    s.subscribe(1, exact(5, &[1])).await;
    s.subscribe(2, exact(5, &[2])).await;
    s.send(&Frame::Unsub(Unsub {
        sub_id: 1,
        delete: None,
    }))
    .await;
    s.send(&Frame::Unsub(Unsub {
        sub_id: 77,
        delete: None,
    }))
    .await;
    let e = s.expect_err().await;
    assert_eq!(e.code, ErrorCode::UnknownSubscription);
    assert!(!e.fatal);
    assert_eq!(e.sub_id, Some(77));
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    p.publish(envelope(5, &[1])).await;
    let marker = envelope(5, &[2]);
    p.publish(marker.clone()).await;
    assert_eq!(s.expect_msg().await.envelope, marker);
}

#[tokio::test]
async fn ping_pong_and_sub_ok_sequence() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut c = Client::ws(relay.ws()).await;
    let w = c.hello().await;
    assert_eq!(w.version, 2);
    assert_eq!(w.max_frame, Config::default().limits.max_frame as u64);
    assert_eq!(w.heartbeat_ms, Config::default().timeouts.heartbeat_ms);
    c.send(&Frame::Ping(Ping { nonce: 42 })).await;
    assert!(matches!(c.recv().await, Frame::Pong(p) if p.nonce == 42));
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    p.send(&Frame::Pub(Pub {
        envelope: envelope(6, &[1]),
        flags: pub_flags::ACK,
        publish_id: Some([1; 16]),
        qos: Qos::AtMostOnce,
    }))
    .await;
    let Frame::PubAck(ack) = p.recv().await else {
        panic!("PubAck expected")
    };
    let ok = c.subscribe(1, exact(6, &[1])).await;
    assert_eq!(ok.seq, ack.seq, "SubOk carries the last assigned sequence");
}

#[tokio::test]
async fn in_process_connection_reaches_socket_clients() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let (tx, mut rx) = relay.handle.connect_in_process();
    tx.send(hello_frame().to_bytes()).await.unwrap();
    let welcome = Frame::decode(&rx.recv().await.unwrap()).unwrap();
    assert!(matches!(welcome, Frame::Welcome(_)));
    tx.send(sub_frame(1, exact(7, &[1])).to_bytes())
        .await
        .unwrap();
    assert!(matches!(
        Frame::decode(&rx.recv().await.unwrap()).unwrap(),
        Frame::SubOk(_)
    ));
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    let env = envelope(7, &[1]);
    p.publish(env.clone()).await;
    match Frame::decode(&rx.recv().await.unwrap()).unwrap() {
        Frame::Msg(m) => assert_eq!(m.envelope, env),
        other => panic!("expected Msg, got {other:?}"),
    }
    // And the other way round.
    let mut s = subscriber_tcp(relay.tcp(), exact(7, &[2])).await;
    let env2 = envelope(7, &[2]);
    tx.send(pub_frame(env2.clone()).to_bytes()).await.unwrap();
    assert_eq!(s.expect_msg().await.envelope, env2);
}

#[tokio::test]
async fn embedded_relay_without_sockets() {
    let relay = whispeer_relay::Relay::builder(Config::ephemeral())
        .build()
        .unwrap();
    let h = relay.handle();
    let (a_tx, mut a_rx) = h.connect_in_process();
    let (b_tx, mut b_rx) = h.connect_in_process();
    for tx in [&a_tx, &b_tx] {
        tx.send(hello_frame().to_bytes()).await.unwrap();
    }
    a_rx.recv().await.unwrap();
    b_rx.recv().await.unwrap();
    a_tx.send(sub_frame(1, pattern(8, &[], true)).to_bytes())
        .await
        .unwrap();
    a_rx.recv().await.unwrap();
    let env = envelope(8, &[1, 2, 3]);
    b_tx.send(pub_frame(env.clone()).to_bytes()).await.unwrap();
    let got = Frame::decode(&a_rx.recv().await.unwrap()).unwrap();
    assert!(matches!(got, Frame::Msg(m) if m.envelope == env));
}

struct Tls {
    connector: tokio_rustls::TlsConnector,
    dir: std::path::PathBuf,
}

fn tls_material() -> Tls {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = temp_dir("tls");
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ck.cert.pem().as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Tls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        dir,
    }
}

#[tokio::test]
async fn tls_and_wss_pubsub() {
    let tls = tls_material();
    let mut config = Config::ephemeral();
    config.listen.tls = "127.0.0.1:0".parse::<ListenAddr>().unwrap();
    config.listen.wss = "127.0.0.1:0".parse::<ListenAddr>().unwrap();
    config.tls.cert = Some(tls.dir.join("cert.pem"));
    config.tls.key = Some(tls.dir.join("key.pem"));
    let relay = TestRelay::start(config).await;
    let name = ServerName::try_from("localhost").unwrap();

    let tcp = tokio::net::TcpStream::connect(relay.addrs.tls.unwrap())
        .await
        .unwrap();
    let stream = tls.connector.connect(name.clone(), tcp).await.unwrap();
    let mut over_tls = Client::over_stream(Box::new(stream));
    over_tls.hello().await;
    over_tls.subscribe(1, exact(9, &[1])).await;

    let wss_addr = relay.addrs.wss.unwrap();
    let tcp = tokio::net::TcpStream::connect(wss_addr).await.unwrap();
    let stream = tls.connector.connect(name, tcp).await.unwrap();
    let mut over_wss = Client::ws_over(
        Box::new(stream),
        &format!("wss://localhost:{}/", wss_addr.port()),
    )
    .await;
    over_wss.hello().await;
    over_wss.subscribe(1, exact(9, &[1])).await;

    let mut plain = Client::tcp(relay.tcp()).await;
    plain.hello().await;
    let env = envelope(9, &[1]);
    plain.publish(env.clone()).await;
    assert_eq!(over_tls.expect_msg().await.envelope, env);
    assert_eq!(over_wss.expect_msg().await.envelope, env);
    let env2 = envelope_sized(9, &[1], 300);
    over_wss.publish(env2.clone()).await;
    assert_eq!(over_tls.expect_msg().await.envelope, env2);
    let _ = std::fs::remove_dir_all(&tls.dir);
}

#[tokio::test]
async fn in_process_frames_are_checked_like_socket_frames() {
    let relay = whispeer_relay::Relay::builder(Config::ephemeral())
        .build()
        .unwrap();
    let (tx, mut rx) = relay.handle().connect_in_process();
    tx.send(Bytes::from_static(&[0xff, 0x00])).await.unwrap();
    let f = Frame::decode(&rx.recv().await.unwrap()).unwrap();
    assert!(matches!(f, Frame::Err(e) if e.fatal && e.code == ErrorCode::Malformed));
    assert!(
        rx.recv().await.is_none(),
        "connection closed after a fatal error"
    );
}
