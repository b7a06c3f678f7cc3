//! Batch signing in the engine (`core::batching::SealJob`): the engine queues prepared
//! publishes, cuts them into seal jobs, and re-orders the results by job id, so frames leave
//! in publish order whatever order the jobs finish in — publish ids, QoS 1 acks and the
//! order a subscriber sees included. Against the real relay binary over real sockets: an
//! engine driven here (so the test decides when each job finishes), and the tokio client on
//! its worker threads and inline.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_chacha::rand_core::SeedableRng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use whispeer::core::batching::{SealDone, SealJob};
use whispeer::core::connection::{
    Engine, EngineConfig, Event, Now, PubOptions, PublishFailure, PublishId, Transmit,
};
use whispeer::core::{self, SealPolicy};
use whispeer::protocol::{BatchPolicy, Frame, Prepared, Qos, Sealer};
use whispeer::{Client, Encryption, Identity, Keyring, PublishOptions, Tcp, Topic, TreeKey};

use support::proxy::KillerProxy;
use support::{keyring_with, start_relay_binary, tree, within, RelayProcess};

/// An engine on a real TCP socket to the relay, driven by the test: transmits are written
/// as they come, frames read by a task, seal jobs left to the test.
struct Wire {
    eng: Engine,
    addr: SocketAddr,
    start: Instant,
    sock: Option<(u64, tokio::net::tcp::OwnedWriteHalf)>,
    rx: Option<mpsc::UnboundedReceiver<Option<Vec<u8>>>>,
    events: Vec<Event>,
}

impl Wire {
    fn now(&self) -> Now {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        Now::new(self.start.elapsed().as_millis() as u64, unix)
    }

    async fn new(addr: SocketAddr, keyring: Keyring, cfg: EngineConfig) -> Wire {
        let start = Instant::now();
        let eng = Engine::new(cfg, Arc::new(RwLock::new(keyring)), [9; 32], Now::new(0, 0));
        let mut w = Wire {
            eng,
            addr,
            start,
            sock: None,
            rx: None,
            events: Vec::new(),
        };
        w.until("connected", |e| {
            e.iter().any(|e| matches!(e, Event::Connected { .. }))
        })
        .await;
        w
    }

    /// Writes, dials and hangs up as the engine says; collects its events.
    async fn turn(&mut self) {
        while let Some(t) = self.eng.poll_transmit() {
            match t {
                Transmit::Frame(b) => {
                    if let Some((_, s)) = &mut self.sock {
                        let _ = s.write_all(&(b.len() as u32).to_be_bytes()).await;
                        let _ = s.write_all(&b).await;
                    }
                }
                Transmit::Dial(id) => {
                    let s = TcpStream::connect(self.addr).await.expect("dial the relay");
                    s.set_nodelay(true).unwrap();
                    let (mut r, w) = s.into_split();
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        loop {
                            let f = support::raw::read_raw(&mut r).await;
                            let end = f.is_none();
                            if tx.send(f).is_err() || end {
                                return;
                            }
                        }
                    });
                    self.sock = Some((id, w));
                    self.rx = Some(rx);
                    let now = self.now();
                    self.eng.handle_connected(id, now);
                }
                Transmit::Hangup(_) => self.sock = None,
            }
        }
        if let Some((_, s)) = &mut self.sock {
            let _ = s.flush().await;
        }
        while let Some(e) = self.eng.poll_event() {
            self.events.push(e);
        }
    }

    /// Drives until `done(events)` holds: reads frames, fires timeouts.
    async fn until(&mut self, what: &str, done: impl Fn(&[Event]) -> bool) {
        within(what, async {
            loop {
                self.turn().await;
                if done(&self.events) {
                    return;
                }
                self.read().await;
            }
        })
        .await
    }

    /// One frame, or the engine's next deadline (`poll_timeout`) if it comes first.
    async fn read(&mut self) {
        let deadline = self
            .eng
            .poll_timeout()
            .map(|ms| tokio::time::Instant::from_std(self.start + Duration::from_millis(ms)));
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let frame = async {
            match &mut self.rx {
                Some(rx) => Some(rx.recv().await),
                None => std::future::pending().await,
            }
        };
        let got = tokio::select! {
            f = frame => f,
            () = timer => None,
        };
        let now = self.now();
        let id = self.sock.as_ref().map_or(0, |s| s.0);
        match got {
            Some(Some(Some(f))) => self.eng.handle_frame(id, &Bytes::from(f), now),
            Some(_) => {
                self.rx = None;
                self.sock = None;
                self.eng.handle_disconnected(id, "closed", now);
            }
            None => self.eng.handle_timeout(now),
        }
    }
}

