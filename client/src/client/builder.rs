//! Connecting a [`ClientBuilder`] (its settings live in `options`, with the engines that
//! fill them in): the first connection must succeed, then the driver task runs the
//! connection engine.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::rngs::OsRng;
use rand::RngCore;
use tokio::sync::{mpsc, oneshot, watch};
use whispeer_protocol::{Identity, Keyring};

use super::driver::Driver;
use super::handle::Client;
use super::shared::{now_ms, Backlog, ClientStats, ConnectionState, Inbox, Inner};
use crate::core::connection::{Backoff, Engine as ConnEngine, EngineConfig, Now};
use crate::error::ConnectError;
use crate::options::ClientBuilder;
use crate::transport::{Dialer, Endpoint};

/// What a relay account gives away over `ep` when it is plaintext (`ws://`, `tcp://`) to a
/// host other than loopback — the warning [`ClientBuilder::connect`] logs once per URL — or
/// `None` (TLS, QUIC, loopback, or no account).
fn plaintext_auth(ep: &Endpoint, auth: Option<&crate::RelayAuth>) -> Option<&'static str> {
    use crate::core::connection::AccountAuth;
    if ep.tls || ep.quic || crate::transport::is_loopback_host(&ep.host) {
        return None;
    }
    match &auth?.0 {
        AccountAuth::Token(_) => Some("the relay account's bearer token"),
        AccountAuth::Key(_) => Some("the relay account's sign-in"),
    }
}

impl ClientBuilder {
    /// One dialer per relay, in the order tried (every URL is checked now: a bad one fails
    /// `connect` rather than a failover hours later).
    fn dialers(&self) -> Result<Vec<Dialer>, ConnectError> {
        #[cfg(feature = "in-process")]
        if let Some(relay) = &self.in_process {
            return Ok(vec![Dialer::InProcess(relay.clone())]);
        }
        if self.urls.is_empty() {
            return Err(ConnectError::NoTransport);
        }
        self.urls
            .iter()
            .map(|url| {
                let ep = Endpoint::parse(url)?;
                if let Some(what) = plaintext_auth(&ep, self.relay_auth.as_ref()) {
                    tracing::warn!(
                        "relay {url} is plaintext to a host other than loopback: {what} and \
                         all metadata cross the network in the clear (use wss:// or tls://)"
                    );
                }
                Ok(Dialer::Net {
                    ep,
                    tls: self.tls.clone(),
                })
            })
            .collect()
    }

