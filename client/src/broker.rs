//! In-process mode: the relay embedded in this process, with keys ready.
//!
//! For single-process apps and tests a [`Broker`] is the whole system in one value: an
//! embedded `whispeer-relay` (the same code as the server, no sockets unless asked), a tree
//! key, and an embedded client that connects to it over channels. Encryption and compression
//! stay on — messages are sealed and opened exactly as over the network, so code moves to a
//! real relay by changing one line. One builder, one `.with(engine)` for everything:
//!
//! - every engine a [`ClientBuilder`] takes (compression, padding, identity, plugins, topic
//!   options...) configures the embedded client (and the clients of
//!   [`Broker::connect_client`]);
//! - [`WebSocket::new(url)`](crate::WebSocket), [`Tcp::new(addr)`](crate::Tcp) and
//!   [`Quic::new(addr)`](crate::Quic) mean "also serve there" (`http://`, `ws://`,
//!   `tcp://`, `quic://` or `host:port`; port 0 picks one and [`Broker::ws_url`] /
//!   [`Broker::tcp_url`] / [`Broker::quic_url`] tell the real one), so other processes (a
//!   browser, the CLI) join the same broker. QUIC is always TLS 1.3: without a certificate
//!   in [`BrokerBuilder::relay_config`] the broker makes a self-signed one (kept in the
//!   persistence directory, so its pin survives a restart) and [`Broker::tls_pin`] gives
//!   the fingerprint a client pins;
//! - [`Persistence::sqlite(dir)`](crate::Persistence) keeps, in one directory, the relay's
//!   history (`relay.sqlite`, ciphertext only), the embedded client's outbox and dedup
//!   window (`client.sqlite`), and the broker's generated keys (`broker.keys`, mode 0600,
//!   never in a store) — so history stays readable after a restart;
//! - [`Encryption::new()`](crate::Encryption) (the default) makes a fresh tree,
//!   [`Encryption::with_keys`](crate::Encryption::with_keys) takes existing key strings;
//!   [`Broker::keys`] returns the strings to share out of band.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use serde::{Deserialize, Serialize};
//! use whispeer::{Broker, BrokerOptions, Compression, Encryption, Message, WebSocket};
//! #[derive(Debug, Default, Clone, Serialize, Deserialize)]
//! struct MyData { name: String, id: i32 }
//!
//! let broker = Broker::builder(BrokerOptions::default())
//!     .with(Encryption::new())
//!     .with(Compression::new())
//!     .with(WebSocket::new("http://127.0.0.1:0"))
//!     .build()
//!     .await?;
//! let _sub = broker
//!     .subscribe("some-event", |msg: Message<MyData>| println!("{:?}", msg.value))
//!     .await?;
//! broker.publish("some-event", MyData::default()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use whispeer_protocol::{Identity, KeyError, PassphraseParams, TreeKey};
use whispeer_relay::config::{ListenAddr, StoreKind};
use whispeer_relay::{BoundAddrs, Config, Listeners, Relay, RelayError, RelayHandle};

use crate::client::{
    now_ms, Client, Message, PublishOptions, Subscription, SubscriptionHandle, TypedTopic,
};
use crate::core::SubscribeOptions;
use crate::error::{ConnectError, PublishError, SubscribeError};
use crate::options::{AnyKey, BrokerSetup, ClientBuilder, Engine, InProcess};
use crate::options::{Compression, Encryption};
use crate::tag::TypeTag;

/// The relay history file in a broker's persistence directory.
pub const RELAY_STORE_FILE: &str = "relay.sqlite";
/// The embedded client's state file (outbox, dedup window) in a broker's directory.
pub const CLIENT_STATE_FILE: &str = "client.sqlite";
/// The broker's key file (generated key strings, mode 0600) in its directory.
pub const KEY_FILE: &str = "broker.keys";
/// The embedded client's identity (secret string, mode 0600) in the broker's directory.
pub const IDENTITY_FILE: &str = "broker.identity";
/// The self-signed certificate of a broker's QUIC listener (PEM) in its directory.
pub const QUIC_CERT_FILE: &str = "broker.crt";
/// The private key of that certificate (PEM, mode 0600) in the broker's directory.
pub const QUIC_KEY_FILE: &str = "broker.key";

/// Why a broker could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The embedded relay could not bind or build.
    #[error("embedded relay: {0}")]
    Relay(#[from] RelayError),
    /// The tree key could not be made or loaded.
    #[error("broker keys: {0}")]
    Keys(#[from] KeyError),
    /// A listen address given with `WebSocket::new`/`Tcp::new`/`Quic::new` is not usable.
    #[error("cannot serve on {addr:?}: {reason}")]
    Listen {
        /// What was given.
        addr: String,
        /// Why it is refused.
        reason: String,
    },
    /// The persistence directory or a key file could not be read or written.
    #[error("broker directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The key file is sealed under a passphrase and `BrokerOptions::key_passphrase` is not
    /// set.
    #[error("{path} is sealed under a passphrase: set BrokerOptions::key_passphrase")]
    KeyFileLocked {
        /// The key file.
        path: PathBuf,
    },
    /// `BrokerOptions::key_passphrase` is set but this key or identity file holds a plain
    /// secret string: the files are meant to be sealed at rest, and a plain line may have
    /// been written by whoever can write the directory (a planted tree key would make the
    /// broker publish under theirs), so it is not used. Seal the line
    /// (`whispeer::protocol::locked::lock_secret_string`) or unset the passphrase.
    #[error(
        "{path} holds a plain secret string but BrokerOptions::key_passphrase is set: \
         refusing to use it (the broker's files are sealed at rest: replace the line by its \
         wslocked1… form, whispeer::protocol::locked::lock_secret_string, or unset \
         key_passphrase)"
    )]
    KeyFileNotLocked {
        /// The key or identity file.
        path: PathBuf,
    },
    /// `Encryption::with_keyring` on a broker: it must be able to hand its keys on.
    #[error(
        "a broker needs key strings (Encryption::with_keys) or a fresh tree \
         (Encryption::new()), not a Keyring: it hands its keys to other clients"
    )]
    KeyringNotShareable,
    /// The embedded client could not connect to the embedded relay.
    #[error("embedded client: {0}")]
    Connect(#[from] ConnectError),
    /// The QUIC listener's certificate could not be made, read or written.
    #[error("QUIC certificate: {0}")]
    Tls(#[from] whispeer_relay::tls::TlsError),
    /// Unix: the persistence directory exists and is owned by another user, or writable
    /// by others without the sticky bit, so whoever can write it could have planted (or
    /// replace) the key file, identity or QUIC certificate and key the broker would use.
    /// (A group-writable one of this user's is used, with a warning.)
    #[error(
        "broker directory {} {}: another user could plant the broker's keys, identity or \
         certificate in it; use a directory of your own, not writable by others (chmod 700)",
        .path.display(),
        dir_problem(*.owner, *.uid, *.mode)
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// Unix: a file in the persistence directory (key file, identity, QUIC certificate or
    /// key) is a symbolic link, not a regular file, another user's or writable by group or
    /// others: refused, never read nor written into.
    #[error("broker file {} {reason}", .path.display())]
    UnsafeFile {
        /// The file.
        path: PathBuf,
        /// Why it is refused.
        reason: crate::error::UnsafeFile,
    },
}

/// What is wrong with a store directory ([`BrokerError::UnsafeDirectory`]).
fn dir_problem(owner: u32, uid: u32, mode: u32) -> String {
    if owner != uid {
        format!("belongs to another user (uid {owner}; this process runs as uid {uid})")
    } else {
        format!(
            "is writable by others without the sticky bit (mode {:03o})",
            mode & 0o7777
        )
    }
}

/// Where a broker keeps its messages: see [`Broker::build_default_with_persistence`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PersistenceType<P: AsRef<Path> = PathBuf> {
    /// SQLite files in this directory (created if missing).
    Sqlite(P),
    /// In memory: lost when the broker stops.
    Memory,
}

