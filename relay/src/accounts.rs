//! Relay accounts: who may use the relay, and on which key ids.
//!
//! Accounts are separate from sender identities (they never appear inside envelopes, so
//! sealed sender stays sealed). An account proves itself with an Ed25519 key (challenge and
//! response, [`whispeer_protocol::frame::auth_sig_input`]) or with a bearer token of which
//! the relay keeps only the SHA-256. Each account belongs to a **group** (by default a group
//! of its own) and has rights: `publish`, `subscribe`, `replay`, `retain`, `durable`.
//!
//! Key ids change every epoch, so rights are not configured per key id: the first account
//! that uses a key id claims it for its group, and from then on only members of that group
//! may use it (each with its own rights). Claims and durable-subscription owners are kept
//! in a small append-only state file ([`AuthState`]) so they survive restarts.
//!
//! The account list is a TOML file (`whispeer-relay account add|list|remove` edits it); the
//! relay reloads it when it changes or on SIGHUP and closes the connections of accounts
//! that were removed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use whispeer_protocol::frame::{auth_sig_input, ErrFrame};
use whispeer_protocol::{codec, ErrorCode, Frame, KeyId};

use crate::config::{AuthConfig, AuthMode};
use crate::ids::ConnId;
use crate::outbound::Outbound;
use crate::store::{Claim, StoreError};

/// Prefix of a bearer token printed by `account add --token`.
pub const TOKEN_PREFIX: &str = "wsp_tok_";
/// Prefix of an account secret key file written by `account add --key-out`.
pub const SECRET_PREFIX: &str = "wsp_acct_sk_";

/// Why the account list or the state file could not be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AccountError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a valid account list.
    #[error("invalid account list {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// An entry is invalid.
    #[error("account {name:?}: {reason}")]
    Invalid { name: String, reason: String },
}

/// One right an account may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Publish envelopes.
    Publish,
    /// Subscribe (live messages and retained values).
    Subscribe,
    /// Subscribe with replay of history.
    Replay,
    /// Publish with the retain flag.
    Retain,
    /// Hold durable subscriptions.
    Durable,
}

impl Right {
    /// Every right.
    pub const ALL: [Right; 5] = [
        Right::Publish,
        Right::Subscribe,
        Right::Replay,
        Right::Retain,
        Right::Durable,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The name used in the account file.
    pub fn name(self) -> &'static str {
        match self {
            Right::Publish => "publish",
            Right::Subscribe => "subscribe",
            Right::Replay => "replay",
            Right::Retain => "retain",
            Right::Durable => "durable",
        }
    }
}

impl std::str::FromStr for Right {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Right::ALL
            .into_iter()
            .find(|r| r.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                format!("{s:?} is not a right (publish, subscribe, replay, retain, durable)")
            })
    }
}

/// A set of rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u8);

impl Rights {
    /// Every right.
    pub fn all() -> Self {
        Rights(Right::ALL.iter().fold(0, |a, r| a | r.bit()))
    }
    /// Builds a set.
    pub fn of(rights: &[Right]) -> Self {
        Rights(rights.iter().fold(0, |a, r| a | r.bit()))
    }
    /// Adds one right.
    pub fn with(self, r: Right) -> Self {
        Rights(self.0 | r.bit())
    }
    /// Whether every right of `other` is held.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }
    /// The rights in `need` that are missing.
    pub fn missing(self, need: Rights) -> Vec<Right> {
        Right::ALL
            .into_iter()
            .filter(|r| need.0 & r.bit() != 0 && self.0 & r.bit() == 0)
            .collect()
    }
}

/// One `[[account]]` entry of the account file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountEntry {
    /// Unique name (operator's label; never sent by clients).
    pub name: String,
    /// The group whose key ids this account shares; absent: a group of its own (its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Ed25519 public key, 64 hex characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SHA-256 of a bearer token, 64 hex characters (the token itself is never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Rights; absent: all of them.
    #[serde(default = "all_rights")]
    pub rights: Vec<Right>,
}

fn all_rights() -> Vec<Right> {
    Right::ALL.to_vec()
}