const TOPICS: [&str; 2] = ["s/a", "s/b"];

/// An engine configuration with small batches (4) and many jobs out at once.
fn cfg() -> EngineConfig {
    let mut c = EngineConfig::default();
    c.batch = BatchPolicy {
        max_messages: 4,
        max_wait_us: 0,
    };
    c.seal_ahead = 64;
    c
}

fn prepare(
    kr: &RwLock<Keyring>,
    topic: &str,
    i: usize,
    rng: &mut rand_chacha::ChaCha20Rng,
) -> Prepared {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    core::prepare_publish_in(
        kr,
        None,
        &SealPolicy::default(),
        &mut Sealer::new(),
        &Topic::new(topic).unwrap(),
        core::OCTETS,
        i.to_string().as_bytes(),
        unix,
        rng,
    )
    .unwrap()
    .0
}

/// A subscriber (the tokio client) on `s/#`.
async fn subscriber(
    relay: &RelayProcess,
    t: &TreeKey,
) -> (Client, whispeer::Subscription<Vec<u8>>) {
    let c = Client::builder()
        .with(Tcp::new(relay.tcp_url()))
        .with(Encryption::with_keyring(keyring_with(t)))
        .with(Identity::generate())
        .connect()
        .await
        .expect("subscriber connects");
    let s = c.subscribe_bytes("s/#").await.unwrap();
    (c, s)
}

/// The next `n` payloads (as numbers) the subscription delivers.
async fn receive(sub: &mut whispeer::Subscription<Vec<u8>>, n: usize) -> Vec<usize> {
    within("the subscriber receives every message", async {
        let mut got = Vec::new();
        while got.len() < n {
            let m = sub.next_message().await.expect("open").expect("a message");
            got.push(String::from_utf8(m.value).unwrap().parse().unwrap());
        }
        got
    })
    .await
}

