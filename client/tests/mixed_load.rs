//! Randomised end to end over the real relay (TCP, memory store): one publisher; one
//! subscriber client with several overlapping subscriptions of mixed QoS on one connection,
//! a small subscription capacity, and apps that stop reading at random points and resume
//! (on events: the publisher's progress, never on time). Whatever the interleaving, every
//! subscription's app
//!
//! 1. never sees a message twice, nor one its filter does not match;
//! 2. sees every at-least-once message (a QoS 1 publish: the store keeps it) when it is an
//!    at-least-once subscription itself;
//! 3. for every other matching message, sees it or is told of its loss (`Lagged`): nothing
//!    is lost silently (a loss may be told more than once — a known limit, PROTOCOL §3.5.5 —
//!    so this checks `seen + told ≥ matching`).
//!
//! This is what the client's flow control (credit, holding back, the order rule, the
//! withheld-loss reports) promises together (issue 9 "No oracle, no silent loss"; sessions
//! 50–51 found silent losses in exactly these interleavings by reading the code, this test
//! four more in session 52, and a loss across reconnects). Each case prints its seed and
//! draw on failure; `WHISPEER_MIXED_SEEDS=N` runs N more seeds, `WHISPEER_MIXED_SEED=S`
//! only seed S. A quarter of the cases run on a relay that keeps QoS 0 too (every message
//! stored).
//!
//! The subscriber's connection is also cut (through a proxy) after random publishes (up to
//! two cuts per case; `WHISPEER_MIXED_CUTS=0` turns them off); across reconnects only what
//! the store keeps is accounted for (live-only messages published while a subscription was
//! away leave no trace anyone could report). Cuts found two losses fixed in session 52 (a
//! message in two resumed histories; a subscription's own history copy held back while a
//! neighbour's delivered the message), three in session 53 — a paused subscription's
//! resume position moved past what the relay still owed it by a neighbour's live copy (the
//! relay now names paused subscriptions in such copies, `Msg.paused`) or by a neighbour's
//! catch-up copy (catch-up copies now name their subscription, `Msg.sub_id`), and a slow
//! resumed history that lost what a faster one delivered before a second cut — and five in
//! session 54: a subscription's own copy held back for want of room (which comes again only
//! as a redelivery, out of order) settled by later copies and forgiven by the `Gap` ending
//! its catch-up; a neighbour's ack freeing such a copy at the relay (history copies, and
//! overlapping histories); and an at-least-once subscription that had received nothing
//! resubscribing live after a cut. They were opt-in until then (a run of 52 seeds failed
//! about one time in two or three); since, 860 seeds with cuts passed in a row. One more
//! came from a CI run on a loaded machine (session 58): an at-least-once subscription cut
//! before its retained values ended started live again and lost what was stored meanwhile
//! (the relay holds its live messages back until `ReplayDone`); a failing case now prints
//! what the client and relay logged of each subscription's course (`case_log`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::proxy::KillerProxy;
use support::*;
use tokio::sync::watch;
use whispeer::protocol::Qos;
use whispeer::{Client, Encryption, PublishOptions, ReceiveError, SubscribeOptions, Tcp};

/// Messages each case publishes.
const MESSAGES: u32 = 240;
/// Bound for a whole case: generous, as a held-back message a relay cannot resume from its
/// store may wait for one ack timeout (shortened here to 1 s).
const CASE: Duration = Duration::from_secs(90);

const FILTERS: [&str; 4] = ["t/#", "t/a", "t/+", "t/b"];
const TOPICS: [&str; 2] = ["t/a", "t/b"];

/// One subscription of a case.
#[derive(Debug, Clone)]
struct SubPlan {
    filter: &'static str,
    acking: bool,
    /// Stop reading after taking this many messages, until the publisher has published
    /// this many; then the next pause (in order).
    pauses: Vec<(usize, u32)>,
}

/// One message of a case: its topic and whether it is published at least once.
#[derive(Clone, Copy)]
struct MsgPlan {
    topic: &'static str,
    acking: bool,
}

impl std::fmt::Debug for MsgPlan {
    /// `a1` = QoS 1 on `t/a`, `b0` = QoS 0 on `t/b`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", &self.topic[2..], u8::from(self.acking))
    }
}