/// The account file: `[[account]]` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountFile {
    /// The accounts.
    #[serde(default)]
    pub account: Vec<AccountEntry>,
}

impl AccountFile {
    /// Reads a file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, AccountError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(AccountError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and checks an account list's TOML text; `origin` names it in errors (a file,
    /// or the cluster's stream).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, AccountError> {
        let file: AccountFile = toml::from_str(text).map_err(|e| AccountError::Parse {
            path: origin.into(),
            reason: e.to_string(),
        })?;
        file.table()?;
        Ok(file)
    }

    /// The list as TOML text (what [`save`](Self::save) writes, without its comment).
    pub fn to_toml(&self) -> Result<String, AccountError> {
        toml::to_string(self).map_err(|e| AccountError::Parse {
            path: PathBuf::from("<account list>"),
            reason: e.to_string(),
        })
    }

    /// Writes the file atomically (temporary file, then rename), mode 0600 on Unix.
    pub fn save(&self, path: &Path) -> Result<(), AccountError> {
        let io = |source| AccountError::Io {
            path: path.into(),
            source,
        };
        let mut text = String::from(
            "# whispeer-relay accounts: edit with `whispeer-relay account add|list|remove`.\n\
             # The relay reloads this file when it changes (and on SIGHUP).\n",
        );
        text.push_str(&self.to_toml()?);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private(&tmp, text.as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Checks every entry (names, keys and token hashes unique and well formed).
    pub fn validate(&self) -> Result<(), AccountError> {
        self.table().map(|_| ())
    }

    /// Checks every entry and builds the lookup table.
    fn table(&self) -> Result<Table, AccountError> {
        let mut t = Table::default();
        for e in &self.account {
            let invalid = |reason: String| AccountError::Invalid {
                name: e.name.clone(),
                reason,
            };
            if e.name.trim().is_empty() {
                return Err(invalid("the name is empty".into()));
            }
            if e.key.is_none() && e.token_sha256.is_none() {
                return Err(invalid("needs a key or a token_sha256".into()));
            }
            let acct = Arc::new(Account {
                name: e.name.clone(),
                group: e.group.clone().unwrap_or_else(|| e.name.clone()),
                rights: Rights::of(&e.rights),
            });
            if t.by_name.insert(e.name.clone(), acct.clone()).is_some() {
                return Err(invalid("the name appears twice".into()));
            }
            if let Some(k) = &e.key {
                let b = parse_hex32(k).map_err(|r| invalid(format!("key: {r}")))?;
                let vk = VerifyingKey::from_bytes(&b)
                    .map_err(|_| invalid("key is not an Ed25519 public key".into()))?;
                if t.by_key.insert(b, (vk, acct.clone())).is_some() {
                    return Err(invalid("the key belongs to two accounts".into()));
                }
            }
            if let Some(h) = &e.token_sha256 {
                let b = parse_hex32(h).map_err(|r| invalid(format!("token_sha256: {r}")))?;
                if t.by_token.insert(b, acct.clone()).is_some() {
                    return Err(invalid("the token belongs to two accounts".into()));
                }
            }
        }
        Ok(t)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Parses 64 hex characters.
pub fn parse_hex32(s: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out)
        .map_err(|_| "expected 64 hexadecimal characters".to_string())?;
    Ok(out)
}

/// SHA-256 of a bearer token, as stored in the account file.
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// An authenticated account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its name in the account file.
    pub name: String,
    /// Its group (claims are per group).
    pub group: String,
    /// Its rights.
    pub rights: Rights,
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<String, Arc<Account>>,
    by_key: HashMap<[u8; 32], (VerifyingKey, Arc<Account>)>,
    by_token: HashMap<[u8; 32], Arc<Account>>,
}

/// Why a request was refused, as the error code and message the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: ErrorCode,
    /// The message.
    pub message: String,
    /// Whether the connection must be closed (the account is gone).
    pub fatal: bool,
}

impl Refusal {
    fn new(code: ErrorCode, message: String) -> Self {
        Self {
            code,
            message,
            fatal: false,
        }
    }
}

/// A line of the state file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum StateLine {
    /// A key id claimed by a group.
    Claim { key_id: String, group: String },
    /// A durable subscription's owner.
    Owner {
        key_id: String,
        name: String,
        owner: String,
    },
}

