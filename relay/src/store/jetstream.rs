//! The cluster store: JetStream numbers and keeps stored messages for every relay.
//!
//! With `[cluster] store = "jetstream"` every relay of a cluster uses one JetStream stream
//! (`[cluster] stream`, default `WSP`, subjects `<prefix>.>`), so a sequence means the same
//! on every relay:
//!
//! - **Publishing.** [`append`](Store::append) (under the routing lock, never waiting)
//!   queues the envelope for the stream — subject `<prefix>.<key id hex>.<token hex>…`,
//!   header `Nats-Msg-Id` for QoS 2 — and answers [`Accepted::Pending`]. The publish is not
//!   routed then: one task publishes the queue in order, another awaits JetStream's acks in
//!   order; the stream's ack carries the sequence, and only then does the publisher get its
//!   `PubAck` ([`Store::when_sequenced`]). A duplicate `Nats-Msg-Id` inside the stream's
//!   duplicate window is answered with the original's sequence (QoS 2 dedup across relays).
//! - **Live delivery** on every relay, the accepting one included, comes from the stream:
//!   one ordered consumer per relay reads it in sequence order and hands each message to
//!   the router ([`Store::take_sequenced`]), which makes it [`last_seq`](Store::last_seq)
//!   under the routing lock ([`Store::advance`]) and fans it out with that sequence.
//! - **QoS 0 the retention policy does not keep** (`store_qos0 = false`) is not numbered:
//!   [`Accepted::Live`] with sequence 0, routed at once and carried to the other relays by
//!   core NATS (the bridge, on `<prefix>_live.…`). It cannot be resumed.
//! - **History** (replay, catch-up) is read back from the stream by an ordered consumer
//!   filtered on the key id, from a start sequence; **retained values** live in a second
//!   stream (`<stream>_RETAINED`, subjects `<prefix>_retained.>`, one message per subject)
//!   carrying the original's sequence in header `Wsp-Seq`; **durable floors** live in a
//!   third stream (`<stream>_DURABLE`, subjects `<prefix>_durable.<key>`, one message per
//!   durable), kept in memory from an ordered read of it and written behind.
//! - **Sequence space.** `Welcome.seq_space` is derived from the stream's name and creation
//!   time, the same on every relay, and new when the stream is recreated.
//!
//! JetStream unreachable: publishes that need the store get `Err(store_failed)` (retryable)
//! while live routing of QoS 0 goes on. The relay sees here what it sees anyway — tokens,
//! sizes, flags, publish ids — and never opens an envelope.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use whispeer_protocol::frame::{pub_flags, Replay};
use whispeer_protocol::{Envelope, KeyId, Qos, TokenPattern};

use super::{
    path_bytes, Accepted, Append, DurableKey, OnDurable, OnSequenced, ReadChunk, ReadPlan,
    RetentionStatus, Sequenced, Store, StoreError, StoreMetrics, StoreStatus, Stored, Tenant,
};
use crate::config::{ClusterConfig, StoreConfig};
use crate::ids::Seq;

/// Header carrying a retained value's original sequence.
const SEQ_HEADER: &str = "Wsp-Seq";
/// Header carrying the publish flags (absent = 0).
const FLAGS_HEADER: &str = "Wsp-Flags";
/// Most messages one history read returns.
const CHUNK: usize = 1024;
/// How long a history or retained read may take before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Numbered messages waiting for the router.
const FEED: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream {what}: {e}"))
}

/// The subject prefix of live-only (unnumbered) envelopes on core NATS, outside the
/// stream's `<prefix>.>`.
pub fn live_prefix(prefix: &str) -> String {
    format!("{prefix}_live")
}

fn retained_prefix(prefix: &str) -> String {
    format!("{prefix}_retained")
}

fn durable_prefix(prefix: &str) -> String {
    format!("{prefix}_durable")
}

/// One publish on its way to the stream.
struct Job {
    ticket: u64,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    /// The retained stream's subject, for a `RETAIN` publish.
    retain: Option<String>,
}