#[derive(Debug, Clone)]
struct Case {
    capacity: usize,
    /// The relay keeps QoS 0 publishes too (`store.store_qos0`): every message is stored.
    store_qos0: bool,
    /// The subscriber's connection is cut (through a proxy) after these many publishes;
    /// it reconnects and resumes (at-least-once subscriptions from their last sequence).
    cuts: Vec<u32>,
    subs: Vec<SubPlan>,
    msgs: Vec<MsgPlan>,
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, of: &[T]) -> T {
    of[rng.next_u32() as usize % of.len()]
}

fn draw(seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let capacity = pick(&mut rng, &[1usize, 2, 3, 8]);
    let store_qos0 = rng.next_u32() % 4 == 0;
    let mut cuts: Vec<u32> = (0..rng.next_u32() % 3)
        .map(|_| 1 + rng.next_u32() % (MESSAGES - 1))
        .collect();
    cuts.sort();
    if std::env::var("WHISPEER_MIXED_CUTS").is_ok_and(|v| v == "0") {
        cuts.clear();
    }
    let n_subs = 2 + rng.next_u32() as usize % 3;
    let subs = (0..n_subs)
        .map(|_| {
            let filter = pick(&mut rng, &FILTERS);
            let acking = rng.next_u32() % 2 == 0;
            let mut pauses = Vec::new();
            let (mut taken, mut until) = (0usize, 0u32);
            for _ in 0..rng.next_u32() % 4 {
                taken += 1 + rng.next_u32() as usize % 30;
                until = (until + 10 + rng.next_u32() % 80).min(MESSAGES);
                pauses.push((taken, until));
            }
            SubPlan {
                filter,
                acking,
                pauses,
            }
        })
        .collect();
    let msgs = (0..MESSAGES)
        .map(|_| MsgPlan {
            topic: pick(&mut rng, &TOPICS),
            acking: rng.next_u32() % 3 == 0,
        })
        .collect();
    Case {
        capacity,
        store_qos0,
        cuts,
        subs,
        msgs,
    }
}

/// Whether every message `plan` matches must be seen or told lost: always without
/// reconnects; across them only when the store keeps everything an at-least-once
/// subscription resumes from (live-only messages published while it was away leave no
/// trace anyone could report).
fn whole(case: &Case, plan: &SubPlan) -> bool {
    case.cuts.is_empty() || (plan.acking && case.store_qos0)
}

fn matches(filter: &str, topic: &str) -> bool {
    match filter {
        "t/#" | "t/+" => topic.starts_with("t/"),
        f => f == topic,
    }
}

/// What one subscription's app saw.
#[derive(Debug, Default)]
struct Seen {
    values: Vec<u32>,
    told_lost: u64,
    /// The error that ended reading, if not the client's close.
    ended: Option<String>,
    /// What the app saw, in order: a value, or `-n` for `n` told lost.
    log: Vec<i64>,
}

/// Reads `sub` as its plan says until the client closes; `report` turns true once the app
/// accounted for everything `enough` asks.
async fn read(
    mut sub: whispeer::Subscription<u32>,
    plan: SubPlan,
    published: watch::Receiver<u32>,
    enough: impl Fn(&Seen) -> bool,
    report: watch::Sender<bool>,
    progress: Arc<std::sync::Mutex<Vec<i64>>>,
) -> Seen {
    let mut seen = Seen::default();
    let mut pauses = plan.pauses.into_iter().peekable();
    loop {
        if let Some(&(after, until)) = pauses.peek() {
            if seen.values.len() >= after {
                // The app stops reading until the publisher got that far.
                let mut p = published.clone();
                let _ = p.wait_for(|n| *n >= until).await;
                pauses.next();
                continue;
            }
        }
        progress.lock().unwrap().clone_from(&seen.log);
        if enough(&seen) {
            report.send_replace(true);
        }
        match sub.next_message().await {
            Some(Ok(m)) => {
                seen.values.push(m.value);
                seen.log.push(i64::from(m.value));
            }
            Some(Err(ReceiveError::Lagged(n))) => {
                seen.told_lost += n;
                seen.log.push(-(n as i64));
            }
            // The client closed at the end of the case (or something broke: shown).
            Some(Err(e)) => {
                seen.ended = Some(e.to_string());
                return seen;
            }
            None => return seen,
        }
    }
}