/// Key-id claims and durable owners, in memory and (optionally) in an append-only file.
///
/// Each entry carries the number of its state-file line (0: read at start). The file is
/// written and `sync_data`ed by a writer thread of its own, a batch of lines at a time,
/// never on a tokio worker; [`AuthState::durable`] tells how many lines are on disk, so a
/// request that made (or depends on) a newer line can wait for it before it is answered.
#[derive(Debug, Default)]
pub struct AuthState {
    claims: HashMap<[u8; 16], (String, u64)>,
    claims_per_group: HashMap<String, usize>,
    owners: HashMap<([u8; 16], String), (String, u64)>,
    writer: Option<StateWriter>,
}

/// The state file's writer thread: lines in, their count on disk out.
#[derive(Debug)]
struct StateWriter {
    tx: std::sync::mpsc::Sender<Vec<u8>>,
    /// Lines handed to the thread.
    sent: u64,
    durable: tokio::sync::watch::Receiver<u64>,
}

impl StateWriter {
    fn spawn(path: PathBuf, mut f: File) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (done, durable) = tokio::sync::watch::channel(0u64);
        std::thread::Builder::new()
            .name("whispeer-auth-state".into())
            .spawn(move || {
                let mut written = 0u64;
                // Group commit: everything queued meanwhile goes in one write and one sync.
                while let Ok(first) = rx.recv() {
                    let mut buf = first;
                    let mut n = 1;
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(&more);
                        n += 1;
                    }
                    if let Err(e) = f.write_all(&buf).and_then(|_| f.sync_data()) {
                        tracing::error!(file = %path.display(), error = %e,
                            "cannot write the auth state file: a claim may not survive a restart");
                    }
                    written += n;
                    // Also after an error: waiting requests go on (as before: logged).
                    done.send_replace(written);
                }
            })?;
        Ok(Self {
            tx,
            sent: 0,
            durable,
        })
    }
}