/// A broker's own options (the rest comes with `.with(...)`).
#[derive(Clone)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// The name of a freshly generated tree (default `"broker"`).
    pub tree_name: String,
    /// The embedded relay's configuration: limits, queues, timeouts. Its listeners are
    /// honoured too; `WebSocket`/`Tcp` engines override them.
    pub relay: Config,
    /// With persistence: seal the generated key (and identity) files under this passphrase
    /// (`wslocked1…`: Argon2id + XChaCha20-Poly1305); a restart needs the same passphrase.
    /// `None` (the default): the files hold the plain secret strings, mode 0600.
    pub key_passphrase: Option<zeroize::Zeroizing<String>>,
    /// The Argon2id cost of `key_passphrase` (default: as for passphrase trees, 256 MiB,
    /// t = 2). Below 64 MiB or t = 2 writing a file is refused
    /// (`whispeer::protocol::locked::MIN_M_KIB`, `MIN_T`).
    pub key_passphrase_params: PassphraseParams,
}

impl std::fmt::Debug for BrokerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerOptions")
            .field("tree_name", &self.tree_name)
            .field("relay", &self.relay)
            .field(
                "key_passphrase",
                &self.key_passphrase.as_ref().map(|_| "<redacted>"),
            )
            .field("key_passphrase_params", &self.key_passphrase_params)
            .finish()
    }
}

impl BrokerOptions {
    /// Seals the broker's key files under `passphrase` (see `key_passphrase`).
    pub fn key_passphrase(mut self, passphrase: impl Into<String>) -> Self {
        self.key_passphrase = Some(zeroize::Zeroizing::new(passphrase.into()));
        self
    }
}

impl Default for BrokerOptions {
    fn default() -> Self {
        let mut relay = Config::default();
        relay.listen.ws = ListenAddr::OFF;
        relay.listen.tcp = ListenAddr::OFF;
        relay.listen.admin = ListenAddr::OFF;
        relay.store.kind = Some(StoreKind::Memory);
        BrokerOptions {
            tree_name: "broker".into(),
            relay,
            key_passphrase: None,
            key_passphrase_params: PassphraseParams::default(),
        }
    }
}

/// Configures a [`Broker`]: add engines with [`BrokerBuilder::with`], then `build()`.
#[derive(Debug)]
pub struct BrokerBuilder {
    opts: BrokerOptions,
    setup: BrokerSetup,
}