enum Slot {
    Done(Result<Accepted, StoreError>),
    Waiting(OnSequenced),
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
    live_only: AtomicU64,
    busy: AtomicU64,
    rows_read: AtomicU64,
}

struct Inner {
    rt: tokio::runtime::Handle,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    retained_stream: String,
    prefix: String,
    space: [u8; 16],
    last: AtomicU64,
    jobs: mpsc::Sender<Job>,
    next_ticket: AtomicU64,
    slots: Mutex<HashMap<u64, Slot>>,
    feed: Mutex<Option<mpsc::Receiver<Sequenced>>>,
    store_qos0: bool,
    retention: RetentionStatus,
    /// The durable-floor stream (a direct read on each durable `Sub`).
    durable_stream: stream::Stream,
    /// Durable floors by key, as the durable stream's reader reports them (and this relay
    /// wrote them).
    durables: Mutex<HashMap<String, u64>>,
    /// Floors to write to the durable stream (write-behind).
    dirty: Mutex<HashMap<String, u64>>,
    flush: Arc<Notify>,
    counters: Counters,
}

/// The JetStream-backed store (`[cluster] store = "jetstream"`).
pub struct JetStreamStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("stream", &self.inner.stream)
            .field("last", &self.inner.last.load(Relaxed))
            .finish_non_exhaustive()
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn limit(v: u64) -> i64 {
    if v == 0 {
        -1
    } else {
        i64::try_from(v).unwrap_or(i64::MAX)
    }
}