impl AuthState {
    /// Opens (or creates) the state file and replays it.
    pub fn open(path: Option<&Path>) -> Result<Self, AccountError> {
        let mut s = AuthState::default();
        let Some(path) = path else {
            return Ok(s);
        };
        let io = |source| AccountError::Io {
            path: path.into(),
            source,
        };
        match File::open(path) {
            Ok(f) => {
                for (n, line) in BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(io)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let Ok(parsed) = serde_json::from_str::<StateLine>(&line) else {
                        // A torn last line after a crash is skipped; anything else is damage.
                        tracing::warn!(file = %path.display(), line = n + 1,
                            "skipping an unreadable line of the auth state file");
                        continue;
                    };
                    s.apply(parsed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut o = OpenOptions::new();
        o.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let f = o.open(path).map_err(io)?;
        s.writer = Some(StateWriter::spawn(path.to_owned(), f).map_err(io)?);
        Ok(s)
    }

    fn apply(&mut self, l: StateLine) {
        match l {
            StateLine::Claim { key_id, group } => {
                let mut k = [0u8; 16];
                if hex::decode_to_slice(&key_id, &mut k).is_ok() {
                    *self.claims_per_group.entry(group.clone()).or_default() += 1;
                    self.claims.insert(k, (group, 0));
                }
            }
            StateLine::Owner {
                key_id,
                name,
                owner,
            } => {
                let mut k = [0u8; 16];
                if hex::decode_to_slice(&key_id, &mut k).is_ok() {
                    self.owners.insert((k, name), (owner, 0));
                }
            }
        }
    }

    /// Hands a line to the writer thread; its number (0 without a file).
    fn append(&mut self, l: &StateLine) -> u64 {
        let Some(w) = &mut self.writer else {
            return 0;
        };
        let mut line = serde_json::to_vec(l).unwrap_or_default();
        line.push(b'\n');
        if w.tx.send(line).is_err() {
            return 0;
        }
        w.sent += 1;
        w.sent
    }

    /// `Some(line)` while state-file line `line` is not yet on disk.
    fn pending(&self, line: u64) -> Option<u64> {
        let w = self.writer.as_ref()?;
        (line > *w.durable.borrow()).then_some(line)
    }

    /// How many state-file lines are on disk (changes as the writer thread syncs).
    pub fn durable(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.writer.as_ref().map(|w| w.durable.clone())
    }

    /// Key ids claimed in total.
    pub fn claim_count(&self) -> usize {
        self.claims.len()
    }

    /// Durable owners recorded.
    pub fn owner_count(&self) -> usize {
        self.owners.len()
    }
}

/// The accounts, claims and live authenticated connections of a relay.
#[derive(Debug)]
pub struct Accounts {
    mode: AuthMode,
    file: Option<PathBuf>,
    max_claims: usize,
    table: RwLock<Arc<Table>>,
    stamp: Mutex<Option<(SystemTime, u64)>>,
    state: Mutex<AuthState>,
    live: Mutex<HashMap<ConnId, (String, Arc<Outbound>)>>,
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Accounts {
    /// Loads the account list and the state file the configuration names.
    pub fn open(cfg: &AuthConfig) -> Result<Self, AccountError> {
        let file = cfg.accounts.clone().filter(|p| !p.as_os_str().is_empty());
        let (table, stamp) = match &file {
            Some(p) => (AccountFile::load(p)?.table()?, stamp_of(p)),
            None => (Table::default(), None),
        };
        Ok(Self {
            mode: cfg.mode,
            file,
            max_claims: cfg.max_claims_per_group,
            table: RwLock::new(Arc::new(table)),
            stamp: Mutex::new(stamp),
            state: Mutex::new(AuthState::open(cfg.state.as_deref())?),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Whether clients must authenticate.
    pub fn required(&self) -> bool {
        self.mode == AuthMode::Required
    }

    /// The account file, if any (for the reload task).
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of accounts.
    pub fn count(&self) -> usize {
        self.table().by_name.len()
    }

    /// How many state-file lines are on disk (`None`: the state is in memory only).
    pub fn durable(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.state().durable()
    }

    /// Key ids claimed and durable owners recorded.
    pub fn state_counts(&self) -> (usize, usize) {
        let s = self.state();
        (s.claim_count(), s.owner_count())
    }

    /// Connections currently authenticated.
    pub fn live_count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The account of a bearer token.
    pub fn by_token(&self, token: &[u8]) -> Option<Arc<Account>> {
        self.table().by_token.get(&token_hash(token)).cloned()
    }

    /// Checks a challenge response: the account's key must be listed and the signature
    /// (strict Ed25519) must cover this connection's nonce and the account key.
    pub fn verify(
        &self,
        account: &[u8; 32],
        nonce: &[u8; 32],
        sig: &[u8; 64],
    ) -> Option<Arc<Account>> {
        let t = self.table();
        let (vk, acct) = t.by_key.get(account)?;
        let sig = Signature::from_bytes(sig);
        vk.verify_strict(&auth_sig_input(nonce, account), &sig)
            .ok()
            .map(|_| acct.clone())
    }

    /// The current entry of an account (None once it was removed).
    pub fn current(&self, name: &str) -> Option<Arc<Account>> {
        self.table().by_name.get(name).cloned()
    }

    /// Records an authenticated connection (closed if its account is removed).
    pub(crate) fn attach(&self, conn: ConnId, name: &str, out: &Arc<Outbound>) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, (name.to_owned(), out.clone()));
    }

    /// Forgets a connection.
    pub(crate) fn detach(&self, conn: ConnId) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
    }

    /// May `name` do `need` on `key_id`? Claims the key id for the account's group when
    /// nobody holds it yet.
    ///
    /// `Ok(Some(line))`: allowed, but the claim it relies on is state-file line `line`,
    /// not yet on disk: answer the request once [`durable`](Self::durable) reaches it.
    ///
    /// `shared` asks a store shared by several relays (JetStream) for the claim, so one
    /// group holds a key id in the whole cluster ([`crate::store::Store::claim_key`]); it
    /// is called without this relay's state locked. A claim it reports is remembered here
    /// (claims never move) and not written to the state file.
    pub fn authorize(
        &self,
        name: &str,
        key_id: &KeyId,
        need: Rights,
        shared: impl FnOnce(&str, bool) -> Result<Claim, StoreError>,
    ) -> Result<Option<u64>, Refusal> {
        if !self.required() {
            return Ok(None);
        }
        let Some(acct) = self.current(name) else {
            return Err(Refusal {
                code: ErrorCode::AuthFailed,
                message: "the account was removed".into(),
                fatal: true,
            });
        };
        let missing = acct.rights.missing(need);
        if !missing.is_empty() {
            let names: Vec<_> = missing.iter().map(|r| r.name()).collect();
            return Err(Refusal::new(
                ErrorCode::AuthFailed,
                format!("the account lacks the right to {}", names.join(", ")),
            ));
        }
        let k = *key_id.as_bytes();
        let others = || {
            Err(Refusal::new(
                ErrorCode::AuthFailed,
                "this key id is claimed by another group of accounts".into(),
            ))
        };
        let over = |n: usize| {
            Err(Refusal::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "the account's group holds {n} key ids, the limit \
                     (auth.max_claims_per_group)"
                ),
            ))
        };
        // At its limit a group may still use key ids it holds (at another relay of the
        // cluster, too): the shared store is then only asked, never written.
        let at_limit = {
            let st = self.state();
            match st.claims.get(&k) {
                Some((g, line)) if *g == acct.group => return Ok(st.pending(*line)),
                Some(_) => return others(),
                None => {
                    let n = st.claims_per_group.get(&acct.group).copied().unwrap_or(0);
                    (n >= self.max_claims).then_some(n)
                }
            }
        };
        let claim = shared(&acct.group, at_limit.is_none())
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        let mut st = self.state();
        match claim {
            // Only answered to a question without creating, i.e. at the limit: the key id
            // would be a new claim.
            Claim::Unclaimed => return over(at_limit.unwrap_or(self.max_claims)),
            // Claims are this relay's own: decided below from its state.
            Claim::NotShared => {
                if let Some(n) = at_limit {
                    return over(n);
                }
            }
            Claim::Ours { new } => {
                // Counted per relay: a group can claim up to the limit at each relay.
                if new {
                    *st.claims_per_group.entry(acct.group.clone()).or_default() += 1;
                }
                st.claims.insert(k, (acct.group.clone(), 0));
                return Ok(None);
            }
            // Not remembered here (the holding group's name is not known here, only its
            // tag): the store remembers it.
            Claim::Others => return others(),
        }
        match st.claims.get(&k) {
            Some((g, line)) if *g == acct.group => Ok(st.pending(*line)),
            Some(_) => others(),
            None => {
                let n = st.claims_per_group.get(&acct.group).copied().unwrap_or(0);
                if n >= self.max_claims {
                    return over(n);
                }
                *st.claims_per_group.entry(acct.group.clone()).or_default() += 1;
                let line = st.append(&StateLine::Claim {
                    key_id: hex::encode(k),
                    group: acct.group.clone(),
                });
                st.claims.insert(k, (acct.group.clone(), line));
                Ok(st.pending(line))
            }
        }
    }

    /// Checks the owner of a durable subscription without recording one: `Err` when it is
    /// someone else's, `Ok(Some(line))` (as for [`authorize`](Self::authorize)) when it is
    /// `owner`'s by a line not yet on disk, else `Ok(None)` (`owner`'s, or nobody's yet).
    /// `owner` as for [`durable_owner`](Self::durable_owner).
    pub fn check_durable_owner(
        &self,
        key_id: &KeyId,
        name: &str,
        owner: Option<&str>,
    ) -> Result<Option<u64>, Refusal> {
        let k = (*key_id.as_bytes(), name.to_owned());
        let st = self.state();
        match st.owners.get(&k) {
            Some((have, line)) if owner == Some(have.as_str()) => Ok(st.pending(*line)),
            Some(_) => Err(Self::not_the_owner(name)),
            None => Ok(None),
        }
    }

    /// Checks (and on first use records) the owner of a durable subscription. `owner` is
    /// `account:NAME` when authenticated, `sha256:HEX` of the `Sub.owner` secret, or None
    /// for a durable created without an owner (auth off, legacy clients). `Ok(Some(line))`
    /// as for [`authorize`](Self::authorize).
    ///
    /// Records are kept forever (in memory and as a state-file line): call it only once the
    /// durable exists (created or found), after [`check_durable_owner`](Self::check_durable_owner)
    /// let the `Sub` go on — so a `Sub` refused for the durable quota, a busy name or a
    /// store error leaves no record (each one used to leave ~1 KB in both).
    pub fn durable_owner(
        &self,
        key_id: &KeyId,
        name: &str,
        owner: Option<String>,
    ) -> Result<Option<u64>, Refusal> {
        let k = (*key_id.as_bytes(), name.to_owned());
        let mut st = self.state();
        match (st.owners.get(&k), owner) {
            (Some((have, line)), Some(want)) if *have == want => Ok(st.pending(*line)),
            (Some(_), _) => Err(Self::not_the_owner(name)),
            (None, None) => Ok(None),
            (None, Some(want)) => {
                let line = st.append(&StateLine::Owner {
                    key_id: hex::encode(k.0),
                    name: k.1.clone(),
                    owner: want.clone(),
                });
                st.owners.insert(k, (want, line));
                Ok(st.pending(line))
            }
        }
    }

    fn not_the_owner(name: &str) -> Refusal {
        Refusal::new(
            ErrorCode::NotAllowed,
            format!("durable subscription {name:?} belongs to someone else"),
        )
    }

    /// Reloads the account file if it changed since the last load; returns how many
    /// connections were closed. Errors leave the previous list in force.
    pub fn reload_if_changed(&self) -> Result<usize, AccountError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let now = stamp_of(path);
        {
            let mut s = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *s == now {
                return Ok(0);
            }
            *s = now;
        }
        self.reload()
    }

    /// Reloads the account file now; closes connections of removed accounts.
    pub fn reload(&self) -> Result<usize, AccountError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let table = AccountFile::load(path)?.table()?;
        Ok(self.install_table(table))
    }