impl BrokerBuilder {
    /// Adds an engine: any client engine (for the embedded client), or the broker's own
    /// meaning of `WebSocket`/`Tcp` (serve there), `Persistence` (one directory for
    /// history, outbox and keys) and `Encryption` (the broker's keys).
    pub fn with(mut self, engine: impl Engine) -> Self {
        engine.apply_broker(&mut self.setup);
        self
    }
    /// Also serve `/metrics`, `/status` and `/healthz`.
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.opts.relay.listen.admin = ListenAddr::on(addr);
        self
    }
    /// Use this tree key (e.g. shared with other processes).
    pub fn tree_key(mut self, tree: TreeKey) -> Self {
        self.setup.encryption = Some(Encryption(crate::options::EncryptionKeys::Keys(vec![
            AnyKey::Tree(tree),
        ])));
        self
    }
    /// Derive the tree key from a passphrase (Argon2id; every party with the same tree
    /// name and passphrase gets the same key).
    pub fn passphrase(self, tree: &str, passphrase: &str) -> Result<Self, BrokerError> {
        let key =
            TreeKey::from_passphrase(tree, passphrase.as_bytes(), PassphraseParams::default())?;
        Ok(self.tree_key(key))
    }
    /// Full relay configuration (limits, queues, timeouts).
    pub fn relay_config(mut self, config: Config) -> Self {
        self.opts.relay = config;
        self
    }

    /// Starts the embedded relay and connects the embedded client (inside a tokio runtime).
    pub async fn build(self) -> Result<Broker, BrokerError> {
        let BrokerOptions {
            tree_name,
            relay: mut config,
            key_passphrase,
            key_passphrase_params,
        } = self.opts;
        let lock = Lock {
            passphrase: key_passphrase,
            params: key_passphrase_params,
        };
        let mut setup = self.setup;
        // Before anything is written into it (the QUIC certificate too).
        if let Some(dir) = &setup.store_dir {
            create_store_dir(dir)?;
        }
        if let Some(url) = &setup.serve_ws {
            config.listen.ws = ListenAddr::on(listen_addr(url, &["http", "ws"]).await?);
        }
        if let Some(url) = &setup.serve_tcp {
            config.listen.tcp = ListenAddr::on(listen_addr(url, &["tcp"]).await?);
        }
        // A generated certificate's files live until the relay has loaded them (build).
        let mut quic_cert: Option<QuicCert> = None;
        if let Some(url) = &setup.serve_quic {
            let addr = listen_addr(url, &["quic"]).await?;
            config.listen.quic = ListenAddr::on(addr);
            if config.tls.cert.is_none() || config.tls.key.is_none() {
                let cert = QuicCert::load_or_make(setup.store_dir.as_deref(), addr)?;
                config.tls.cert = Some(cert.cert.clone());
                config.tls.key = Some(cert.key.clone());
                quic_cert = Some(cert);
            }
        }
        let encryption = setup.encryption.take().unwrap_or_else(Encryption::new);
        let keys = match &setup.store_dir {
            Some(dir) => {
                config.store.kind = Some(StoreKind::Sqlite);
                config.store.path = dir.join(RELAY_STORE_FILE);
                if setup.client.state_file.is_none() {
                    setup.client.state_file = Some(dir.join(CLIENT_STATE_FILE));
                }
                if setup.client.identity.is_none() {
                    setup.client.identity = Some(load_or_make_identity(dir, &lock)?);
                }
                load_or_make_keys(dir, encryption, &tree_name, &lock)?
            }
            None => resolve_keys(encryption, &tree_name)?,
        };
        // The relay's store is checked here first (review of b07abc2: the store directory
        // may be group-writable or sticky 1777), then opened without following a symbolic
        // link swapped in since (`open_relay_store`).
        let store = if setup.store_dir.is_some() {
            config.store.path = guard_relay_store(&config.store.path)?;
            Some(open_relay_store(&config.store)?)
        } else {
            None
        };
        let listeners = Listeners::bind(&config).await?;
        let mut relay = Relay::builder(config).listeners(listeners);
        if let Some(store) = store {
            relay = relay.store(Arc::new(store));
        }
        let relay = relay.build()?;
        let tls_pin = quic_cert.map(|c| c.sha256);
        let addrs = relay.addrs();
        let handle = relay.handle();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(relay.run(async {
            let _ = stop_rx.await;
        }));
        // The rules behind the policy too, for client_builder().
        let policy = setup.client.policy.clone();
        let topic_rules = setup.client.topic_rules.clone();
        let plugins = setup.client.plugins.clone();
        let mut b = setup.client;
        b.keyring = keyring_of(&keys)?;
        b.in_process = Some(handle.clone());
        b.urls.clear();
        if b.identity.is_none() {
            b.identity = Some(Identity::generate());
        }
        let client = match b.connect().await {
            Ok(c) => c,
            Err(e) => {
                handle.shutdown();
                return Err(e.into());
            }
        };
        Ok(Broker {
            inner: Arc::new(Inner {
                handle,
                addrs,
                tls_pin,
                keys,
                policy,
                topic_rules,
                plugins,
                client,
                stop: Mutex::new(Some(stop_tx)),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Same as [`BrokerBuilder::build`] (the name of earlier versions).
    pub async fn start(self) -> Result<Broker, BrokerError> {
        self.build().await
    }
}

/// `http://h:p`, `ws://h:p`, `tcp://h:p` or `h:p` → a socket address (port 0 allowed).
async fn listen_addr(url: &str, schemes: &[&str]) -> Result<SocketAddr, BrokerError> {
    let bad = |reason: String| BrokerError::Listen {
        addr: url.to_owned(),
        reason,
    };
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
                return Err(bad(format!(
                    "scheme {scheme}:// is not served here (use {})",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                )));
            }
            rest
        }
        None => url,
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err(bad("a listen address has no path".into()));
    }
    let mut addrs = tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| bad(format!("{e} (expected host:port)")))?;
    addrs
        .next()
        .ok_or_else(|| bad("the host name resolves to no address".into()))
}

/// The certificate of a broker's QUIC listener: in the persistence directory (made once,
/// then reused so clients' pins hold across restarts), or in a private temporary
/// directory removed once the relay has loaded it.
struct QuicCert {
    cert: PathBuf,
    key: PathBuf,
    sha256: [u8; 32],
    _temp: Option<tempfile::TempDir>,
}

impl QuicCert {
    fn load_or_make(dir: Option<&Path>, addr: SocketAddr) -> Result<QuicCert, BrokerError> {
        use whispeer_relay::tls;
        let (dir, temp) = match dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("whispeer-broker-")
                    .tempdir()
                    .map_err(|source| BrokerError::Io {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let cert = dir.join(QUIC_CERT_FILE);
        let key = dir.join(QUIC_KEY_FILE);
        // Each through the persistence guard: a symbolic link, a file not regular, another
        // user's or one writable by others is refused, never used nor written into.
        let cert_file = open_guarded(&cert, None)?;
        let key_file = open_guarded(&key, Some("it holds the QUIC listener's private key"))?;
        if let (Some(mut cert_file), Some(_)) = (cert_file, key_file) {
            let mut pem = Vec::new();
            std::io::Read::read_to_end(&mut cert_file, &mut pem).map_err(|source| {
                BrokerError::Io {
                    path: cert.clone(),
                    source,
                }
            })?;
            use rustls_pki_types::pem::PemObject;
            let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| tls::TlsError::NoCertificate(cert.clone()))?;
            let sha256 = tls::cert_sha256(&der);
            return Ok(QuicCert {
                cert,
                key,
                sha256,
                _temp: temp,
            });
        }
        // Names a client may dial: the bound IP, or every loopback name when it binds all.
        let ip = addr.ip();
        let mut names = vec!["localhost".to_owned()];
        if ip.is_unspecified() {
            names.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
        } else {
            names.push(ip.to_string());
        }
        let g = tls::generate(&names)?;
        // `force`: one of the pair may be there (checked above); each is written to a new
        // file renamed over it, never through what is at the path.
        tls::write_pem(&cert, &g.cert_pem, false, true)?;
        tls::write_pem(&key, &g.key_pem, true, true)?;
        Ok(QuicCert {
            cert,
            key,
            sha256: g.sha256,
            _temp: temp,
        })
    }
}

fn resolve_keys(enc: Encryption, tree_name: &str) -> Result<Vec<AnyKey>, BrokerError> {
    use crate::options::EncryptionKeys;
    match enc.0 {
        EncryptionKeys::Fresh => Ok(vec![AnyKey::Tree(TreeKey::generate(tree_name)?)]),
        EncryptionKeys::Keys(k) => Ok(k),
        EncryptionKeys::Keyring(_) => Err(BrokerError::KeyringNotShareable),
    }
}

/// With persistence a generated key lives in `dir/broker.keys` (never in a store): loaded
/// if present, written (mode 0600) if not. Keys given with `with_keys` are used as given.
fn load_or_make_keys(
    dir: &Path,
    enc: Encryption,
    tree_name: &str,
    lock: &Lock,
) -> Result<Vec<AnyKey>, BrokerError> {
    if !matches!(enc.0, crate::options::EncryptionKeys::Fresh) {
        return resolve_keys(enc, tree_name);
    }
    let path = dir.join(KEY_FILE);
    match read_guarded(&path, "it holds the broker's tree keys")? {
        Some(text) => {
            let keys = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| Ok(AnyKey::parse(&lock.open(l, &path)?)?))
                .collect::<Result<Vec<_>, BrokerError>>()?;
            if keys.is_empty() {
                return Err(BrokerError::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the key file holds no key",
                    ),
                });
            }
            Ok(keys)
        }
        None => {
            let keys = resolve_keys(enc, tree_name)?;
            let mut text = zeroize::Zeroizing::new(String::from(
                "# whispeer broker key: whoever holds it reads and writes every topic\n",
            ));
            for k in &keys {
                if let AnyKey::Tree(t) = k {
                    text.push_str(&lock.seal(&t.to_key_string())?);
                    text.push('\n');
                }
            }
            write_secret(&path, text.as_bytes())?;
            Ok(keys)
        }
    }
}