    /// Connects (the first attempt must succeed) and starts the background task.
    pub async fn connect(mut self) -> Result<Client, ConnectError> {
        // Per-topic rules over the client-wide settings as finally configured (kept so by
        // every `with`; again here whatever set them).
        self.resolve_topic_rules();
        if let Some(e) = self.key_error {
            return Err(e.into());
        }
        let dialers = self.dialers()?;
        #[allow(unused_mut)]
        let mut keyring = self.keyring;
        #[cfg(feature = "persistence")]
        let saved = match &self.state_file {
            Some(path) => Some(crate::persist::Store::open(path)?),
            None => None,
        };
        // The admins pinned by earlier runs: a grant of the builder's keyring signed by
        // another admin of a pinned tree fails here (`AdminMismatch`), and so does any later
        // one. The merged pins are saved at once.
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            // And when epochs were superseded in earlier runs (the builder's grants were
            // added now: without them the previous epoch's grace restarted at every start).
            st.restore_keys(&mut keyring, now_ms())?;
        }
        let keyring = Arc::new(RwLock::new(keyring));
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let seal_jobs = self.seal_jobs.unwrap_or_else(seal_ahead);
        #[allow(unused_mut)]
        let mut cfg = EngineConfig {
            client_name: self.name,
            auth: self.relay_auth.map(|a| a.0),
            connect_timeout_ms: ms(self.connect_timeout),
            relays: dialers.len(),
            // What a relay-bound sign-in signs on a connection to each (PROTOCOL §3.5.6).
            relay_names: dialers.iter().map(Dialer::relay_name).collect(),
            require_bound_auth: self.require_bound_auth,
            backoff: Backoff::new(
                ms(self.reconnect.initial),
                ms(self.reconnect.max),
                self.reconnect.max_attempts,
            ),
            offline_bytes: self.outbox_bytes,
            kept_bytes: self.kept_bytes,
            sub_capacity: self.sub_capacity as u64,
            receive: self.receive,
            // Durable owner secrets: from the identity (a restarted client keeps its
            // durables), else random for this client's lifetime.
            owner_key: Some(match (self.durable_owner, &self.identity) {
                (Some(k), _) => k,
                (None, Some(i)) => i.derive_secret("whispeer v2 durable owner"),
                (None, None) => {
                    let mut k = zeroize::Zeroizing::new([0u8; 32]);
                    OsRng.fill_bytes(&mut k[..]);
                    k
                }
            }),
            // More than one core: envelopes open on the worker threads (`pool`), in relay
            // order; one core gains nothing from the hand-off, so it opens inline.
            open_ahead: open_ahead(),
            // Batch signing: the engine queues prepared publishes and cuts seal jobs; with
            // more than one core they run on the worker threads (`pool`), in publish order.
            batch: self.policy.batch.unwrap_or(crate::core::DEFAULT_BATCH),
            seal_ahead: seal_jobs.max(1),
            trickle: steady_batching(
                self.steady_batching,
                std::env::var("WHISPEER_STEADY_BATCHING").ok().as_deref(),
            ),
            ..EngineConfig::default()
        };
        // Publishes a previous run kept but never saw acknowledged: re-sent first.
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            cfg.restored = st
                .outbox()?
                .into_iter()
                .map(|(pid, ord, frame)| (crate::core::connection::PublishId(pid), ord, frame))
                .collect();
        }
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let epoch = tokio::time::Instant::now();
        #[allow(unused_mut)]
        let mut eng = ConnEngine::new(cfg, keyring.clone(), seed, Now::new(0, now_ms()));
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            // A window (or what durables are owed) that cannot be read fails the connect:
            // never an empty one in its place (`PersistError::Unreadable`, `Unavailable`).
            st.restore(eng.core_mut().guard_mut(), now_ms())?;
            st.restore_owed(eng.core_mut())?;
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(ConnectionState::Reconnecting(0));
        let (relay_tx, relay_rx) = watch::channel(dialers[0].describe().to_owned());
        let (stats_tx, stats) = watch::channel(ClientStats::default());
        let (first_tx, first_rx) = oneshot::channel();
        let backlog = Arc::new(Backlog::new(self.publish_buffer));
        let batch = self.policy.batches(self.identity.as_ref());
        let inbox = Arc::new(Inbox::new(
            batch.map_or(64, |b| b.max_messages.clamp(1, 4096) as usize),
        ));
        let driver = Driver::new(super::driver::Parts {
            eng,
            epoch,
            dialers,
            relay: relay_tx,
            max_frame: self.max_frame,
            connect_timeout: self.connect_timeout,
            cmd_rx,
            state: state_tx,
            stats: stats_tx,
            plugins: self.plugins.clone(),
            backlog: backlog.clone(),
            first: first_tx,
            inbox: inbox.clone(),
            signer: batch.and(self.identity.clone()).map(Arc::new),
            seal_inline: seal_jobs == 0,
            #[cfg(feature = "persistence")]
            saved,
        });
        tokio::spawn(driver.run());
        first_rx
            .await
            .map_err(|_| ConnectError::Handshake("the connection task stopped".into()))??;
        Ok(Client {
            inner: Arc::new(Inner {
                cmd: cmd_tx,
                inbox,
                keyring,
                identity: self.identity,
                policy: self.policy,
                state: state_rx,
                relay: relay_rx,
                stats,
                next_id: AtomicU64::new(1),
                plugins: self.plugins,
                backlog,
                types: Default::default(),
                type_mismatches: Default::default(),
                close_flush: self.connect_timeout,
            }),
        })
    }
}