impl JetStreamStore {
    /// Connects, creates (or finds) the stream, the retained stream and the durable stream,
    /// and starts the publishing, acknowledging, live-reading and durable tasks on the
    /// current runtime. Waits (retrying) until JetStream answers: the relay cannot name its
    /// sequence space before.
    pub async fn open(cluster: &ClusterConfig, config: &StoreConfig) -> Result<Self, StoreError> {
        let client = crate::cluster::connect_plain(cluster)
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let prefix = cluster.subject_prefix.clone();
        let name = cluster.stream.clone();
        let retained_name = format!("{name}_RETAINED");
        let durable_name = format!("{name}_DURABLE");
        let main_cfg = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            max_messages_per_subject: limit(config.max_messages),
            max_age: ms(config.max_age_ms),
            max_bytes: limit(config.total_max_bytes),
            max_messages: limit(config.total_max_messages),
            discard: stream::DiscardPolicy::New,
            duplicate_window: ms(config.dedup_window_ms.max(1)),
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            allow_direct: true,
            ..Default::default()
        };
        let retained_cfg = stream::Config {
            name: retained_name.clone(),
            subjects: vec![format!("{}.>", retained_prefix(&prefix))],
            max_messages_per_subject: 1,
            max_age: ms(config.retained_max_age_ms),
            max_messages: limit(config.total_max_retained),
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        // Durable floors: one message per durable (the last floor): a key-value store made
        // of a plain stream (async-nats 0.51's KV API did not parse nats-server 2.9's
        // answers when creating a bucket).
        let durable_cfg = stream::Config {
            name: durable_name.clone(),
            subjects: vec![format!("{}.>", durable_prefix(&prefix))],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        let mut attempt = 0u32;
        let (mut main, durables) = loop {
            let r = async {
                let main = js
                    .get_or_create_stream(main_cfg.clone())
                    .await
                    .map_err(|e| unavailable("stream", e))?;
                js.get_or_create_stream(retained_cfg.clone())
                    .await
                    .map_err(|e| unavailable("retained stream", e))?;
                let durables = js
                    .get_or_create_stream(durable_cfg.clone())
                    .await
                    .map_err(|e| unavailable("durable stream", e))?;
                Ok::<_, StoreError>((main, durables))
            }
            .await;
            match r {
                Ok(v) => break v,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cluster store: JetStream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8))))
                        .await;
                }
            }
        };
        let info = main
            .info()
            .await
            .map_err(|e| unavailable("stream info", e))?
            .clone();
        let space = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(b"whispeer-relay/v2/jetstream-seq-space\0");
            h.update(name.as_bytes());
            h.update([0]);
            h.update(info.created.unix_timestamp_nanos().to_be_bytes());
            let d = h.finalize();
            let mut s = [0u8; 16];
            s.copy_from_slice(&d[..16]);
            s
        };
        let last = info.state.last_sequence;
        let (jobs_tx, jobs_rx) = mpsc::channel(cluster.queue);
        let (feed_tx, feed_rx) = mpsc::channel(FEED);
        let inner = Arc::new(Inner {
            rt: tokio::runtime::Handle::current(),
            client,
            js: js.clone(),
            stream: name,
            retained_stream: retained_name,
            prefix,
            space,
            last: AtomicU64::new(last),
            jobs: jobs_tx,
            next_ticket: AtomicU64::new(1),
            slots: Mutex::new(HashMap::new()),
            feed: Mutex::new(Some(feed_rx)),
            store_qos0: config.store_qos0,
            retention: RetentionStatus {
                max_messages: config.max_messages,
                max_bytes: 0,
                max_age_ms: config.max_age_ms,
            },
            durable_stream: durables.clone(),
            durables: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashMap::new()),
            flush: Arc::new(Notify::new()),
            counters: Counters::default(),
        });
        // Durable floors: what the stream holds now, then every change, kept in memory.
        tokio::spawn(durable_watch(
            Arc::downgrade(&inner),
            durables,
            format!("{}.", durable_prefix(&inner.prefix)),
        ));
        tokio::spawn(durable_writer(
            Arc::downgrade(&inner),
            inner.flush.clone(),
            js.clone(),
            durable_prefix(&inner.prefix),
        ));
        let (acks_tx, acks_rx) = mpsc::channel(cluster.queue);
        tokio::spawn(publish_loop(js.clone(), jobs_rx, acks_tx));
        tokio::spawn(ack_loop(Arc::downgrade(&inner), js, acks_rx));
        tokio::spawn(live_loop(main, last, feed_tx));
        tracing::info!(
            stream = %inner.stream,
            last_seq = last,
            "cluster store: JetStream stream ready"
        );
        Ok(Self { inner })
    }

    fn resolve(inner: &Inner, ticket: u64, r: Result<Accepted, StoreError>) {
        match &r {
            Ok(Accepted::Duplicate(_)) => {
                inner.counters.duplicates.fetch_add(1, Relaxed);
            }
            Ok(_) => {
                inner.counters.appends.fetch_add(1, Relaxed);
            }
            Err(_) => {
                inner.counters.failures.fetch_add(1, Relaxed);
            }
        }
        let waiting = {
            let mut slots = lock(&inner.slots);
            match slots.remove(&ticket) {
                Some(Slot::Waiting(done)) => Some(done),
                _ => {
                    slots.insert(ticket, Slot::Done(r.clone()));
                    None
                }
            }
        };
        if let Some(done) = waiting {
            done(r);
        }
    }

    /// Blocks the calling (non-runtime) thread on a JetStream read.
    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(StoreError::Unavailable(
                "a JetStream read was called on the async runtime".into(),
            ));
        }
        self.inner.rt.block_on(async {
            tokio::time::timeout(READ_TIMEOUT, f)
                .await
                .map_err(|_| StoreError::Unavailable("JetStream read timed out".into()))?
        })
    }

    /// Reads the stream's messages of `key_id` in `from..=upto` (at most `max`), calling
    /// `each(seq, received ms, envelope, flags)`; returns the last sequence looked at.
    async fn scan(
        &self,
        key_id: &KeyId,
        from: u64,
        upto: u64,
        max: usize,
        mut each: impl FnMut(u64, u64, Envelope),
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        if from > upto {
            return Ok(upto);
        }
        let stream = inner
            .js
            .get_stream_no_info(&inner.stream)
            .await
            .map_err(|e| unavailable("stream", e))?;
        let cfg = consumer::pull::OrderedConfig {
            filter_subject: format!("{}.{}.>", inner.prefix, key_id),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        };
        let c = stream
            .create_consumer(cfg)
            .await
            .map_err(|e| unavailable("history consumer", e))?;
        let mut last = upto;
        if c.cached_info().num_pending == 0 {
            return Ok(last);
        }
        let mut msgs = c
            .messages()
            .await
            .map_err(|e| unavailable("history read", e))?;
        let mut n = 0;
        while let Some(m) = msgs.next().await {
            let m = m.map_err(|e| unavailable("history read", e))?;
            let info = m.info().map_err(|e| unavailable("history read", e))?;
            let seq = info.stream_sequence;
            let pending = info.pending;
            let ts = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            if seq > upto {
                break;
            }
            inner.counters.rows_read.fetch_add(1, Relaxed);
            if let Ok(env) = Envelope::from_bytes(m.payload.clone()) {
                each(seq, ts, env);
            }
            n += 1;
            if pending == 0 || seq == upto {
                break;
            }
            if n >= max {
                last = seq;
                break;
            }
        }
        Ok(last)
    }

    fn durable_key(key: &DurableKey) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(key.name.as_bytes());
        format!("{}.{}", key.key_id, hex::encode(&h[..16]))
    }
}