/// The `Pub` frames among `frames`: their publish ids, in write order.
fn pub_ids(frames: &[Bytes]) -> Vec<Option<[u8; 16]>> {
    frames
        .iter()
        .filter_map(|b| match Frame::decode(b) {
            Ok(Frame::Pub(p)) => Some(p.publish_id),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn scrambled_seal_completion_still_leaves_in_publish_order_with_acks_in_order() {
    let relay = start_relay_binary(&[]);
    let t = tree("seal-order");
    let (_sc, mut sub) = subscriber(&relay, &t).await;
    let mut w = Wire::new(relay.tcp, keyring_with(&t), cfg()).await;
    let kr = w.eng.core().keyring().clone();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let now = w.now();
    // 40 publishes, every third at least once, on two topics; a flush after the 20th.
    let mut pids: Vec<PublishId> = Vec::new();
    let mut weights = 0;
    let mut flush = None;
    for i in 0..40 {
        let p = prepare(&kr, TOPICS[i % 2], i, &mut rng);
        weights += core::batching::prepared_weight(&p);
        let o = if i % 3 == 0 {
            PubOptions::new().qos(Qos::AtLeastOnce)
        } else {
            PubOptions::new()
        };
        if let Some(pid) = w.eng.publish_prepared(p, o, now).unwrap() {
            pids.push(pid);
        }
        if i == 19 {
            flush = Some(w.eng.flush(now));
        }
    }
    // The unsealed publishes count as queued (backpressure), and the QoS 1 ones as being
    // sealed — not yet as unacknowledged: none is kept (nor saved) yet.
    assert_eq!(w.eng.sealing_bytes(), weights);
    assert!(w.eng.queued_bytes() >= weights);
    assert_eq!(w.eng.stats().sealing_publishes, pids.len() as u64);
    assert_eq!(w.eng.stats().unacked_publishes, 0);
    assert!(
        w.eng.poll_kept().is_none(),
        "nothing kept before its seal job"
    );
    let mut jobs: Vec<SealJob> = Vec::new();
    while let Some(j) = w.eng.poll_seal_job(now) {
        jobs.push(j);
    }
    assert_eq!(jobs.len(), 10, "batches of at most 4");
    assert!(jobs.iter().all(|j| j.len() <= 4));
    let signer = Identity::generate();
    let mut sealer = Sealer::new();
    let mut done: Vec<SealDone> = jobs
        .into_iter()
        .map(|j| j.run(&signer, &mut sealer, &mut rng))
        .collect();
    // Finishing backwards, the first job last: nothing may leave before it.
    done.reverse();
    let mut written: Vec<Bytes> = Vec::new();
    // What a driver with persistence saves, each before the next `poll_transmit`.
    let mut saved: Vec<(PublishId, Bytes)> = Vec::new();
    let n = done.len();
    for (k, d) in done.into_iter().enumerate() {
        w.eng.handle_sealed(d, w.now());
        loop {
            while let Some((pid, _, frame)) = w.eng.poll_kept() {
                saved.push((pid, frame));
            }
            let Some(t) = w.eng.poll_transmit() else {
                break;
            };
            if let Transmit::Frame(b) = t {
                if matches!(Frame::decode(&b), Ok(Frame::Pub(_))) {
                    if let Some(id) = pub_ids(std::slice::from_ref(&b))[0] {
                        // A kept publish's frame leaves only after it was reported.
                        assert!(
                            saved.iter().any(|(p, f)| p.0 == id && *f == b),
                            "a kept publish's frame left before poll_kept reported it"
                        );
                    }
                }
                if let Some((_, s)) = &mut w.sock {
                    s.write_all(&(b.len() as u32).to_be_bytes()).await.unwrap();
                    s.write_all(&b).await.unwrap();
                }
                written.push(b);
            }
        }
        if k + 1 < n {
            assert!(
                pub_ids(&written).is_empty(),
                "nothing leaves before job 0 answered"
            );
            assert_eq!(w.eng.sealing_bytes(), weights);
            assert!(saved.is_empty(), "nothing kept before job 0 answered");
        }
    }
    assert_eq!(w.eng.sealing_bytes(), 0);
    assert_eq!(
        saved.iter().map(|s| s.0).collect::<Vec<_>>(),
        pids,
        "every kept publish reported once, in publish order"
    );
    assert_eq!(w.eng.stats().sealing_publishes, 0);
    assert_eq!(w.eng.stats().unacked_publishes, pids.len() as u64);
    let ids = pub_ids(&written);
    assert_eq!(ids.len(), 40);
    let sent: Vec<[u8; 16]> = ids.into_iter().flatten().collect();
    assert_eq!(
        sent,
        pids.iter().map(|p| p.0).collect::<Vec<_>>(),
        "publish ids in order"
    );
    // The flush's Ping leaves after the 20th Pub.
    let ping_at = written
        .iter()
        .filter(|b| matches!(Frame::decode(b), Ok(Frame::Pub(_)) | Ok(Frame::Ping(_))))
        .position(|b| matches!(Frame::decode(b), Ok(Frame::Ping(_))))
        .expect("the flush's ping");
    assert_eq!(ping_at, 20);
    let want = pids.len();
    w.until("every PubAck", |e| {
        e.iter()
            .filter(|e| matches!(e, Event::PubAck { .. }))
            .count()
            == want
    })
    .await;
    let acks: Vec<(PublishId, u64)> = w
        .events
        .iter()
        .filter_map(|e| match e {
            Event::PubAck { pid, seq } => Some((*pid, *seq)),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks.iter().map(|a| a.0).collect::<Vec<_>>(),
        pids,
        "acks in publish order"
    );
    assert!(
        acks.windows(2).all(|a| a[0].1 < a[1].1),
        "relay sequences increase: {acks:?}"
    );
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, Event::Flushed { id } if Some(*id) == flush)));
    assert_eq!(receive(&mut sub, 40).await, (0..40).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_seal_failure_fails_that_publish_and_the_rest_go_on() {
    let relay = start_relay_binary(&[]);
    let t = tree("seal-fail");
    let (_sc, mut sub) = subscriber(&relay, &t).await;
    let mut w = Wire::new(relay.tcp, keyring_with(&t), cfg()).await;
    let kr = w.eng.core().keyring().clone();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
    let now = w.now();
    let mut pids = Vec::new();
    for i in 0..8 {
        let p = prepare(&kr, "s/a", i, &mut rng);
        let o = PubOptions::new().qos(Qos::AtLeastOnce);
        pids.push(w.eng.publish_prepared(p, o, now).unwrap().unwrap());
    }
    let a = w.eng.poll_seal_job(now).unwrap();
    let b = w.eng.poll_seal_job(now).unwrap();
    assert!(w.eng.poll_seal_job(now).is_none());
    let signer = Identity::generate();
    // The first batch's runner fails; the second seals.
    let db = b.run(&signer, &mut Sealer::new(), &mut rng);
    w.eng.handle_sealed(db, now);
    w.eng
        .handle_sealed(a.fail(whispeer::protocol::SealError::BatchEmpty), now);
    w.until("four PubAcks", |e| {
        e.iter()
            .filter(|e| matches!(e, Event::PubAck { .. }))
            .count()
            == 4
    })
    .await;
    let failed: Vec<PublishId> = w
        .events
        .iter()
        .filter_map(|e| match e {
            Event::PublishFailed {
                pid,
                reason: PublishFailure::Seal(_),
            } => Some(*pid),
            _ => None,
        })
        .collect();
    assert_eq!(failed, pids[..4], "the first four fail, typed");
    assert_eq!(w.eng.stats().seal_failures, 4);
    assert_eq!(w.eng.stats().unacked_publishes, 0);
    assert_eq!(receive(&mut sub, 4).await, vec![4, 5, 6, 7]);
}

/// However many messages a batch may hold, a seal job takes at most `BATCH_MAX_BYTES` of
/// publishes (a batch is sealed whole before its first frame leaves): 300 KiB messages go
/// three to a job under a 256-message cap, and all of them arrive, in order.
#[tokio::test]
async fn a_seal_job_holds_at_most_batch_max_bytes_of_publishes() {
    use whispeer::core::connection::BATCH_MAX_BYTES;
    let relay = start_relay_binary(&[]);
    let t = tree("seal-bytes");
    let (_sc, mut sub) = subscriber(&relay, &t).await;
    let mut c = cfg();
    c.batch.max_messages = 256;
    let mut w = Wire::new(relay.tcp, keyring_with(&t), c).await;
    let kr = w.eng.core().keyring().clone();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
    let now = w.now();
    let unix = now.unix_ms;
    const SIZE: usize = 300 * 1024;
    for i in 0..7 {
        // The number, zero-padded to 300 KiB (it still parses as the number).
        let n = i.to_string();
        let payload = "0".repeat(SIZE - n.len()) + &n;
        let p = core::prepare_publish_in(
            &kr,
            None,
            // Uncompressed: the zeros would shrink to nothing.
            &SealPolicy::new(
                whispeer::protocol::SealOptions {
                    compression: whispeer::Compression::none().into_inner(),
                    ..Default::default()
                },
                true,
            ),
            &mut Sealer::new(),
            &Topic::new("s/big").unwrap(),
            core::OCTETS,
            payload.as_bytes(),
            unix,
            &mut rng,
        )
        .unwrap()
        .0;
        w.eng.publish_prepared(p, PubOptions::new(), now).unwrap();
    }
    let mut jobs = Vec::new();
    while let Some(j) = w.eng.poll_seal_job(now) {
        jobs.push(j);
    }
    let sizes: Vec<usize> = jobs.iter().map(|j| j.len()).collect();
    assert_eq!(sizes, [3, 3, 1], "jobs of at most {BATCH_MAX_BYTES} bytes");
    let signer = Identity::generate();
    for j in jobs {
        let d = j.run(&signer, &mut Sealer::new(), &mut rng);
        w.eng.handle_sealed(d, now);
    }
    w.turn().await;
    assert_eq!(receive(&mut sub, 7).await, (0..7).collect::<Vec<_>>());
}

#[tokio::test]
async fn close_waits_for_the_seal_jobs_before_it() {
    let relay = start_relay_binary(&[]);
    let t = tree("seal-close");
    let (_sc, mut sub) = subscriber(&relay, &t).await;
    let mut w = Wire::new(relay.tcp, keyring_with(&t), cfg()).await;
    let kr = w.eng.core().keyring().clone();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    let now = w.now();
    for i in 0..6 {
        let p = prepare(&kr, "s/a", i, &mut rng);
        w.eng.publish_prepared(p, PubOptions::new(), now).unwrap();
    }
    w.eng.close(now);
    assert!(!w.eng.is_closed(), "waits for its seal jobs");
    assert!(matches!(
        w.eng
            .publish_prepared(prepare(&kr, "s/a", 9, &mut rng), PubOptions::new(), now),
        Err(whispeer::PublishError::Closed)
    ));
    let signer = Identity::generate();
    let mut jobs = Vec::new();
    while let Some(j) = w.eng.poll_seal_job(now) {
        jobs.push(j);
    }
    for j in jobs.into_iter().rev() {
        let d = j.run(&signer, &mut Sealer::new(), &mut rng);
        w.eng.handle_sealed(d, now);
    }
    w.until("closed", |e| e.iter().any(|e| matches!(e, Event::Closed)))
        .await;
    assert_eq!(receive(&mut sub, 6).await, (0..6).collect::<Vec<_>>());
}

/// Polls every future once in order (so they queue their publishes in that order), then
/// until all are done; their outputs in that order.
async fn all_in_order<T>(
    mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) -> Vec<T> {
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

/// The tokio client, `seal_jobs` seal jobs on the worker threads (0: inline), publishing
/// `n` at-least-once messages at once: acks come back in publish order, the subscriber
/// sees publish order.
async fn qos1_in_order(
    seal_jobs: usize,
    through: Option<&KillerProxy>,
    relay: &RelayProcess,
    n: usize,
) {
    let t = tree("seal-client");
    let (_sc, mut sub) = subscriber(relay, &t).await;
    let addr = through.map_or(relay.tcp, |p| p.addr);
    let c = Client::builder()
        .with(Tcp::new(format!("tcp://{addr}")))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(Identity::generate())
        .seal_jobs(seal_jobs)
        .connect()
        .await
        .expect("publisher connects");
    let payloads: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let futs = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = &c;
            Box::pin(async move {
                c.publish_bytes_with(
                    TOPICS[i % 2],
                    core::OCTETS,
                    p.as_bytes(),
                    PublishOptions::at_least_once(),
                )
                .await
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>>
        })
        .collect();
    let publishing = all_in_order(futs);
    let seqs = match through {
        None => within("every publish acknowledged", publishing).await,
        Some(p) => {
            // Cut the link while publishes are in flight (sealed, written, not all acked).
            tokio::pin!(publishing);
            let cut = async {
                let n = n as u64;
                support::until_stats(&c, "some acknowledged, some in flight", |s| {
                    s.unacked_publishes > 0 && s.unacked_publishes < n
                })
                .await;
                p.cut_all();
                std::future::pending::<()>().await
            };
            within("every publish acknowledged across the cut", async {
                tokio::select! {
                    r = &mut publishing => r,
                    () = cut => unreachable!(),
                }
            })
            .await
        }
    };
    let seqs: Vec<u64> = seqs
        .into_iter()
        .map(|r: Result<u64, whispeer::PublishError>| r.expect("acknowledged"))
        .collect();
    if through.is_none() {
        assert!(
            seqs.windows(2).all(|s| s[0] < s[1]),
            "acks in publish order: {seqs:?}"
        );
        assert_eq!(receive(&mut sub, n).await, (0..n).collect::<Vec<_>>());
    } else {
        // Nothing acknowledged is lost (a re-send after the cut may come twice).
        let got = receive_distinct(&mut sub, n).await;
        assert_eq!(got, (0..n).collect());
    }
    assert_eq!(c.stats().seal_failures, 0);
    assert_eq!(c.queued_bytes(), 0, "the backlog drains, sealed or not");
    c.close().await;
}

async fn receive_distinct(
    sub: &mut whispeer::Subscription<Vec<u8>>,
    n: usize,
) -> std::collections::BTreeSet<usize> {
    within(
        "the subscriber receives every acknowledged message",
        async {
            let mut got = std::collections::BTreeSet::new();
            while got.len() < n {
                let m = sub.next_message().await.expect("open").expect("a message");
                got.insert(String::from_utf8(m.value).unwrap().parse().unwrap());
            }
            got
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_acks_and_delivery_in_publish_order_on_the_worker_threads() {
    let relay = start_relay_binary(&[]);
    qos1_in_order(2, None, &relay, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_sealing_keeps_publish_order_too() {
    let relay = start_relay_binary(&[]);
    qos1_in_order(0, None, &relay, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_mid_flight_loses_nothing_acknowledged() {
    let relay = start_relay_binary(&[]);
    let proxy = KillerProxy::start(relay.tcp).await;
    qos1_in_order(2, Some(&proxy), &relay, 400).await;
}

/// With `Persistence`, a batch-signed QoS ≥ 1 publish is in the saved outbox before it
/// counts as unacknowledged and before any of its frame leaves the process — on the worker
/// threads and sealing inline. The test holds the state file's write lock (the client's
/// save then waits in SQLite's busy handler), so while it holds it the relay must not see
/// the publish nor the stats count it; once released, the publish goes out.
#[cfg(feature = "persistence")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_publish_is_saved_before_it_counts_or_leaves() {
    let relay = start_relay_binary(&[]);
    let dir = tempfile::tempdir().unwrap();
    for seal_jobs in [4, 0] {
        let t = tree(&format!("seal-persist-{seal_jobs}"));
        let (_sc, mut sub) = subscriber(&relay, &t).await;
        let state = dir.path().join(format!("state-{seal_jobs}.db"));
        let c = Client::builder()
            .with(Tcp::new(relay.tcp_url()))
            .with(Encryption::with_keyring(keyring_with(&t)))
            .with(Identity::generate())
            .with(whispeer::Persistence::sqlite(&state))
            .seal_jobs(seal_jobs)
            .connect()
            .await
            .expect("publisher connects");
        let publish = |i: usize| {
            let c = c.clone();
            async move {
                c.publish_bytes_with(
                    "s/a",
                    core::OCTETS,
                    i.to_string().as_bytes(),
                    PublishOptions::at_least_once(),
                )
                .await
            }
        };
        within("a first publish", publish(0)).await.unwrap();
        assert_eq!(receive(&mut sub, 1).await, vec![0]);

        let db = rusqlite::Connection::open(&state).unwrap();
        db.execute_batch("BEGIN IMMEDIATE").unwrap();
        let pending = tokio::spawn(publish(1));
        let early = tokio::time::timeout(Duration::from_millis(400), sub.next_message()).await;
        assert!(
            early.is_err(),
            "seal_jobs {seal_jobs}: the publish left before it was saved"
        );
        let s = c.stats();
        assert_eq!(
            s.unacked_publishes, 0,
            "seal_jobs {seal_jobs}: counted as unacknowledged before it was saved"
        );
        assert!(s.sealing_publishes <= 1, "{s:?}");
        db.execute_batch("COMMIT").unwrap();
        assert_eq!(receive(&mut sub, 1).await, vec![1]);
        within("acknowledged", pending).await.unwrap().unwrap();
        let rows: i64 = db
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "acknowledged: no longer saved");
        c.close().await;
    }
}