impl Client {
    /// A builder; add a transport, keys and an identity with `.with(...)`.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects to `url` (`ws://`, `wss://`, `tcp://`, `tls://`) with these keys and identity,
    /// zstd level 3 and Padmé padding.
    pub async fn connect(
        url: &str,
        keyring: Keyring,
        identity: Identity,
    ) -> Result<Client, ConnectError> {
        ClientBuilder {
            urls: vec![url.to_owned()],
            keyring,
            identity: Some(identity),
            ..ClientBuilder::default()
        }
        .connect()
        .await
    }
}

/// How many frames a subscriber may park while their envelopes open on the worker threads
/// (`EngineConfig::open_ahead`): 0 (inline) on one core, else 256. `WHISPEER_OPEN_AHEAD`
/// overrides it (0 opens inline; for measuring).
fn open_ahead() -> usize {
    env_or(
        "WHISPEER_OPEN_AHEAD",
        if super::pool::cores() > 1 { 256 } else { 0 },
    )
}

/// Whether steady-stream batching is on (`EngineConfig::trickle`): the builder's
/// [`ClientBuilder::steady_batching`] where it was called, else `WHISPEER_STEADY_BATCHING`
/// (`env`) as a number other than 0; off by default and for anything unparsable.
fn steady_batching(set: Option<bool>, env: Option<&str>) -> bool {
    set.unwrap_or_else(|| {
        env.and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n != 0)
    })
}

/// `name` parsed from the environment (an override for measuring), else `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many seal jobs (batch signing) may run on the worker threads at once
/// (`EngineConfig::seal_ahead`): 0 (inline, on the connection task) on up to two cores,
/// else 2 — while they run, publishes queue and the next batch grows by itself. On two
/// cores the hand-off measured no throughput gain and 1–4 µs more client CPU per message
/// (`whispeer bench`, 100k × 1 KiB, batch-signed: 44.1–49.6k msg/s with jobs vs 48.5–49.7k
/// inline), so there it seals inline; with more cores the publisher's sealing would
/// otherwise be one core's work (not measured here: no such machine).
/// `WHISPEER_SEAL_AHEAD` overrides it (0 seals inline; for measuring).
fn seal_ahead() -> usize {
    env_or(
        "WHISPEER_SEAL_AHEAD",
        if super::pool::cores() > 2 { 2 } else { 0 },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RelayAuth;

    /// The builder's call wins over the environment both ways; the environment decides
    /// only where it was not called, and only a number other than 0 turns it on.
    #[test]
    fn steady_batching_follows_the_builder_then_the_environment() {
        assert!(steady_batching(Some(true), None));
        assert!(steady_batching(Some(true), Some("0")));
        assert!(!steady_batching(Some(false), Some("1")));
        assert!(!steady_batching(None, None));
        assert!(steady_batching(None, Some("1")));
        assert!(steady_batching(None, Some("2")));
        for off in ["0", "", "yes", "-1", "on"] {
            assert!(!steady_batching(None, Some(off)), "{off:?}");
        }
    }

    /// Plaintext to a host other than loopback with a relay account warns (once per URL, at
    /// `connect`); TLS, QUIC, loopback or no account does not.
    #[test]
    fn plaintext_with_a_relay_account_off_loopback_is_flagged() {
        let token = RelayAuth::token("t0ken");
        let key = RelayAuth::key(ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
        let ep = |u: &str| Endpoint::parse(u).unwrap();
        for u in [
            "ws://relay.example:80",
            "tcp://192.0.2.1:7481",
            "ws://[2001:db8::1]",
        ] {
            assert!(plaintext_auth(&ep(u), Some(&token))
                .unwrap()
                .contains("token"));
            assert!(plaintext_auth(&ep(u), Some(&key)).is_some(), "{u}");
            assert!(plaintext_auth(&ep(u), None).is_none(), "{u}");
        }
        for u in [
            "wss://relay.example",
            "tls://relay.example:443",
            "quic://relay.example:443",
            "ws://127.0.0.1:7070",
            "tcp://localhost:7481",
            "ws://[::1]:7070",
        ] {
            assert!(plaintext_auth(&ep(u), Some(&token)).is_none(), "{u}");
        }
    }
}