/// How the key files are kept: plain (mode 0600) or sealed under a passphrase.
struct Lock {
    passphrase: Option<zeroize::Zeroizing<String>>,
    params: PassphraseParams,
}

impl Lock {
    fn seal(&self, secret: &str) -> Result<zeroize::Zeroizing<String>, BrokerError> {
        Ok(zeroize::Zeroizing::new(match &self.passphrase {
            None => secret.to_owned(),
            Some(p) => whispeer_protocol::locked::lock_secret_string(
                secret,
                p.as_bytes(),
                self.params,
                &mut rand::rngs::OsRng,
            )?,
        }))
    }
    /// A line of a key or identity file: plain without a passphrase, sealed with one (a
    /// plain line then is [`BrokerError::KeyFileNotLocked`]). A sealed line below the
    /// Argon2id floors writing applies (`locked::is_below_floor`, from a version before
    /// them) opens, with a warning.
    fn open(&self, line: &str, path: &Path) -> Result<zeroize::Zeroizing<String>, BrokerError> {
        use whispeer_protocol::locked;
        let sealed = line.to_ascii_lowercase().starts_with("wslocked1");
        match (&self.passphrase, sealed) {
            (None, false) => Ok(zeroize::Zeroizing::new(line.to_owned())),
            (Some(_), false) => Err(BrokerError::KeyFileNotLocked {
                path: path.to_owned(),
            }),
            (None, true) => Err(BrokerError::KeyFileLocked {
                path: path.to_owned(),
            }),
            (Some(p), true) => {
                let secret = locked::unlock_secret_string(line, p.as_bytes())?;
                let params = locked::locked_params(line)?;
                if locked::is_below_floor(params) {
                    tracing::warn!(
                        path = %path.display(),
                        "a secret in this file is sealed at an Argon2id cost below what is \
                         written now (m = {} KiB, t = {}; at least m = {} KiB, t = {}): a \
                         copy of it is cheaper to guess the passphrase of. Seal it again \
                         (locked::unlock_secret_string, then lock_secret_string)",
                        params.m_kib,
                        params.t,
                        locked::MIN_M_KIB,
                        locked::MIN_T
                    );
                }
                Ok(secret)
            }
        }
    }
}

fn load_or_make_identity(dir: &Path, lock: &Lock) -> Result<Identity, BrokerError> {
    let path = dir.join(IDENTITY_FILE);
    match read_guarded(&path, "it holds the broker's signing identity")? {
        Some(text) => Ok(Identity::from_secret_string(
            &lock.open(text.trim(), &path)?,
        )?),
        None => {
            let id = Identity::generate();
            write_secret(&path, lock.seal(&id.to_secret_string())?.as_bytes())?;
            Ok(id)
        }
    }
}

