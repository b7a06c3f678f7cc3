//! Deterministic scenarios of the sans-IO connection engine alone: no sockets, no tokio, no
//! clock. A scripted relay feeds real `whispeer-protocol` frames, time moves only by hand
//! (`Step::Timeout` jumps to `poll_timeout()`, like quinn-proto's `Pair::step`), and the
//! keyring and the engine's seed are fixed.
//!
//! Each scenario is data: a list of [`Step`]s (commands, relay frames, expectations) run by
//! [`Sim`]. The same lists are meant to drive the JS engine and, with timing relaxed, both
//! drivers against the real relay (ENGINE.md §4, "one scenario suite, two drivers"). Every
//! scenario also runs twice and must produce the same trace (determinism).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rand_chacha::rand_core::SeedableRng;
use whispeer::core::connection::{
    AccountAuth, AckToken, Backoff, ConnId, Disconnect, Engine, EngineConfig, Event, Now,
    PubOptions, PublishFailure, PublishId, SeededRng, SubscribeFailure, Transmit,
};
use whispeer::core::{self, SealPolicy, SubscribeOptions};
use whispeer::protocol::frame::{self, msg_flags, ErrFrame, Gap, Msg, Ping};
use whispeer::protocol::{Envelope, ErrorCode, Frame, Qos, Sealer, TopicFilter};
use whispeer::{Identity, Keyring, Replay, Topic, TreeKey};

const T0_MONO: u64 = 1_000;
const T0_UNIX: u64 = 1_800_000_000_000;
const SESSION: [u8; 16] = [0x5e; 16];

/// How the test driver treats `Placeholder` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholders {
    /// Acked as soon as they come out (the driver does not pass them through a channel).
    AckAtOnce,
    /// Queued with the subscription's messages; `Take` skips (and acks) them first.
    InChannel,
}

/// A frame or action the engine hands the driver.
#[derive(Debug, Clone, PartialEq)]
enum Tx {
    Dial,
    Hangup,
    Hello {
        account: bool,
    },
    Auth,
    /// A `Sub` of local subscription `sub` (its newest relay id), with its resume options.
    Sub {
        sub: u64,
        replay: Option<Replay>,
        retained: bool,
        durable: Option<&'static str>,
    },
    Unsub,
    /// A `Pub` of the named publish (same publish id as when it was first published).
    Pub(&'static str),
    Ack(Vec<u64>),
    Ping(u64),
    Pong(u64),
    Close,
}

/// What a `Disconnected` event must say.
#[derive(Debug, Clone, PartialEq)]
enum Why {
    Transport,
    Timeout,
    Rejected,
    Handshake,
    Fatal,
    RelayClosed,
    Heartbeat,
    BadFrame,
}

/// An event the app must see.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Connected,
    /// `retry: Some(attempt)`: a retry is scheduled within the backoff bounds of that
    /// attempt; `None`: the engine gave up.
    Disconnected {
        why: Why,
        retry: Option<u32>,
    },
    Closed,
    Message {
        sub: u64,
        msg: &'static str,
    },
    Placeholder {
        sub: u64,
    },
    Gap {
        dropped: u64,
        subs: Vec<u64>,
    },
    Dropped {
        sub: u64,
        n: u64,
    },
    ReplayDone {
        sub: u64,
        seq: u64,
    },
    SubscribeOk(u64),
    SubscribeErrRejected(u64),
    SubscribeErrClosed(u64),
    PubAck {
        publish: &'static str,
        seq: u64,
    },
    PublishFailed {
        publish: &'static str,
        reason: Fail,
    },
    Flushed(&'static str),
    /// The answer to the durable deletion whose flush is named: `refused` when the relay
    /// refused it.
    DurableDeleted {
        flush: &'static str,
        refused: bool,
    },
    FlushFailed(&'static str),
    RelayError(ErrorCode),
    PublishRefused(ErrorCode),
}

#[derive(Debug, Clone, PartialEq)]
enum Fail {
    Rejected,
    NotAcknowledged,
    Closed,
}

/// One step of a scenario.
#[derive(Debug, Clone)]
enum Step {
    /// Dial, open the socket, handshake (`Hello` → `Welcome`), `Connected`.
    Connect {
        heartbeat_ms: u64,
    },
    /// Expect a `Dial` and open the socket (no `Welcome` yet).
    Dialed,
    /// After a drop: jump to the retry, dial, `Hello`, `Welcome` (before the re-sent
    /// subscriptions and publishes are checked, and before `Connected`).
    Redial,
    /// Expect a `Dial` and report that it failed.
    DialFails,
    /// The relay: `Welcome`.
    Welcome {
        heartbeat_ms: u64,
    },
    /// The relay: `Challenge` with this nonce.
    Challenge([u8; 32]),
    /// The app subscribes local subscription `id`.
    Subscribe {
        id: u64,
        filter: &'static str,
        opts: SubscribeOptions,
    },
    Unsubscribe(u64),
    /// The relay confirms every relay subscription of `id` (`SubOk{seq}`).
    SubOk {
        id: u64,
        seq: u64,
    },
    /// The relay confirms every relay subscription of `id` and says history follows
    /// (`SubOk{seq, history: true}`): it holds back their live messages until `ReplayDone`.
    SubOkHistory {
        id: u64,
        seq: u64,
    },
    /// The relay ends the history of (the newest relay subscription of) `id`.
    ReplayDone {
        id: u64,
        seq: u64,
    },
    /// The relay refuses the newest relay subscription of `id`.
    SubRefused {
        id: u64,
    },
    /// Seal a message on `topic` (by the writer of the fixture keyring) under `name`.
    Seal {
        name: &'static str,
        topic: &'static str,
    },
    /// A copy of `from` whose ciphertext was tampered with (routes, never opens).
    Tamper {
        name: &'static str,
        from: &'static str,
    },
    /// The relay delivers the named message.
    Deliver {
        msg: &'static str,
        seq: u64,
        flags: u64,
    },
    /// The relay delivers the named message as history of (the newest relay subscription
    /// of) `id` (`Msg.sub_id`).
    DeliverHistory {
        msg: &'static str,
        seq: u64,
        flags: u64,
        id: u64,
    },
    /// The relay delivers the named live message for a neighbour, naming (the newest relay
    /// subscriptions of) `paused` as paused (`Msg.paused`).
    DeliverPaused {
        msg: &'static str,
        seq: u64,
        paused: Vec<u64>,
    },
    /// The relay: a `Gap` of `dropped` naming (the newest relay subscription of) `id`.
    GapNaming {
        id: u64,
        dropped: u64,
    },
    /// The app publishes a fresh message on `topic` as `name`.
    Publish {
        name: &'static str,
        topic: &'static str,
        qos: Qos,
        ack: bool,
    },
    /// The relay acknowledges the named publish (`None`: an id nobody used).
    PubAck {
        publish: Option<&'static str>,
        seq: u64,
    },
    /// The relay refuses the named publish.
    PubRefused {
        publish: &'static str,
        code: ErrorCode,
    },
    /// The relay: any frame.
    Relay(Frame),
    /// The relay: these bytes (not a frame).
    RelayBytes(&'static [u8]),
    /// The relay answers flush `name`.
    Pong(&'static str),
    /// The driver reports the socket gone.
    Drop,
    /// Move the clock to the next deadline and fire it.
    Timeout,
    /// Move the clock forward without firing anything.
    Advance(u64),
    /// The app takes the next delivered item of `sub` (placeholders first, when in channel).
    Take(u64),
    /// The app asks for a flush named `name`.
    Flush(&'static str),
    /// The app deletes durable subscription `id`; `flush` names the flush that follows.
    DeleteDurable {
        id: u64,
        flush: &'static str,
    },
    /// The app closes.
    Close,
    /// Keys changed.
    RefreshKeys,
    ExpectTx(Tx),
    ExpectNoTx,
    ExpectEvent(Ev),
    ExpectNoEvent,
    /// The next deadline is `ms` after now (`None`: no deadline).
    ExpectTimeoutIn(Option<u64>),
    ExpectStat(Stat, u64),
}

#[derive(Debug, Clone, Copy)]
enum Stat {
    SlowSubscriberDrops,
    RelayGaps,
    Duplicates,
    Rejected,
    HeldBack,
    NamedPaused,
    Reconnects,
    UnackedPublishes,
    OutboxDrops,
    PublishRetries,
    PublishRefusals,
}

/// The engine, a fake clock, a scripted relay and the app's side, in one.
struct Sim {
    eng: Engine,
    now: Now,
    cfg_backoff: Backoff,
    placeholders: Placeholders,
    /// The socket the driver has open or is dialing.
    conn: Option<ConnId>,
    tx: VecDeque<Transmit>,
    events: VecDeque<Event>,
    writer: Arc<RwLock<Keyring>>,
    identity: Identity,
    rng: rand_chacha::ChaCha20Rng,
    msgs: BTreeMap<&'static str, Envelope>,
    pubs: BTreeMap<&'static str, Option<PublishId>>,
    flushes: BTreeMap<&'static str, u64>,
    /// Relay ids of each local subscription, from the newest `Sub` frames seen.
    relay_ids: BTreeMap<u64, Vec<u64>>,
    /// Delivered and not yet taken, per subscription.
    inbox: BTreeMap<u64, VecDeque<(Option<String>, AckToken)>>,
    /// Everything that came out, for the determinism check.
    trace: Vec<String>,
}

fn keyring() -> Keyring {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(42);
    let tk = TreeKey::generate_with("scenarios", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    kr
}

fn account_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9; 32])
}

impl Sim {
    fn new(tune: impl FnOnce(&mut EngineConfig)) -> Self {
        Self::with(Placeholders::AckAtOnce, tune)
    }

    fn with(placeholders: Placeholders, tune: impl FnOnce(&mut EngineConfig)) -> Self {
        let mut cfg = EngineConfig::default();
        cfg.backoff = Backoff::new(100, 2_000, None);
        cfg.ack_delay_ms = 20;
        tune(&mut cfg);
        let cfg_backoff = cfg.backoff;
        let now = Now::new(T0_MONO, T0_UNIX);
        let kr = Arc::new(RwLock::new(keyring()));
        let eng = Engine::new(cfg, kr, [1; 32], now);
        let mut s = Sim {
            eng,
            now,
            cfg_backoff,
            placeholders,
            conn: None,
            tx: VecDeque::new(),
            events: VecDeque::new(),
            writer: Arc::new(RwLock::new(keyring())),
            identity: Identity::generate_with(&mut rand_chacha::ChaCha20Rng::seed_from_u64(7)),
            rng: rand_chacha::ChaCha20Rng::seed_from_u64(8),
            msgs: BTreeMap::new(),
            pubs: BTreeMap::new(),
            flushes: BTreeMap::new(),
            relay_ids: BTreeMap::new(),
            inbox: BTreeMap::new(),
            trace: Vec::new(),
        };
        s.drain();
        s
    }

    /// Drains the engine in the driver's order: transmits, the deadline, events.
    fn drain(&mut self) {
        while let Some(t) = self.eng.poll_transmit() {
            self.trace.push(format!("tx {t:?}"));
            if let Transmit::Frame(b) = &t {
                if let Ok(Frame::Sub(s)) = Frame::decode(b) {
                    let local = self.eng.core().local_for(s.sub_id).expect("known sub");
                    let ids = self.relay_ids.entry(local).or_default();
                    if ids.contains(&s.sub_id) {
                        panic!("relay id {} sent twice", s.sub_id);
                    }
                    ids.retain(|r| self.eng.core().relay_ids(local).contains(r));
                    ids.push(s.sub_id);
                }
            }
            self.tx.push_back(t);
        }
        let dl = self.eng.poll_timeout();
        self.trace.push(format!("timeout {dl:?}"));
        if let Some(d) = dl {
            assert!(d >= self.now.mono_ms, "deadline {d} in the past");
        }
        while let Some(e) = self.eng.poll_event() {
            self.trace.push(format!("event {e:?}"));
            match &e {
                Event::Message { sub, msg, token } => {
                    let text = String::from_utf8_lossy(&msg.payload).into_owned();
                    self.inbox
                        .entry(*sub)
                        .or_default()
                        .push_back((Some(text), *token));
                }
                Event::Placeholder { sub, token } => match self.placeholders {
                    Placeholders::AckAtOnce => {
                        self.eng.ack(*token, self.now);
                    }
                    Placeholders::InChannel => self
                        .inbox
                        .entry(*sub)
                        .or_default()
                        .push_back((None, *token)),
                },
                _ => {}
            }
            self.events.push_back(e);
            // An ack above may have produced output: keep draining in order.
            while let Some(t) = self.eng.poll_transmit() {
                self.trace.push(format!("tx {t:?}"));
                self.tx.push_back(t);
            }
        }
    }

    fn feed(&mut self, f: Frame) {
        let c = self.conn.expect("a socket is open");
        self.eng.handle_frame(c, &f.to_bytes(), self.now);
        self.drain();
    }

    fn next_tx(&mut self) -> Transmit {
        self.tx
            .pop_front()
            .unwrap_or_else(|| panic!("expected a transmit, got none"))
    }

    fn next_frame(&mut self) -> Frame {
        match self.next_tx() {
            Transmit::Frame(b) => Frame::decode(&b).expect("engine writes valid frames"),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    fn seal(&mut self, topic: &str, body: &str) -> Envelope {
        core::seal_publish(
            &self.writer,
            Some(&self.identity),
            &SealPolicy::default(),
            &mut Sealer::new(),
            &Topic::new(topic).unwrap(),
            core::OCTETS,
            body.as_bytes(),
            self.now.unix_ms,
            &mut self.rng,
        )
        .unwrap()
        .0
    }

    fn run(&mut self, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            self.trace.push(format!("step {i}: {step:?}"));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(step)));
            if let Err(e) = r {
                eprintln!("failed at step {i}: {step:?}");
                eprintln!("pending tx: {:?}", self.tx);
                eprintln!("pending events: {:?}", self.events);
                std::panic::resume_unwind(e);
            }
        }
    }

    fn step(&mut self, step: &Step) {
        match step.clone() {
            Step::Connect { heartbeat_ms } => {
                self.step(&Step::Dialed);
                self.step(&Step::ExpectTx(Tx::Hello { account: false }));
                self.step(&Step::Welcome { heartbeat_ms });
                self.step(&Step::ExpectEvent(Ev::Connected));
            }
            Step::Redial => {
                self.step(&Timeout);
                self.step(&Dialed);
                self.step(&ExpectTx(Tx::Hello { account: false }));
                self.step(&Welcome {
                    heartbeat_ms: 10_000,
                });
            }
            Step::Dialed => match self.next_tx() {
                Transmit::Dial(c) => {
                    self.conn = Some(c);
                    self.eng.handle_connected(c, self.now);
                    self.drain();
                }
                other => panic!("expected Dial, got {other:?}"),
            },
            Step::DialFails => match self.next_tx() {
                Transmit::Dial(c) => {
                    self.eng
                        .handle_disconnected(c, "connection refused", self.now);
                    self.drain();
                }
                other => panic!("expected Dial, got {other:?}"),
            },
            Step::Welcome { heartbeat_ms } => self.feed(welcome(heartbeat_ms, 0, None)),
            Step::Challenge(nonce) => {
                self.feed(Frame::Challenge(frame::Challenge { nonce, bound: None }))
            }
            Step::Subscribe { id, filter, opts } => {
                let f = TopicFilter::new(filter).unwrap();
                self.eng
                    .subscribe(id, f, opts, self.now)
                    .expect("subscribe");
                self.drain();
            }
            Step::Unsubscribe(id) => {
                self.eng.unsubscribe(id);
                self.drain();
            }
            Step::SubOk { id, seq } | Step::SubOkHistory { id, seq } => {
                let history = matches!(step, Step::SubOkHistory { .. }).then_some(true);
                for sub_id in self.relay_ids[&id].clone() {
                    self.feed(Frame::SubOk(frame::SubOk {
                        sub_id,
                        seq,
                        history,
                    }));
                }
            }
            Step::ReplayDone { id, seq } => {
                let sub_id = *self.relay_ids[&id].last().unwrap();
                self.feed(Frame::ReplayDone(frame::ReplayDone {
                    sub_id,
                    seq,
                    count: 0,
                }));
            }
            Step::SubRefused { id } => {
                let sub_id = *self.relay_ids[&id].last().unwrap();
                self.feed(Frame::Err(ErrFrame {
                    code: ErrorCode::QuotaExceeded,
                    message: "too many subscriptions".into(),
                    fatal: false,
                    sub_id: Some(sub_id),
                    publish_id: None,
                }));
            }
            Step::Seal { name, topic } => {
                let env = self.seal(topic, name);
                self.msgs.insert(name, env);
            }
            Step::Tamper { name, from } => {
                let mut b = self.msgs[from].as_bytes().to_vec();
                *b.last_mut().unwrap() ^= 1;
                self.msgs
                    .insert(name, Envelope::from_bytes(Bytes::from(b)).unwrap());
            }
            Step::Deliver { msg, seq, flags } => {
                let envelope = self.msgs[msg].clone();
                self.feed(Frame::Msg(Msg {
                    paused: None,
                    sub_id: None,
                    seq,
                    envelope,
                    flags,
                }));
            }
            Step::DeliverHistory {
                msg,
                seq,
                flags,
                id,
            } => {
                let envelope = self.msgs[msg].clone();
                let sub_id = *self.relay_ids[&id].last().unwrap();
                self.feed(Frame::Msg(Msg {
                    paused: None,
                    sub_id: Some(sub_id),
                    seq,
                    envelope,
                    flags,
                }));
            }
            Step::DeliverPaused {
                msg,
                seq,
                ref paused,
            } => {
                let envelope = self.msgs[msg].clone();
                let paused = paused
                    .iter()
                    .map(|id| *self.relay_ids[id].last().unwrap())
                    .collect();
                self.feed(Frame::Msg(Msg {
                    paused: Some(paused),
                    sub_id: None,
                    seq,
                    envelope,
                    flags: 0,
                }));
            }
            Step::GapNaming { id, dropped } => {
                let sub_id = *self.relay_ids[&id].last().unwrap();
                self.feed(Frame::Gap(Gap {
                    dropped,
                    sub_id: Some(sub_id),
                }));
            }
            Step::Publish {
                name,
                topic,
                qos,
                ack,
            } => {
                let env = self.seal(topic, name);
                self.msgs.insert(name, env.clone());
                let o = PubOptions::new().qos(qos).ack(ack);
                let pid = self.eng.publish(env, o, self.now).expect("publish");
                assert_eq!(pid.is_some(), ack || qos != Qos::AtMostOnce);
                self.pubs.insert(name, pid);
                self.drain();
            }
            Step::PubAck { publish, seq } => {
                let publish_id = match publish {
                    Some(p) => self.pubs[p].expect("acked publish has an id").0,
                    None => [0xee; 16],
                };
                self.feed(Frame::PubAck(frame::PubAck { publish_id, seq }));
            }
            Step::PubRefused { publish, code } => {
                let publish_id = self.pubs[publish].map(|p| p.0);
                self.feed(Frame::Err(ErrFrame {
                    code,
                    message: "refused".into(),
                    fatal: false,
                    sub_id: None,
                    publish_id,
                }));
            }
            Step::Relay(f) => self.feed(f),
            Step::RelayBytes(b) => {
                let c = self.conn.unwrap();
                self.eng.handle_frame(c, &Bytes::from_static(b), self.now);
                self.drain();
            }
            Step::Pong(name) => self.feed(Frame::Pong(frame::Pong {
                nonce: self.flushes[name],
            })),
            Step::Drop => {
                let c = self.conn.take().expect("a socket is open");
                self.eng
                    .handle_disconnected(c, "connection reset", self.now);
                self.drain();
            }
            Step::Timeout => {
                let at = self.eng.poll_timeout().expect("a deadline");
                self.now.mono_ms = self.now.mono_ms.max(at);
                self.now.unix_ms = T0_UNIX + (self.now.mono_ms - T0_MONO);
                self.eng.handle_timeout(self.now);
                self.drain();
            }
            Step::Advance(ms) => {
                self.now.mono_ms += ms;
                self.now.unix_ms += ms;
            }
            Step::Take(sub) => {
                let q = self.inbox.get_mut(&sub).expect("delivered items");
                loop {
                    let (item, token) = q.pop_front().expect("an item to take");
                    self.eng.ack(token, self.now);
                    if item.is_some() {
                        break;
                    }
                }
                self.drain();
            }
            Step::Flush(name) => {
                let id = self.eng.flush(self.now);
                self.flushes.insert(name, id);
                self.drain();
            }
            Step::DeleteDurable { id, flush } => {
                let f = self.eng.delete_durable(id, self.now).expect("delete");
                self.flushes.insert(flush, f);
                self.drain();
            }
            Step::Close => {
                self.eng.close(self.now);
                self.drain();
            }
            Step::RefreshKeys => {
                self.eng.refresh_keys(self.now);
                self.drain();
            }
            Step::ExpectTx(want) => self.expect_tx(want),
            Step::ExpectNoTx => assert!(self.tx.is_empty(), "unexpected {:?}", self.tx),
            Step::ExpectEvent(want) => self.expect_event(want),
            Step::ExpectNoEvent => {
                assert!(self.events.is_empty(), "unexpected {:?}", self.events)
            }
            Step::ExpectTimeoutIn(d) => {
                assert_eq!(
                    self.eng.poll_timeout().map(|t| t - self.now.mono_ms),
                    d,
                    "next deadline"
                )
            }
            Step::ExpectStat(which, n) => {
                let s = self.eng.stats();
                let got = match which {
                    Stat::SlowSubscriberDrops => s.slow_subscriber_drops,
                    Stat::RelayGaps => s.core.relay_gaps,
                    Stat::Duplicates => s.core.duplicates,
                    Stat::Rejected => s.core.rejected,
                    Stat::HeldBack => s.core.held_back,
                    Stat::NamedPaused => s.core.named_paused,
                    Stat::Reconnects => s.reconnects,
                    Stat::UnackedPublishes => s.unacked_publishes,
                    Stat::OutboxDrops => s.outbox_drops,
                    Stat::PublishRetries => s.publish_retries,
                    Stat::PublishRefusals => s.publish_refusals,
                };
                assert_eq!(got, n, "{which:?}");
            }
        }
    }

    fn expect_tx(&mut self, want: Tx) {
        let t = self.next_tx();
        match (&want, t) {
            (Tx::Dial, Transmit::Dial(c)) => self.conn = Some(c),
            (Tx::Hangup, Transmit::Hangup(c)) => {
                if self.conn == Some(c) {
                    self.conn = None;
                }
            }
            (_, Transmit::Frame(b)) => {
                let f = Frame::decode(&b).unwrap();
                self.check_frame(&want, f);
            }
            (_, other) => panic!("expected {want:?}, got {other:?}"),
        }
    }

    fn check_frame(&mut self, want: &Tx, f: Frame) {
        match (want, &f) {
            (Tx::Hello { account }, Frame::Hello(h)) => {
                assert_eq!(h.versions, vec![frame::PROTOCOL_VERSION]);
                assert_eq!(h.account.is_some(), *account);
            }
            (Tx::Auth, Frame::Auth(_)) => {}
            (
                Tx::Sub {
                    sub,
                    replay,
                    retained,
                    durable,
                },
                Frame::Sub(s),
            ) => {
                assert_eq!(self.eng.core().local_for(s.sub_id), Some(*sub), "{s:?}");
                assert_eq!(&s.replay, replay, "replay of {s:?}");
                assert_eq!(&s.retained, retained, "retained of {s:?}");
                assert_eq!(s.durable.as_deref(), *durable, "durable of {s:?}");
            }
            (Tx::Unsub, Frame::Unsub(_)) => {}
            (Tx::Pub(name), Frame::Pub(p)) => {
                assert_eq!(p.publish_id, self.pubs[name].map(|p| p.0), "publish id");
                assert_eq!(&p.envelope, &self.msgs[name], "envelope of {name}");
            }
            (Tx::Ack(seqs), Frame::Ack(a)) => assert_eq!(&a.seqs, seqs),
            (Tx::Ping(n), Frame::Ping(p)) => assert_eq!(p.nonce, *n),
            (Tx::Pong(n), Frame::Pong(p)) => assert_eq!(p.nonce, *n),
            (Tx::Close, Frame::Close(_)) => {}
            _ => panic!("expected {want:?}, got {f:?}"),
        }
    }

    fn expect_event(&mut self, want: Ev) {
        let e = self
            .events
            .pop_front()
            .unwrap_or_else(|| panic!("expected {want:?}, got no event"));
        let pid = |s: &Self, name: &str| s.pubs[name];
        let ok = match (&want, &e) {
            (
                Ev::Connected,
                Event::Connected {
                    session,
                    heartbeat_ms,
                    ..
                },
            ) => *session == SESSION && *heartbeat_ms > 0,
            (
                Ev::Disconnected { why, retry },
                Event::Disconnected {
                    reason,
                    attempt,
                    retry_at,
                },
            ) => {
                let kind = match reason {
                    Disconnect::Transport(_) => Why::Transport,
                    Disconnect::Timeout => Why::Timeout,
                    Disconnect::Rejected { .. } => Why::Rejected,
                    Disconnect::Handshake(_) => Why::Handshake,
                    Disconnect::Fatal { .. } => Why::Fatal,
                    Disconnect::RelayClosed { .. } => Why::RelayClosed,
                    Disconnect::HeartbeatTimeout => Why::Heartbeat,
                    Disconnect::BadFrame(_) => Why::BadFrame,
                    _ => panic!("unknown reason {reason:?}"),
                };
                let timing = match (retry, retry_at) {
                    (Some(n), Some(at)) => {
                        let b = self.cfg_backoff;
                        let full = (b.initial_ms << (n - 1).min(16)).min(b.max_ms);
                        let d = at - self.now.mono_ms;
                        *attempt == *n && d >= full / 2 && d <= full
                    }
                    (None, None) => true,
                    _ => false,
                };
                kind == *why && timing
            }
            (Ev::Closed, Event::Closed) => true,
            (Ev::Message { sub, msg }, Event::Message { sub: s, msg: m, .. }) => {
                s == sub && m.payload.as_ref() == msg.as_bytes()
            }
            (Ev::Placeholder { sub }, Event::Placeholder { sub: s, .. }) => s == sub,
            (
                Ev::Gap { dropped, subs },
                Event::Gap {
                    dropped: d,
                    subs: s,
                },
            ) => d == dropped && s == subs,
            (Ev::Dropped { sub, n }, Event::Dropped { sub: s, n: m }) => s == sub && m == n,
            (Ev::ReplayDone { sub, seq }, Event::ReplayDone { sub: s, seq: q }) => {
                s == sub && q == seq
            }
            (Ev::SubscribeOk(id), Event::SubscribeOk { sub }) => sub == id,
            (Ev::SubscribeErrRejected(id), Event::SubscribeErr { sub, error }) => {
                sub == id && matches!(error, SubscribeFailure::Rejected { .. })
            }
            (Ev::SubscribeErrClosed(id), Event::SubscribeErr { sub, error }) => {
                sub == id && *error == SubscribeFailure::Closed
            }
            (Ev::PubAck { publish, seq }, Event::PubAck { pid: p, seq: q }) => {
                pid(self, publish) == Some(*p) && q == seq
            }
            (Ev::PublishFailed { publish, reason }, Event::PublishFailed { pid: p, reason: r }) => {
                let kind = match r {
                    PublishFailure::Rejected { .. } => Fail::Rejected,
                    PublishFailure::NotAcknowledged => Fail::NotAcknowledged,
                    PublishFailure::Closed => Fail::Closed,
                    _ => panic!("unknown failure {r:?}"),
                };
                pid(self, publish) == Some(*p) && kind == *reason
            }
            (Ev::Flushed(name), Event::Flushed { id }) => self.flushes[name] == *id,
            (Ev::DurableDeleted { flush, refused }, Event::DurableDeleted { id, error }) => {
                self.flushes[flush] == *id && error.is_some() == *refused
            }
            (Ev::FlushFailed(name), Event::FlushFailed { id }) => self.flushes[name] == *id,
            (Ev::RelayError(code), Event::RelayError { code: c, .. }) => c == code,
            (Ev::PublishRefused(code), Event::PublishRefused { code: c, .. }) => c == code,
            _ => false,
        };
        assert!(ok, "expected {want:?}, got {e:?}");
    }
}

/// Runs a scenario twice: it must pass, and both runs must produce the same trace.
fn play(name: &str, make: impl Fn() -> Sim, steps: &[Step]) {
    let mut a = make();
    a.run(steps);
    let mut b = make();
    b.run(steps);
    assert_eq!(
        a.trace, b.trace,
        "{name}: the same inputs gave different outputs"
    );
}

// ---- scenarios -----------------------------------------------------------------------------

use Step::*;

fn sub(id: u64, filter: &'static str, opts: SubscribeOptions) -> Step {
    Subscribe { id, filter, opts }
}

/// The connection (or a dial) failed; `retry`: the attempt whose backoff is scheduled.
fn lost(why: Why, retry: Option<u32>) -> Step {
    ExpectEvent(Ev::Disconnected { why, retry })
}

/// A `Sub` starting live, with retained values, not durable.
fn fresh_sub(sub: u64) -> Step {
    ExpectTx(Tx::Sub {
        sub,
        replay: None,
        retained: true,
        durable: None,
    })
}

/// The relay's `Welcome` (1 MiB frames, the fixture session).
fn welcome(heartbeat_ms: u64, features: u64, seq_space: Option<[u8; 16]>) -> Frame {
    Frame::Welcome(frame::Welcome {
        version: frame::PROTOCOL_VERSION,
        features,
        max_frame: 1 << 20,
        session: SESSION,
        relay: None,
        heartbeat_ms,
        seq_space,
    })
}

fn qos1() -> SubscribeOptions {
    SubscribeOptions::new().qos(Qos::AtLeastOnce)
}

fn connected_with(subs: Vec<Step>) -> Vec<Step> {
    let mut v = vec![Connect {
        heartbeat_ms: 10_000,
    }];
    v.extend(subs);
    v
}

/// Subscribes `id` while live and confirms it.
fn live_sub(id: u64, filter: &'static str, opts: SubscribeOptions) -> Vec<Step> {
    // Retained values are asked for with a live start only (next to a replay a relay
    // ignores them, or, granted `RETAINED_BEFORE`, sends the older ones).
    let (replay, retained, durable) = (opts.replay, opts.retained && opts.replay.is_none(), None);
    let durable = opts.durable.as_ref().map(|_| "d").or(durable);
    vec![
        sub(id, filter, opts),
        ExpectTx(Tx::Sub {
            sub: id,
            replay,
            retained,
            durable,
        }),
        SubOk { id, seq: 0 },
        ExpectEvent(Ev::SubscribeOk(id)),
    ]
}

fn handshake_steps() -> Vec<Step> {
    vec![
        Dialed,
        ExpectTx(Tx::Hello { account: true }),
        Challenge([3; 32]),
        ExpectTx(Tx::Auth),
        Welcome { heartbeat_ms: 0 },
        ExpectEvent(Ev::Connected),
        // The relay asked for no heartbeat: the default (30 s) applies.
        ExpectTimeoutIn(Some(30_000)),
        ExpectNoTx,
        ExpectNoEvent,
    ]
}

#[test]
fn handshake_with_account_challenge() {
    let make = || {
        Sim::new(|c| {
            c.auth = Some(AccountAuth::Key(Arc::new(account_key())));
        })
    };
    play("handshake", make, &handshake_steps());
    // The Auth frame signs the challenge with the account key.
    let mut s = make();
    s.step(&Dialed);
    s.next_frame();
    s.step(&Challenge([3; 32]));
    let Frame::Auth(a) = s.next_frame() else {
        panic!("Auth expected")
    };
    let pk = account_key().verifying_key();
    let msg = frame::auth_sig_input(&[3; 32], &pk.to_bytes());
    pk.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&a.sig))
        .expect("valid signature");
}