    /// Installs an account list given as TOML text (the cluster's list, from JetStream);
    /// closes the connections of accounts it no longer has. A list that does not parse or
    /// check leaves the previous one in force.
    pub fn install(&self, text: &str) -> Result<usize, AccountError> {
        let table = AccountFile::parse(text, Path::new("<the cluster's account list>"))?.table()?;
        Ok(self.install_table(table))
    }

    fn install_table(&self, table: Table) -> usize {
        let table = Arc::new(table);
        let n = table.by_name.len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = table.clone();
        let mut closed = 0;
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for (name, out) in live.values() {
            if !table.by_name.contains_key(name) {
                let frame = codec::encode_prefixed(&Frame::Err(ErrFrame {
                    code: ErrorCode::AuthFailed,
                    message: "the account was removed".into(),
                    fatal: true,
                    sub_id: None,
                    publish_id: None,
                }));
                if out.close_with(Some(frame)) {
                    closed += 1;
                }
            }
        }
        tracing::info!(accounts = n, closed, "account list reloaded");
        closed
    }
}

/// A fresh bearer token (`wsp_tok_` + 64 hex characters, 256 random bits).
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(b)))
}

/// A fresh account key: (secret file contents, public key hex).
pub fn new_key() -> Result<(String, String), getrandom::Error> {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::getrandom(seed.as_mut())?;
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let secret = format!("{SECRET_PREFIX}{}\n", hex::encode(seed.as_ref()));
    Ok((secret, hex::encode(sk.verifying_key().as_bytes())))
}

/// The owner string of a `Sub.owner` secret (only its hash is kept).
pub fn owner_of_secret(secret: &Bytes) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_and_table_checks() {
        let r = Rights::of(&[Right::Publish, Right::Subscribe]);
        assert!(r.contains(Rights::of(&[Right::Publish])));
        assert_eq!(
            r.missing(Rights::of(&[Right::Publish, Right::Durable])),
            vec![Right::Durable]
        );
        let f = AccountFile {
            account: vec![AccountEntry {
                name: "a".into(),
                group: None,
                key: None,
                token_sha256: None,
                rights: all_rights(),
            }],
        };
        assert!(
            f.table().is_err(),
            "an entry without key or token is refused"
        );
    }
}