/// What the client and the relay log of each subscription's course — where it resumed,
/// its `SubOk`s, histories and their ends, warnings — for a case that fails (one CI run
/// failed once, on a loaded machine, where no local run reproduced it: the next one says
/// what happened). This test binary's only log subscriber.
fn case_log() -> &'static support::logs::LogBuf {
    static LOG: std::sync::OnceLock<support::logs::LogBuf> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = support::logs::LogBuf::default();
        let writer = log.clone();
        let filter = tracing_subscriber::EnvFilter::new(
            "warn,whispeer::core::connection=debug,whispeer_relay::replay=debug,\
             whispeer_relay::session=debug",
        );
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_env_filter(filter)
                .with_writer(move || writer.clone())
                .finish(),
        )
        .expect("the only log subscriber of this test binary");
        log
    })
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn run_case(case: Case) -> Result<(), String> {
    case_log().clear();
    let store_qos0 = case.store_qos0;
    let relay = TestRelay::start_with(|c| {
        c.delivery.ack_timeout_ms = 1_000;
        c.store.store_qos0 = store_qos0;
    })
    .await;
    let proxy = KillerProxy::start(relay.addrs.tcp.unwrap()).await;
    let t = tree("mixed");
    let sub_client = Client::builder()
        .with(Tcp::new(format!("tcp://{}", proxy.addr)))
        .with(whispeer::Reconnect::new(
            Duration::from_millis(5),
            Duration::from_millis(50),
        ))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(identity())
        .subscription_capacity(case.capacity)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let p = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;

    // What each subscription must account for.
    let expected: Vec<(BTreeSet<u32>, BTreeSet<u32>)> = case
        .subs
        .iter()
        .map(|s| {
            let all: BTreeSet<u32> = (0..MESSAGES)
                .filter(|i| matches(s.filter, case.msgs[*i as usize].topic))
                .collect();
            let must: BTreeSet<u32> = all
                .iter()
                .copied()
                .filter(|i| s.acking && (case.store_qos0 || case.msgs[*i as usize].acking))
                .collect();
            (all, must)
        })
        .collect();

    let (published_tx, published) = watch::channel(0u32);
    let mut readers = Vec::new();
    let mut done_flags = Vec::new();
    let mut progress = Vec::new();
    for (plan, (all, must)) in case.subs.iter().zip(&expected) {
        let opts = if plan.acking {
            SubscribeOptions::new().qos(Qos::AtLeastOnce)
        } else {
            SubscribeOptions::new()
        };
        let sub = sub_client
            .subscribe_with_options::<u32>(plan.filter, opts)
            .await
            .map_err(|e| e.to_string())?;
        let (all, must) = (Arc::new(all.clone()), Arc::new(must.clone()));
        // Across a reconnect a subscription misses the live-only messages published while
        // it was away, and nothing can tell it (the relay kept no trace of them): only
        // what the store keeps is accounted for then.
        let whole = whole(&case, plan);
        let enough = move |s: &Seen| {
            let got: BTreeSet<u32> = s.values.iter().copied().collect();
            must.is_subset(&got) && (!whole || got.len() as u64 + s.told_lost >= all.len() as u64)
        };
        let (report, done) = watch::channel(false);
        done_flags.push(done);
        let p = Arc::new(std::sync::Mutex::new(Vec::new()));
        progress.push(p.clone());
        readers.push(tokio::spawn(read(
            sub,
            plan.clone(),
            published.clone(),
            enough,
            report,
            p,
        )));
    }
    // Every subscription is in place at the relay before the first publish.
    sub_client.flush().await.map_err(|e| e.to_string())?;

    for (i, m) in case.msgs.iter().enumerate() {
        let opts = if m.acking {
            PublishOptions::at_least_once()
        } else {
            PublishOptions::default()
        };
        p.publish_with(m.topic, &(i as u32), opts)
            .await
            .map_err(|e| format!("publish {i}: {e}"))?;
        let _ = published_tx.send(i as u32 + 1);
        if case.cuts.contains(&(i as u32 + 1)) {
            proxy.cut_all();
        }
    }
    p.flush().await.map_err(|e| e.to_string())?;

    // Every app accounts for everything it must (or the case times out: a silent loss).
    for (k, d) in done_flags.iter_mut().enumerate() {
        if tokio::time::timeout(CASE, d.wait_for(|x| *x))
            .await
            .is_err()
        {
            let log = progress[k].lock().unwrap().clone();
            let got: BTreeSet<u32> = log.iter().filter(|v| **v >= 0).map(|v| *v as u32).collect();
            let told: i64 = -log.iter().filter(|v| **v < 0).sum::<i64>();
            let (all, must) = &expected[k];
            let unseen: Vec<String> = all
                .difference(&got)
                .map(|i| format!("{i}:{:?}", case.msgs[*i as usize]))
                .collect();
            // Every subscription's course, by local id (`LocalSubId` k + 1: subscribed
            // in order on a new client).
            let others: Vec<String> = progress
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    let log = p.lock().unwrap().clone();
                    let got: BTreeSet<u32> =
                        log.iter().filter(|v| **v >= 0).map(|v| *v as u32).collect();
                    let missing = expected[j].1.difference(&got).count();
                    format!(
                        "  subscription {j}: seen {}, stored missing {missing}, first {:?}",
                        got.len(),
                        &log[..log.len().min(12)]
                    )
                })
                .collect();
            return Err(format!(
                "subscription {k} never accounted for its messages: seen {}, told lost \
                 {told}, matching {}, stored {}; client {:?}\nunseen {unseen:?}\nlog {log:?}\n\
                 every subscription:\n{}\nthe case's log (last 300 lines):\n{}",
                got.len(),
                all.len(),
                must.len(),
                sub_client.stats(),
                others.join("\n"),
                tail(&case_log().text(), 300)
            ));
        }
    }
    // Anything still on its way arrives before the flush's answer: then the apps stop (a
    // flush a cut interrupted is asked again on the next connection).
    while let Err(e) = sub_client.flush().await {
        if !matches!(e, whispeer::FlushError::Disconnected) {
            return Err(e.to_string());
        }
    }
    sub_client.close().await;
    let mut seen = Vec::new();
    for r in readers {
        seen.push(r.await.map_err(|e| e.to_string())?);
    }
    p.close().await;
    relay.stop().await;

    for (k, ((s, (all, must)), plan)) in seen.iter().zip(&expected).zip(&case.subs).enumerate() {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for v in &s.values {
            *counts.entry(*v).or_default() += 1;
        }
        let twice: Vec<_> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(v, _)| v)
            .collect();
        if !twice.is_empty() {
            return Err(format!(
                "subscription {k} ({plan:?}) saw {twice:?} twice; log {:?}",
                s.log
            ));
        }
        let got: BTreeSet<u32> = counts.keys().copied().collect();
        let foreign: Vec<_> = got.difference(all).collect();
        if !foreign.is_empty() {
            return Err(format!(
                "subscription {k} ({plan:?}) saw {foreign:?}, not its own"
            ));
        }
        let missing: Vec<_> = must.difference(&got).collect();
        if !missing.is_empty() {
            return Err(format!(
                "subscription {k} ({plan:?}) lost stored {missing:?}"
            ));
        }
        if whole(&case, plan) && (got.len() as u64) + s.told_lost < all.len() as u64 {
            let why = s.ended.as_deref().unwrap_or("-");
            return Err(format!(
                "subscription {k} ({plan:?}): {} of {} seen, {} told lost: {} lost silently (ended: {why})",
                got.len(),
                all.len(),
                s.told_lost,
                all.len() as u64 - got.len() as u64 - s.told_lost
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_of_mixed_qos_lose_nothing_silently_and_see_nothing_twice() {
    let extra: u64 = std::env::var("WHISPEER_MIXED_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let only: Option<u64> = std::env::var("WHISPEER_MIXED_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    let seeds: Vec<u64> = match only {
        Some(s) => vec![s],
        None => (1..=12).chain(1_000..1_000 + extra).collect(),
    };
    for seed in seeds {
        let case = draw(seed);
        let shown = format!("{case:?}");
        match tokio::time::timeout(CASE * 2, run_case(case)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("seed {seed}: {e}\n{shown}"),
            Err(_) => panic!("seed {seed}: timed out\n{shown}"),
        }
    }
}