/// The connection's `Dial` (after any hang-up), opened.
fn redial_now(s: &mut Sim) -> ConnId {
    loop {
        match s.next_tx() {
            Transmit::Dial(c) => {
                s.conn = Some(c);
                s.eng.handle_connected(c, s.now);
                s.drain();
                return c;
            }
            Transmit::Hangup(_) => {}
            other => panic!("expected Dial, got {other:?}"),
        }
    }
}

/// Verifies `a`'s signature by [`account_key`] over `input`.
fn signed_over(a: &frame::Auth, input: &[u8]) -> bool {
    account_key()
        .verifying_key()
        .verify_strict(input, &ed25519_dalek::Signature::from_bytes(&a.sig))
        .is_ok()
}

/// Relay-bound sign-ins (PROTOCOL §3.5.6): on a `Challenge` that asks for one, the account
/// key signs the relay name of the address *this* connection dialed — with two relays,
/// each its own — and the signature verifies over that name only (not the legacy input,
/// not the other relay's name); a `Challenge` that does not ask gets the legacy form.
#[test]
fn a_bound_challenge_is_signed_over_the_dialed_relays_name() {
    let (a, b) = ("relay-a.example:443", "[2001:db8::1]:7481");
    let mut s = Sim::new(|c| {
        c.auth = Some(AccountAuth::Key(Arc::new(account_key())));
        c.relays = 2;
        c.relay_names = vec![Some(a.into()), Some(b.into())];
        c.retry_first_connect = true;
    });
    let pk = account_key().verifying_key().to_bytes();
    let bound = |nonce| frame::Challenge {
        nonce,
        bound: Some(true),
    };
    let c0 = redial_now(&mut s);
    assert_eq!(s.eng.dial_relay(c0), 0);
    assert!(matches!(s.next_frame(), Frame::Hello(_)));
    s.feed(Frame::Challenge(bound([3; 32])));
    let Frame::Auth(auth) = s.next_frame() else {
        panic!("Auth expected")
    };
    assert_eq!(auth.relay.as_deref(), Some(a));
    assert!(signed_over(
        &auth,
        &frame::auth_bound_sig_input(&[3; 32], &pk, a).unwrap()
    ));
    assert!(!signed_over(&auth, &frame::auth_sig_input(&[3; 32], &pk)));
    assert!(!signed_over(
        &auth,
        &frame::auth_bound_sig_input(&[3; 32], &pk, b).unwrap()
    ));

    // Refused there: the next connection goes to relay b and signs b's name.
    s.feed(Frame::Err(ErrFrame {
        code: ErrorCode::AuthFailed,
        message: "no".into(),
        fatal: true,
        sub_id: None,
        publish_id: None,
    }));
    // (A lost connection moves to the next relay at once.)
    let c1 = redial_now(&mut s);
    assert_eq!(s.eng.dial_relay(c1), 1);
    assert!(matches!(s.next_frame(), Frame::Hello(_)));
    s.feed(Frame::Challenge(bound([4; 32])));
    let Frame::Auth(auth) = s.next_frame() else {
        panic!("Auth expected")
    };
    assert_eq!(auth.relay.as_deref(), Some(b));
    assert!(signed_over(
        &auth,
        &frame::auth_bound_sig_input(&[4; 32], &pk, b).unwrap()
    ));

    // A relay that does not ask gets the legacy form.
    let mut s = Sim::new(|c| {
        c.auth = Some(AccountAuth::Key(Arc::new(account_key())));
        c.relay_names = vec![Some(a.into())];
    });
    redial_now(&mut s);
    s.next_frame();
    s.feed(Frame::Challenge(frame::Challenge {
        nonce: [5; 32],
        bound: None,
    }));
    let Frame::Auth(auth) = s.next_frame() else {
        panic!("Auth expected")
    };
    assert_eq!(auth.relay, None);
    assert!(signed_over(&auth, &frame::auth_sig_input(&[5; 32], &pk)));
}