/// A file of the store directory opened through the persistence guard (Unix: no symbolic
/// link followed, a regular file of this user not writable by group or others; `private`:
/// one readable by others is made 0600 with a warning saying what it holds), or `None` if
/// there is none.
fn open_guarded(path: &Path, private: Option<&str>) -> Result<Option<std::fs::File>, BrokerError> {
    #[cfg(unix)]
    {
        use crate::persist::guard::{open_checked, Refused};
        match open_checked(path, path, private) {
            Ok(f) => Ok(Some(f)),
            Err(Refused::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(Refused::Io(path, source)) => Err(BrokerError::Io { path, source }),
            Err(Refused::Unsafe(path, reason)) => Err(BrokerError::UnsafeFile { path, reason }),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        match std::fs::File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BrokerError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// The files of the embedded relay's store, which the store's open does not check (no
/// owner or mode check): a `-wal` another user planted is replayed into the history,
/// retained values and durable positions at the start, a `-lock` they hold stops the
/// broker. Unix: `relay.sqlite`, what SQLite keeps beside it (`-wal`, `-shm`, `-journal`),
/// its `-lock` (a SQLite file of its own) and what SQLite keeps beside that go through the
/// guard ([`open_guarded`]: another user's file, one writable by group or others, a
/// symbolic link or a file not regular is refused with [`BrokerError::UnsafeFile`] and left
/// as it is; one of ours readable by others is made 0600); a missing `relay.sqlite` or
/// `-lock` is created 0600 (`persist::guard::prepare`), so the `-wal` and `-shm` SQLite
/// makes beside them take that mode. Returns the store path with its directory resolved
/// (a link naming the directory is the user's), for [`open_relay_store`], which opens it
/// without following a symbolic link put there after this check. What stays: another user
/// who can write the directory could still plant a `-wal` between this check and SQLite
/// creating one (as for the client's state file); keep the store in a directory of your own.
fn guard_relay_store(path: &Path) -> Result<PathBuf, BrokerError> {
    #[cfg(unix)]
    {
        use crate::persist::guard::{prepare, Refused};
        const HOLDS: &str = "it holds the relay's history, retained values and durable positions";
        let beside = |base: &Path, suffix: &str| {
            let mut p = base.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        let lock = beside(path, "-lock");
        for base in [path, lock.as_path()] {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                open_guarded(&beside(base, suffix), Some(HOLDS))?;
            }
        }
        let prepare = |base: &Path| {
            prepare(base).map_err(|r| match r {
                Refused::Io(path, source) => BrokerError::Io { path, source },
                Refused::Unsafe(path, reason) => BrokerError::UnsafeFile { path, reason },
            })
        };
        let resolved = prepare(path)?;
        prepare(&lock)?;
        Ok(resolved)
    }
    #[cfg(not(unix))]
    Ok(path.to_owned())
}

/// Opens the embedded relay's store checked by [`guard_relay_store`] (at the path it
/// returned) with `SQLITE_OPEN_NOFOLLOW` on every connection to `relay.sqlite` and its
/// `-lock` (`SqliteStore::open_file_nofollow`): a symbolic link another user swapped in
/// since the check is refused, [`BrokerError::UnsafeFile`] (`UnsafeFile::Symlink`) naming
/// it, and its target neither read, written nor created (it was followed: a plain SQLite
/// open). A standalone `whispeer-relay` follows links (its operator's own choice).
fn open_relay_store(
    store: &whispeer_relay::config::StoreConfig,
) -> Result<whispeer_relay::store::SqliteStore, BrokerError> {
    whispeer_relay::store::SqliteStore::open_file_nofollow(store.clone()).map_err(|e| {
        // SQLite refused a link (its message says so); which file holds it, named when it
        // is still there.
        #[cfg(unix)]
        {
            let mut lock = store.path.as_os_str().to_owned();
            lock.push("-lock");
            for p in [store.path.clone(), PathBuf::from(lock)] {
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return BrokerError::UnsafeFile {
                        path: p,
                        reason: crate::error::UnsafeFile::Symlink,
                    };
                }
            }
        }
        BrokerError::Relay(RelayError::Store(e))
    })
}

/// A secret file of the store directory read through [`open_guarded`], or `None`.
fn read_guarded(
    path: &Path,
    holds: &str,
) -> Result<Option<zeroize::Zeroizing<String>>, BrokerError> {
    let Some(mut f) = open_guarded(path, Some(holds))? else {
        return Ok(None);
    };
    let mut text = zeroize::Zeroizing::new(String::new());
    std::io::Read::read_to_string(&mut f, &mut text).map_err(|source| BrokerError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some(text))
}

/// Creates the broker's directory (and missing parents) owner-only: 0700 on Unix, so the
/// relay's history, the client state and the key file beside them are nobody else's to read
/// or to plant files among (it was `create_dir_all`'s 0755). On Unix an existing directory
/// (or one made by someone else in between) owned by another user, or writable by others
/// without the sticky bit, is refused ([`BrokerError::UnsafeDirectory`]): such a user — one
/// who made it first under `/tmp` — could plant the key file (a tree key they know), the
/// identity or the QUIC certificate and key (security review: it was used as it is).
///
/// A group-writable one (made by the old `create_dir_all` under umask 002, or a Kubernetes
/// `fsGroup` volume, 2775) or an other-writable one with the sticky bit is used, with a
/// warning: every file in it is opened through the guard (no symbolic link, this user's,
/// writable by it alone), so a group member can only delete or rename the broker's files,
/// not plant one it would use (a planted file is the planter's: refused). On a filesystem
/// that keeps no modes or owners (vfat/exFAT, WSL drvfs, SMB: probed, see
/// `persist::guard::kept_in`) what the directory shows is not checked, with a warning.
/// A symbolic link naming the directory is followed (the path is the user's choice); the
/// directory it leads to is checked.
fn create_store_dir(dir: &Path) -> Result<(), BrokerError> {
    let io = |source| BrokerError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir).map_err(io)?;
        if !m.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a directory",
            )));
        }
        let uid = rustix::process::geteuid().as_raw();
        let mode = m.mode() & 0o7777;
        let other_owner = m.uid() != uid;
        let open_to_all = mode & 0o002 != 0 && mode & 0o1000 == 0;
        if other_owner || open_to_all {
            let kept = crate::persist::guard::kept_in(dir);
            if (other_owner && kept.owners) || (open_to_all && kept.modes) {
                return Err(BrokerError::UnsafeDirectory {
                    path: dir.to_owned(),
                    owner: m.uid(),
                    uid,
                    mode,
                });
            }
            crate::persist::guard::warn_unkept(dir, kept);
        } else if mode & 0o022 != 0 {
            tracing::warn!(
                directory = %dir.display(),
                mode = format_args!("{mode:03o}"),
                "broker directory writable by group{}: its members can delete or rename the \
                 broker's files (keys, identity, certificate, history), not plant ones it \
                 uses (each must be this user's, writable by it alone); chmod 700 to keep \
                 them out",
                if mode & 0o002 != 0 { " or others (sticky)" } else { "" }
            );
        }
    }
    Ok(())
}