async fn publish_loop(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Job>,
    acks: mpsc::Sender<(
        Job,
        Result<jetstream::context::PublishAckFuture, StoreError>,
    )>,
) {
    while let Some(job) = rx.recv().await {
        let r = js
            .publish_with_headers(
                job.subject.clone(),
                job.headers.clone(),
                job.payload.clone(),
            )
            .await
            .map_err(|e| unavailable("publish", e));
        if acks.send((job, r)).await.is_err() {
            return;
        }
    }
}

async fn ack_loop(
    inner: std::sync::Weak<Inner>,
    js: jetstream::Context,
    mut rx: mpsc::Receiver<(
        Job,
        Result<jetstream::context::PublishAckFuture, StoreError>,
    )>,
) {
    while let Some((job, r)) = rx.recv().await {
        let out = async {
            let ack = r?.await.map_err(|e| unavailable("publish ack", e))?;
            let seq = Seq(ack.sequence);
            if ack.duplicate {
                return Ok(Accepted::Duplicate(seq));
            }
            if let Some(subject) = &job.retain {
                let mut h = HeaderMap::new();
                h.insert(SEQ_HEADER, ack.sequence.to_string().as_str());
                js.publish_with_headers(subject.clone(), h, job.payload.clone())
                    .await
                    .map_err(|e| unavailable("retained publish", e))?
                    .await
                    .map_err(|e| unavailable("retained publish ack", e))?;
            }
            Ok(Accepted::New(seq))
        }
        .await;
        let Some(inner) = inner.upgrade() else { return };
        JetStreamStore::resolve(&inner, job.ticket, out);
    }
}

/// Reads the whole stream in order from `last + 1`, forever (re-created after errors),
/// feeding the router.
async fn live_loop(stream: stream::Stream, last: u64, feed: mpsc::Sender<Sequenced>) {
    let mut next = last + 1;
    let mut failures = 0u32;
    loop {
        let cfg = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            ..Default::default()
        };
        let msgs = match stream.create_consumer(cfg).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match msgs {
            Ok(mut msgs) => {
                while let Some(m) = msgs.next().await {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster store: live read error");
                            break;
                        }
                    };
                    let Ok(info) = m.info() else { continue };
                    let seq = info.stream_sequence;
                    if seq < next {
                        continue;
                    }
                    next = seq + 1;
                    failures = 0;
                    let flags = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(FLAGS_HEADER))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    let Ok(envelope) = Envelope::from_bytes(m.payload.clone()) else {
                        tracing::debug!(seq, "cluster store: a stream message is no envelope");
                        continue;
                    };
                    let s = Sequenced {
                        seq: Seq(seq),
                        envelope,
                        flags,
                    };
                    if feed.send(s).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cluster store: cannot read the stream"),
        }
        if feed.is_closed() {
            return;
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
    }
}