/// With `require_bound_auth` a `Challenge` that does not ask for a bound sign-in is not
/// answered: the socket is hung up on and the connection fails with the typed reason
/// (naming the relay dialed). A `Challenge` asking for one over an address without a relay
/// name fails the same way, whatever the option says. Nothing is signed in either case.
#[test]
fn an_unbound_challenge_fails_with_the_reason_when_binding_is_required() {
    use whispeer::core::connection::AuthNotBound;
    for (require, names, bound, why) in [
        (
            true,
            vec![Some("relay.example.com:443".to_string())],
            None,
            AuthNotBound::NotOffered {
                relay: Some("relay.example.com:443".into()),
            },
        ),
        (
            true,
            vec![],
            Some(false),
            AuthNotBound::NotOffered { relay: None },
        ),
        (false, vec![], Some(true), AuthNotBound::NoName),
        // A name that is not canonical is no name.
        (
            false,
            vec![Some("Relay.Example.com:443".to_string())],
            Some(true),
            AuthNotBound::NoName,
        ),
    ] {
        let mut s = Sim::new(|c| {
            c.auth = Some(AccountAuth::Key(Arc::new(account_key())));
            c.relay_names = names;
            c.require_bound_auth = require;
        });
        redial_now(&mut s);
        assert!(matches!(s.next_frame(), Frame::Hello(_)));
        s.feed(Frame::Challenge(frame::Challenge {
            nonce: [3; 32],
            bound,
        }));
        assert!(
            matches!(s.next_tx(), Transmit::Hangup(_)),
            "hung up on, no Auth"
        );
        let reason = s
            .events
            .iter()
            .find_map(|e| match e {
                Event::Disconnected { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .expect("Disconnected");
        assert_eq!(reason, Disconnect::AuthNotBound(why.clone()));
        assert!(reason.to_string().contains("bound to its name"), "{reason}");
    }
}

/// The relay's heartbeat interval is taken within 1 s and 5 min: 1 ms would have the
/// client send a thousand Pings a second, u64::MAX would turn its dead-relay detection off.
#[test]
fn the_relays_heartbeat_interval_is_bounded() {
    for (asked, used) in [(1, 1_000), (u64::MAX, 300_000), (15_000, 15_000)] {
        let steps = [
            Connect {
                heartbeat_ms: asked,
            },
            ExpectTimeoutIn(Some(used)),
        ];
        play("heartbeat bounds", || Sim::new(|_| {}), &steps);
    }
}

/// The account key answers one `Challenge` per connection: a relay asking again (to have
/// it sign another relay's challenges, relayed) is hung up on, before anything is signed.
#[test]
fn a_second_challenge_on_one_connection_is_not_answered() {
    let make = || {
        Sim::new(|c| {
            c.auth = Some(AccountAuth::Key(Arc::new(account_key())));
        })
    };
    let steps = [
        Dialed,
        ExpectTx(Tx::Hello { account: true }),
        Challenge([3; 32]),
        ExpectTx(Tx::Auth),
        Challenge([4; 32]),
        ExpectTx(Tx::Hangup),
        ExpectEvent(Ev::Disconnected {
            why: Why::Handshake,
            retry: None,
        }),
    ];
    play("second challenge", make, &steps);
}

#[test]
fn handshake_failures() {
    // A challenge without an account key, a refusal, a timeout: each ends the first
    // connection (no retry by default), hanging up the socket.
    for (relay, why) in [
        (
            Some(Frame::Challenge(frame::Challenge {
                nonce: [1; 32],
                bound: None,
            })),
            Why::Handshake,
        ),
        (
            Some(Frame::Err(ErrFrame {
                code: ErrorCode::AuthRequired,
                message: "account required".into(),
                fatal: true,
                sub_id: None,
                publish_id: None,
            })),
            Why::Rejected,
        ),
        (None, Why::Timeout),
    ] {
        let mut steps = vec![Dialed, ExpectTx(Tx::Hello { account: false })];
        match relay {
            Some(f) => steps.push(Relay(f)),
            None => steps.push(Timeout),
        }
        steps.extend([
            ExpectTx(Tx::Hangup),
            ExpectEvent(Ev::Disconnected { why, retry: None }),
            ExpectEvent(Ev::Closed),
            ExpectTimeoutIn(None),
        ]);
        play("handshake failure", || Sim::new(|_| {}), &steps);
    }
    // With first-connect retry, a refused dial backs off and dials again.
    let steps = [
        DialFails,
        lost(Why::Transport, Some(1)),
        Timeout,
        Connect {
            heartbeat_ms: 1_000,
        },
        ExpectStat(Stat::Reconnects, 0),
    ];
    play(
        "first connect retry",
        || Sim::new(|c| c.retry_first_connect = true),
        &steps,
    );
}

#[test]
fn reconnect_mid_publish() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend([
        Publish {
            name: "p1",
            topic: "a/1",
            qos: Qos::AtLeastOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p1")),
        Publish {
            name: "p2",
            topic: "a/2",
            qos: Qos::ExactlyOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p2")),
        Publish {
            name: "p0",
            topic: "a/0",
            qos: Qos::AtMostOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p0")),
        ExpectStat(Stat::UnackedPublishes, 2),
        // The connection drops before any PubAck.
        Drop,
        // QoS 0 with ack cannot be re-sent safely: it fails; QoS 1/2 are kept.
        ExpectEvent(Ev::PublishFailed {
            publish: "p0",
            reason: Fail::NotAcknowledged,
        }),
        lost(Why::Transport, Some(1)),
        ExpectNoTx,
        // Published while disconnected: kept too, sent after the earlier ones.
        Publish {
            name: "p3",
            topic: "a/3",
            qos: Qos::AtLeastOnce,
            ack: true,
        },
        ExpectNoTx,
        Redial,
        // Subscriptions first, then the kept publishes in order, with the same ids. The
        // at-least-once subscription resumes after its boundary (`SubOk.seq` 0): what
        // was stored while it was away comes in its resume history.
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(1)),
            retained: false,
            durable: None,
        }),
        ExpectTx(Tx::Pub("p1")),
        ExpectTx(Tx::Pub("p2")),
        ExpectTx(Tx::Pub("p3")),
        ExpectNoTx,
        ExpectEvent(Ev::Connected),
        PubAck {
            publish: Some("p1"),
            seq: 11,
        },
        PubAck {
            publish: Some("p2"),
            seq: 12,
        },
        PubAck {
            publish: Some("p3"),
            seq: 13,
        },
        // A late PubAck of the first send of p1: nothing more.
        PubAck {
            publish: Some("p1"),
            seq: 11,
        },
        ExpectEvent(Ev::PubAck {
            publish: "p1",
            seq: 11,
        }),
        ExpectEvent(Ev::PubAck {
            publish: "p2",
            seq: 12,
        }),
        ExpectEvent(Ev::PubAck {
            publish: "p3",
            seq: 13,
        }),
        ExpectNoEvent,
        ExpectStat(Stat::UnackedPublishes, 0),
        ExpectStat(Stat::Reconnects, 1),
    ]);
    play("reconnect mid-publish", || Sim::new(|_| {}), &steps);
}

#[test]
fn relay_restart_resumes_after_last_seq_and_durable_by_name() {
    let mut steps = vec![Connect {
        heartbeat_ms: 10_000,
    }];
    steps.extend(live_sub(1, "a/#", qos1()));
    steps.extend(live_sub(2, "b/#", qos1().durable("d")));
    steps.extend([
        Seal {
            name: "m5",
            topic: "a/x",
        },
        Deliver {
            msg: "m5",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m5" }),
        Take(1),
        Timeout, // ack_delay
        ExpectTx(Tx::Ack(vec![5])),
        Relay(Frame::Close(frame::Close {
            code: ErrorCode::ShuttingDown,
            message: "restart".into(),
        })),
        ExpectTx(Tx::Hangup),
        lost(Why::RelayClosed, Some(1)),
        Timeout,
        DialFails,
        lost(Why::Transport, Some(2)),
        Timeout,
        DialFails,
        lost(Why::Transport, Some(3)),
        Redial,
        // Resumes right after the last sequence seen, without retained values again.
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(6)),
            retained: false,
            durable: None,
        }),
        // The durable one resumes by name (the relay keeps its position).
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained: true,
            durable: Some("d"),
        }),
        ExpectEvent(Ev::Connected),
        ExpectStat(Stat::Reconnects, 1),
    ]);
    play("relay restart", || Sim::new(|_| {}), &steps);
}

#[test]
fn backoff_gives_up_after_max_attempts() {
    let steps = [
        Connect {
            heartbeat_ms: 10_000,
        },
        Publish {
            name: "p1",
            topic: "a/1",
            qos: Qos::AtLeastOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p1")),
        sub(7, "a/#", SubscribeOptions::new()),
        fresh_sub(7),
        Drop,
        lost(Why::Transport, Some(1)),
        Timeout,
        DialFails,
        lost(Why::Transport, Some(2)),
        Timeout,
        DialFails,
        // Two attempts allowed: the engine gives up; everything waiting fails once.
        lost(Why::Transport, None),
        ExpectEvent(Ev::PublishFailed {
            publish: "p1",
            reason: Fail::Closed,
        }),
        ExpectEvent(Ev::SubscribeErrClosed(7)),
        ExpectEvent(Ev::Closed),
        ExpectNoEvent,
        ExpectTimeoutIn(None),
        ExpectNoTx,
    ];
    play(
        "give up",
        || Sim::new(|c| c.backoff = Backoff::new(100, 2_000, Some(2))),
        &steps,
    );
}

#[test]
fn duplicate_delivery_is_one_message_and_both_seqs_are_acked() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend(live_sub(2, "a/+", qos1()));
    steps.extend([
        Seal {
            name: "m",
            topic: "a/x",
        },
        Deliver {
            msg: "m",
            seq: 1,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        // The same Msg again, redelivered; then the same envelope under a new seq.
        Deliver {
            msg: "m",
            seq: 1,
            flags: msg_flags::REDELIVERED,
        },
        Deliver {
            msg: "m",
            seq: 2,
            flags: 0,
        },
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectNoEvent,
        ExpectStat(Stat::Duplicates, 2),
        // Nothing is acked before the app takes the message (the duplicates wait behind it):
        // no ack deadline, only the heartbeat.
        ExpectTimeoutIn(Some(10_000)),
        ExpectNoTx,
        Take(1),
        Take(2),
        Timeout,
        // Seq 1 once: acks are per sequence, sent when every slot of it is released.
        ExpectTx(Tx::Ack(vec![1, 2])),
        ExpectNoTx,
    ]);
    play("duplicate delivery", || Sim::new(|_| {}), &steps);
}

#[test]
fn replay_hand_over_without_gap_or_duplicate_across_a_cut() {
    let opts = qos1().replay(Replay::FromSeq(1));
    let mut steps = vec![Connect {
        heartbeat_ms: 10_000,
    }];
    steps.extend([
        sub(1, "a/#", opts),
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(1)),
            retained: false,
            durable: None,
        }),
        SubOk { id: 1, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(1)),
    ]);
    for i in 1..=6 {
        let name: &'static str = ["", "m1", "m2", "m3", "m4", "m5", "m6"][i];
        steps.push(Seal { name, topic: "a/x" });
    }
    steps.extend([
        Deliver {
            msg: "m1",
            seq: 1,
            flags: msg_flags::REPLAYED,
        },
        Deliver {
            msg: "m2",
            seq: 2,
            flags: msg_flags::REPLAYED,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m1" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        Take(1),
        Take(1),
        // Cut mid-history.
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        // Resumes after the last seq seen (2), not from the original position.
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(3)),
            retained: false,
            durable: None,
        }),
        ExpectEvent(Ev::Connected),
        SubOk { id: 1, seq: 4 },
        // The relay overlaps by one (seq 2 again): not shown twice.
        Deliver {
            msg: "m2",
            seq: 2,
            flags: msg_flags::REPLAYED,
        },
        Deliver {
            msg: "m3",
            seq: 3,
            flags: msg_flags::REPLAYED,
        },
        Deliver {
            msg: "m4",
            seq: 4,
            flags: msg_flags::REPLAYED,
        },
        ReplayDone { id: 1, seq: 4 },
        Deliver {
            msg: "m5",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m4" }),
        ExpectEvent(Ev::ReplayDone { sub: 1, seq: 4 }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m5" }),
        ExpectNoEvent,
        Take(1),
        Take(1),
        Take(1),
        Timeout,
        ExpectTx(Tx::Ack(vec![2, 3, 4, 5])),
    ]);
    play("replay hand-over", || Sim::new(|_| {}), &steps);
}

/// Two subscriptions of one connection share live `Msg`s (they name none), but the relay
/// holds back one subscription's live messages while it sends that one's retained values:
/// a live message that reaches the client for the other subscription meanwhile is not the
/// first one's yet. It gets the relay's copy after `ReplayDone`, in order after the
/// messages held back before it — and the other subscription gets nothing twice. (Taken at
/// once, `sensor/#` saw m3 before m1 and m2: a CI failure of
/// `pubsub::wildcards_deliver_exactly_the_matching_topics`.)
#[test]
fn live_messages_the_relay_holds_back_for_a_subscription_wait_for_its_history_to_end() {
    let mut steps = connected_with(live_sub(1, "a/+/t", SubscribeOptions::new()));
    steps.extend([
        sub(2, "a/#", SubscribeOptions::new()),
        fresh_sub(2),
        SubOkHistory { id: 2, seq: 0 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "r",
            topic: "a/r",
        },
        Seal {
            name: "m1",
            topic: "a/k",
        },
        Seal {
            name: "m2",
            topic: "a/g/t/x",
        },
        Seal {
            name: "m3",
            topic: "a/g/t",
        },
        // Sub 2's retained value; m1 and m2 (its alone) wait in its gate; m3 is live for
        // sub 1 and waits in sub 2's gate too.
        DeliverHistory {
            msg: "r",
            seq: 1,
            flags: msg_flags::RETAINED,
            id: 2,
        },
        Deliver {
            msg: "m3",
            seq: 4,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "r" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        ExpectNoEvent,
        ReplayDone { id: 2, seq: 0 },
        Deliver {
            msg: "m1",
            seq: 2,
            flags: 0,
        },
        Deliver {
            msg: "m2",
            seq: 3,
            flags: 0,
        },
        Deliver {
            msg: "m3",
            seq: 4,
            flags: 0,
        },
        // Retained values' end is not a replay's: no event for it.
        ExpectEvent(Ev::Message { sub: 2, msg: "m1" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m3" }),
        ExpectNoEvent,
        // A copy of m3 again is a duplicate for both.
        Deliver {
            msg: "m3",
            seq: 4,
            flags: 0,
        },
        ExpectNoEvent,
    ]);
    play("held-back live messages", || Sim::new(|_| {}), &steps);
}

/// The hand-over exception (the relay's copy of a live message held back for a
/// subscription in its history passes the dedup window) is tied to that message, not to a
/// sequence number the relay chose: a relay that numbers copies of messages the client
/// already delivered with sequences it sent while the subscription was held — an old copy
/// sent then, or a held-back message's sequence — replays nothing (review of wave 2
/// session 42: "r", its retained value, reached subscription 2 again under m3's sequence).
#[test]
fn a_relay_cannot_replay_delivered_messages_under_held_back_sequences() {
    let mut steps = connected_with(live_sub(1, "a/+/t", SubscribeOptions::new()));
    steps.extend([
        sub(2, "a/#", SubscribeOptions::new()),
        fresh_sub(2),
        SubOkHistory { id: 2, seq: 0 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "r",
            topic: "a/r",
        },
        Seal {
            name: "m3",
            topic: "a/g/t",
        },
        Seal {
            name: "old",
            topic: "a/k/t",
        },
        DeliverHistory {
            msg: "r",
            seq: 1,
            flags: msg_flags::RETAINED,
            id: 2,
        },
        // "old": delivered to subscription 1 before; its copy comes again while
        // subscription 2 is held, under a new sequence.
        Deliver {
            msg: "old",
            seq: 2,
            flags: 0,
        },
        Deliver {
            msg: "m3",
            seq: 4,
            flags: 0,
        },
        Deliver {
            msg: "old",
            seq: 9,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "r" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "old" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        ExpectNoEvent,
        ReplayDone { id: 2, seq: 0 },
        // Its retained value under m3's held-back sequence; "old" under the sequence its
        // copy came with while held.
        Deliver {
            msg: "r",
            seq: 4,
            flags: 0,
        },
        Deliver {
            msg: "old",
            seq: 9,
            flags: 0,
        },
        ExpectNoEvent,
        // m3's own copy is still subscription 2's, once.
        Deliver {
            msg: "m3",
            seq: 4,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "m3" }),
        ExpectNoEvent,
        Deliver {
            msg: "m3",
            seq: 4,
            flags: 0,
        },
        ExpectNoEvent,
    ]);
    play("held-back sequences replayed", || Sim::new(|_| {}), &steps);
}

/// Review F2: a message the relay holds back for a subscription in its history (2, its
/// boundary 0 below the message's sequence 5) can reach the client first in another
/// subscription's history (3, subscribed later with a replay covering 5: the relay sends
/// it there, named for 3 and flagged `REPLAYED`), new to the client and delivered to 3.
/// The relay's own copy for 2 follows 2's `ReplayDone` (live, naming none): it is still
/// 2's, past the dedup window — it was dropped as a duplicate. And 3's ack of 5 waits
/// until 2 took its copy: the relay frees a sequence for every subscription of the
/// connection, so acked at once it could free 2's copy, in flight, untaken.
#[test]
fn a_message_first_seen_in_another_subscriptions_history_is_still_the_held_ones() {
    let q1 = || SubscribeOptions::new().qos(Qos::AtLeastOnce);
    let mut steps = connected_with(vec![
        sub(2, "a/#", q1()),
        fresh_sub(2),
        SubOkHistory { id: 2, seq: 0 },
        ExpectEvent(Ev::SubscribeOk(2)),
        sub(3, "a/#", q1().replay(Replay::FromSeq(1))),
        ExpectTx(Tx::Sub {
            sub: 3,
            replay: Some(Replay::FromSeq(1)),
            retained: false,
            durable: None,
        }),
        SubOkHistory { id: 3, seq: 5 },
        ExpectEvent(Ev::SubscribeOk(3)),
    ]);
    steps.extend([
        Seal {
            name: "m",
            topic: "a/x",
        },
        history("m", 5, 3),
        ReplayDone { id: 3, seq: 5 },
        ExpectEvent(Ev::Message { sub: 3, msg: "m" }),
        ExpectEvent(Ev::ReplayDone { sub: 3, seq: 5 }),
        ExpectNoEvent,
        Take(3),
        ExpectNoTx,
        ReplayDone { id: 2, seq: 0 },
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        // The live copy names no subscription: 3 (live now) takes its place in the acks.
        ExpectEvent(Ev::Placeholder { sub: 3 }),
        ExpectNoEvent,
        ExpectNoTx,
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![5])),
        // Once: another copy is a duplicate for both (a placeholder in the acks).
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectEvent(Ev::Placeholder { sub: 3 }),
        ExpectNoEvent,
    ]);
    play(
        "held message first seen in another history",
        || Sim::new(|_| {}),
        &steps,
    );
}

#[test]
fn qos2_resend_is_acked_once_and_a_restored_outbox_keeps_its_ids() {
    let steps = [
        Connect {
            heartbeat_ms: 10_000,
        },
        Publish {
            name: "q",
            topic: "a/q",
            qos: Qos::ExactlyOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("q")),
        Drop,
        lost(Why::Transport, Some(1)),
        Timeout,
        Connect {
            heartbeat_ms: 10_000,
        },
        ExpectTx(Tx::Pub("q")),
        // The relay deduplicated the re-send: both sends are answered with the original seq.
        PubAck {
            publish: Some("q"),
            seq: 3,
        },
        PubAck {
            publish: Some("q"),
            seq: 3,
        },
        // An id this client never used.
        PubAck {
            publish: None,
            seq: 9,
        },
        ExpectEvent(Ev::PubAck {
            publish: "q",
            seq: 3,
        }),
        ExpectNoEvent,
        // A refused publish fails once, with the relay's code.
        Publish {
            name: "r",
            topic: "a/r",
            qos: Qos::ExactlyOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("r")),
        PubRefused {
            publish: "r",
            code: ErrorCode::QuotaExceeded,
        },
        ExpectEvent(Ev::PublishFailed {
            publish: "r",
            reason: Fail::Rejected,
        }),
        ExpectNoEvent,
        ExpectStat(Stat::UnackedPublishes, 0),
    ];
    play("qos2 dedup", || Sim::new(|_| {}), &steps);

    // A restored outbox: entries of a previous run go first, with their ids.
    let mut prev = Sim::new(|_| {});
    prev.run(&[
        Connect {
            heartbeat_ms: 10_000,
        },
        Publish {
            name: "old",
            topic: "a/o",
            qos: Qos::ExactlyOnce,
            ack: true,
        },
    ]);
    let pid = prev.pubs["old"].unwrap();
    let (order, frame) = prev.eng.kept_publish(&pid).expect("kept");
    let env = prev.msgs["old"].clone();
    let mut next = Sim::new(|c| c.restored = vec![(pid, order, frame.clone())]);
    next.pubs.insert("old", Some(pid));
    next.msgs.insert("old", env);
    next.run(&[
        ExpectStat(Stat::UnackedPublishes, 1),
        Connect {
            heartbeat_ms: 10_000,
        },
        ExpectTx(Tx::Pub("old")),
        PubAck {
            publish: Some("old"),
            seq: 1,
        },
        ExpectEvent(Ev::PubAck {
            publish: "old",
            seq: 1,
        }),
    ]);
}

#[test]
fn slow_consumer_qos0_drops_qos1_holds_back_and_placeholders_keep_order() {
    let mut steps = connected_with(live_sub(1, "zero/#", SubscribeOptions::new()));
    steps.extend(live_sub(2, "one/#", qos1()));
    for (name, topic) in [
        ("z1", "zero/a"),
        ("z2", "zero/a"),
        ("z3", "zero/a"),
        ("o1", "one/a"),
        ("o2", "one/a"),
        ("o3", "one/a"),
    ] {
        steps.push(Seal { name, topic });
    }
    steps.extend([
        // Credit 2: the third QoS 0 message is dropped, counted and reported.
        Deliver {
            msg: "z1",
            seq: 0,
            flags: 0,
        },
        Deliver {
            msg: "z2",
            seq: 0,
            flags: 0,
        },
        Deliver {
            msg: "z3",
            seq: 0,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "z1" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "z2" }),
        ExpectEvent(Ev::Dropped { sub: 1, n: 1 }),
        ExpectStat(Stat::SlowSubscriberDrops, 1),
        // The relay's own drops reach the at-most-once subscriptions.
        Relay(Frame::Gap(Gap {
            dropped: 4,
            sub_id: None,
        })),
        ExpectEvent(Ev::Gap {
            dropped: 4,
            subs: vec![1],
        }),
        ExpectStat(Stat::RelayGaps, 4),
        // QoS 1: the third is held back (not delivered, never acked).
        Deliver {
            msg: "o1",
            seq: 10,
            flags: 0,
        },
        Deliver {
            msg: "o2",
            seq: 11,
            flags: 0,
        },
        Deliver {
            msg: "o3",
            seq: 12,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "o1" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "o2" }),
        ExpectNoEvent,
        ExpectStat(Stat::HeldBack, 1),
        Take(2),
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![10, 11])),
        ExpectNoTx,
        // The relay delivers it again; now there is room.
        Deliver {
            msg: "o3",
            seq: 12,
            flags: msg_flags::REDELIVERED,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "o3" }),
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![12])),
    ]);
    play("slow consumer", || Sim::new(|c| c.sub_capacity = 2), &steps);
}