/// Writes a new file readable by its owner only (created with mode 0600 on Unix).
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), BrokerError> {
    use std::io::Write;
    let io = |source| BrokerError::Io {
        path: path.to_owned(),
        source,
    };
    let mut o = std::fs::OpenOptions::new();
    // `create_new` (`O_EXCL`): nothing already at the path is opened, a symbolic link
    // included.
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn keyring_of(keys: &[AnyKey]) -> Result<whispeer_protocol::Keyring, KeyError> {
    let mut ring = whispeer_protocol::Keyring::new();
    AnyKey::add_all(keys, &mut ring, now_ms())?;
    Ok(ring)
}

/// An embedded relay, its keys and a connected client: see the [module docs](self).
/// Cheap to clone; every clone is the same broker (it stops when the last one is dropped
/// or on [`Broker::shutdown`]).
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handle: RelayHandle,
    addrs: BoundAddrs,
    /// SHA-256 of the generated QUIC certificate.
    tls_pin: Option<[u8; 32]>,
    keys: Vec<AnyKey>,
    policy: crate::core::SealPolicy,
    /// The [`crate::TopicOptions`] rules behind `policy.per_topic` as given, so a
    /// [`Broker::client_builder`]'s own settings reach what a rule leaves unset.
    topic_rules: Vec<crate::options::TopicSealRule>,
    plugins: crate::plugin::Plugins,
    client: Client,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<Result<(), RelayError>>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

impl Broker {
    /// A broker with options; add engines with `.with(...)` then `.build().await`.
    pub fn builder(options: BrokerOptions) -> BrokerBuilder {
        BrokerBuilder {
            opts: options,
            setup: BrokerSetup::default(),
        }
    }

    /// In memory, compression (zstd 3) and encryption (a fresh tree) on.
    pub fn build_default() -> BrokerBuilder {
        Self::builder(BrokerOptions::default())
            .with(Encryption::new())
            .with(Compression::new())
    }

    /// [`Broker::build_default`], also serving WebSocket at `url` (`http://` or `ws://`).
    pub fn build_default_with_ws(url: &str) -> BrokerBuilder {
        Self::build_default().with(crate::options::WebSocket::new(url))
    }

    /// [`Broker::build_default`] with its history, outbox and keys kept in a directory.
    pub fn build_default_with_persistence<P: AsRef<Path>>(
        persistence: PersistenceType<P>,
    ) -> BrokerBuilder {
        let b = Self::build_default();
        match persistence {
            PersistenceType::Sqlite(dir) => {
                b.with(crate::persist::Persistence::sqlite(dir.as_ref()))
            }
            PersistenceType::Memory => b,
        }
    }

    /// [`Broker::build_default_with_persistence`], also serving WebSocket at `url`.
    pub fn build_default_with_persistence_ws<P: AsRef<Path>>(
        url: &str,
        persistence: PersistenceType<P>,
    ) -> BrokerBuilder {
        Self::build_default_with_persistence(persistence).with(crate::options::WebSocket::new(url))
    }

    /// An in-memory broker with default options (as [`Broker::build_default`]).
    pub async fn start() -> Result<Broker, BrokerError> {
        Self::build_default().build().await
    }

    /// The key strings to share out of band (a grant of the whole tree for a tree the
    /// broker holds, not its admin key): `Encryption::with_keys(broker.keys())` elsewhere.
    pub fn keys(&self) -> Vec<String> {
        self.inner
            .keys
            .iter()
            .map(|k| k.share_string().to_string())
            .collect()
    }

    /// The tree key when the broker holds one (its first).
    pub fn tree_key(&self) -> Option<&TreeKey> {
        self.inner.keys.iter().find_map(|k| match k {
            AnyKey::Tree(t) => Some(t),
            AnyKey::Grant(_) | AnyKey::Dict(_) => None,
        })
    }

    /// The embedded client (publishes and subscriptions of the broker itself).
    pub fn client_handle(&self) -> &Client {
        &self.inner.client
    }

    /// A new client of this broker (in process, its own fresh identity, the broker's keys,
    /// compression and plugins): for another task that wants its own connection.
    pub async fn connect_client(&self) -> Result<Client, ConnectError> {
        self.client_builder()
            .with(Identity::generate())
            .connect()
            .await
    }

    /// Same as [`Broker::connect_client`] (the name of earlier versions).
    pub async fn client(&self) -> Result<Client, ConnectError> {
        self.connect_client().await
    }

    /// A builder already set up for this broker (in-process transport, keys, sealing
    /// options, plugins); add an identity or other engines, then `connect()`.
    pub fn client_builder(&self) -> ClientBuilder {
        let mut b = Client::builder().with(InProcess::new(self.inner.handle.clone()));
        match keyring_of(&self.inner.keys) {
            Ok(k) => b.keyring = k,
            Err(e) => b.key_error = Some(e),
        }
        // The rules with the policy resolved from them: a setting added to this builder
        // (`Compression::none()`) reaches what a broker's rule leaves unset, as on any
        // ClientBuilder (a9017dd); with the policy alone such a rule kept the broker's.
        b.policy = self.inner.policy.clone();
        b.topic_rules = self.inner.topic_rules.clone();
        b.plugins = self.inner.plugins.clone();
        b
    }

    /// `ws://…` when a WebSocket listener was asked for: give it, with [`Broker::keys`],
    /// to another process (`Client::builder().with(WebSocket::new(url))`).
    pub fn ws_url(&self) -> Option<String> {
        self.inner.addrs.ws.map(|a| format!("ws://{a}"))
    }

    /// `tcp://…` when a TCP listener was asked for.
    pub fn tcp_url(&self) -> Option<String> {
        self.inner.addrs.tcp.map(|a| format!("tcp://{a}"))
    }

    /// `quic://…` when a QUIC listener was asked for; a client connects with
    /// `Client::builder().with(Quic::new(url)).with(TlsPin::sha256_hex(&pin)?)` where
    /// `pin` is [`Broker::tls_pin`] (or the CA of a certificate given in the relay config).
    pub fn quic_url(&self) -> Option<String> {
        self.inner.addrs.quic.map(|a| format!("quic://{a}"))
    }

    /// The SHA-256 fingerprint (hex) of the self-signed certificate the broker made for its
    /// QUIC listener — what a client pins ([`crate::TlsPin::sha256_hex`], the CLI's
    /// `--tls-pin`). `None` without QUIC or when the relay config names a certificate.
    pub fn tls_pin(&self) -> Option<String> {
        self.inner.tls_pin.map(hex::encode)
    }

    /// The embedded relay (metrics, status).
    pub fn relay(&self) -> &RelayHandle {
        &self.inner.handle
    }

    /// Messages of another type refused on typed subscriptions of this broker (never given
    /// to a callback).
    pub fn type_mismatches(&self) -> u64 {
        self.inner.client.stats().type_mismatches
    }

    /// Publishes a value (serde → CBOR) on `topic`, by value or by reference. On a topic
    /// registered with [`Broker::topic`] only that type is accepted (it is then sent with
    /// the type's tag); another type fails with [`PublishError::TypeMismatch`].
    pub async fn publish<T: Serialize>(&self, topic: &str, value: T) -> Result<(), PublishError> {
        self.inner.client.publish(topic, &value).await
    }

    /// [`Broker::publish`] with options (QoS, retain, ack); returns the relay sequence with
    /// `ack`.
    pub async fn publish_with<T: Serialize>(
        &self,
        topic: &str,
        value: T,
        opts: PublishOptions,
    ) -> Result<u64, PublishError> {
        self.inner.client.publish_with(topic, &value, opts).await
    }

    /// Calls `f` for every message on `filter` (on its own task, in order) until the handle
    /// is dropped (which unsubscribes). Messages that do not decode as `T` are logged and
    /// skipped.
    pub async fn subscribe<T, F>(
        &self,
        filter: &str,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        self.inner.client.subscribe_callback(filter, f).await
    }

    /// [`Broker::subscribe`] with options (replay, durable name, QoS, retained values, and
    /// the tree: `SubscribeOptions::new().tree(id)` when keys of two trees cover `filter`,
    /// where the plain call fails with `KeyError::AmbiguousTree`).
    pub async fn subscribe_with_options<T, F>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        self.inner
            .client
            .subscribe_callback_with_options(filter, opts, f)
            .await
    }

    /// Like [`Broker::subscribe`] with an async callback (awaited before the next message).
    pub async fn subscribe_async<T, F, Fut>(
        &self,
        filter: &str,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        self.inner.client.subscribe_async(filter, f).await
    }

    /// [`Broker::subscribe_async`] with options (see [`Broker::subscribe_with_options`]).
    pub async fn subscribe_async_with_options<T, F, Fut>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        self.inner
            .client
            .subscribe_async_with_options(filter, opts, f)
            .await
    }

    /// A stream of the messages on `filter` decoded as `T` (a [`Subscription`]; drop it to
    /// unsubscribe).
    pub async fn subscribe_stream<T: DeserializeOwned>(
        &self,
        filter: &str,
    ) -> Result<Subscription<T>, SubscribeError> {
        self.inner.client.subscribe::<T>(filter).await
    }

    /// A stream with options (replay from history, durable name, QoS, retained values).
    pub async fn subscribe_stream_with_options<T: DeserializeOwned>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscription<T>, SubscribeError> {
        self.inner
            .client
            .subscribe_with_options::<T>(filter, opts)
            .await
    }

    /// A typed topic of this broker: its `publish` takes only `T`, its `subscribe` gives
    /// only `T` (messages of another type are refused with `ReceiveError::TypeMismatch` and
    /// counted in [`Broker::type_mismatches`]). Registers the topic: [`Broker::publish`]
    /// of another type on it is refused.
    pub fn topic<T>(&self, topic: &str) -> Result<TypedTopic<T>, PublishError>
    where
        T: TypeTag + Serialize + DeserializeOwned + Send + 'static,
    {
        self.inner.client.topic::<T>(topic)
    }

    /// Flushes the embedded client, stops the relay and waits for it (every clone of this
    /// broker stops with it).
    pub async fn shutdown(self) -> Result<(), RelayError> {
        self.inner.client.close().await;
        let stop = self
            .inner
            .stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match task {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

#[allow(dead_code)]
fn assert_clone_send_sync() {
    fn is<T: Clone + Send + Sync>() {}
    is::<Broker>();
}

#[cfg(test)]
mod tests {
    /// The time-of-check/time-of-use race on the embedded relay's store: another user who
    /// can write the store directory swaps `relay.sqlite`, then its `-lock`, for a symbolic
    /// link after the guard checked the files and before the store opens them (the swap
    /// made in between here, as the broker's build calls the two). The open refuses the
    /// link — `BrokerError::UnsafeFile` (`Symlink`) naming it — and neither writes into
    /// the file it points at nor creates a missing one (a plain SQLite open followed it).
    #[cfg(unix)]
    #[tokio::test]
    async fn a_store_file_swapped_for_a_symbolic_link_after_the_guard_is_not_opened() {
        use crate::error::UnsafeFile;
        use whispeer_relay::store::Store;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("broker");
        super::create_store_dir(&dir).unwrap();
        let mut store = whispeer_relay::Config::default().store;
        store.path = dir.join(super::RELAY_STORE_FILE);
        store.min_free_bytes = 0; // not dependent on TMPDIR's free space
        let lock = dir.join(format!("{}-lock", super::RELAY_STORE_FILE));
        // The attacker's targets: an empty file (SQLite would make it a store) and a
        // missing one (SQLite would create it).
        let (victim, nowhere) = (t.path().join("victim"), t.path().join("nowhere"));
        std::fs::write(&victim, b"").unwrap();
        let swap = |file: &std::path::Path, to: &std::path::Path| {
            std::fs::remove_file(file).unwrap();
            std::os::unix::fs::symlink(to, file).unwrap();
        };
        let refused = |at: &std::path::Path| {
            let mut checked = store.clone();
            checked.path = super::guard_relay_store(&store.path).expect("the files pass");
            swap(at, if at == lock { &nowhere } else { &victim });
            match super::open_relay_store(&checked) {
                Err(super::BrokerError::UnsafeFile {
                    path,
                    reason: UnsafeFile::Symlink,
                }) => assert_eq!(path.file_name(), at.file_name()),
                Err(e) => panic!("{}: another error: {e}", at.display()),
                Ok(s) => {
                    s.close();
                    panic!("{}: a symbolic link swapped in was followed", at.display())
                }
            }
            std::fs::remove_file(at).unwrap();
        };
        refused(&store.path);
        assert_eq!(std::fs::metadata(&victim).unwrap().len(), 0, "not written");
        refused(&lock);
        assert!(!nowhere.exists(), "nothing created through the link");
        // Nothing swapped: the checked store opens, also named through a symbolic link to
        // its directory (the user's own: the guard resolves it, NOFOLLOW would refuse it).
        let linked = t.path().join("linked");
        std::os::unix::fs::symlink(&dir, &linked).unwrap();
        let path = super::guard_relay_store(&linked.join(super::RELAY_STORE_FILE)).unwrap();
        super::open_relay_store(&whispeer_relay::config::StoreConfig { path, ..store })
            .unwrap()
            .close();
    }

    /// The broker's directory, and the parents it creates, are 0700 (they were 0755).
    #[cfg(unix)]
    #[test]
    fn the_store_directory_is_created_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("parent").join("broker");
        super::create_store_dir(&dir).unwrap();
        for d in [&dir, &t.path().join("parent")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}: mode {mode:03o}", d.display());
        }
        // Again: an existing directory is fine.
        super::create_store_dir(&dir).unwrap();
        // One its group may write is used, with a warning (an old create_dir_all under
        // umask 002, a Kubernetes fsGroup volume): each file in it is checked.
        let chmod =
            |m: u32| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
        for m in [0o770, 0o775, 0o2775, 0o1777] {
            chmod(m);
            super::create_store_dir(&dir).unwrap_or_else(|e| panic!("{m:o}: {e}"));
        }
        // One others may write without the sticky bit is not (security review F1).
        for m in [0o777, 0o703, 0o2777] {
            chmod(m);
            match super::create_store_dir(&dir) {
                Err(e @ super::BrokerError::UnsafeDirectory { mode, .. }) => {
                    assert_eq!(mode, m);
                    assert!(
                        e.to_string().contains(&format!(
                            "is writable by others without the sticky bit (mode {m:03o})"
                        )),
                        "{e}"
                    );
                }
                other => panic!("{m:o}: {other:?}"),
            }
        }
        // Nor another user's, even 0700 (root can make one here).
        chmod(0o700);
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&dir, Some(12345), None).unwrap();
            match super::create_store_dir(&dir) {
                Err(e @ super::BrokerError::UnsafeDirectory { owner: 12345, .. }) => {
                    assert!(e.to_string().contains("belongs to another user"), "{e}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// `BrokerOptions`' `Debug` prints the embedded relay's `Config`: its secrets (the
    /// admin token, the NATS password and token, a NATS URL's user information) and the
    /// key passphrase are redacted, not printed (they were, through the derived `Debug`).
    #[test]
    fn broker_options_debug_prints_no_secret() {
        let mut o = super::BrokerOptions::default().key_passphrase("correct horse battery");
        o.relay.auth.admin_token = Some("admin-secret-0123456789".into());
        o.relay.cluster.password = Some("nats-password-xyz".into());
        o.relay.cluster.token = Some("nats-token-xyz".into());
        o.relay.cluster.urls = vec!["nats://relay:url-pass-xyz@h1:4222".into()];
        for shown in [format!("{o:?}"), format!("{o:#?}")] {
            for secret in [
                "correct horse",
                "admin-secret",
                "nats-password",
                "nats-token",
                "url-pass",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("admin_token") && shown.contains("redacted"));
            assert!(shown.contains("h1:4222"), "{shown}");
        }
    }

    /// With `key_passphrase` set, a plain (unsealed) line in `broker.keys` or
    /// `broker.identity` is refused with a typed error naming the file: it was used as it
    /// was, so "sealed at rest" silently did not hold, and a tree key planted by whoever can
    /// write the directory would have been adopted. Sealed files open as before.
    #[test]
    fn a_plain_key_file_is_refused_when_a_passphrase_is_set() {
        use super::{BrokerError, Lock, IDENTITY_FILE, KEY_FILE};
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("broker");
        super::create_store_dir(&dir).unwrap();
        let plain = Lock {
            passphrase: None,
            params: Default::default(),
        };
        let sealed = Lock {
            passphrase: Some(zeroize::Zeroizing::new("correct horse".into())),
            params: whispeer_protocol::PassphraseParams {
                m_kib: whispeer_protocol::locked::MIN_M_KIB,
                t: whispeer_protocol::locked::MIN_T,
                p: 1,
            },
        };
        // A first start without the passphrase writes both files plain.
        super::load_or_make_identity(&dir, &plain).unwrap();
        let keys = super::load_or_make_keys(&dir, crate::Encryption::new(), "b", &plain).unwrap();
        let tree = match &keys[0] {
            crate::options::AnyKey::Tree(t) => t.to_key_string().to_string(),
            other => panic!("{other:?}"),
        };
        assert!(std::fs::read_to_string(dir.join(KEY_FILE))
            .unwrap()
            .contains(&tree));
        // With the passphrase: refused, each naming its file.
        match super::load_or_make_keys(&dir, crate::Encryption::new(), "b", &sealed) {
            Err(e @ BrokerError::KeyFileNotLocked { .. }) => {
                let BrokerError::KeyFileNotLocked { path } = &e else {
                    unreachable!()
                };
                assert_eq!(path, &dir.join(KEY_FILE));
                let msg = e.to_string();
                assert!(
                    msg.contains("plain secret") && !msg.contains(&tree),
                    "{msg}"
                );
            }
            other => panic!("{:?}", other.map(|k| k.len())),
        }
        match super::load_or_make_identity(&dir, &sealed) {
            Err(BrokerError::KeyFileNotLocked { path }) => {
                assert_eq!(path, dir.join(IDENTITY_FILE))
            }
            other => panic!("{:?}", other.map(|i| i.public_id().to_string())),
        }
        // Files written sealed open with the passphrase (and need it).
        std::fs::remove_file(dir.join(KEY_FILE)).unwrap();
        let keys = super::load_or_make_keys(&dir, crate::Encryption::new(), "b", &sealed).unwrap();
        let again = super::load_or_make_keys(&dir, crate::Encryption::new(), "b", &sealed).unwrap();
        assert_eq!(keys.len(), again.len());
        assert!(matches!(
            super::load_or_make_keys(&dir, crate::Encryption::new(), "b", &plain),
            Err(BrokerError::KeyFileLocked { .. })
        ));
    }

    /// Review B2: on a filesystem that keeps no modes (exFAT through FUSE; skipped where
    /// it cannot be mounted) the store directory shows 0777 and every file in it 0777:
    /// used (a probe shows the modes are not kept), the identity written on the first
    /// start read at the second (before: UnsafeDirectory, mode 777, at every start).
    #[cfg(unix)]
    #[test]
    fn a_store_directory_on_a_filesystem_without_modes_is_used() {
        let Some(m) = crate::persist::guard::hook::ModelessMount::new() else {
            return;
        };
        let dir = m.path.join("broker");
        let lock = super::Lock {
            passphrase: None,
            params: Default::default(),
        };
        super::create_store_dir(&dir).unwrap();
        let first = super::load_or_make_identity(&dir, &lock).unwrap();
        super::create_store_dir(&dir).expect("second start");
        let again = super::load_or_make_identity(&dir, &lock).expect("identity read back");
        assert_eq!(
            first.to_secret_string().as_str(),
            again.to_secret_string().as_str()
        );
    }

    /// Review of a9017dd: a broker's per-topic rules go to [`Broker::client_builder`] as
    /// given, not only resolved, so a setting added there reaches what a rule leaves unset:
    /// `client_builder().with(Compression::none())` leaves the broker's suite-only `a/#`
    /// rule uncompressed (it stayed on zstd: the length leak a9017dd fixed for
    /// `ClientBuilder`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_builders_settings_reach_the_brokers_topic_rules() {
        use crate::options::{CipherSuite, TopicOptions};
        use whispeer_protocol::{Compression as C, Suite, Topic};
        let broker = super::Broker::builder(super::BrokerOptions::default())
            .with(TopicOptions::new("a/#").suite(CipherSuite::aes_gcm()))
            .build()
            .await
            .unwrap();
        let b = broker.client_builder();
        let a = |b: &super::ClientBuilder| b.policy.for_topic(&Topic::new("a/x").unwrap());
        assert_eq!(a(&b).suite, Suite::Aes256Gcm, "the broker's rule");
        assert_eq!(a(&b).compression, C::Zstd(3), "the broker's default");
        let b = b.with(super::Compression::none());
        assert_eq!(a(&b).compression, C::None, "a suite-only rule");
        assert_eq!(a(&b).suite, Suite::Aes256Gcm);
        let q = b.policy.for_topic(&Topic::new("q").unwrap());
        assert_eq!(q.compression, C::None);
        // Added after the broker's rules, a rule of the client's own is resolved alike.
        let b = b
            .with(TopicOptions::new("z/#").padding(crate::options::Padding::none()))
            .with(super::Compression::lz4());
        assert_eq!(a(&b).compression, C::Lz4);
        assert_eq!(
            b.policy.for_topic(&Topic::new("z/x").unwrap()).compression,
            C::Lz4
        );
        broker.shutdown().await.unwrap();
    }
}