/// Keeps the in-memory durable floors in step with the durable stream (its current
/// contents, then every change), re-reading it after errors.
async fn durable_watch(inner: std::sync::Weak<Inner>, stream: stream::Stream, prefix: String) {
    let mut failures = 0u32;
    loop {
        let cfg = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        };
        if let Ok(c) = stream.create_consumer(cfg).await {
            if let Ok(mut msgs) = c.messages().await {
                while let Some(Ok(m)) = msgs.next().await {
                    let Some(i) = inner.upgrade() else { return };
                    failures = 0;
                    let Some(key) = m.subject.as_str().strip_prefix(&prefix) else {
                        continue;
                    };
                    let Some(floor) = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let mut d = lock(&i.durables);
                    let e = d.entry(key.to_string()).or_insert(floor);
                    *e = (*e).max(floor);
                }
            }
        }
        if inner.strong_count() == 0 {
            return;
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
    }
}

async fn durable_writer(
    inner: std::sync::Weak<Inner>,
    flush: Arc<Notify>,
    js: jetstream::Context,
    prefix: String,
) {
    loop {
        let notified = flush.notified();
        let Some(i) = inner.upgrade() else { return };
        let batch: Vec<(String, u64)> = lock(&i.dirty).drain().collect();
        drop(i);
        for (k, v) in batch {
            let r = match js
                .publish(format!("{prefix}.{k}"), Bytes::from(v.to_string()))
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cluster store: durable floor not written");
            }
        }
        notified.await;
    }
}

impl Store for JetStreamStore {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn features(&self) -> u64 {
        super::KEEPING_FEATURES
    }