/// With the cluster's JetStream store a QoS 0 publish is unnumbered (sequence 0): the relay
/// tracks nothing for it, and drops it from a connection's full queue as it drops QoS 0
/// messages, whatever the subscription's QoS, counting it in a `Gap` for the whole
/// connection (relay test `cluster_jetstream::unnumbered_messages_to_a_stalled_qos1_subscriber_are_bounded_by_its_queue`).
/// Such a count reaches an acknowledging subscription that was routed an unnumbered
/// message on the connection; one that got only numbered messages loses messages only
/// while paused (told by a `Gap` naming it) and does not get it. Before, no acknowledging
/// subscription did, so one fed unnumbered messages lost them without hearing of it.
#[test]
fn a_connection_gap_reaches_an_acknowledging_subscription_that_was_sent_unnumbered_messages() {
    let mut steps = connected_with(live_sub(1, "u/#", qos1()));
    steps.extend(live_sub(2, "n/#", qos1()));
    steps.extend([
        Seal {
            name: "u1",
            topic: "u/a",
        },
        Seal {
            name: "n1",
            topic: "n/a",
        },
    ]);
    // A numbered message to subscription 2, then a connection Gap: not 2's to hear; an
    // unnumbered one to subscription 1, then another: 1's.
    for (msg, seq, sub, dropped, heard) in [("n1", 5, 2, 2, vec![]), ("u1", 0, 1, 3, vec![1])] {
        steps.extend([
            Deliver { msg, seq, flags: 0 },
            ExpectEvent(Ev::Message { sub, msg }),
            Relay(Frame::Gap(Gap {
                dropped,
                sub_id: None,
            })),
            ExpectEvent(Ev::Gap {
                dropped,
                subs: heard,
            }),
        ]);
    }
    // Per connection: on the next one, nothing unnumbered reached it yet.
    steps.extend([
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        ExpectEvent(Ev::Connected),
        Relay(Frame::Gap(Gap {
            dropped: 4,
            sub_id: None,
        })),
        ExpectEvent(Ev::Gap {
            dropped: 4,
            subs: vec![],
        }),
    ]);
    play(
        "unnumbered, then a connection Gap",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// An unnumbered message (sequence 0) a QoS 1 subscription has no room for is a drop for
/// it and goes to its QoS 0 neighbour — never held back from both (nothing sends it
/// again). Reported to the QoS 1 one as `Dropped` unless it holds its whole credit of
/// numbered messages: then the relay has it paused, skipped it itself and counts it in the
/// `Gap` naming it, so the client's report would count it twice.
#[test]
fn an_unnumbered_message_without_room_is_dropped_once_and_reaches_the_neighbour() {
    let mut steps = connected_with(live_sub(1, "u/#", qos1()));
    steps.extend(live_sub(2, "u/#", SubscribeOptions::new().capacity(16)));
    for (name, topic) in [("o1", "u/o"), ("u1", "u/a"), ("u2", "u/b"), ("u3", "u/c")] {
        steps.push(Seal { name, topic });
    }
    steps.extend([
        // A numbered one fills subscription 1's credit of 1: the relay pauses it.
        Deliver {
            msg: "o1",
            seq: 10,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "o1" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "o1" }),
        // Sent for the neighbour: no report for 1 (the relay's Gap tells it).
        Deliver {
            msg: "u1",
            seq: 0,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "u1" }),
        ExpectNoEvent,
        // Taken: room again; an unnumbered one fills it (the relay tracks none of them).
        Take(1),
        Deliver {
            msg: "u2",
            seq: 0,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "u2" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "u2" }),
        // No room, and not paused at the relay: the client's own drop, told.
        Deliver {
            msg: "u3",
            seq: 0,
            flags: 0,
        },
        ExpectEvent(Ev::Dropped { sub: 1, n: 1 }),
        ExpectEvent(Ev::Message { sub: 2, msg: "u3" }),
        ExpectStat(Stat::SlowSubscriberDrops, 1),
    ]);
    play(
        "unnumbered without room",
        || Sim::new(|c| c.sub_capacity = 1),
        &steps,
    );
}

/// With the cluster's JetStream store a QoS 0 publish is unnumbered (sequence 0). A relay
/// holding live messages back for subscriptions in their hand-over (retained values or
/// history) sends each of them its own copy after its `ReplayDone`, naming it: the second
/// subscription's copy is a duplicate to the dedup window, yet its own — it was dropped so,
/// and a subscription beside another on the same topics lost every unnumbered message
/// published during its hand-over (found with the relay's retained values slowed: the
/// failover test `unnumbered_messages_beyond_a_qos1_subscriptions_room_reach_its_qos0_neighbour`).
/// Each subscription that matches gets it once: a further copy naming either is a
/// duplicate, and one that does not match the topic is owed nothing.
#[test]
fn an_unnumbered_message_in_a_copy_named_for_each_subscription_reaches_each_once() {
    let mut steps = connected_with(live_sub(1, "u/#", qos1()));
    steps.extend(live_sub(2, "u/#", SubscribeOptions::new()));
    steps.extend(live_sub(3, "x/#", SubscribeOptions::new()));
    steps.push(Seal {
        name: "u1",
        topic: "u/a",
    });
    let named = |id| DeliverHistory {
        msg: "u1",
        seq: 0,
        flags: 0,
        id,
    };
    steps.extend([
        named(2),
        ExpectEvent(Ev::Message { sub: 2, msg: "u1" }),
        ExpectNoEvent,
        named(1),
        ExpectEvent(Ev::Message { sub: 1, msg: "u1" }),
        ExpectNoEvent,
        // Spent: a relay replaying it reaches neither again.
        named(1),
        named(2),
        ExpectNoEvent,
        ExpectStat(Stat::Duplicates, 2),
        // Not the topic of subscription 3: a copy naming it is not its.
        named(3),
        ExpectNoEvent,
    ]);
    play(
        "unnumbered named copies",
        || Sim::new(|c| c.sub_capacity = 4),
        &steps,
    );
}

/// Subscriptions 1 (at least once, the simulation's capacity) and 2 (`second`) on `h/#`,
/// messages `m1` and `m2` sealed, and `m1` (sequence 1) delivered to both: the start of the
/// held-back-message scenarios below.
fn two_subs_with_m1(second: SubscribeOptions) -> Vec<Step> {
    let mut steps = connected_with(live_sub(1, "h/#", qos1()));
    steps.extend(live_sub(2, "h/#", second));
    for (name, topic) in [("m1", "h/a"), ("m2", "h/b")] {
        steps.push(Seal { name, topic });
    }
    steps.extend([
        Deliver {
            msg: "m1",
            seq: 1,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m1" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m1" }),
    ]);
    steps
}

/// The relay delivers `msg` as history (`REPLAYED`) of (the newest relay subscription of)
/// `id`.
fn history(msg: &'static str, seq: u64, id: u64) -> Step {
    DeliverHistory {
        msg,
        seq,
        flags: msg_flags::REPLAYED,
        id,
    }
}

/// After [`two_subs_with_m1`]: both take `m1`, the connection drops, and both resume from
/// sequence 2 with history to come (`SubOk` boundary `boundary`).
fn taken_and_resumed(boundary: u64) -> Vec<Step> {
    let resume = |sub| {
        ExpectTx(Tx::Sub {
            sub,
            replay: Some(Replay::FromSeq(2)),
            retained: false,
            durable: None,
        })
    };
    vec![
        Take(1),
        Take(2),
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        resume(1),
        resume(2),
        ExpectEvent(Ev::Connected),
        SubOkHistory {
            id: 1,
            seq: boundary,
        },
        SubOkHistory {
            id: 2,
            seq: boundary,
        },
    ]
}

/// A message held back for want of an at-least-once subscription's room that the relay did
/// not pause (it sent the copy, so nothing comes from its store) comes again only as a
/// redelivery after the relay's ack timeout — a copy a QoS 0 neighbour never takes. Once
/// that redelivery reached the subscription it was held back for, the neighbour is told of
/// its loss at once (before: never — found by `tests/mixed_load.rs`).
#[test]
fn a_redelivery_that_ends_a_hold_tells_the_neighbour_it_lost_the_message() {
    let mut steps = two_subs_with_m1(SubscribeOptions::new().capacity(16));
    steps.extend([
        // No room for 1: held back from both.
        Deliver {
            msg: "m2",
            seq: 2,
            flags: 0,
        },
        ExpectNoEvent,
        Take(1),
        // Never acked, so the relay redelivers it: 1 takes the copy, 2 never will.
        Deliver {
            msg: "m2",
            seq: 2,
            flags: msg_flags::REDELIVERED,
        },
        ExpectEvent(Ev::Dropped { sub: 2, n: 1 }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        ExpectNoEvent,
    ]);
    play(
        "redelivery ends a hold",
        || Sim::new(|c| c.sub_capacity = 1),
        &steps,
    );
}

/// A copy of a message already handed out, held back later (a redelivery meeting a full
/// subscription), takes nothing from the subscriptions routed it: they are not tracked as
/// denied it, so a later copy is neither shown to them twice nor reported lost to them
/// (found by `tests/mixed_load.rs`: an at-least-once neighbour saw such messages twice).
#[test]
fn a_later_copy_held_back_denies_nothing_to_those_that_had_the_message() {
    let mut steps = two_subs_with_m1(qos1().capacity(16));
    steps.extend([
        Take(1),
        Deliver {
            msg: "m2",
            seq: 2,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        // 1's ack of m1 was late: the relay redelivers m1 while 1 is full again.
        Deliver {
            msg: "m1",
            seq: 1,
            flags: msg_flags::REDELIVERED,
        },
        ExpectNoEvent,
        Take(1),
        // A duplicate for both: a placeholder each, no message, no loss.
        Deliver {
            msg: "m1",
            seq: 1,
            flags: msg_flags::REDELIVERED,
        },
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectNoEvent,
    ]);
    play(
        "a later copy held back",
        || Sim::new(|c| c.sub_capacity = 1),
        &steps,
    );
}

/// After a reconnect each subscription that received stored messages resumes with its own
/// history (`FromSeq` after its position). A message in two such histories is new to each:
/// the first copy delivered makes it a duplicate in the client-wide dedup window, yet the
/// second still reaches its subscription (before: a placeholder, acked — a stored message
/// lost to an at-least-once subscription; found by `tests/mixed_load.rs`).
#[test]
fn after_a_reconnect_a_message_in_two_resumed_histories_reaches_both() {
    let mut steps = two_subs_with_m1(qos1());
    steps.extend(taken_and_resumed(2));
    steps.extend([
        history("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        history("m2", 2, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        // Once each: the relay's overlap is a placeholder.
        history("m2", 2, 2),
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectNoEvent,
    ]);
    play("two resumed histories", || Sim::new(|_| {}), &steps);
}

/// The exception above is for messages new on this connection: a relay that puts a message
/// a subscription saw before the reconnect into its resume history, under a sequence above
/// its position, does not get it shown again (the dedup window drops it, as it did before
/// resumed histories had the exception).
#[test]
fn a_relay_cannot_show_a_resumed_subscription_a_message_it_saw_before_the_reconnect() {
    let mut steps = two_subs_with_m1(qos1());
    steps.extend(taken_and_resumed(5));
    steps.extend([
        history("m1", 5, 2),
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        history("m1", 5, 1),
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectNoEvent,
    ]);
    play(
        "an old message in a resume history",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// A message held back from a subscription that never had it, which another subscription
/// took (from its history) before the connection dropped: the first subscription's resume
/// history brings it again, a duplicate of the window from the old connection, and it still
/// reaches that subscription — carried across the reconnect as owed to it (before: a
/// placeholder, acked — the at-least-once loss of `tests/mixed_load.rs` with reconnects).
#[test]
fn a_message_owed_before_a_reconnect_reaches_its_subscription_from_its_resume_history() {
    let replaying = qos1().capacity(16).replay(Replay::FromSeq(1));
    let mut steps = connected_with(live_sub(1, "h/#", qos1()));
    steps.extend([
        sub(2, "h/#", replaying.clone()),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: Some(Replay::FromSeq(1)),
            retained: false,
            durable: None,
        }),
        SubOkHistory { id: 2, seq: 2 },
        ExpectEvent(Ev::SubscribeOk(2)),
    ]);
    for (name, topic) in [("m1", "h/a"), ("m2", "h/b")] {
        steps.push(Seal { name, topic });
    }
    steps.extend([
        // Live: both get m1 (1 is full then); m2 is held back from 1, which never had it.
        Deliver {
            msg: "m1",
            seq: 1,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m1" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m1" }),
        Deliver {
            msg: "m2",
            seq: 2,
            flags: 0,
        },
        ExpectNoEvent,
        // 2's history brings it to 2.
        history("m2", 2, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        Take(1),
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(2)),
            retained: false,
            durable: None,
        }),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: Some(Replay::FromSeq(3)),
            retained: false,
            durable: None,
        }),
        ExpectEvent(Ev::Connected),
        SubOkHistory { id: 1, seq: 2 },
        // A duplicate of the window (2 took it on the old connection), new to 1.
        history("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        ExpectNoEvent,
    ]);
    play(
        "owed across a reconnect",
        || Sim::new(|c| c.sub_capacity = 1),
        &steps,
    );
}

/// After a reconnect a subscription's own history copy of a message is held back for want
/// of room after a neighbour's history copy delivered it: the relay's redelivery to it is a
/// duplicate in the client-wide dedup window by then, yet it still reaches that
/// subscription (before: a placeholder, acked — found by `tests/mixed_load.rs` with
/// reconnects).
#[test]
fn a_held_back_history_copy_comes_as_a_redelivery_and_still_reaches_its_subscription() {
    let mut steps = two_subs_with_m1(qos1().capacity(16));
    steps.push(Seal {
        name: "m3",
        topic: "h/c",
    });
    steps.extend(taken_and_resumed(3));
    steps.extend([
        // 1 takes its first history message and has no room left.
        history("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        history("m2", 2, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        history("m3", 3, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m3" }),
        // 1's own copy of m3: held back (no room), never acked.
        history("m3", 3, 1),
        ExpectNoEvent,
        Take(1),
        Deliver {
            msg: "m3",
            seq: 3,
            flags: msg_flags::REDELIVERED,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        // 2 had it from its history: a placeholder.
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectNoEvent,
    ]);
    play(
        "a held-back history copy",
        || Sim::new(|c| c.sub_capacity = 1),
        &steps,
    );
}

/// An unopenable envelope between two taken ones: its ack leaves with its neighbours, in
/// relay order, whether the driver acks placeholders at once or passes them through the
/// subscription's channel.
#[test]
fn placeholder_between_two_taken_ones_leaves_in_order() {
    for mode in [Placeholders::AckAtOnce, Placeholders::InChannel] {
        let mut steps = connected_with(live_sub(1, "a/#", qos1()));
        steps.extend([
            Seal {
                name: "m1",
                topic: "a/1",
            },
            Seal {
                name: "m3",
                topic: "a/3",
            },
            Tamper {
                name: "bad",
                from: "m3",
            },
            Deliver {
                msg: "m1",
                seq: 1,
                flags: 0,
            },
            Deliver {
                msg: "bad",
                seq: 2,
                flags: 0,
            },
            Deliver {
                msg: "m3",
                seq: 3,
                flags: 0,
            },
            ExpectEvent(Ev::Message { sub: 1, msg: "m1" }),
            ExpectEvent(Ev::Placeholder { sub: 1 }),
            ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
            ExpectStat(Stat::Rejected, 1),
            // Nothing leaves before the head is taken, whatever became of seq 2.
            ExpectTimeoutIn(Some(10_000)),
            ExpectNoTx,
            Take(1),
            Take(1),
            Timeout,
            ExpectTx(Tx::Ack(vec![1, 2, 3])),
            ExpectNoTx,
        ]);
        play("placeholder order", move || Sim::with(mode, |_| {}), &steps);
    }
}

#[test]
fn subscribe_pending_across_a_drop_resolves_once() {
    let steps = [
        Connect {
            heartbeat_ms: 10_000,
        },
        sub(1, "a/#", SubscribeOptions::new()),
        fresh_sub(1),
        // Dropped before SubOk.
        Drop,
        lost(Why::Transport, Some(1)),
        // Subscribed while offline too: both wait for the next connection.
        sub(2, "b/#", SubscribeOptions::new()),
        ExpectNoTx,
        Redial,
        fresh_sub(1),
        fresh_sub(2),
        ExpectEvent(Ev::Connected),
        ExpectNoEvent,
        SubOk { id: 1, seq: 0 },
        ExpectEvent(Ev::SubscribeOk(1)),
        SubRefused { id: 2 },
        ExpectEvent(Ev::SubscribeErrRejected(2)),
        ExpectNoEvent,
        // A second drop: the confirmed one is simply re-made (no second SubscribeOk). The
        // connection did not stay up for the backoff's max_ms: the second attempt.
        Drop,
        lost(Why::Transport, Some(2)),
        Timeout,
        Connect {
            heartbeat_ms: 10_000,
        },
        fresh_sub(1),
        ExpectNoTx,
        SubOk { id: 1, seq: 0 },
        ExpectNoEvent,
    ];
    play("subscribe across drop", || Sim::new(|_| {}), &steps);
}

#[test]
fn heartbeat_timeout_reconnects_with_backoff() {
    let steps = [
        Connect {
            heartbeat_ms: 1_000,
        },
        ExpectTimeoutIn(Some(1_000)),
        Timeout,
        ExpectTx(Tx::Ping(0)),
        // Any frame from the relay shows it is alive.
        Relay(Frame::Pong(frame::Pong { nonce: 0 })),
        Timeout,
        ExpectTx(Tx::Ping(0)),
        Timeout,
        ExpectTx(Tx::Ping(0)),
        ExpectNoEvent,
        // Two pings unanswered: the connection is dead.
        Timeout,
        ExpectTx(Tx::Hangup),
        lost(Why::Heartbeat, Some(1)),
        Timeout,
        Connect {
            heartbeat_ms: 1_000,
        },
        ExpectStat(Stat::Reconnects, 1),
        // The relay pings too: answered.
        Relay(Frame::Ping(Ping { nonce: 77 })),
        ExpectTx(Tx::Pong(77)),
    ];
    play("heartbeat", || Sim::new(|_| {}), &steps);
}

#[test]
fn flush_round_trip_and_failures() {
    let steps = [
        Flush("early"), // not connected yet
        ExpectEvent(Ev::FlushFailed("early")),
        Connect {
            heartbeat_ms: 10_000,
        },
        Flush("f1"),
        ExpectTx(Tx::Ping(2)),
        Flush("f2"),
        ExpectTx(Tx::Ping(3)),
        Pong("f2"),
        ExpectEvent(Ev::Flushed("f2")),
        ExpectNoEvent,
        // The connection drops with f1 unanswered.
        Drop,
        ExpectEvent(Ev::FlushFailed("f1")),
        lost(Why::Transport, Some(1)),
        // A late Pong of an old socket is ignored.
        ExpectNoEvent,
    ];
    play("flush", || Sim::new(|_| {}), &steps);
}

/// "Everything sent before" a flush includes the acks of what the app took.
#[test]
fn flush_sends_pending_acks_first() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend([
        Seal {
            name: "m",
            topic: "a/x",
        },
        Deliver {
            msg: "m",
            seq: 3,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        Take(1),
        ExpectNoTx, // waiting for ack_delay
        Flush("f"),
        ExpectTx(Tx::Ack(vec![3])),
        ExpectTx(Tx::Ping(1)),
        ExpectNoTx,
    ]);
    play("flush acks", || Sim::new(|_| {}), &steps);
}

#[test]
fn close_writes_acks_and_close_before_hangup_then_never_dials() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend([
        Seal {
            name: "m",
            topic: "a/x",
        },
        Deliver {
            msg: "m",
            seq: 4,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        Take(1),
        Publish {
            name: "p",
            topic: "a/p",
            qos: Qos::AtLeastOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p")),
        Close,
        // The pending ack leaves before Close, then the socket closes.
        ExpectTx(Tx::Ack(vec![4])),
        ExpectTx(Tx::Close),
        ExpectTx(Tx::Hangup),
        ExpectNoTx,
        ExpectEvent(Ev::PublishFailed {
            publish: "p",
            reason: Fail::Closed,
        }),
        ExpectEvent(Ev::Closed),
        ExpectNoEvent,
        ExpectTimeoutIn(None),
        Advance(60_000),
        ExpectNoTx,
    ]);
    play("close", || Sim::new(|_| {}), &steps);
    let mut s = Sim::new(|_| {});
    s.run(&steps);
    let env = s.msgs["m"].clone();
    assert!(matches!(
        s.eng.publish(env, PubOptions::new(), s.now),
        Err(whispeer::PublishError::Closed)
    ));
}

#[test]
fn acks_leave_within_ack_delay_or_at_once_at_4096() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.push(Seal {
        name: "m",
        topic: "a/x",
    });
    // 4,097 deliveries of one envelope: the first opens, the rest are duplicates
    // (placeholders, acked at once by this driver): every slot is released once seq 1 is
    // taken.
    for seq in 1..=4097u64 {
        steps.push(Deliver {
            msg: "m",
            seq,
            flags: if seq == 1 { 0 } else { msg_flags::REDELIVERED },
        });
    }
    steps.extend([
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoTx,
        Take(1),
        // 4,096 are ready: one full Ack leaves at once; the last waits for the deadline.
        ExpectTx(Tx::Ack((1..=4096).collect())),
        ExpectNoTx,
        ExpectTimeoutIn(Some(20)),
        Timeout,
        ExpectTx(Tx::Ack(vec![4097])),
    ]);
    play("ack batching", || Sim::new(|_| {}), &steps);
}

/// With no ack delay, what one input released leaves at the next `poll_transmit`, as one
/// `Ack` (here: taking the head releases it and the two placeholders behind it).
#[test]
fn no_ack_delay_acks_leave_with_the_next_transmit() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend([
        Seal {
            name: "m",
            topic: "a/x",
        },
        Deliver {
            msg: "m",
            seq: 1,
            flags: 0,
        },
        Deliver {
            msg: "m",
            seq: 2,
            flags: msg_flags::REDELIVERED,
        },
        Deliver {
            msg: "m",
            seq: 3,
            flags: msg_flags::REDELIVERED,
        },
        ExpectNoTx,
        Take(1),
        ExpectTx(Tx::Ack(vec![1, 2, 3])),
        ExpectNoTx,
        ExpectTimeoutIn(Some(10_000)),
    ]);
    play("no ack delay", || Sim::new(|c| c.ack_delay_ms = 0), &steps);
}

#[test]
fn bad_frames_and_fatal_errors_are_disconnects_not_panics() {
    let steps = [
        Connect {
            heartbeat_ms: 10_000,
        },
        RelayBytes(b"\xff\x00garbage"),
        ExpectTx(Tx::Hangup),
        lost(Why::BadFrame, Some(1)),
        Timeout,
        Connect {
            heartbeat_ms: 10_000,
        },
        // Non-fatal: naming no request, the answer to a QoS 0 publish (which carries no
        // publish id): counted, nobody waits for it.
        Relay(Frame::Err(ErrFrame {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            fatal: false,
            sub_id: None,
            publish_id: None,
        })),
        ExpectEvent(Ev::PublishRefused(ErrorCode::RateLimited)),
        ExpectStat(Stat::PublishRefusals, 1),
        // Naming a subscription this client does not have: a relay error.
        Relay(Frame::Err(ErrFrame {
            code: ErrorCode::UnknownSubscription,
            message: "no subscription 99".into(),
            fatal: false,
            sub_id: Some(99),
            publish_id: None,
        })),
        ExpectEvent(Ev::RelayError(ErrorCode::UnknownSubscription)),
        ExpectStat(Stat::PublishRefusals, 1),
        Relay(Frame::Err(ErrFrame {
            code: ErrorCode::Internal,
            message: "bye".into(),
            fatal: true,
            sub_id: None,
            publish_id: None,
        })),
        ExpectTx(Tx::Hangup),
        // Lost right after the first (the connection never stayed up): attempt 2.
        lost(Why::Fatal, Some(2)),
    ];
    play("bad frames", || Sim::new(|_| {}), &steps);
}

/// A relay that greets and then drops every connection (a hostile or broken one) is
/// redialled with a growing delay — each time the client resubscribes and re-sends every
/// kept publish, so a `Welcome` alone must not start the backoff again from its first
/// step (with several relays it was no delay at all). Only a connection that stayed up
/// for the backoff's `max_ms` counts as a success.
#[test]
fn a_relay_that_greets_and_drops_is_redialled_with_a_growing_delay() {
    let up = || Connect {
        heartbeat_ms: 60_000,
    };
    let steps = [
        up(),
        Drop,
        lost(Why::Transport, Some(1)),
        Timeout,
        up(),
        Drop,
        lost(Why::Transport, Some(2)),
        Timeout,
        up(),
        Advance(1_999),
        Drop,
        lost(Why::Transport, Some(3)),
        Timeout,
        up(),
        // Up for max_ms (2 s in these scenarios): a success, the next loss starts again.
        Advance(2_000),
        Drop,
        lost(Why::Transport, Some(1)),
    ];
    play("greets and drops", || Sim::new(|_| {}), &steps);
}

#[test]
fn offline_qos0_buffer_is_capped_and_sent_on_connect() {
    let steps = [
        // Not connected yet: buffered.
        Publish {
            name: "a",
            topic: "a/1",
            qos: Qos::AtMostOnce,
            ack: false,
        },
        Connect {
            heartbeat_ms: 10_000,
        },
        ExpectTx(Tx::Pub("a")),
        ExpectNoTx,
        ExpectStat(Stat::OutboxDrops, 0),
    ];
    play("offline buffer", || Sim::new(|_| {}), &steps);
    // Over the cap: a typed error, counted.
    let mut s = Sim::new(|c| c.offline_bytes = 10);
    let env = s.seal("a/1", "too big for ten bytes");
    assert!(matches!(
        s.eng.publish(env, PubOptions::new(), s.now),
        Err(whispeer::PublishError::BufferFull(10))
    ));
    s.step(&ExpectStat(Stat::OutboxDrops, 1));
}

#[test]
fn refresh_keys_remakes_subscriptions_where_they_were() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend([
        Seal {
            name: "m",
            topic: "a/x",
        },
        Deliver {
            msg: "m",
            seq: 8,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        RefreshKeys,
        ExpectTx(Tx::Unsub),
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(9)),
            retained: false,
            durable: None,
        }),
        ExpectNoTx,
    ]);
    play("refresh keys", || Sim::new(|_| {}), &steps);
}