    fn append(&self, m: Append<'_>) -> Result<Accepted, StoreError> {
        let inner = &self.inner;
        let retain = m.flags & pub_flags::RETAIN != 0;
        if m.qos == Qos::AtMostOnce && !inner.store_qos0 && !retain {
            inner.counters.live_only.fetch_add(1, Relaxed);
            return Ok(Accepted::Live(Seq(0)));
        }
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            inner.counters.failures.fetch_add(1, Relaxed);
            return Err(StoreError::Unavailable(
                "JetStream is unreachable; retry".into(),
            ));
        }
        let path = m.path;
        let subject = crate::cluster::path_subject(&inner.prefix, path);
        let mut headers = HeaderMap::new();
        if m.flags != 0 {
            headers.insert(FLAGS_HEADER, m.flags.to_string().as_str());
        }
        if let (Qos::ExactlyOnce, Some(id)) = (m.qos, m.publish_id) {
            let scoped = match m.tenant {
                Tenant::Account(a) => format!("{}-{}", hex::encode(&a[..8]), hex::encode(id)),
                _ => hex::encode(id),
            };
            headers.insert(async_nats::header::NATS_MESSAGE_ID, scoped.as_str());
        }
        let ticket = inner.next_ticket.fetch_add(1, Relaxed);
        let job = Job {
            ticket,
            subject,
            headers,
            payload: m.envelope.as_bytes().clone(),
            retain: retain
                .then(|| crate::cluster::path_subject(&retained_prefix(&inner.prefix), path)),
        };
        match inner.jobs.try_send(job) {
            Ok(()) => Ok(Accepted::Pending(ticket)),
            Err(mpsc::error::TrySendError::Full(_)) => {
                inner.counters.busy.fetch_add(1, Relaxed);
                Err(StoreError::Busy(
                    "the JetStream publish queue is full".into(),
                ))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StoreError::Unavailable(
                "the JetStream publisher stopped".into(),
            )),
        }
    }

    fn last_seq(&self) -> Seq {
        Seq(self.inner.last.load(Relaxed))
    }

    fn seq_space(&self) -> [u8; 16] {
        self.inner.space
    }

    fn when_durable(&self, _seq: Seq, done: OnDurable) {
        // Every numbered message came back from the stream: it is stored there.
        done(Ok(()))
    }

    fn when_sequenced(&self, ticket: u64, done: OnSequenced) {
        let ready = {
            let mut slots = lock(&self.inner.slots);
            match slots.remove(&ticket) {
                Some(Slot::Done(r)) => Some(r),
                _ => {
                    slots.insert(ticket, Slot::Waiting(done));
                    return;
                }
            }
        };
        if let Some(r) = ready {
            done(r);
        }
    }

    fn advance(&self, seq: Seq) {
        self.inner.last.fetch_max(seq.0, Relaxed);
    }

    fn take_sequenced(&self) -> Option<mpsc::Receiver<Sequenced>> {
        lock(&self.inner.feed).take()
    }

    fn when_readable(&self, _key_id: &KeyId, _upto: Seq, done: OnDurable) {
        // A sequence is assigned only to what the stream holds already.
        done(Ok(()))
    }

    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: Seq,
    ) -> Result<ReadPlan, StoreError> {
        match replay {
            Replay::FromSeq(s) => Ok(ReadPlan {
                start: s,
                ..ReadPlan::default()
            }),
            Replay::SinceMs(t) => {
                // The first stored message at or after `t` (history is read in order, so
                // the reads filter by time from there).
                let mut first = None;
                let mut from = 1;
                while first.is_none() && from <= upto.0 {
                    let last = self.block(self.scan(
                        pattern.key_id(),
                        from,
                        upto.0,
                        CHUNK,
                        |seq, ts, env| {
                            if first.is_none() && ts >= t && pattern.matches(&env.token_path()) {
                                first = Some(seq);
                            }
                        },
                    ))?;
                    if last >= upto.0 {
                        break;
                    }
                    from = last + 1;
                }
                Ok(ReadPlan {
                    start: first.unwrap_or(upto.0 + 1),
                    since_ms: Some(t),
                    path_starts: None,
                })
            }
            Replay::LastN(n) => {
                // Every matching message's sequence per path, then each path's n-th last.
                let mut per_path: HashMap<Vec<u8>, Vec<u64>> = HashMap::new();
                let mut from = 1;
                while from <= upto.0 {
                    let last = self.block(self.scan(
                        pattern.key_id(),
                        from,
                        upto.0,
                        CHUNK,
                        |seq, _, env| {
                            let path = env.token_path();
                            if pattern.matches(&path) {
                                per_path.entry(path_bytes(&path)).or_default().push(seq);
                            }
                        },
                    ))?;
                    if last >= upto.0 {
                        break;
                    }
                    from = last + 1;
                }
                let starts = per_path
                    .into_iter()
                    .filter(|_| n > 0)
                    .map(|(p, seqs)| {
                        let k = usize::try_from(n).unwrap_or(usize::MAX).min(seqs.len());
                        (p, seqs[seqs.len() - k])
                    })
                    .collect::<HashMap<_, _>>();
                Ok(ReadPlan::per_path(starts, upto))
            }
        }
    }

    fn read(
        &self,
        pattern: &TokenPattern,
        plan: &ReadPlan,
        from: u64,
        upto: Seq,
    ) -> Result<ReadChunk, StoreError> {
        let from = from.max(plan.start);
        let mut msgs = Vec::new();
        let last =
            self.block(
                self.scan(pattern.key_id(), from, upto.0, CHUNK, |seq, ts, env| {
                    let path = env.token_path();
                    if pattern.matches(&path) && plan.admits(seq, &path_bytes(&path), ts) {
                        msgs.push(Stored {
                            seq: Seq(seq),
                            envelope: env,
                        });
                    }
                }),
            )?;
        Ok(ReadChunk {
            msgs,
            next: last.saturating_add(1),
        })
    }

    fn retained(&self, pattern: &TokenPattern, upto: Seq) -> Result<Vec<Stored>, StoreError> {
        let inner = &self.inner;
        let rp = retained_prefix(&inner.prefix);
        let out = self.block(async {
            let stream = inner
                .js
                .get_stream_no_info(&inner.retained_stream)
                .await
                .map_err(|e| unavailable("retained stream", e))?;
            let mut out = Vec::new();
            for subject in crate::cluster::pattern_subjects(&rp, pattern) {
                let cfg = consumer::pull::OrderedConfig {
                    filter_subject: subject,
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    ..Default::default()
                };
                let c = stream
                    .create_consumer(cfg)
                    .await
                    .map_err(|e| unavailable("retained consumer", e))?;
                if c.cached_info().num_pending == 0 {
                    continue;
                }
                let mut msgs = c
                    .messages()
                    .await
                    .map_err(|e| unavailable("retained read", e))?;
                while let Some(m) = msgs.next().await {
                    let m = m.map_err(|e| unavailable("retained read", e))?;
                    let pending = m.info().map(|i| i.pending).unwrap_or(0);
                    inner.counters.rows_read.fetch_add(1, Relaxed);
                    let seq = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(SEQ_HEADER))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    if let (Some(seq), Ok(env)) = (seq, Envelope::from_bytes(m.payload.clone())) {
                        if seq <= upto.0 && pattern.matches(&env.token_path()) {
                            out.push(Stored {
                                seq: Seq(seq),
                                envelope: env,
                            });
                        }
                    }
                    if pending == 0 {
                        break;
                    }
                }
            }
            Ok(out)
        })?;
        let mut out = out;
        out.sort_by_key(|s| s.seq);
        Ok(out)
    }

    fn durable(&self, key: &DurableKey) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        let k = Self::durable_key(key);
        let cached = lock(&inner.durables).get(&k).copied();
        // The floor another relay wrote may not have reached this relay's reader yet (it
        // was acknowledged there an instant before that relay died): read the stream's
        // value directly. A durable `Sub` is rare; the wait is bounded. Only on the
        // multi-threaded runtime (the `serve` binary); elsewhere the reader's view counts.
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if flavor.ok() != Some(tokio::runtime::RuntimeFlavor::MultiThread) {
            return Ok(cached);
        }
        let subject = format!("{}.{k}", durable_prefix(&inner.prefix));
        let stream = inner.durable_stream.clone();
        let fetched = tokio::task::block_in_place(|| {
            inner.rt.block_on(async move {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    stream.get_last_raw_message_by_subject(&subject),
                )
                .await
            })
        });
        let fetched = match fetched {
            Err(_) => {
                return Err(StoreError::Unavailable(
                    "JetStream durable read timed out".into(),
                ))
            }
            Ok(Ok(m)) => std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|v| v.parse::<u64>().ok()),
            Ok(Err(e)) => {
                use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
                match e.kind() {
                    K::NoMessageFound => None,
                    _ => return Err(unavailable("durable read", e)),
                }
            }
        };
        Ok(match (cached, fetched) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        })
    }

    fn set_durable(
        &self,
        key: &DurableKey,
        floor: u64,
        _tenant: &Tenant,
    ) -> Result<(), StoreError> {
        let k = Self::durable_key(key);
        {
            let mut d = lock(&self.inner.durables);
            let e = d.entry(k.clone()).or_insert(floor);
            *e = (*e).max(floor);
        }
        lock(&self.inner.dirty).insert(k, floor);
        self.inner.flush.notify_one();
        Ok(())
    }

    fn status(&self) -> StoreStatus {
        let inner = &self.inner;
        let last = inner.last.load(Relaxed);
        let connected = inner.client.connection_state() == async_nats::connection::State::Connected;
        StoreStatus {
            kind: self.kind().into(),
            retention: inner.retention,
            last_seq: last,
            committed_seq: last,
            durables: lock(&inner.durables).len() as u64,
            state: if connected { "ok" } else { "unavailable" }.into(),
            ..StoreStatus::default()
        }
    }

    fn metrics(&self) -> StoreMetrics {
        let c = &self.inner.counters;
        StoreMetrics {
            appends: c.appends.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            commit_failures: c.failures.load(Relaxed),
            live_only: c.live_only.load(Relaxed),
            busy_rejections: c.busy.load(Relaxed),
            rows_read: c.rows_read.load(Relaxed),
            ..StoreMetrics::default()
        }
    }

    fn close(&self) {
        self.inner.flush.notify_one();
    }
}