#[test]
fn unsubscribe_never_acks_what_was_not_taken() {
    let mut steps = connected_with(live_sub(1, "a/#", qos1()));
    steps.extend(live_sub(2, "b/#", qos1()));
    steps.extend([
        Seal {
            name: "m1",
            topic: "a/1",
        },
        Seal {
            name: "m2",
            topic: "b/2",
        },
        Deliver {
            msg: "m1",
            seq: 1,
            flags: 0,
        },
        Deliver {
            msg: "m2",
            seq: 2,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m1" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        Take(2),
        // Subscription 1 goes away without taking m1: seq 1 is never acked (redelivered).
        Unsubscribe(1),
        ExpectTx(Tx::Unsub),
        Timeout,
        ExpectTx(Tx::Ack(vec![2])),
        ExpectNoTx,
        Drop,
        lost(Why::Transport, Some(1)),
        Timeout,
        ExpectTx(Tx::Dial),
    ]);
    play("unsubscribe", || Sim::new(|_| {}), &steps);
}

#[test]
fn stale_socket_inputs_are_ignored() {
    let mut s = Sim::new(|c| c.retry_first_connect = true);
    s.run(&[
        Connect {
            heartbeat_ms: 10_000,
        },
        Drop,
    ]);
    let old = 1;
    // A late frame and a late close of the old socket change nothing.
    s.eng.handle_frame(
        old,
        &Frame::Pong(frame::Pong { nonce: 5 }).to_bytes(),
        s.now,
    );
    s.eng.handle_disconnected(old, "late", s.now);
    s.eng.handle_connected(old, s.now);
    s.drain();
    s.run(&[
        lost(Why::Transport, Some(1)),
        ExpectTx(Tx::Hangup), // the engine does not want the old socket back
        ExpectNoEvent,
        ExpectNoTx,
    ]);
    // Time never goes back: an older `now` cannot move a deadline into the past.
    let dl = s.eng.poll_timeout().unwrap();
    s.eng.handle_timeout(Now::new(0, 0));
    assert_eq!(s.eng.poll_timeout(), Some(dl));
}

/// Several relays: every failure moves on to the next at once (round robin, the lost
/// connection counting as its relay's try); the backoff waits only after a full round, and
/// `max_attempts` counts rounds. Without `retry_first_connect` the first connection gives
/// up after one round.
#[test]
fn relays_round_robin_with_the_backoff_per_full_round() {
    let kr = Arc::new(RwLock::new(keyring()));
    let mut cfg = EngineConfig::default();
    cfg.retry_first_connect = true;
    cfg.relays = 3;
    cfg.connect_timeout_ms = 1_000;
    cfg.backoff = Backoff::new(100, 1_000, Some(2));
    let t0 = Now::new(0, T0_UNIX);
    let mut e = Engine::new(cfg.clone(), kr.clone(), [3; 32], t0);
    let dial = |e: &mut Engine| match e.poll_transmit() {
        Some(Transmit::Dial(c)) => (c, e.dial_relay(c)),
        other => panic!("expected Dial, got {other:?}"),
    };
    let events = |e: &mut Engine| std::iter::from_fn(|| e.poll_event()).collect::<Vec<_>>();
    // Round 1: relays 0, 1, 2 at once, then the first backoff.
    let (c, r) = dial(&mut e);
    assert_eq!(r, 0);
    e.handle_disconnected(c, "refused", Now::new(5, T0_UNIX));
    let (c, r) = dial(&mut e);
    assert_eq!(r, 1, "the next relay, at once");
    assert_eq!(
        e.poll_timeout(),
        Some(1_005),
        "its connect deadline, no backoff"
    );
    e.handle_disconnected(c, "refused", Now::new(6, T0_UNIX));
    let (c, r) = dial(&mut e);
    assert_eq!(r, 2);
    e.handle_disconnected(c, "refused", Now::new(7, T0_UNIX));
    assert_eq!(e.poll_transmit(), None, "a full round failed: back off");
    let retry = e.poll_timeout().unwrap();
    assert!(
        (57..=107).contains(&retry),
        "backoff attempt 0 after the round: {retry}"
    );
    let ev = events(&mut e);
    let retries: Vec<_> = ev
        .iter()
        .map(|x| match x {
            Event::Disconnected {
                attempt, retry_at, ..
            } => (*attempt, *retry_at),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(retries, vec![(1, Some(5)), (2, Some(6)), (3, Some(retry))]);
    e.handle_timeout(Now::new(retry, T0_UNIX));
    let (c, r) = dial(&mut e);
    assert_eq!(r, 0, "round 2 starts again at the first relay");
    // Live on relay 0, then lost: relay 1 at once.
    e.handle_connected(c, Now::new(retry, T0_UNIX));
    let _hello = e.poll_transmit();
    e.handle_decoded(
        c,
        welcome(10_000, 0, Some([9; 16])),
        Now::new(retry, T0_UNIX),
    );
    assert!(e.is_live());
    assert!(matches!(
        events(&mut e).last(),
        Some(Event::Connected { relay: 0, .. })
    ));
    e.handle_disconnected(c, "reset", Now::new(retry + 1, T0_UNIX));
    assert_eq!(dial(&mut e).1, 1);

    // max_attempts = 2 rounds: the third full round of failures gives up.
    let mut e = Engine::new(cfg.clone(), kr.clone(), [3; 32], t0);
    let mut now = 0;
    for round in 1..=3 {
        for relay in 0..3 {
            let (c, r) = dial(&mut e);
            assert_eq!(r, relay);
            e.handle_disconnected(c, "refused", Now::new(now, T0_UNIX));
        }
        if round < 3 {
            now = e.poll_timeout().unwrap();
            e.handle_timeout(Now::new(now, T0_UNIX));
        }
    }
    assert!(e.is_closed(), "gave up after the third round");

    // The first connection without retry_first_connect: one round, then it gives up.
    cfg.retry_first_connect = false;
    cfg.relays = 2;
    let mut e = Engine::new(cfg, kr, [3; 32], t0);
    let (c, _) = dial(&mut e);
    e.handle_disconnected(c, "refused", t0);
    assert!(!e.is_closed(), "the second relay is still to try");
    let (c, r) = dial(&mut e);
    assert_eq!(r, 1);
    e.handle_disconnected(c, "refused", t0);
    assert!(e.is_closed());
}

/// The same seed gives the same publish ids and backoff; another seed, others.
#[test]
fn seed_decides_ids_and_jitter() {
    let run = |seed: [u8; 32]| {
        let kr = Arc::new(RwLock::new(keyring()));
        let mut cfg = EngineConfig::default();
        cfg.retry_first_connect = true;
        let now = Now::new(0, T0_UNIX);
        let mut e = Engine::new(cfg, kr, seed, now);
        let mut s = Sim::new(|_| {});
        let env = s.seal("a/1", "x");
        let pid = e
            .publish(env, PubOptions::new().qos(Qos::AtLeastOnce), now)
            .unwrap();
        let Some(Transmit::Dial(c)) = e.poll_transmit() else {
            panic!()
        };
        e.handle_disconnected(c, "refused", now);
        (pid, e.poll_timeout())
    };
    assert_eq!(run([1; 32]), run([1; 32]));
    assert_ne!(run([1; 32]).0, run([2; 32]).0);
    let _ = SeededRng::new(&[0; 32]);
}

/// Random interleavings of relay frames, drops, timeouts and app commands (fixed seeds, so
/// a failure replays): no message twice per subscription; exactly one outcome per publish
/// that waits for one; nothing acked that the app did not take, nor a seq the connection
/// never delivered; `Ack`s of at most 4,096; frames only on an open socket; deadlines never
/// in the past.
#[test]
fn random_interleavings_keep_the_invariants() {
    use rand_chacha::rand_core::RngCore;
    use std::collections::{BTreeSet, HashMap};
    let mut totals = [0usize; 5];
    for run in 0..60u64 {
        let mode = if run % 2 == 0 {
            Placeholders::AckAtOnce
        } else {
            Placeholders::InChannel
        };
        let mut s = Sim::with(mode, |c| {
            c.retry_first_connect = true;
            c.sub_capacity = 3;
            c.ack_delay_ms = 5;
            c.offline_bytes = 4_000;
            // One, two or three relay addresses: failover moves between them (each its own
            // sequence space, as the scripted relay names none).
            c.relays = 1 + (run % 3) as usize;
        });
        let mut r = rand_chacha::ChaCha20Rng::seed_from_u64(1_000 + run);
        // Envelopes sealed so far, with the at-least-once subscription each opens for.
        let mut pool: Vec<(Envelope, Option<u64>)> = Vec::new();
        let subs: [(u64, &str, SubscribeOptions); 3] = [
            (1, "a/#", qos1()),
            (2, "a/+", SubscribeOptions::new()),
            (3, "b/#", qos1().durable("d")),
        ];
        for (id, f, o) in subs.iter().cloned() {
            s.eng
                .subscribe(id, TopicFilter::new(f).unwrap(), o, s.now)
                .unwrap();
        }
        s.drain();
        // Driver and relay model.
        let mut open: Option<ConnId> = None;
        let mut dialing: Option<ConnId> = None;
        let mut handshaking = false;
        let mut live = false;
        let mut next_seq = 1u64;
        let mut fed: BTreeMap<(ConnId, u64), usize> = BTreeMap::new();
        // (subscription, pool index) of every message the app was handed.
        let mut handed: BTreeSet<(u64, usize)> = BTreeSet::new();
        let mut fed_seqs: Vec<(u64, usize)> = Vec::new();
        let mut written_pids: Vec<[u8; 16]> = Vec::new();
        let mut nonces: Vec<u64> = Vec::new();
        let mut waiting_pids: BTreeSet<PublishId> = BTreeSet::new();
        let mut outcomes: HashMap<PublishId, u32> = HashMap::new();
        let mut seen: BTreeSet<(u64, [u8; 16])> = BTreeSet::new();
        // Messages of acking subscriptions handed out and not taken, per (conn, seq).
        let mut untaken: BTreeMap<(ConnId, u64), u32> = BTreeMap::new();
        let mut token_conn: Vec<(u64, ConnId, u64)> = Vec::new();
        let mut conn_of_delivery = 0;
        for _ in 0..400 {
            // The driver acts on everything queued.
            while let Some(t) = s.tx.pop_front() {
                match t {
                    Transmit::Dial(c) => dialing = Some(c),
                    Transmit::Hangup(c) => {
                        if open == Some(c) {
                            open = None;
                            handshaking = false;
                            live = false;
                        }
                        if dialing == Some(c) {
                            dialing = None;
                        }
                    }
                    Transmit::Frame(b) => {
                        let c = open.expect("a frame only goes to an open socket");
                        match Frame::decode(&b).unwrap() {
                            Frame::Ack(a) => {
                                assert!(a.seqs.len() <= 4096);
                                for q in a.seqs {
                                    let idx = *fed.get(&(c, q)).expect("acked, never delivered");
                                    // An envelope that opens for an at-least-once
                                    // subscription is acked only once the app had it.
                                    if let Some(sub) = pool[idx].1 {
                                        assert!(
                                            handed.contains(&(sub, idx)),
                                            "run {run}: seq {q} acked, never handed to {sub}"
                                        );
                                    }
                                    assert_eq!(
                                        untaken.get(&(c, q)).copied().unwrap_or(0),
                                        0,
                                        "seq {q} acked before the app took it"
                                    );
                                }
                            }
                            Frame::Pub(p) => {
                                if let Some(id) = p.publish_id {
                                    written_pids.push(id);
                                }
                            }
                            Frame::Ping(p) if p.nonce > 0 => nonces.push(p.nonce),
                            _ => {}
                        }
                    }
                }
            }
            for e in std::mem::take(&mut s.events) {
                match e {
                    Event::Message { sub, msg, token } => {
                        let text = String::from_utf8_lossy(&msg.payload).into_owned();
                        if let Some(i) = text.strip_prefix('m').and_then(|n| n.parse().ok()) {
                            handed.insert((sub, i));
                        }
                        assert!(
                            seen.insert((sub, msg.msg_id.0)),
                            "run {run}: message twice to sub {sub}"
                        );
                        if token.acks() {
                            *untaken.entry((conn_of_delivery, msg.seq)).or_default() += 1;
                            token_conn.push((sub, conn_of_delivery, msg.seq));
                        }
                    }
                    Event::PubAck { pid, .. } | Event::PublishFailed { pid, .. } => {
                        *outcomes.entry(pid).or_default() += 1;
                        assert_eq!(outcomes[&pid], 1, "run {run}: two outcomes for a publish");
                    }
                    _ => {}
                }
            }
            let at = s.eng.poll_timeout();
            if let Some(at) = at {
                assert!(at >= s.now.mono_ms);
            }
            match r.next_u32() % 16 {
                0 | 1 => {
                    if let Some(c) = dialing.take() {
                        if r.next_u32() % 4 == 0 {
                            s.eng.handle_disconnected(c, "refused", s.now);
                        } else {
                            open = Some(c);
                            handshaking = true;
                            s.eng.handle_connected(c, s.now);
                        }
                    } else if handshaking {
                        handshaking = false;
                        live = true;
                        s.conn = open;
                        s.step(&Welcome { heartbeat_ms: 50 });
                        continue;
                    }
                }
                2..=4 if live => {
                    let c = open.unwrap();
                    let (seq, idx, flags) = if r.next_u32() % 3 == 0 && !fed_seqs.is_empty() {
                        let (q, i) = fed_seqs[r.next_u32() as usize % fed_seqs.len()];
                        (q, i, msg_flags::REDELIVERED)
                    } else {
                        // Mostly a fresh message; sometimes one already sent under another
                        // seq (a duplicate by content), sometimes one that does not open.
                        let i = match r.next_u32() % 8 {
                            0 if !pool.is_empty() => r.next_u32() as usize % pool.len(),
                            k => {
                                let (topic, owner) = [
                                    ("a/x", Some(1)),
                                    ("a/y", Some(1)),
                                    ("b/z", Some(3)),
                                    ("c/w", None),
                                ][k as usize % 4];
                                let mut env = s.seal(topic, &format!("m{}", pool.len()));
                                let owner = if k == 7 {
                                    let mut b = env.as_bytes().to_vec();
                                    *b.last_mut().unwrap() ^= 1;
                                    env = Envelope::from_bytes(Bytes::from(b)).unwrap();
                                    None
                                } else {
                                    owner
                                };
                                pool.push((env, owner));
                                pool.len() - 1
                            }
                        };
                        next_seq += 1;
                        fed_seqs.push((next_seq, i));
                        (next_seq, i, 0)
                    };
                    fed.insert((c, seq), idx);
                    conn_of_delivery = c;
                    let envelope = pool[idx].0.clone();
                    s.eng.handle_frame(
                        c,
                        &Frame::Msg(Msg {
                            paused: None,
                            sub_id: None,
                            seq,
                            envelope,
                            flags,
                        })
                        .to_bytes(),
                        s.now,
                    );
                }
                5 if live => {
                    let ids: Vec<u64> = s.relay_ids.values().flatten().copied().collect();
                    if let Some(id) = ids.get(r.next_u32() as usize % ids.len().max(1)) {
                        s.eng.handle_frame(
                            open.unwrap(),
                            &Frame::SubOk(frame::SubOk {
                                sub_id: *id,
                                seq: 0,
                                history: None,
                            })
                            .to_bytes(),
                            s.now,
                        );
                    }
                }
                6 if live && !written_pids.is_empty() => {
                    let id = written_pids[r.next_u32() as usize % written_pids.len()];
                    let f = if r.next_u32() % 5 == 0 {
                        Frame::Err(ErrFrame {
                            code: ErrorCode::QuotaExceeded,
                            message: "no".into(),
                            fatal: false,
                            sub_id: None,
                            publish_id: Some(id),
                        })
                    } else {
                        Frame::PubAck(frame::PubAck {
                            publish_id: id,
                            seq: 0,
                        })
                    };
                    s.eng.handle_frame(open.unwrap(), &f.to_bytes(), s.now);
                }
                7 => {
                    let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce]
                        [r.next_u32() as usize % 3];
                    let ack = r.next_u32() % 2 == 0;
                    let env = s.seal("a/p", "published");
                    if let Ok(Some(pid)) =
                        s.eng
                            .publish(env, PubOptions::new().qos(qos).ack(ack), s.now)
                    {
                        waiting_pids.insert(pid);
                    }
                }
                8 | 9 => {
                    let sub = 1 + (r.next_u32() as u64 % 3);
                    if let Some((item, token)) = s.inbox.get_mut(&sub).and_then(|q| q.pop_front()) {
                        if item.is_some() && token.acks() {
                            let i = token_conn
                                .iter()
                                .position(|(sb, _, _)| *sb == sub)
                                .expect("delivered");
                            let (_, c, q) = token_conn.remove(i);
                            *untaken.get_mut(&(c, q)).unwrap() -= 1;
                        }
                        s.eng.ack(token, s.now);
                    }
                }
                10 | 11 => {
                    if let Some(at) = at {
                        let late = u64::from(r.next_u32() % 3);
                        s.now.mono_ms = at + late;
                        s.now.unix_ms = T0_UNIX + (at + late - T0_MONO);
                        s.eng.handle_timeout(s.now);
                    }
                }
                12 if open.is_some() => {
                    let c = open.take().unwrap();
                    handshaking = false;
                    live = false;
                    s.eng.handle_disconnected(c, "reset", s.now);
                }
                13 => {
                    if live && !nonces.is_empty() && r.next_u32() % 2 == 0 {
                        let nonce = nonces.remove(0);
                        s.eng.handle_frame(
                            open.unwrap(),
                            &Frame::Pong(frame::Pong { nonce }).to_bytes(),
                            s.now,
                        );
                    } else {
                        s.eng.flush(s.now);
                    }
                }
                14 if live => {
                    // A Gap, or now and then a frame with one byte flipped (the engine
                    // handles it or drops the connection; it never panics).
                    let mut b = Frame::Gap(Gap {
                        dropped: 2,
                        sub_id: None,
                    })
                    .to_bytes()
                    .to_vec();
                    if r.next_u32() % 3 == 0 {
                        let i = r.next_u32() as usize % b.len();
                        b[i] ^= 1 << (r.next_u32() % 8);
                    }
                    s.eng.handle_frame(open.unwrap(), &Bytes::from(b), s.now);
                }
                _ => {
                    // Time passes, up to the next deadline (a timer fires on time; a late
                    // one is the `handle_timeout` arm with the clock past the deadline).
                    let ms = u64::from(r.next_u32() % 30)
                        .min(at.map_or(u64::MAX, |at| at - s.now.mono_ms));
                    s.now.mono_ms += ms;
                    s.now.unix_ms += ms;
                }
            }
            s.drain();
        }
        // Closing settles every publish still waiting: each has exactly one outcome.
        s.eng.close(s.now);
        s.drain();
        for e in std::mem::take(&mut s.events) {
            if let Event::PubAck { pid, .. } | Event::PublishFailed { pid, .. } = e {
                *outcomes.entry(pid).or_default() += 1;
            }
        }
        for pid in &waiting_pids {
            assert_eq!(
                outcomes.get(pid),
                Some(&1),
                "run {run}: outcomes of {pid:?}"
            );
        }
        assert!(s.eng.is_closed());
        totals[0] += seen.len();
        totals[1] += outcomes.len();
        totals[2] += s.eng.stats().reconnects as usize;
        totals[3] += s.eng.stats().core.held_back as usize;
        totals[4] += s.eng.stats().core.duplicates as usize;
    }
    // The runs exercise what they claim to.
    eprintln!("messages, publish outcomes, reconnects, held back, duplicates: {totals:?}");
    assert!(totals.iter().all(|t| *t > 0), "{totals:?}");
}

/// A QoS 0 publish still queued (not yet taken by the driver) when the socket drops goes
/// back to the offline buffer and leaves on the next connection: accepted data is never
/// dropped silently. One already written is gone with the socket (at most once).
#[test]
fn queued_qos0_publishes_survive_a_drop_written_ones_do_not() {
    let mut s = Sim::new(|c| c.retry_first_connect = true);
    s.run(&[Connect {
        heartbeat_ms: 10_000,
    }]);
    let (a, b) = (s.seal("a/1", "written"), s.seal("a/2", "queued"));
    let now = s.now;
    s.eng.publish(a, PubOptions::new(), now).unwrap();
    let Some(Transmit::Frame(_)) = s.eng.poll_transmit() else {
        panic!("the first publish is written")
    };
    s.eng.publish(b.clone(), PubOptions::new(), now).unwrap();
    // The socket drops before the driver took the second frame.
    s.eng
        .handle_disconnected(s.conn.take().unwrap(), "reset", now);
    s.drain();
    s.msgs.insert("queued", b);
    s.pubs.insert("queued", None);
    s.run(&[
        lost(Why::Transport, Some(1)),
        ExpectNoTx,
        Redial,
        ExpectTx(Tx::Pub("queued")),
        ExpectNoTx,
        ExpectEvent(Ev::Connected),
        ExpectStat(Stat::OutboxDrops, 0),
    ]);
}

#[test]
fn retryable_refusals_of_kept_publishes_are_retried_with_backoff_and_the_same_id() {
    let qos1 = |name| Publish {
        name,
        topic: "a/1",
        qos: Qos::AtLeastOnce,
        ack: true,
    };
    let refused = |publish, code| PubRefused { publish, code };
    let steps = [
        Connect {
            heartbeat_ms: 10_000,
        },
        qos1("p1"),
        ExpectTx(Tx::Pub("p1")),
        // Busy: no failure; the publish stays kept and is re-sent after the backoff (well
        // before the heartbeat), with the same publish id.
        refused("p1", ErrorCode::Busy),
        ExpectNoEvent,
        ExpectNoTx,
        ExpectStat(Stat::UnackedPublishes, 1),
        ExpectStat(Stat::PublishRetries, 1),
        Timeout,
        ExpectTx(Tx::Pub("p1")),
        ExpectNoTx,
        // Storage full this time: retried again (the next backoff step).
        refused("p1", ErrorCode::StorageFull),
        ExpectNoEvent,
        Timeout,
        ExpectTx(Tx::Pub("p1")),
        PubAck {
            publish: Some("p1"),
            seq: 7,
        },
        ExpectEvent(Ev::PubAck {
            publish: "p1",
            seq: 7,
        }),
        ExpectNoEvent,
        ExpectStat(Stat::UnackedPublishes, 0),
        ExpectStat(Stat::PublishRetries, 2),
        // A refusal that is not retryable fails at once.
        qos1("p2"),
        ExpectTx(Tx::Pub("p2")),
        refused("p2", ErrorCode::QuotaExceeded),
        ExpectEvent(Ev::PublishFailed {
            publish: "p2",
            reason: Fail::Rejected,
        }),
        // QoS 0 keeps nothing to re-send: it fails at once too.
        Publish {
            name: "p0",
            topic: "a/1",
            qos: Qos::AtMostOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p0")),
        refused("p0", ErrorCode::Busy),
        ExpectEvent(Ev::PublishFailed {
            publish: "p0",
            reason: Fail::Rejected,
        }),
        // Out of retries (two here): the relay's code, once.
        qos1("p3"),
        ExpectTx(Tx::Pub("p3")),
        refused("p3", ErrorCode::Busy),
        Timeout,
        ExpectTx(Tx::Pub("p3")),
        refused("p3", ErrorCode::Busy),
        Timeout,
        ExpectTx(Tx::Pub("p3")),
        refused("p3", ErrorCode::Busy),
        ExpectEvent(Ev::PublishFailed {
            publish: "p3",
            reason: Fail::Rejected,
        }),
        ExpectNoEvent,
        ExpectNoTx,
        ExpectStat(Stat::UnackedPublishes, 0),
        ExpectStat(Stat::PublishRetries, 4),
    ];
    play(
        "retryable publish refusals",
        || Sim::new(|c| c.publish_retries = 2),
        &steps,
    );
}

#[test]
fn a_retry_waiting_at_a_drop_is_resent_on_the_next_connection() {
    let steps = [
        Connect {
            heartbeat_ms: 10_000,
        },
        Publish {
            name: "p1",
            topic: "a/1",
            qos: Qos::ExactlyOnce,
            ack: true,
        },
        ExpectTx(Tx::Pub("p1")),
        PubRefused {
            publish: "p1",
            code: ErrorCode::Busy,
        },
        ExpectNoEvent,
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        // Re-sent once, with the other kept publishes, not again when the old retry was due.
        ExpectTx(Tx::Pub("p1")),
        ExpectNoTx,
        ExpectEvent(Ev::Connected),
        Advance(5_000),
        ExpectNoTx,
        PubAck {
            publish: Some("p1"),
            seq: 3,
        },
        ExpectEvent(Ev::PubAck {
            publish: "p1",
            seq: 3,
        }),
    ];
    play("retry across a drop", || Sim::new(|_| {}), &steps);
}

/// A durable's deletion forgets what it is owed only once the relay confirmed it: the
/// durable held a message untaken while a plain subscription took it (owed to the durable),
/// the app deletes the durable, the relay refuses — the durable still exists, and its next
/// resume gets the message (not a duplicate placeholder, acked and lost).
#[test]
fn a_refused_durable_deletion_keeps_what_the_durable_is_owed() {
    let mut steps = vec![
        Dialed,
        ExpectTx(Tx::Hello { account: false }),
        Relay(welcome(10_000, frame::features::DURABLE_DELETE, None)),
        ExpectEvent(Ev::Connected),
    ];
    steps.extend(live_sub(1, "b/#", qos1().durable("d")));
    steps.extend(live_sub(2, "b/x", qos1()));
    steps.extend([
        Seal {
            name: "m",
            topic: "b/x",
        },
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        Take(2),
        DeleteDurable {
            id: 1,
            flush: "del",
        },
        ExpectTx(Tx::Unsub),
        ExpectTx(Tx::Ping(1)),
        SubRefused { id: 1 },
        Pong("del"),
        ExpectEvent(Ev::DurableDeleted {
            flush: "del",
            refused: true,
        }),
    ]);
    steps.extend(live_sub(3, "b/#", qos1().durable("d")));
    steps.extend([
        Deliver {
            msg: "m",
            seq: 5,
            flags: msg_flags::REPLAYED,
        },
        ExpectEvent(Ev::Message { sub: 3, msg: "m" }),
    ]);
    play("refused durable deletion", || Sim::new(|_| {}), &steps);
}

/// A live message the relay holds back for a durable still in its history (§3.5.5
/// "Hand-over beside other subscriptions") is not that durable's: taken by another
/// (at-most-once) subscription of the connection meanwhile, it must not be acked on the
/// durable's behalf. An `Ack` frees a sequence for every subscription of the connection, so
/// one that reached the relay after its hand-over would free the durable's own copy (and
/// move its floor past it) before the app took it: lost for the durable on a crash. Its
/// sequence is acked only once the durable took the relay's copy, after `ReplayDone`.
#[test]
fn a_live_message_held_back_for_a_durable_in_history_is_not_acked_for_it() {
    let mut steps = connected_with(live_sub(1, "b/x", SubscribeOptions::new()));
    let opts = qos1().durable("d");
    let retained = opts.retained;
    steps.extend([
        sub(2, "b/#", opts),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained,
            durable: Some("d"),
        }),
        SubOkHistory { id: 2, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "h",
            topic: "b/y",
        },
        Seal {
            name: "m",
            topic: "b/x",
        },
        // The durable's history...
        history("h", 3, 2),
        // ... and, meanwhile, a live message the relay sends for sub 1 and holds back for
        // the durable.
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        Take(2),
        Take(1),
        Timeout,
        // Only the durable's history: sequence 5 is not the durable's yet.
        ExpectTx(Tx::Ack(vec![3])),
        ExpectNoTx,
        ExpectEvent(Ev::Message { sub: 2, msg: "h" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoEvent,
        // The hand-over: the relay's copy of m for the durable.
        ReplayDone { id: 2, seq: 4 },
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::ReplayDone { sub: 2, seq: 4 }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        ExpectNoEvent,
        ExpectNoTx,
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![5])),
    ]);
    play(
        "held back for a durable, not acked for it",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// The same hand-over beside an at-least-once neighbour: the live message is the
/// neighbour's alone while the durable is in its history, so the durable gets no
/// placeholder for it. Its sequence is still owed to the durable (the relay's copy
/// follows `ReplayDone`): the neighbour's ack waits until the durable took that copy, then
/// leaves with the durable's history.
#[test]
fn a_live_message_held_back_for_a_durable_in_history_is_acked_for_its_neighbour_alone() {
    let mut steps = connected_with(live_sub(1, "b/x", qos1()));
    let opts = qos1().durable("d");
    let retained = opts.retained;
    steps.extend([
        sub(2, "b/#", opts),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained,
            durable: Some("d"),
        }),
        SubOkHistory { id: 2, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "h",
            topic: "b/y",
        },
        Seal {
            name: "m",
            topic: "b/x",
        },
        history("h", 3, 2),
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "h" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoEvent,
        // The neighbour took it; the durable has not taken its own copy (nor been sent
        // it yet): 5 is not acked.
        Take(1),
        Flush("f"),
        ExpectTx(Tx::Ping(1)),
        ExpectNoTx,
        ReplayDone { id: 2, seq: 4 },
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::ReplayDone { sub: 2, seq: 4 }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        // A live copy routes to the neighbour too: a duplicate there (acked at once).
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectNoEvent,
        Take(2),
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![3, 5])),
    ]);
    play(
        "held back for a durable, acked for its neighbour",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// The durable and the neighbour of the two tests above, at-least-once both: the
/// neighbour's ack of a live message the relay held back for the durable is held back too
/// until the durable took its own copy of that sequence. An `Ack` frees a sequence for
/// every subscription of the connection: sent as soon as the neighbour took the message,
/// it could reach the relay after the relay handed the durable its copy (after
/// `ReplayDone`) and free that copy untaken — lost on a crash (the relay does not deliver
/// it again, and the durable's floor moved past it). PROTOCOL §3.5.5 "Hand-over beside
/// other subscriptions".
#[test]
fn a_neighbours_ack_of_a_message_held_back_for_a_durable_waits_for_the_durables_copy() {
    let mut steps = connected_with(live_sub(1, "b/x", qos1()));
    let opts = qos1().durable("d");
    let retained = opts.retained;
    steps.extend([
        sub(2, "b/#", opts),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained,
            durable: Some("d"),
        }),
        SubOkHistory { id: 2, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "h",
            topic: "b/y",
        },
        Seal {
            name: "m",
            topic: "b/x",
        },
        history("h", 3, 2),
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "h" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoEvent,
        // The neighbour takes m: its ack of 5 waits (a flush sends every ack ready first).
        Take(1),
        Flush("f1"),
        ExpectTx(Tx::Ping(1)),
        ExpectNoTx,
        // The durable takes its history: 3 leaves, 5 does not.
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![3])),
        ExpectNoTx,
        // The hand-over: the relay's copy of 5 for the durable, handed and not taken yet.
        ReplayDone { id: 2, seq: 4 },
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::ReplayDone { sub: 2, seq: 4 }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectNoEvent,
        Flush("f2"),
        ExpectTx(Tx::Ping(2)),
        ExpectNoTx,
        // Taken: 5 is acked, once.
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![5])),
        ExpectNoTx,
        Flush("f3"),
        ExpectTx(Tx::Ping(3)),
        ExpectNoTx,
    ]);
    play(
        "a neighbour's ack waits for the durable's copy",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// The same, but the durable goes away before its copy came: nothing is owed to it any
/// more, and the neighbour's ack of 5 leaves (after the `Unsub`). What the durable was
/// handed and never took (its history, 3) is not acked: its next resume gets it again.
#[test]
fn a_neighbours_held_ack_leaves_when_the_durable_goes_away() {
    let mut steps = connected_with(live_sub(1, "b/x", qos1()));
    let opts = qos1().durable("d");
    let retained = opts.retained;
    steps.extend([
        sub(2, "b/#", opts),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained,
            durable: Some("d"),
        }),
        SubOkHistory { id: 2, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "h",
            topic: "b/y",
        },
        Seal {
            name: "m",
            topic: "b/x",
        },
        history("h", 3, 2),
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "h" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoEvent,
        Take(1),
        Flush("f1"),
        ExpectTx(Tx::Ping(1)),
        ExpectNoTx,
        Unsubscribe(2),
        ExpectTx(Tx::Unsub),
        Timeout,
        ExpectTx(Tx::Ack(vec![5])),
        ExpectNoTx,
    ]);
    play(
        "a held ack leaves when the durable goes away",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// The same, but a key refresh replaces the held-back subscription's relay subscription
/// before its copy came: the relay's held-back copy of 5 never comes — nothing is owed to
/// the old relay subscription any more and the neighbour's ack of 5 leaves at once
/// (PROTOCOL §3.5.5: a replaced subscription's held ack is sent without waiting), before
/// the `Unsub`s (after them the relay finds no subscription holding 5 and ignores the ack)
/// and the new `Sub`s. The new one resumes from its boundary (its retained values had not
/// ended; before, it started live again and lost 5), and its history brings 5, still its
/// own although the neighbour took it.
#[test]
fn a_neighbours_held_ack_leaves_when_a_key_refresh_replaces_the_subscription() {
    let mut steps = connected_with(live_sub(1, "b/x", qos1()));
    steps.extend([
        sub(2, "b/#", qos1()),
        fresh_sub(2),
        SubOkHistory { id: 2, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "m",
            topic: "b/x",
        },
        // Live, while the relay holds back subscription 2's live messages (its retained
        // values are pending): the neighbour's copy.
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoEvent,
        Take(1),
        Flush("f1"),
        ExpectTx(Tx::Ping(1)), // no Ack [5] first: owed to subscription 2
        ExpectNoTx,
        RefreshKeys,
        // Before the Unsubs: the relay settles an ack through the subscriptions holding
        // the sequence and ignores one for unsubscribed ones.
        ExpectTx(Tx::Ack(vec![5])),
        ExpectTx(Tx::Unsub),
        ExpectTx(Tx::Unsub),
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(6)),
            retained: false,
            durable: None,
        }),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: Some(Replay::FromSeq(5)),
            retained: false,
            durable: None,
        }),
        ExpectNoTx,
        SubOkHistory { id: 2, seq: 5 },
        history("m", 5, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        ExpectNoEvent,
    ]);
    play(
        "a held ack leaves when a key refresh replaces the subscription",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// The same, cut before the durable's copy came: the held ack of 5 belonged to the old
/// connection (acks name that connection's deliveries) and is never sent on the next one.
/// There the durable resumes, gets 5 from its history (still its own although the
/// neighbour took it) and acks it once taken.
#[test]
fn a_neighbours_held_ack_is_not_sent_on_the_next_connection() {
    let mut steps = connected_with(live_sub(1, "b/x", qos1()));
    let opts = qos1().durable("d");
    let retained = opts.retained;
    steps.extend([
        sub(2, "b/#", opts),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained,
            durable: Some("d"),
        }),
        SubOkHistory { id: 2, seq: 4 },
        ExpectEvent(Ev::SubscribeOk(2)),
        Seal {
            name: "h",
            topic: "b/y",
        },
        Seal {
            name: "m",
            topic: "b/x",
        },
        history("h", 3, 2),
        Deliver {
            msg: "m",
            seq: 5,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "h" }),
        ExpectEvent(Ev::Message { sub: 1, msg: "m" }),
        ExpectNoEvent,
        Take(2),
        Take(1),
        Timeout,
        ExpectTx(Tx::Ack(vec![3])),
        ExpectNoTx,
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(6)),
            retained: false,
            durable: None,
        }),
        ExpectTx(Tx::Sub {
            sub: 2,
            replay: None,
            retained,
            durable: Some("d"),
        }),
        ExpectEvent(Ev::Connected),
        Flush("f1"),
        ExpectTx(Tx::Ping(1)),
        ExpectNoTx,
        SubOk { id: 1, seq: 5 },
        SubOkHistory { id: 2, seq: 5 },
        history("m", 5, 2),
        ReplayDone { id: 2, seq: 5 },
        // The durable's own history: no slot (nor placeholder) for the live neighbour.
        ExpectEvent(Ev::Message { sub: 2, msg: "m" }),
        ExpectEvent(Ev::ReplayDone { sub: 2, seq: 5 }),
        ExpectNoEvent,
        ExpectNoTx,
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![5])),
        ExpectNoTx,
    ]);
    play(
        "a held ack is not sent on the next connection",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// The relay's catch-up copy of `msg` for (the newest relay subscription of) `id`: live
/// flags, naming the subscription (`Msg.sub_id`), as the relay sends one after a pause.
fn catch_up(msg: &'static str, seq: u64, id: u64) -> Step {
    DeliverHistory {
        msg,
        seq,
        flags: 0,
        id,
    }
}

/// Two at-least-once subscriptions on `h/#` (1 of capacity 1, 2 of capacity 16) after
/// `m1`: subscription 1 holds it untaken, so the relay pauses it at the next one.
fn paused_beside_a_neighbour() -> Vec<Step> {
    two_subs_with_m1(qos1().capacity(16))
        .into_iter()
        .map(|step| match step {
            Subscribe { id: 1, filter, .. } => Subscribe {
                id: 1,
                filter,
                opts: qos1().capacity(1),
            },
            other => other,
        })
        .collect()
}

/// [`paused_beside_a_neighbour`], then the relay's live copy of `m2` for subscription 2,
/// naming 1 paused: 2 gets it.
fn m2_named_paused() -> Vec<Step> {
    let mut steps = paused_beside_a_neighbour();
    steps.extend([
        DeliverPaused {
            msg: "m2",
            seq: 2,
            paused: vec![1],
        },
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
    ]);
    steps
}

/// PROTOCOL §3.5.5 "Paused beside other subscriptions": the relay names a paused
/// subscription in the live copy it sends for a neighbour (`Msg.paused`). That copy is
/// the neighbour's alone: not handed to the paused one (it came before what the relay
/// still owes it), whose own copy follows in its catch-up (naming it) and passes the dedup
/// window although the neighbour's copy is in it. The sequence is not acked before the
/// paused one took its copy: an `Ack` frees it for every subscription of the connection,
/// and one that reached the relay after the catch-up sent its copy would free that copy
/// before it was taken.
#[test]
fn a_copy_naming_a_paused_subscription_is_the_neighbours_and_its_catch_up_copy_follows() {
    let mut steps = m2_named_paused();
    steps.extend([
        ExpectNoEvent,
        ExpectStat(Stat::NamedPaused, 1),
        Take(2),
        Take(2),
        // 2 is owed to subscription 1, and 1 is held by it: no ack due (the next deadline
        // is the heartbeat's, not the ack delay's).
        ExpectTimeoutIn(Some(10_000)),
        Take(1),
        Timeout,
        ExpectTx(Tx::Ack(vec![1])),
        catch_up("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        ExpectNoEvent,
        ExpectStat(Stat::Duplicates, 0),
        Take(1),
        Timeout,
        ExpectTx(Tx::Ack(vec![2])),
        ExpectNoTx,
    ]);
    play("named paused", || Sim::new(|_| {}), &steps);
}

/// A copy named paused moves no resume position of the paused subscription: cut before its
/// catch-up, it resumes from before that message and its resume history brings it (a
/// duplicate in the window, still its own). Before the relay named it, the neighbour's copy
/// reached it and its position moved past the messages the relay still owed it: lost
/// across the reconnect (found by `tests/mixed_load.rs` with reconnects).
#[test]
fn a_copy_named_paused_moves_no_resume_position_and_the_resume_brings_it() {
    let mut steps = m2_named_paused();
    steps.extend([Take(1), Take(2), Take(2)]);
    steps.extend(cut_and_m2_resumed_for_1(1, SubOk { id: 2, seq: 2 }));
    play("named paused, resumed", || Sim::new(|_| {}), &steps);
}

/// Both subscriptions paused: each catch-up copy names its subscription and goes to it
/// alone — the other's comes in its own catch-up, after the earlier messages the relay
/// owes that one (taken from the first catch-up, it came before them: found by
/// `tests/mixed_load.rs`). The second copy passes the dedup window, and the sequence is
/// acked once both took theirs. A catch-up copy held back for want of room stays owed: the
/// neighbour's ack of its own copy would free it at the relay, and the relay's
/// redelivery is what brings it.
#[test]
fn catch_up_copies_go_to_their_subscription_alone_and_each_is_acked_once_taken() {
    play(
        "catch-up copies, the neighbour's first",
        || Sim::new(|_| {}),
        &both_caught_up(2),
    );
    play(
        "catch-up copies, the held-back one first",
        || Sim::new(|_| {}),
        &both_caught_up(1),
    );
}

/// [`catch_up_copies_go_to_their_subscription_alone_and_each_is_acked_once_taken`], the
/// catch-up copy for subscription `first` coming first.
fn both_caught_up(first: u64) -> Vec<Step> {
    let mut steps = paused_beside_a_neighbour();
    // Subscription 2's catch-up copy: not 1's (1 still holds m1, untaken). 1's own copy
    // comes before it has room: held back.
    let copies = [
        vec![
            catch_up("m2", 2, 2),
            ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        ],
        vec![catch_up("m2", 2, 1)],
    ];
    let order = if first == 2 { [0, 1] } else { [1, 0] };
    for i in order {
        steps.extend(copies[i].iter().cloned());
    }
    steps.extend([
        ExpectNoEvent,
        ExpectStat(Stat::HeldBack, 1),
        Take(2),
        Take(2),
        // 2 is owed to subscription 1 (its copy held back), and 1 is held by it.
        ExpectTimeoutIn(Some(10_000)),
        Take(1),
        Timeout,
        ExpectTx(Tx::Ack(vec![1])),
        // The relay redelivers 1's copy (nothing acked it).
        Deliver {
            msg: "m2",
            seq: 2,
            flags: msg_flags::REDELIVERED,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        // A redelivery is a copy for every subscription that acknowledges: 2 had it.
        ExpectEvent(Ev::Placeholder { sub: 2 }),
        ExpectNoEvent,
        Take(1),
        Timeout,
        ExpectTx(Tx::Ack(vec![2])),
        ExpectNoTx,
    ]);
    steps
}

/// Two resumed subscriptions: the neighbour's faster history delivered `m2` (new to the
/// client on that connection), and the connection dropped before the slower history got
/// there. Its next resume history brings `m2` again, a duplicate in the window from an
/// earlier connection — still its own, once (before: a placeholder, an at-least-once loss
/// across two reconnects; found by `tests/mixed_load.rs`).
#[test]
fn a_message_a_neighbours_resume_history_delivered_before_a_second_cut_still_reaches_the_slower_one(
) {
    let mut steps = two_subs_with_m1(qos1());
    steps.extend(taken_and_resumed(2));
    steps.extend([
        history("m2", 2, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        Take(2),
    ]);
    // The second attempt: not stable yet.
    steps.extend(cut_and_m2_resumed_for_1(2, SubOkHistory { id: 2, seq: 2 }));
    play("two cuts", || Sim::new(|_| {}), &steps);
}

/// The connection drops (reconnect attempt `attempt`); subscription 1 resumes from 2 (its
/// position still 1), 2 from 3 and is confirmed by `sub_ok_2`; 1's resume history brings
/// `m2` (seq 2), which reaches it.
fn cut_and_m2_resumed_for_1(attempt: u32, sub_ok_2: Step) -> Vec<Step> {
    let resume = |sub, from| {
        ExpectTx(Tx::Sub {
            sub,
            replay: Some(Replay::FromSeq(from)),
            retained: false,
            durable: None,
        })
    };
    vec![
        Drop,
        lost(Why::Transport, Some(attempt)),
        Redial,
        resume(1, 2),
        resume(2, 3),
        ExpectEvent(Ev::Connected),
        SubOkHistory { id: 1, seq: 2 },
        sub_ok_2,
        history("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        ExpectNoEvent,
    ]
}

/// A sequence owed to a subscription named paused is acked once its own copy cannot come:
/// a `Gap` naming it ends its catch-up (the store did not keep the message), or a later
/// copy of its own stream shows the catch-up is past it. Without that the neighbour's ack
/// stayed held for good, and the relay redelivered the message to the neighbour at every
/// ack timeout.
#[test]
fn a_debt_to_a_paused_subscription_ends_with_its_gap_or_its_own_later_copy() {
    let mut steps = m2_named_paused();
    steps.extend([
        Take(1),
        Take(2),
        Take(2),
        Timeout,
        // 2 owed to subscription 1.
        ExpectTx(Tx::Ack(vec![1])),
    ]);
    let mut by_gap = steps.clone();
    by_gap.extend([
        GapNaming { id: 1, dropped: 1 },
        ExpectEvent(Ev::Gap {
            dropped: 1,
            subs: vec![1],
        }),
        Timeout,
        ExpectTx(Tx::Ack(vec![2])),
        ExpectNoTx,
    ]);
    play("owed, ended by a Gap", || Sim::new(|_| {}), &by_gap);
    let mut by_own = steps;
    by_own.extend([
        Seal {
            name: "m3",
            topic: "h/c",
        },
        // Resumed: a live copy for both.
        Deliver {
            msg: "m3",
            seq: 3,
            flags: 0,
        },
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        ExpectEvent(Ev::Message { sub: 2, msg: "m3" }),
        Take(1),
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![2, 3])),
        ExpectNoTx,
    ]);
    play(
        "owed, ended by its own stream",
        || Sim::new(|_| {}),
        &by_own,
    );
}

/// After [`two_subs_with_m1`] and a reconnect: subscription 1 (room for one) is handed
/// `m2` from its resume history and holds it untaken, so its history copy of `m3` is held
/// back for want of room; 1 takes `m2`, subscription 2's history delivers both, and 1's
/// goes on with `m4`. `m3` was sent to 1 and never acked: the relay sends it again, as a
/// redelivery after its ack timeout — out of order, after `m4` — unless 2's ack of its own
/// copy of `m3` frees it at the relay first (an `Ack` frees a sequence for the whole
/// connection): that ack waits for 1's copy.
fn own_history_copy_held_back() -> Vec<Step> {
    let mut steps = two_subs_with_m1(qos1().capacity(16));
    steps.extend(taken_and_resumed(9));
    for (name, topic) in [("m3", "h/c"), ("m4", "h/d")] {
        steps.push(Seal { name, topic });
    }
    steps.extend([
        history("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        history("m3", 3, 1),
        ExpectNoEvent,
        ExpectStat(Stat::HeldBack, 1),
        // Its held-back slot leaves the ack queue now, unacked.
        Take(1),
        history("m2", 2, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        history("m3", 3, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m3" }),
        history("m4", 4, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m4" }),
        ExpectNoEvent,
    ]);
    steps
}

/// A subscription's own copy held back for want of room is still owed to it after later
/// copies of its own stream and the end of its catch-up: the relay sent that copy, so it
/// sends it again as a redelivery (it is never acked meanwhile), and a cut before that
/// resumes the subscription from before it. Before: the later copy settled what it
/// awaited ("the relay sends what it owes in order" holds for a catch-up, not for a copy
/// sent and never acked) and moved its resume position past it, and the `Gap` ending its
/// catch-up forgave it — the redelivery, a duplicate of 2's copy in the window, was
/// dropped, and a cut lost it for good (found by `tests/mixed_load.rs` with cuts).
#[test]
fn an_own_copy_held_back_for_want_of_room_comes_again_after_later_ones() {
    let mut redelivered = own_history_copy_held_back();
    redelivered.extend([
        ReplayDone { id: 1, seq: 9 },
        ExpectEvent(Ev::ReplayDone { sub: 1, seq: 9 }),
        ReplayDone { id: 2, seq: 9 },
        ExpectEvent(Ev::ReplayDone { sub: 2, seq: 9 }),
        GapNaming { id: 1, dropped: 1 },
        ExpectEvent(Ev::Gap {
            dropped: 1,
            subs: vec![1],
        }),
        Take(1),
        Take(2),
        Take(2),
        Timeout,
        // Everything but 3: 1 never took it (2 once both took their copies of it: 2's
        // history was still to bring its own when 1 took m2).
        ExpectTx(Tx::Ack(vec![4, 2])),
        ExpectNoTx,
    ]);
    redelivered.extend(m3_redelivered_to(1, 2));
    play(
        "own copy held back, redelivered",
        || Sim::new(|c| c.sub_capacity = 1),
        &redelivered,
    );

    let resume = |sub, from| {
        ExpectTx(Tx::Sub {
            sub,
            replay: Some(Replay::FromSeq(from)),
            retained: false,
            durable: None,
        })
    };
    let mut cut = own_history_copy_held_back();
    cut.extend([
        Take(1),
        Drop,
        lost(Why::Transport, Some(2)),
        Redial,
        // 1 from 3, the copy it never took; 2 after m3.
        resume(1, 3),
        resume(2, 4),
        ExpectEvent(Ev::Connected),
        SubOkHistory { id: 1, seq: 9 },
        SubOkHistory { id: 2, seq: 9 },
        history("m3", 3, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        Take(1),
        // m4 it had: a placeholder.
        history("m4", 4, 1),
        ExpectEvent(Ev::Placeholder { sub: 1 }),
        ExpectNoEvent,
    ]);
    play(
        "own copy held back, cut",
        || Sim::new(|c| c.sub_capacity = 1),
        &cut,
    );
}

/// An at-least-once subscription confirmed (`SubOk.seq` 3) that was delivered nothing
/// yet resumes after that boundary when the connection drops: a message stored while it was
/// away comes in its resume history. Before, it started live again and lost every stored
/// message published while it was disconnected (found by `tests/mixed_load.rs` with cuts).
/// An at-most-once neighbour starts live again (with its retained values).
#[test]
fn an_at_least_once_subscription_that_got_nothing_yet_resumes_after_its_boundary() {
    let mut steps = connected_with(vec![
        sub(1, "h/#", qos1()),
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: None,
            retained: true,
            durable: None,
        }),
        SubOk { id: 1, seq: 3 },
        ExpectEvent(Ev::SubscribeOk(1)),
    ]);
    steps.extend(live_sub(2, "h/#", SubscribeOptions::new()));
    steps.extend([
        Seal {
            name: "m4",
            topic: "h/a",
        },
        Drop,
        lost(Why::Transport, Some(1)),
        Redial,
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(4)),
            retained: false,
            durable: None,
        }),
        fresh_sub(2),
        ExpectEvent(Ev::Connected),
        SubOkHistory { id: 1, seq: 5 },
        SubOk { id: 2, seq: 5 },
        history("m4", 4, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m4" }),
        ExpectNoEvent,
    ]);
    play("resumes after its boundary", || Sim::new(|_| {}), &steps);
}

/// A paused subscription's catch-up copy of a message it was named paused in, held back
/// for want of room, is on its way again (a redelivery): the `Gap` ending its catch-up does
/// not forgive it, so across a cut its resume history brings it, a duplicate of the
/// neighbour's copy in the window and still its own. Before, the `Gap` dropped its dedup
/// exception (as for a copy that would never come) and the resumed copy was dropped as a
/// duplicate: a stored message lost (found by `tests/mixed_load.rs` with cuts, seed 1054).
#[test]
fn a_catch_up_copy_held_back_is_not_forgiven_by_the_gap_that_ends_the_catch_up() {
    let mut steps = m2_named_paused();
    steps.extend([
        // Its catch-up copy comes before it took m1: held back.
        catch_up("m2", 2, 1),
        ExpectNoEvent,
        ExpectStat(Stat::HeldBack, 1),
        GapNaming { id: 1, dropped: 1 },
        ExpectEvent(Ev::Gap {
            dropped: 1,
            subs: vec![1],
        }),
        Take(1),
        Take(2),
        Take(2),
    ]);
    steps.extend(cut_and_m2_resumed_for_1(1, SubOk { id: 2, seq: 2 }));
    play(
        "held-back catch-up copy, Gap, cut",
        || Sim::new(|_| {}),
        &steps,
    );
}

/// Two resumed at-least-once subscriptions: the first's history copy of `m3` is taken
/// while the second's history is still to bring its own — which comes held back for want
/// of room. An `Ack` frees a sequence for the whole connection: sent when the first took
/// its copy, it could reach the relay after the relay sent the second's, and the relay
/// would never send that one again. So the first copy's ack waits until the second's
/// came (here: its redelivery, taken). Before, `3` was acked at once (found by
/// `tests/mixed_load.rs` with cuts, seed 1094).
#[test]
fn a_history_copy_is_acked_only_once_the_other_histories_bringing_it_had_theirs() {
    let steps = history_copy_of_m3_taken_by_1();
    let mut redelivered = steps.clone();
    redelivered.extend([
        history("m3", 3, 2),
        ExpectNoEvent,
        ExpectStat(Stat::HeldBack, 1),
        Take(2),
        Timeout,
        ExpectTx(Tx::Ack(vec![2])),
        ExpectNoTx,
    ]);
    redelivered.extend(m3_redelivered_to(2, 1));
    play(
        "history acks wait for the other histories",
        || Sim::new(|c| c.sub_capacity = 1),
        &redelivered,
    );
    // Subscription 2's history ends without m3 (the store no longer had it): not coming,
    // so the ack of 3 is no longer held for it.
    let mut ended = steps;
    ended.extend([
        Take(2),
        ReplayDone { id: 2, seq: 9 },
        ExpectEvent(Ev::ReplayDone { sub: 2, seq: 9 }),
        Timeout,
        ExpectTx(Tx::Ack(vec![2, 3])),
        ExpectNoTx,
    ]);
    play(
        "history acks wait until the other history ends",
        || Sim::new(|c| c.sub_capacity = 1),
        &ended,
    );
}

/// The relay's redelivery of `m3` (sequence 3): subscription `to`'s (it held its copy
/// back), a duplicate passed by `other`; acked once `to` took it.
fn m3_redelivered_to(to: u64, other: u64) -> Vec<Step> {
    vec![
        Deliver {
            msg: "m3",
            seq: 3,
            flags: msg_flags::REDELIVERED,
        },
        ExpectEvent(Ev::Message { sub: to, msg: "m3" }),
        ExpectEvent(Ev::Placeholder { sub: other }),
        ExpectNoEvent,
        Take(to),
        Timeout,
        ExpectTx(Tx::Ack(vec![3])),
        ExpectNoTx,
    ]
}

/// [`a_history_copy_is_acked_only_once_the_other_histories_bringing_it_had_theirs`] up to
/// subscription 1's taking its history copy of `m3` (2's history still to bring it).
fn history_copy_of_m3_taken_by_1() -> Vec<Step> {
    let mut steps = two_subs_with_m1(qos1());
    steps.extend(taken_and_resumed(9));
    steps.extend([
        Seal {
            name: "m3",
            topic: "h/c",
        },
        history("m2", 2, 2),
        ExpectEvent(Ev::Message { sub: 2, msg: "m2" }),
        history("m2", 2, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m2" }),
        Take(1),
        history("m3", 3, 1),
        ExpectEvent(Ev::Message { sub: 1, msg: "m3" }),
        Take(1),
        // No ack due (the next deadline is the heartbeat): 2 waits for subscription 2's
        // taking m2, 3 for its copy of m3.
        ExpectTimeoutIn(Some(10_000)),
    ]);
    steps
}

/// An at-least-once subscription asking for retained values, cut before its hand-over
/// ended (`SubOk.history`, no `ReplayDone` yet): on the next connection it resumes from
/// its boundary — what was stored since it was confirmed comes in its resume history —
/// and, from a relay granting `RETAINED_BEFORE`, asks for its retained values again (those
/// older than its resume point, PROTOCOL §3.5.5). Before, it started live again: every
/// message stored while it waited and was away was lost (found by `tests/mixed_load.rs`
/// on a loaded CI machine, where a retained hand-over outlasted a publisher's burst: the
/// relay holds a subscription's live messages back until its `ReplayDone`). Once its
/// retained values ended, a later resume asks for none.
#[test]
fn a_cut_during_the_retained_hand_over_resumes_an_acknowledging_subscription_from_its_boundary() {
    let resumed = |retained| {
        ExpectTx(Tx::Sub {
            sub: 1,
            replay: Some(Replay::FromSeq(6)),
            retained,
            durable: None,
        })
    };
    let cut = [Drop, lost(Why::Transport, Some(1)), Timeout, Dialed];
    let hello = ExpectTx(Tx::Hello { account: false });
    for granted in [0, frame::features::RETAINED_BEFORE] {
        let mut steps = connected_with(vec![
            sub(1, "h/#", qos1()),
            fresh_sub(1),
            SubOkHistory { id: 1, seq: 5 },
            ExpectEvent(Ev::SubscribeOk(1)),
        ]);
        steps.extend(cut.clone());
        steps.extend([
            hello.clone(),
            Relay(welcome(10_000, granted, None)),
            resumed(granted != 0),
            ExpectEvent(Ev::Connected),
            ExpectNoTx,
        ]);
        play("cut during the hand-over", || Sim::new(|_| {}), &steps);
    }
    // Its hand-over ended: the next resume asks for no retained values, granted or not.
    let mut steps = connected_with(vec![
        sub(1, "h/#", qos1()),
        fresh_sub(1),
        SubOkHistory { id: 1, seq: 5 },
        ExpectEvent(Ev::SubscribeOk(1)),
        ReplayDone { id: 1, seq: 5 },
    ]);
    steps.extend(cut);
    steps.extend([
        hello,
        Relay(welcome(10_000, frame::features::RETAINED_BEFORE, None)),
        resumed(false),
        ExpectEvent(Ev::Connected),
        ExpectNoTx,
    ]);
    play("cut after the hand-over", || Sim::new(|_| {}), &steps);
}
