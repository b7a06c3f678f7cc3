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
//! **Claims lapse lazily** (`auth.claim_idle_ms`, 7 days by default; 0 = never). A group
//! holds at most `auth.max_claims_per_group` claims, so one member could fill the quota
//! with junk key ids (a `Sub` each) and stop its group's next epochs. Each claim of this
//! relay's own therefore knows its holds — the subscriptions using its key id here
//! ([`ClaimHold`], kept with the subscription) — and its last use (any authorize relying
//! on it; refreshed coarsely, written to the file as `used` lines at most every quarter
//! of the idle time). When a group at its limit asks for a new key id, its longest-unused
//! claim is released in its place (`AuthState::release_one`) if it is unheld, unused
//! for `claim_idle_ms`, owns no durable and the store holds nothing under it
//! ([`crate::store::Store::holds_key_id`]); a `release` line makes a restart agree.
//! Nothing lapses by a timer, nothing lapses for another group's request — except a
//! claim of a revoked account's own group (`account-id:…` whose id no account in force has,
//! and no member is left to make lapse), released for another group's request under the
//! same rules less the idle time (`AuthState::release_revoked`) — and in a cluster
//! nothing lapses at all. A held claim never lapses, so a member subscribed to
//! junk key ids and staying connected would keep them for good: each claim records the
//! account that made it (`by`), and a member of a group shared with other accounts makes
//! at most `auth.max_claims_per_account` of its claims (its own longest-unused one lapses
//! in its place, as above); a refusal says whether the requester holds the most, and an
//! info line names the account that does. With the relay stopped an operator can release
//! claims
//! ([`release_claims`], `whispeer-relay claims release`).
//!
//! **Identity** (review finding 17). The name is only the operator's label. An entry that
//! `account add` wrote carries `id`, 16 random bytes (32 hex characters, from the OS RNG);
//! everything the relay keeps for the account derives from it: its store tenant
//! ([`Tenant::for_account_id`]), the owner of its durables (`account-id:HEX`) and its default
//! group (`account-id:HEX`, in a namespace an explicit `group` may not enter:
//! [`ID_GROUP_PREFIX`], [`AccountError::ReservedGroup`]). So a name removed and added again
//! — perhaps for someone else — is a new identity: it inherits none of the old one's
//! claims, durables or store usage, and neither does an account whose explicit `group`
//! happens to equal the name of an old account that had an id. The old identity's claims
//! stay with its group, which no later account can be given (`account add` draws a new
//! id), until another group asks for one of its key ids and nothing keeps it (no
//! subscription, durable or stored data: `AuthState::release_revoked`). (A legacy entry's group is its plain
//! name: `account remove` *retires* it when it removes the group's last member
//! ([`AccountFile::retired_groups`]), so no account is given it, and its claims, by a
//! reused name unless `account add --adopt-retired-group` asks for exactly that.) An entry without `id` (written before ids existed) is a
//! **legacy** entry and keeps the name-based identity it always had — tenant from the name,
//! owner `account:NAME`, default group the name — so its claims, durables and store usage
//! stay its own; the relay never rewrites the file to add ids (`account list` marks such
//! entries; `account remove` + `account add` migrates one, as a fresh identity).
//! `account rotate` replaces an account's key or token and keeps its identity.
//!
//! The account list is a TOML file (`whispeer-relay account add|list|remove|rotate` edits
//! it); the relay reloads it when it changes or on SIGHUP. Each reload walks the
//! authenticated connections once: one whose credential (the account key or token it
//! proved) no longer names its account — the account was removed (also by a remove and an
//! add of the same name between two reloads: a new identity, even with the same key), or
//! its key or token replaced — is closed; one whose account lost a right or
//! moved to another group is told to end the subscriptions that no longer hold
//! ([`Accounts::still_allowed`]). Deliveries never look at accounts. An invalid list leaves
//! the previous one in force — visibly (a gauge, a counter, an error log per changed
//! text) — less the accounts, keys and tokens the invalid text no longer names, when it
//! is still TOML, each entry read on its own (`Accounts::revoke_unnamed`): a removal with
//! a typo elsewhere still holds. A file's such revocations wait until the same text is
//! read twice, `auth.reload_ms` apart (`Accounts::list_failed`): a file written in place
//! can be read mid-write. So do a **valid** file's revocations (a file cut at an entry
//! boundary is a valid list): what it adds applies at once, what it removes or reduces
//! only once the same text is read again a reload period later, or at a SIGHUP
//! (`Accounts::install_file_table`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use whispeer_protocol::frame::ErrFrame;
use whispeer_protocol::{codec, ErrorCode, Frame, KeyId};

use crate::config::{AuthConfig, AuthMode};
use crate::ids::ConnId;
use crate::outbound::Outbound;
use crate::store::{Claim, StoreError, Tenant};

/// Prefix of a bearer token printed by `account add --token`.
pub const TOKEN_PREFIX: &str = "wsp_tok_";
/// Prefix of an account secret key file written by `account add --key-out`.
pub const SECRET_PREFIX: &str = "wsp_acct_sk_";
/// Prefix of the default group of an account with an `id` (`account-id:` + the id in hex),
/// and of the owner of its durables. Reserved: no explicit `group` may start with it (nor
/// the name of a legacy entry without `group`, whose name is its group), so no account
/// can be put into another account's default group, or inherit its claims, by naming it.
pub const ID_GROUP_PREFIX: &str = "account-id:";

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
    /// An entry's group — its explicit `group`, or the name of a legacy entry (no `id`)
    /// without one — starts with [`ID_GROUP_PREFIX`], the namespace of the default groups
    /// of accounts with an `id`.
    #[error(
        "account {name:?}: group {group:?} starts with \"{prefix}\", which is reserved for \
         the default groups of accounts with an id; choose another group name",
        prefix = ID_GROUP_PREFIX
    )]
    ReservedGroup { name: String, group: String },
    /// An entry's group is one of the list's `retired_groups`: the group of a removed
    /// legacy entry, whose key-id claims stay with it (review finding 2 of session 26).
    #[error(
        "account {name:?}: group {group:?} is retired (the group of a removed account \
         without an id; the key ids it claimed stay with it). Choose another group, or take \
         those claims over on purpose with `account add --adopt-retired-group`"
    )]
    RetiredGroup { name: String, group: String },
    /// Another process holds the auth-state file's lock: a relay running on it.
    #[error(
        "{path}: a running relay holds this auth state file; stop the relay first (it \
         releases claims unused for auth.claim_idle_ms by itself when a group needs room)"
    )]
    InUse { path: PathBuf },
    /// A relay starting: another process holds the auth-state file's lock.
    #[error(
        "{path}: another process holds this auth state file's lock (flock): most likely \
         another relay running on the same file (auth.state; each relay needs its own) or a \
         `whispeer-relay claims release` still running. Stop it, or give this relay its own \
         auth.state, then start again"
    )]
    Locked { path: PathBuf },
    /// The auth-state file could not be locked at all (the file system may not support
    /// `flock`).
    #[error(
        "{path}: cannot lock this auth state file ({source}); the relay needs an exclusive \
         flock on it while it runs (some network file systems, e.g. NFS depending on the \
         mount, do not support it: see docs/DEPLOY.md)"
    )]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
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
    /// The account's identity: 32 hex characters (16 random bytes), written by `account
    /// add`. Its store tenant, durable owner and default group derive from it, not from
    /// the name. Absent: a legacy entry, whose identity is its name (as before ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The group whose key ids this account shares; absent: a group of its own
    /// (`account-id:ID`; a legacy entry's: its name). May not start with
    /// [`ID_GROUP_PREFIX`].
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
    /// Groups no account may be given: each the group of a removed legacy entry (its plain
    /// name), which keeps the key ids it claimed. `account remove` adds one when it removes
    /// the last member of such a group; `account add --adopt-retired-group` takes one back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_groups: Vec<String>,
    /// Groups that were a legacy entry's own group (its plain name, holding its claims)
    /// and still have members: each is retired when its last member is removed, whoever
    /// that is, and an adopted retired group is tracked here again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legacy_groups: Vec<String>,
    /// The accounts.
    #[serde(default)]
    pub account: Vec<AccountEntry>,
}

impl AccountFile {
    /// Reads a file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, AccountError> {
        Self::parse(&read_list(path)?, path)
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
            "# whispeer-relay accounts: edit with `whispeer-relay account add|list|remove|rotate`.\n\
             # The relay reloads this file when it changes (and on SIGHUP).\n",
        );
        text.push_str(&self.to_toml()?);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private(&tmp, text.as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Removes the account `name`; `Some(Some(group))` when that retired its group (see
    /// [`AccountFile::retired_groups`]): a legacy entry's own group (its plain name, which
    /// keeps its claims) is retired when its last member goes, whoever that is — while
    /// members remain it is tracked in [`AccountFile::legacy_groups`] — and so is an
    /// adopted retired group. Groups of accounts with an id are never retired (no later
    /// account can be given them), nor other explicit groups (an operator's shared name:
    /// giving it again shares its claims on purpose). `None`: no such account.
    pub fn remove(&mut self, name: &str) -> Option<Option<String>> {
        let i = self.account.iter().position(|e| e.name == name)?;
        let e = self.account.remove(i);
        let group = match (&e.group, &e.id) {
            (Some(g), _) => g.clone(),
            (None, None) => e.name.clone(),
            (None, Some(_)) => return Some(None), // an id group: no later account gets it
        };
        let legacy_own = e.id.is_none() && group == e.name;
        if !(legacy_own || self.legacy_groups.contains(&group))
            || self.retired_groups.contains(&group)
        {
            return Some(None);
        }
        let still_used = self.account.iter().any(|o| {
            o.group.as_deref() == Some(group.as_str())
                || (o.id.is_none() && o.group.is_none() && o.name == group)
        });
        if still_used {
            // Retired once its last member goes, whoever that is (review 27b, R5).
            if !self.legacy_groups.contains(&group) {
                self.legacy_groups.push(group);
            }
            return Some(None);
        }
        self.legacy_groups.retain(|g| *g != group);
        self.retired_groups.push(group.clone());
        Some(Some(group))
    }

    /// Takes the retired group `g` back (`account add --adopt-retired-group`): it is
    /// tracked as a legacy group again, so it is retired again when its last member goes.
    /// `false`: `g` was not retired.
    pub fn adopt_retired(&mut self, g: &str) -> bool {
        let before = self.retired_groups.len();
        self.retired_groups.retain(|r| r != g);
        if self.retired_groups.len() == before {
            return false;
        }
        if !self.legacy_groups.iter().any(|l| l == g) {
            self.legacy_groups.push(g.to_owned());
        }
        true
    }

    /// Checks every entry (names, ids, keys and token hashes unique and well formed; no
    /// group in the reserved namespace or retired).
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
            let id = match &e.id {
                Some(h) => Some(parse_id(h).map_err(|r| invalid(format!("id: {r}")))?),
                None => None,
            };
            let reserved = |group: &str| AccountError::ReservedGroup {
                name: e.name.clone(),
                group: group.to_owned(),
            };
            let group = match (&e.group, id) {
                (Some(g), _) if g.starts_with(ID_GROUP_PREFIX) => return Err(reserved(g)),
                (Some(g), _) => g.clone(),
                (None, Some(id)) => id_group(&id),
                // Legacy: the name is the group.
                (None, None) if e.name.starts_with(ID_GROUP_PREFIX) => {
                    return Err(reserved(&e.name))
                }
                (None, None) => e.name.clone(),
            };
            if self.retired_groups.contains(&group) {
                return Err(AccountError::RetiredGroup {
                    name: e.name.clone(),
                    group,
                });
            }
            if let Some(id) = id {
                if !t.ids.insert(id) {
                    return Err(invalid("the id belongs to two accounts".into()));
                }
            }
            let acct = Arc::new(Account {
                name: e.name.clone(),
                id,
                group,
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
        Ok(t.index())
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

/// Parses an account `id`: 32 hexadecimal characters.
pub fn parse_id(s: &str) -> Result<[u8; 16], String> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| {
        "expected 32 hexadecimal characters (16 random bytes, as `account add` writes)".to_string()
    })?;
    Ok(out)
}

/// A fresh account id (32 hex characters, 128 random bits from the OS).
pub fn new_id() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)?;
    Ok(hex::encode(b))
}

/// The default group of the account with id `id`, also the owner of its durables
/// (`account-id:HEX`).
pub fn id_group(id: &[u8; 16]) -> String {
    format!("{ID_GROUP_PREFIX}{}", hex::encode(id))
}

/// SHA-256 of a bearer token, as stored in the account file.
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// What a connection proved when it authenticated: the account key it signed with, or the
/// SHA-256 of the bearer token it presented. Recorded with the connection, so a reload
/// that replaces an account's key or token (keeping its name) is told apart from one that
/// keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Credential {
    /// An Ed25519 account key (the public key).
    Key([u8; 32]),
    /// A bearer token, by its SHA-256.
    Token([u8; 32]),
}

impl Credential {
    /// The credential of a bearer token.
    pub fn token(token: &[u8]) -> Self {
        Credential::Token(token_hash(token))
    }
}

/// An authenticated account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its name in the account file.
    pub name: String,
    /// Its identity (`id` in the account file); `None`: a legacy entry, identified by its
    /// name.
    pub id: Option<[u8; 16]>,
    /// Its group (claims are per group).
    pub group: String,
    /// Its rights.
    pub rights: Rights,
}

impl Account {
    /// The owner string of the account's durable subscriptions: `account-id:HEX`, or
    /// `account:NAME` for a legacy entry (what the auth-state file and the JetStream store
    /// have always held for it). The two forms never meet (`account:` vs `account-id:`),
    /// nor `sha256:HEX` of a `Sub.owner` secret.
    pub fn owner(&self) -> String {
        match &self.id {
            Some(id) => id_group(id),
            None => format!("account:{}", self.name),
        }
    }

    /// The store tenant its quotas count against: from its id, or (legacy) from its name.
    pub fn tenant(&self) -> Tenant {
        match &self.id {
            Some(id) => Tenant::for_account_id(id),
            None => Tenant::for_account(&self.name),
        }
    }

    /// Whether `other` is the same account: the same name and the same identity (a name
    /// removed and added again, or given an id, is another account).
    pub fn same_identity(&self, other: &Account) -> bool {
        self.name == other.name && self.id == other.id
    }
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<String, Arc<Account>>,
    ids: std::collections::HashSet<[u8; 16]>,
    by_key: HashMap<[u8; 32], (VerifyingKey, Arc<Account>)>,
    by_token: HashMap<[u8; 32], Arc<Account>>,
    /// Accounts per group ([`Table::index`]).
    members: HashMap<String, usize>,
    /// Account names by [`Account::owner`], which key-id claims record as their creator
    /// ([`Table::index`]).
    owners: HashMap<String, String>,
}

impl Table {
    /// Fills [`Table::members`] and [`Table::owners`] from the accounts.
    fn index(mut self) -> Self {
        self.members.clear();
        self.owners.clear();
        for (name, a) in &self.by_name {
            *self.members.entry(a.group.clone()).or_default() += 1;
            self.owners.insert(a.owner(), name.clone());
        }
        self
    }

    /// The account `credential` proves, if it is still listed.
    fn account_of(&self, credential: &Credential) -> Option<&Arc<Account>> {
        match credential {
            Credential::Key(k) => self.by_key.get(k).map(|(_, a)| a),
            Credential::Token(h) => self.by_token.get(h),
        }
    }
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
    /// A key id claimed by a group; `used`: its last use then (Unix ms; absent in files
    /// from before claims could lapse, and while `auth.claim_idle_ms` is 0); `by`: the
    /// account whose request made it ([`Account::owner`]; absent in files from before
    /// creators were recorded: such a claim counts as the group's, no member's). A relay
    /// older than `by` ignores it.
    Claim {
        key_id: String,
        group: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        used: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// A durable subscription's owner.
    Owner {
        key_id: String,
        name: String,
        owner: String,
    },
    /// A durable subscription was deleted (by its owner, or idle past
    /// `store.durable_idle_ms`): its owner is forgotten. A relay older than this line
    /// skips it (as an unreadable line) and keeps the owner.
    Disown { key_id: String, name: String },
    /// A claim was used at `at` (Unix ms): written at most every quarter of
    /// `auth.claim_idle_ms` per claim, so its idle time survives a restart. A relay older
    /// than this line skips it.
    Used { key_id: String, at: u64 },
    /// `group`'s claim of the key id lapsed (unused for `auth.claim_idle_ms`, released for a
    /// new key id of the group) or an operator released it (`whispeer-relay claims
    /// release`, relay stopped). A relay older than this line skips it and keeps the claim.
    Release { key_id: String, group: String },
}

/// The clock claims' last uses are measured with: Unix milliseconds (injectable for tests).
#[derive(Clone)]
struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Default for Clock {
    /// The wall clock, read coarsely where that is cheaper (Linux: `CLOCK_REALTIME_COARSE`,
    /// a few ms of resolution, read without a system call): every publish reads it.
    fn default() -> Self {
        #[cfg(target_os = "linux")]
        {
            use rustix::time::{clock_gettime, ClockId};
            Clock(Arc::new(|| {
                let t = clock_gettime(ClockId::RealtimeCoarse);
                u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + (t.tv_nsec / 1_000_000) as u64
            }))
        }
        #[cfg(not(target_os = "linux"))]
        Clock(Arc::new(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        }))
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// After a start, no claim lapses for this long (or `auth.claim_idle_ms`, if shorter): the
/// subscriptions that held claims before come back meanwhile, and a claim held when the
/// relay stopped was last written as used when its subscription began.
const START_GRACE_MS: u64 = 3_600_000;

/// At most this many of a group's idle claims are looked at (owners, store) per request
/// that needs one released; each one found still holding something counts as used now, so
/// it is looked at again only after another `auth.claim_idle_ms`.
const RELEASE_CHECKS: usize = 16;

/// A key id's claim, as the relay keeps it in memory.
#[derive(Debug)]
struct ClaimEntry {
    group: String,
    /// The account whose request made it ([`Account::owner`]); `None`: not recorded (a
    /// line from before creators were, or learned from a shared store).
    by: Option<String>,
    /// Its state-file line (0: read at start, or learned from a shared store).
    line: u64,
    /// Learned from a store shared by relays (JetStream): the cluster's, never released here.
    shared: bool,
    /// Subscriptions on this relay that use the key id ([`ClaimHold`]).
    holds: u32,
    /// Its last use (Unix ms), refreshed at most every eighth of `claim_idle_ms` (a minute
    /// at most), so a publish rarely writes anything.
    used: u64,
    /// The last use the state file holds.
    saved: u64,
}

/// Key-id claims and durable owners, in memory and (optionally) in an append-only file,
/// which its writer thread compacts once most of its lines are dead ([`LiveState`]); a torn
/// last line (a crash mid-write) is cut off at open.
///
/// Each entry carries the number of its state-file line (0: read at start). The file is
/// written and `sync_data`ed by a writer thread of its own, a batch of lines at a time,
/// never on a tokio worker; [`AuthState::durable`] tells how many lines are on disk, so a
/// request that made (or depends on) a newer line can wait for it before it is answered.
///
/// **Lapsing claims** (`auth.claim_idle_ms` > 0, no cluster): each claim of this relay's
/// own knows its holds (subscriptions using the key id here) and its last use; a group at
/// its limit that asks for a new key id gets its longest-unused claim released instead,
/// if that one is unheld, unused for `claim_idle_ms`, owns no durable and the store holds
/// nothing under it (`AuthState::release_one`). Nothing lapses by a timer.
#[derive(Debug, Default)]
pub struct AuthState {
    claims: HashMap<[u8; 16], ClaimEntry>,
    /// Per group: its claims counted, its idle ones, and the same per creating account.
    groups: HashMap<String, GroupClaims>,
    /// When a refusal for a full group (or member) was last logged, per group (at most one
    /// info line a minute each).
    refusals_logged: HashMap<String, u64>,
    /// Ordered, so the owners under one key id are a range.
    owners: std::collections::BTreeMap<([u8; 16], String), (String, u64)>,
    writer: Option<StateWriter>,
    /// `auth.claim_idle_ms` (0: claims never lapse).
    idle_ms: u64,
    clock: Clock,
    /// Claims released since the start.
    released: u64,
    /// Claims of revoked accounts' own groups released for another group, since the start
    /// ([`AuthState::release_revoked`]).
    revoked_released: u64,
}

/// Claims by last use: the releasable ones no subscription holds (kept only while claims
/// may lapse).
type IdleSet = std::collections::BTreeSet<(u64, [u8; 16])>;

/// A group's claims, as counted against `auth.max_claims_per_group`, and per member
/// against `auth.max_claims_per_account`.
#[derive(Debug, Default)]
struct GroupClaims {
    /// Claims counted (this relay's own, and the cluster's made through this relay).
    n: usize,
    /// Its idle claims.
    idle: IdleSet,
    /// Per creating account ([`Account::owner`]): its claims counted and its idle ones. A
    /// claim without a recorded creator is in none.
    by: HashMap<String, MemberClaims>,
}

/// One account's claims in a group.
#[derive(Debug, Default)]
struct MemberClaims {
    n: usize,
    idle: IdleSet,
}

impl GroupClaims {
    fn idle_insert(&mut self, by: Option<&str>, at: (u64, [u8; 16])) {
        self.idle.insert(at);
        if let Some(m) = by.and_then(|b| self.by.get_mut(b)) {
            m.idle.insert(at);
        }
    }

    fn idle_remove(&mut self, by: Option<&str>, at: &(u64, [u8; 16])) {
        self.idle.remove(at);
        if let Some(m) = by.and_then(|b| self.by.get_mut(b)) {
            m.idle.remove(at);
        }
    }
}

/// Which limit a new claim would pass: (the claims held, the limit).
#[derive(Debug, Clone, Copy)]
enum Full {
    /// The account's own claims in its group, `auth.max_claims_per_account`.
    Member(usize, usize),
    /// The group's, `auth.max_claims_per_group`.
    Group(usize, usize),
}

/// A claim [`AuthState::insert_claim`] records.
#[derive(Debug)]
struct NewClaim {
    group: String,
    by: Option<String>,
    /// Its state-file line (0: read at start, or learned from a shared store).
    line: u64,
    /// Learned from (or made in) a store shared by relays: never released here.
    shared: bool,
    /// Counted against the group's limit (and its creator's): made here, or read from the
    /// state file.
    counted: bool,
}

/// How long the auth-state writer waits before it tries a failed write again.
const WRITE_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The auth-state file is compacted once it is at least this long and most of its lines
/// are dead (owners disowned since): see [`LiveState`].
const COMPACT_MIN_BYTES: u64 = 32 * 1024;

/// What replaying the state file gives, kept by its writer thread for compaction (review
/// F3: each durable created and deleted leaves an `Owner` and a `Disown` line, so a
/// client looping `Sub` with an owner and `Unsub {delete}` grew the file without bound).
/// Once the file holds more dead lines than live ones (and [`COMPACT_MIN_BYTES`]), the
/// thread rewrites it as the live claims (with their last use) and owners only: a
/// temporary file, synced, renamed over the file, the directory synced, then appending
/// goes on in the new file. Released claims and `Used` lines are dead lines.
/// Lines are numbered by the writer's count of lines handed to it (never by position in
/// the file), so the count requests wait on ([`AuthState::durable`]) goes on unchanged:
/// a line counted on disk was synced in the old file, and the new file holds its effect
/// before it replaces the old one.
#[derive(Debug, Default)]
struct LiveState {
    /// Key id (hex) -> its claim.
    claims: HashMap<String, LiveClaim>,
    /// (Key id (hex), durable name) -> owner.
    owners: HashMap<(String, String), String>,
    /// Whole lines in the file, readable or not.
    lines: u64,
}

/// A claim in the state file: its group, the last use written, its creator.
#[derive(Debug, Clone)]
struct LiveClaim {
    group: String,
    used: Option<u64>,
    by: Option<String>,
}

impl LiveState {
    fn apply(&mut self, l: &StateLine) {
        match l {
            StateLine::Claim {
                key_id,
                group,
                used,
                by,
            } => {
                self.claims.insert(
                    key_id.clone(),
                    LiveClaim {
                        group: group.clone(),
                        used: *used,
                        by: by.clone(),
                    },
                );
            }
            StateLine::Owner {
                key_id,
                name,
                owner,
            } => {
                self.owners
                    .insert((key_id.clone(), name.clone()), owner.clone());
            }
            StateLine::Disown { key_id, name } => {
                self.owners.remove(&(key_id.clone(), name.clone()));
            }
            StateLine::Used { key_id, at } => {
                if let Some(c) = self.claims.get_mut(key_id) {
                    c.used = Some(c.used.map_or(*at, |u| u.max(*at)));
                }
            }
            StateLine::Release { key_id, group } => {
                if self.claims.get(key_id).is_some_and(|c| c.group == *group) {
                    self.claims.remove(key_id);
                }
            }
        }
    }

    fn live(&self) -> u64 {
        (self.claims.len() + self.owners.len()) as u64
    }

    /// Whether the file (`len` bytes) should be rewritten: at least `min_len` long, with
    /// more dead lines than live ones.
    fn worth_compacting(&self, len: u64, min_len: u64) -> bool {
        len >= min_len && self.lines > 2 * self.live()
    }

    /// The live lines, as the compacted file holds them.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |l: &StateLine| {
            if let Ok(v) = serde_json::to_vec(l) {
                out.extend_from_slice(&v);
                out.push(b'\n');
            }
        };
        for (key_id, c) in &self.claims {
            push(&StateLine::Claim {
                key_id: key_id.clone(),
                group: c.group.clone(),
                used: c.used,
                by: c.by.clone(),
            });
        }
        for ((key_id, name), owner) in &self.owners {
            push(&StateLine::Owner {
                key_id: key_id.clone(),
                name: name.clone(),
                owner: owner.clone(),
            });
        }
        out
    }

    /// Replays the state file at `path` (`None`: there is none). The second value is the
    /// length of its whole lines when a torn last line (a crash mid-write) follows them:
    /// the file must be cut back to it before anything is appended, or the next line
    /// would be glued to it and lost at the following start (review F4). Lines are read as
    /// bytes: a line that is not UTF-8 JSON is skipped (logged), never the whole file.
    fn replay(path: &Path) -> Result<Option<(LiveState, Option<u64>)>, AccountError> {
        let io = |source| AccountError::Io {
            path: path.into(),
            source,
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut live = LiveState::default();
        let mut tail = None;
        let mut r = BufReader::new(f);
        let mut line = Vec::new();
        let (mut n, mut whole) = (0u64, 0u64);
        loop {
            line.clear();
            let got = r.read_until(b'\n', &mut line).map_err(io)?;
            if got == 0 {
                break;
            }
            n += 1;
            if line.last() != Some(&b'\n') {
                tracing::warn!(file = %path.display(), line = n, bytes = got,
                    "cutting off a torn last line of the auth state file (a write \
                     a crash interrupted; never answered)");
                tail = Some(whole);
                break;
            }
            whole += got as u64;
            live.lines += 1;
            if line.trim_ascii().is_empty() {
                continue;
            }
            let Ok(parsed) = serde_json::from_slice::<StateLine>(&line) else {
                tracing::warn!(file = %path.display(), line = n,
                    "skipping an unreadable line of the auth state file");
                continue;
            };
            live.apply(&parsed);
        }
        Ok(Some((live, tail)))
    }
}

/// Opens the state file for appending (created `0600`).
fn open_append(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

/// Takes the advisory lock (`flock`, exclusive) a relay holds on its state file while it
/// runs, without waiting: `Ok(false)` when another process holds it. `whispeer-relay
/// claims release` appends to the file only under it, so it refuses while a relay runs.
/// Advisory only, and only on Unix (elsewhere always `Ok(true)`).
fn try_lock(f: &File) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use rustix::fs::{flock, FlockOperation};
        match flock(f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        Ok(true)
    }
}

/// Whether `f` is the file `path` names now (same device and inode).
fn names(path: &Path, f: &File) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => (a, b),
            (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        Ok((a.dev(), a.ino()) == (b.dev(), b.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, f);
        Ok(true)
    }
}

/// Opens the state file at `path` for appending (created `0600`) and takes its lock
/// ([`try_lock`]) before anything reads or cuts it: `Ok(None)` while another process holds
/// the lock. The file locked is checked to be the one `path` still names: a relay that
/// compacts renames a new file (locked before) over the old one, whose lock then guards
/// nothing; it is opened again then.
fn open_locked(path: &Path) -> std::io::Result<Option<File>> {
    for _ in 0..16 {
        let f = open_append(path)?;
        if !try_lock(&f)? {
            return Ok(None);
        }
        if names(path, &f)? {
            return Ok(Some(f));
        }
    }
    Err(std::io::Error::other(
        "the file keeps being replaced while it is locked",
    ))
}

/// Rewrites the state file `path` as `bytes` (see [`LiveState`]) and returns the new file,
/// open for appending and **locked** ([`try_lock`]) from before it takes the file's name
/// until the relay ends: the handle written and renamed is the one kept, so there is no
/// moment without the relay's lock (a `claims release` taking it in a gap would append
/// lines the next compaction erases). `Err` before the rename: the old file is untouched
/// (and still the one to append to). Once renamed, the directory sync is retried until it
/// works (a crash could otherwise take the new name back).
fn compact(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    compact_then(path, bytes, || {})
}

/// [`compact`], calling `renamed` right after the rename (tests look at the lock there).
fn compact_then(path: &Path, bytes: &[u8], renamed: impl FnOnce()) -> std::io::Result<File> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".compact");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        // A temporary file left by a crash mid-compaction goes first: the new one is a
        // fresh file no other process has open (or locked).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut o = OpenOptions::new();
        o.read(true).append(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let mut t = o.open(&tmp)?;
        // Locked before it takes the file's name: no moment without the relay's lock.
        if !try_lock(&t)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another process locked the new auth state file",
            ));
        }
        t.write_all(bytes)?;
        t.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(t)
    })();
    let t = match written {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    renamed();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut warned = false;
    loop {
        match File::open(&dir).and_then(|d| d.sync_all()) {
            Ok(()) => return Ok(t),
            Err(e) => {
                if !warned {
                    tracing::error!(file = %path.display(), error = %e,
                        "cannot sync the directory of the compacted auth state file (retrying)");
                    warned = true;
                }
                std::thread::sleep(WRITE_RETRY);
            }
        }
    }
}

/// The state file's writer thread: lines in, their count on disk out.
#[derive(Debug)]
struct StateWriter {
    tx: std::sync::mpsc::Sender<Vec<u8>>,
    /// Lines handed to the thread.
    sent: u64,
    durable: tokio::sync::watch::Receiver<u64>,
    /// Closed by the thread once it has written every line and let go of the file (and
    /// its lock).
    exited: std::sync::mpsc::Receiver<()>,
}

/// How long dropping the writer waits for its last lines and the file's lock (a disk that
/// refuses writes keeps the thread retrying: then the lock stays with it and a new open of
/// the same file is refused with `Locked`, as for another process).
const WRITER_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Drop for StateWriter {
    /// Hands the thread its end and waits for it: its lines reach the disk before the
    /// relay's `run` returns, and the file is unlocked when `Accounts` is dropped — a relay
    /// started again in the same process (tests do, an embedding application may) found
    /// the file still locked while the thread had not yet noticed the end.
    fn drop(&mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, closed));
        let _ = self.exited.recv_timeout(WRITER_EXIT_WAIT);
    }
}

impl StateWriter {
    fn spawn(path: PathBuf, mut f: File, mut live: LiveState) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (done, durable) = tokio::sync::watch::channel(0u64);
        let (exit, exited) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("whispeer-auth-state".into())
            .spawn(move || {
                use std::io::{Seek, SeekFrom};
                let mut written = 0u64;
                // The file's length after the last whole write: a failed write is cut
                // back to it, so the file never holds half a line before whole ones.
                let mut len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let mut min_len = COMPACT_MIN_BYTES;
                // Group commit: everything queued meanwhile goes in one write and one sync.
                while let Ok(first) = rx.recv() {
                    let mut buf = first;
                    let mut n = 1;
                    let mut failing = false;
                    loop {
                        while let Ok(more) = rx.try_recv() {
                            buf.extend_from_slice(&more);
                            n += 1;
                        }
                        match f.write_all(&buf).and_then(|_| f.sync_data()) {
                            Ok(()) => break,
                            Err(e) => {
                                // Not answered until written (a full disk, say): a claim
                                // or owner answered but lost at the next restart could
                                // be taken by someone else then. The requests waiting for
                                // these lines wait (their connections' reads paused);
                                // nothing else does. Retried until the disk takes it.
                                if !failing {
                                    tracing::error!(file = %path.display(), error = %e,
                                        "cannot write the auth state file; requests that \
                                         claim a key id or a durable wait until it can be \
                                         written (retrying)");
                                    failing = true;
                                }
                                let _ = f.set_len(len);
                                let _ = f.seek(SeekFrom::Start(len));
                                std::thread::sleep(WRITE_RETRY);
                            }
                        }
                    }
                    if failing {
                        tracing::warn!(file = %path.display(), "the auth state file is written again");
                    }
                    len += buf.len() as u64;
                    written += n;
                    done.send_replace(written);
                    for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        live.lines += 1;
                        if let Ok(l) = serde_json::from_slice::<StateLine>(line) {
                            live.apply(&l);
                        }
                    }
                    if live.worth_compacting(len, min_len) {
                        let bytes = live.to_bytes();
                        match compact(&path, &bytes) {
                            Ok(new) => {
                                tracing::debug!(file = %path.display(), from = len,
                                    to = bytes.len(), "auth state file compacted");
                                f = new;
                                len = bytes.len() as u64;
                                live.lines = live.live();
                                min_len = COMPACT_MIN_BYTES;
                            }
                            Err(e) => {
                                // Tried again once the file has doubled.
                                tracing::warn!(file = %path.display(), error = %e,
                                    "cannot compact the auth state file");
                                min_len = len.saturating_mul(2);
                            }
                        }
                    }
                }
                // The file closed (its lock released) before the writer's `Drop` hears of
                // the end.
                drop(f);
                drop(exit);
            })?;
        Ok(Self {
            tx,
            sent: 0,
            durable,
            exited,
        })
    }
}

impl AuthState {
    /// Opens (or creates) the state file and replays it; claims never lapse.
    pub fn open(path: Option<&Path>) -> Result<Self, AccountError> {
        Self::open_with(path, 0, Clock::default())
    }

    /// [`open`](Self::open), with claims lapsing after `idle_ms` unused (0: never) as
    /// measured by `clock`.
    fn open_with(path: Option<&Path>, idle_ms: u64, clock: Clock) -> Result<Self, AccountError> {
        let mut s = AuthState {
            idle_ms,
            clock,
            ..AuthState::default()
        };
        let Some(path) = path else {
            return Ok(s);
        };
        let io = |source| AccountError::Io {
            path: path.into(),
            source,
        };
        // Locked before the file is read or cut: a second relay on the same file, or a
        // `claims release` at work, would otherwise write lines this relay never sees (or
        // it would cut off theirs as a torn tail).
        let f = match open_locked(path) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(AccountError::Locked { path: path.into() }),
            Err(source) => {
                return Err(AccountError::Lock {
                    path: path.into(),
                    source,
                })
            }
        };
        let (live, tail) = LiveState::replay(path)?.unwrap_or_default();
        let start = s.now();
        // Unused since the file says, but never lapsing within the grace after a start.
        let floor = start
            .saturating_sub(idle_ms)
            .saturating_add(idle_ms.min(START_GRACE_MS));
        for (key_id, c) in &live.claims {
            let mut k = [0u8; 16];
            if hex::decode_to_slice(key_id, &mut k).is_ok() {
                let at = c.used.map_or(start, |u| u.max(floor));
                s.insert_claim(
                    k,
                    NewClaim {
                        group: c.group.clone(),
                        by: c.by.clone(),
                        line: 0,
                        shared: false,
                        counted: true,
                    },
                    at,
                    c.used.unwrap_or(0),
                    false,
                );
            }
        }
        for ((key_id, name), owner) in &live.owners {
            let mut k = [0u8; 16];
            if hex::decode_to_slice(key_id, &mut k).is_ok() {
                s.owners.insert((k, name.clone()), (owner.clone(), 0));
            }
        }
        if let Some(whole) = tail {
            f.set_len(whole).and_then(|_| f.sync_data()).map_err(io)?;
        }
        s.writer = Some(StateWriter::spawn(path.to_owned(), f, live).map_err(io)?);
        Ok(s)
    }

    /// Whether claims may lapse.
    fn lapsing(&self) -> bool {
        self.idle_ms > 0
    }

    fn now(&self) -> u64 {
        (self.clock.0)()
    }

    /// Records a claim (counted for its group and its creator when `new.counted`). An
    /// unheld claim of this relay's own joins its group's idle claims while claims may
    /// lapse.
    fn insert_claim(&mut self, k: [u8; 16], new: NewClaim, used: u64, saved: u64, held: bool) {
        let g = self.groups.entry(new.group.clone()).or_default();
        if new.counted {
            g.n += 1;
            if let Some(by) = &new.by {
                g.by.entry(by.clone()).or_default().n += 1;
            }
        }
        if self.idle_ms > 0 && !new.shared && !held {
            g.idle_insert(new.by.as_deref(), (used, k));
        }
        self.claims.insert(
            k,
            ClaimEntry {
                group: new.group,
                by: new.by,
                line: new.line,
                shared: new.shared,
                holds: u32::from(held),
                used,
                saved,
            },
        );
    }

    /// Forgets the claim of `k` (released): its entry, its place among the idle ones, and
    /// its counts.
    fn remove_claim(&mut self, k: &[u8; 16]) -> Option<ClaimEntry> {
        let e = self.claims.remove(k)?;
        if let Some(g) = self.groups.get_mut(&e.group) {
            g.idle_remove(e.by.as_deref(), &(e.used, *k));
            g.n = g.n.saturating_sub(1);
            if let Some(by) = &e.by {
                if let Some(m) = g.by.get_mut(by) {
                    m.n = m.n.saturating_sub(1);
                    if m.n == 0 && m.idle.is_empty() {
                        g.by.remove(by);
                    }
                }
            }
            if g.n == 0 && g.idle.is_empty() {
                self.groups.remove(&e.group);
            }
        }
        Some(e)
    }

    /// Which limit a new claim of `by` in `group` would pass, if any: the member's own
    /// (`member_cap`) first, then the group's (`group_cap`).
    fn full(&self, group: &str, by: &str, member_cap: usize, group_cap: usize) -> Option<Full> {
        let g = self.groups.get(group)?;
        let mine = g.by.get(by).map_or(0, |m| m.n);
        if mine >= member_cap {
            Some(Full::Member(mine, member_cap))
        } else if g.n >= group_cap {
            Some(Full::Group(g.n, group_cap))
        } else {
            None
        }
    }

    /// The account holding the most of `group`'s claims (ties: the least creator string)
    /// and how many, if any claim has a recorded creator.
    fn top_holder(&self, group: &str) -> Option<(&str, usize)> {
        self.groups
            .get(group)?
            .by
            .iter()
            .filter(|(_, m)| m.n > 0)
            .max_by(|a, b| a.1.n.cmp(&b.1.n).then_with(|| b.0.cmp(a.0)))
            .map(|(by, m)| (by.as_str(), m.n))
    }

    /// The refresh step of a claim's last use: an eighth of `claim_idle_ms`, a minute at
    /// most.
    fn step(&self) -> u64 {
        (self.idle_ms / 8).clamp(1, 60_000)
    }

    /// Whether a use of `e` now needs no refresh: claims cannot lapse, `e` is shared, or
    /// its last use is within the step.
    fn fresh(&self, e: &ClaimEntry) -> bool {
        !self.lapsing() || e.shared || self.now().saturating_sub(e.used) < self.step()
    }

    /// A request relied on the claim of `k` (which exists): refreshes its last use (at most
    /// every eighth of `claim_idle_ms`, a minute at most; written to the file at most
    /// every quarter) and, with `hold`, counts a subscription holding it. Returns whether
    /// a hold was taken (never while claims cannot lapse, nor for a shared claim).
    fn touch(&mut self, k: &[u8; 16], hold: bool) -> bool {
        if !self.lapsing() {
            return false;
        }
        let now = self.now();
        let step = self.step();
        let save_every = (self.idle_ms / 4).max(1);
        let Some(e) = self.claims.get_mut(k) else {
            return false;
        };
        if e.shared {
            return false;
        }
        let stale = now.saturating_sub(e.used) >= step;
        if !stale && !hold {
            return false;
        }
        let unheld = e.holds == 0;
        let g = self.groups.entry(e.group.clone()).or_default();
        if unheld {
            g.idle_remove(e.by.as_deref(), &(e.used, *k));
        }
        if stale {
            e.used = e.used.max(now);
        }
        if hold {
            e.holds += 1;
        } else if unheld {
            // Still unheld: back among the idle ones, as used now.
            g.idle_insert(e.by.as_deref(), (e.used, *k));
        }
        if stale && now.saturating_sub(e.saved) >= save_every {
            e.saved = now;
            self.append(&StateLine::Used {
                key_id: hex::encode(k),
                at: now,
            });
        }
        hold
    }

    /// A subscription holding the claim of `k` ended ([`ClaimHold`]): the claim counts as
    /// used now, and lapses once unused for `claim_idle_ms` from here.
    fn unhold(&mut self, k: &[u8; 16]) {
        let now = self.now();
        let save_every = (self.idle_ms / 4).max(1);
        let Some(e) = self.claims.get_mut(k) else {
            return;
        };
        if e.holds == 0 {
            return;
        }
        e.holds -= 1;
        if e.holds > 0 {
            return;
        }
        e.used = e.used.max(now);
        self.groups
            .entry(e.group.clone())
            .or_default()
            .idle_insert(e.by.as_deref(), (e.used, *k));
        if now.saturating_sub(e.saved) >= save_every {
            e.saved = now;
            self.append(&StateLine::Used {
                key_id: hex::encode(k),
                at: now,
            });
        }
    }

    /// Whether a durable owner is recorded under `k`.
    fn owns_durable(&self, k: &[u8; 16]) -> bool {
        self.owners
            .range((*k, String::new())..)
            .next()
            .is_some_and(|((o, _), _)| o == k)
    }

    /// Releases `group`'s longest-unused claim if it may lapse — with `by`, the longest
    /// unused of those that account made: unheld, unused for `claim_idle_ms`, no durable
    /// owner under its key id and nothing in the store (`stored`: whether the store holds
    /// anything under a key id; an error counts as yes). Looks at [`RELEASE_CHECKS`] such
    /// claims at most; one that still holds something counts as used now. Returns the
    /// released key id.
    fn release_one(
        &mut self,
        group: &str,
        by: Option<&str>,
        stored: &mut dyn FnMut(&[u8; 16]) -> bool,
    ) -> Option<[u8; 16]> {
        if !self.lapsing() {
            return None;
        }
        let now = self.now();
        let g = self.groups.get(group)?;
        let idle = match by {
            Some(b) => &g.by.get(b)?.idle,
            None => &g.idle,
        };
        let due: Vec<(u64, [u8; 16])> = idle
            .iter()
            .take_while(|(used, _)| now.saturating_sub(*used) >= self.idle_ms)
            .take(RELEASE_CHECKS)
            .copied()
            .collect();
        for (used, k) in due {
            if self.owns_durable(&k) || stored(&k) {
                // In use after all: looked at again only after another idle period.
                if let (Some(g), Some(e)) = (self.groups.get_mut(group), self.claims.get_mut(&k)) {
                    g.idle_remove(e.by.as_deref(), &(used, k));
                    e.used = now;
                    g.idle_insert(e.by.as_deref(), (now, k));
                }
                continue;
            }
            self.remove_claim(&k);
            self.append(&StateLine::Release {
                key_id: hex::encode(k),
                group: group.to_owned(),
            });
            self.released += 1;
            // Key ids only at debug (relay/README.md: info logs never show them).
            tracing::info!(
                group,
                member = by.is_some(),
                idle_ms = now.saturating_sub(used),
                "key-id claim released: unused for auth.claim_idle_ms, nothing stored, no \
                 subscription or durable; the group (or, member = true, the account that \
                 made it, at auth.max_claims_per_account) needed room for a new key id"
            );
            tracing::debug!(group, key_id = %hex::encode(k), "released claim");
            return Some(k);
        }
        None
    }

    /// Whether `e` is this relay's own claim of a revoked account's own group, while
    /// claims may lapse: [`AuthState::release_revoked`] may release it. Revoked: the id of
    /// the group (`account-id:<id>`) is no account's in force (`ids`, the table's) — not
    /// merely a group without members: an account in force moved to an explicit group
    /// keeps its own group's claims, for when it is moved back.
    fn revoked_own(&self, e: &ClaimEntry, ids: &std::collections::HashSet<[u8; 16]>) -> bool {
        self.lapsing()
            && !e.shared
            && e.group
                .strip_prefix(ID_GROUP_PREFIX)
                .and_then(|h| parse_id(h).ok())
                .is_some_and(|id| !ids.contains(&id))
    }

    /// Whether [`AuthState::release_revoked`] would release `k` now (nothing changed).
    fn revoked_releasable(
        &self,
        k: &[u8; 16],
        ids: &std::collections::HashSet<[u8; 16]>,
        stored: &mut dyn FnMut(&[u8; 16]) -> bool,
    ) -> bool {
        self.claims.get(k).is_some_and(|e| {
            self.revoked_own(e, ids) && e.holds == 0 && !self.owns_durable(k) && !stored(k)
        })
    }

    /// Releases the claim of `k`, which another group asks for, if it is held by a
    /// revoked account's own group: an `account-id:…` group whose id no account in force
    /// has (`ids`: the ids of the list in force; an account in force in an explicit group
    /// keeps its own group's claims). Called once the request is granted room (a request
    /// refused at its group's limit releases nothing). An account's own group is
    /// the only group no account can be given again (`account add` draws a new id, and an
    /// explicit `group` may not name it), so once its account is revoked no member will
    /// ever use its claims — nor make them lapse, which only a member's new key id does
    /// ([`AuthState::release_one`]) — and every other group would be refused those key
    /// ids (the epochs the account shared with others) until `claims release`. It goes
    /// under `release_one`'s rules, less the idle time (no member is left to use it):
    /// this relay's own claim (not learned from a shared store), no subscription holding
    /// it, no durable owner recorded under it, nothing stored under it (`stored`; the next
    /// group to claim it would read that) — each looked at again at the next request.
    /// Nothing while claims cannot lapse (`auth.claim_idle_ms` 0, or a cluster). An
    /// explicit group keeps its claims (an operator gives it again to share them on
    /// purpose), and so does a removed legacy entry's own group (retired, for
    /// `--adopt-retired-group`). A `release` line makes a restart agree. Returns whether
    /// it was released.
    fn release_revoked(
        &mut self,
        k: &[u8; 16],
        ids: &std::collections::HashSet<[u8; 16]>,
        stored: &mut dyn FnMut(&[u8; 16]) -> bool,
    ) -> bool {
        if !self.revoked_releasable(k, ids, stored) {
            return false;
        }
        let Some(e) = self.claims.get(k) else {
            return false;
        };
        let group = e.group.clone();
        self.remove_claim(k);
        self.append(&StateLine::Release {
            key_id: hex::encode(k),
            group: group.clone(),
        });
        self.revoked_released += 1;
        // Key ids only at debug (relay/README.md: info logs never show them).
        tracing::info!(group = %group,
            "key-id claim released for another group: the account whose own group held it \
             was revoked (no subscription or durable on it, nothing stored)");
        tracing::debug!(group, key_id = %hex::encode(k), "released a revoked account's claim");
        true
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

/// A subscription's hold on its key id's claim: while one exists the claim does not lapse
/// (`auth.claim_idle_ms`). Given by [`Accounts::authorize_use`] and kept with the
/// subscription; dropped when it ends (`Unsub`, replaced, ended by a reload, or the
/// connection closed), which counts as the claim's last use.
pub struct ClaimHold {
    state: Arc<Mutex<AuthState>>,
    key: [u8; 16],
}

impl std::fmt::Debug for ClaimHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimHold")
            .field("key", &hex::encode(&self.key[..4]))
            .finish_non_exhaustive()
    }
}

impl Drop for ClaimHold {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unhold(&self.key);
    }
}

/// What [`Accounts::authorize_use`] grants.
#[derive(Debug, Default)]
pub struct Granted {
    /// The claim relied on is state-file line `line`, not yet on disk: answer the request
    /// once [`Accounts::durable`] reaches it.
    pub pending: Option<u64>,
    /// The hold a subscription keeps on its key id's claim (asked for, and claims may
    /// lapse here).
    pub hold: Option<ClaimHold>,
}

/// A claim as the state file holds it ([`list_claims`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    /// The key id, hex.
    pub key_id: String,
    /// The group holding it.
    pub group: String,
    /// The account whose request made it (`account-id:HEX`, or `account:NAME` for a legacy
    /// entry: [`Account::owner`]); `None`: not recorded (a line from before creators were),
    /// counted as the group's.
    pub by: Option<String>,
    /// Its last use the file holds (Unix ms); `None`: not known (a line from before claims
    /// could lapse, or written while `auth.claim_idle_ms` was 0).
    pub used: Option<u64>,
    /// Durable owners recorded under the key id.
    pub durables: usize,
}

/// The claims the state file at `path` holds (none when there is no file), by group and
/// key id. Reads only: a running relay may hold newer ones in memory, not yet written.
pub fn list_claims(path: &Path) -> Result<Vec<ClaimInfo>, AccountError> {
    let Some((live, _)) = LiveState::replay(path)? else {
        return Ok(Vec::new());
    };
    Ok(claim_infos(&live))
}

fn claim_infos(live: &LiveState) -> Vec<ClaimInfo> {
    let mut durables: HashMap<&str, usize> = HashMap::new();
    for (key_id, _) in live.owners.keys() {
        *durables.entry(key_id.as_str()).or_default() += 1;
    }
    let mut v: Vec<ClaimInfo> = live
        .claims
        .iter()
        .map(|(key_id, c)| ClaimInfo {
            key_id: key_id.clone(),
            group: c.group.clone(),
            by: c.by.clone(),
            used: c.used,
            durables: durables.get(key_id.as_str()).copied().unwrap_or(0),
        })
        .collect();
    v.sort_by(|a, b| (&a.group, &a.key_id).cmp(&(&b.group, &b.key_id)));
    v
}

/// What [`release_claims`] did.
#[derive(Debug, Default)]
pub struct Released {
    /// Claims released.
    pub released: Vec<ClaimInfo>,
    /// Claims picked but kept: a durable owner is recorded under the key id (delete the
    /// durable first).
    pub kept: Vec<ClaimInfo>,
    /// Claims the group holds in the file (0: the file names no such group — a typo?).
    pub group_claims: usize,
    /// The groups holding claims in the file, sorted.
    pub groups: Vec<String>,
}

/// Releases the claims of `group` that `pick` chooses from the state file at `path`, by
/// appending `release` lines (synced) — with the relay **stopped**: a running relay holds
/// the file's lock (`try_lock`; `Err(AccountError::InUse)`), and would neither see the
/// lines nor keep them when it compacts the file. A claim under which a durable owner is
/// recorded is kept (reported). What the store holds under a released key id stays (the
/// next group to claim it can read it: sealed envelopes).
pub fn release_claims(
    path: &Path,
    group: &str,
    pick: impl Fn(&ClaimInfo) -> bool,
) -> Result<Released, AccountError> {
    let io = |source| AccountError::Io {
        path: path.into(),
        source,
    };
    if !path.exists() {
        return Ok(Released::default());
    }
    let Some(mut f) = open_locked(path).map_err(io)? else {
        return Err(AccountError::InUse { path: path.into() });
    };
    let Some((live, tail)) = LiveState::replay(path)? else {
        return Ok(Released::default());
    };
    if let Some(whole) = tail {
        f.set_len(whole).and_then(|_| f.sync_data()).map_err(io)?;
    }
    let mut out = Released::default();
    let mut lines = Vec::new();
    let all = claim_infos(&live);
    out.groups = all.iter().map(|c| c.group.clone()).collect();
    out.groups.dedup();
    out.group_claims = all.iter().filter(|c| c.group == group).count();
    for c in all.into_iter().filter(|c| c.group == group && pick(c)) {
        if c.durables > 0 {
            out.kept.push(c);
            continue;
        }
        let mut line = serde_json::to_vec(&StateLine::Release {
            key_id: c.key_id.clone(),
            group: c.group.clone(),
        })
        .unwrap_or_default();
        line.push(b'\n');
        lines.extend_from_slice(&line);
        out.released.push(c);
    }
    if !lines.is_empty() {
        f.write_all(&lines)
            .and_then(|_| f.sync_data())
            .map_err(io)?;
    }
    Ok(out)
}

/// The accounts, claims and live authenticated connections of a relay.
#[derive(Debug)]
pub struct Accounts {
    mode: AuthMode,
    file: Option<PathBuf>,
    max_claims: usize,
    /// `auth.max_claims_per_account`: a member's share of a group shared with other
    /// accounts.
    max_claims_per_account: usize,
    table: RwLock<Arc<Table>>,
    stamp: Mutex<Stamp>,
    /// Shared with the [`ClaimHold`]s of subscriptions.
    state: Arc<Mutex<AuthState>>,
    /// Authenticated connections. Locked before `table` wherever both are taken: a
    /// connection is attached under the table it is checked against, and a reload swaps
    /// the table and walks the connections under this lock, so none escapes the walk.
    live: Mutex<HashMap<ConnId, Live>>,
    /// Whether the last account list read (the file, or the cluster's) was valid and is in
    /// force; `false` while an invalid one was read since (`whispeer_relay_account_list_valid`).
    list_valid: std::sync::atomic::AtomicBool,
    /// Account lists read that were invalid or unreadable, each changed text counted once
    /// (`whispeer_relay_account_reload_errors_total`).
    reload_errors: std::sync::atomic::AtomicU64,
    /// Revocations by the account file's valid lists held for a confirming read: accounts
    /// removed or reduced, plus keys and token hashes of accounts not held themselves
    /// (`whispeer_relay_account_revocations_held`).
    revocations_held: std::sync::atomic::AtomicU64,
    /// Account files read that held a revocation not held before
    /// (`whispeer_relay_account_revocations_deferred_total`).
    revocations_deferred: std::sync::atomic::AtomicU64,
    /// `auth.reload_ms`: a file's revocations wait for a confirming read at least this
    /// long after the first: of the same text for an invalid list, of a valid list that
    /// still makes them for a valid one.
    reload_ms: u64,
    /// The claims' clock, also timing those reads.
    clock: Clock,
}

/// An authenticated connection, as the reload walk sees it.
#[derive(Debug)]
struct Live {
    name: String,
    /// The account's identity when the connection authenticated: a name removed and added
    /// again (a new `id`) is another account, whose connections these are not.
    id: Option<[u8; 16]>,
    credential: Credential,
    out: Arc<Outbound>,
    /// Tells the connection's session that its account lost a right or changed group
    /// (capacity 1: one pending notice covers any number of reloads).
    rights_changed: tokio::sync::mpsc::Sender<()>,
}

/// The account file's metadata at the last look: modification time, length and (on Unix)
/// inode.
type FileMeta = (SystemTime, u64, u64);

/// What the last look at the account file saw.
#[derive(Debug)]
struct Stamp {
    meta: Option<FileMeta>,
    /// When the file was last read (taken before reading).
    read_at: SystemTime,
    /// SHA-256 of the text last read.
    digest: Option<[u8; 32]>,
    /// The last text read, if invalid (while no valid one was read since): its
    /// revocations are applied only once the same text is read again a reload period
    /// later ([`Accounts::list_failed`]).
    pending: Option<PendingRead>,
    /// What the valid lists read from the file revoke of the list in force, and when each
    /// was first read: held in force until a read at least a reload period later still
    /// revokes it; dropped as soon as a valid read no longer does
    /// ([`Accounts::install_file_table`]).
    held: HashMap<Revocation, u64>,
}

/// An invalid account file's text whose revocations wait for a confirming read, as first
/// read.
#[derive(Debug)]
struct PendingRead {
    digest: [u8; 32],
    /// When it was first read (the claims clock, Unix ms).
    first: u64,
    /// Its revocations were applied.
    applied: bool,
}

/// One thing a valid list read from the account file revokes of the list in force
/// ([`revocations`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Revocation {
    /// An account removed, given another identity (a new `id` under its name), or reduced
    /// (a right taken away, another group).
    Account(String),
    /// A key in force that no longer names the same account.
    Key([u8; 32]),
    /// A token hash in force that no longer names the same account.
    Token([u8; 32]),
}

/// How long after its modification time a file with unchanged metadata is still read
/// again: an edit within the same timestamp tick (coarse on some file systems) that keeps
/// the length (64 hex digits replaced by 64 others) changes no metadata at all, only the
/// contents.
const RACY_WINDOW: Duration = Duration::from_secs(3);

fn meta_of(path: &Path) -> Option<FileMeta> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok()?, m.len(), ino))
}

/// The account file's text; a missing file is an empty list.
fn read_list(path: &Path) -> Result<String, AccountError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(AccountError::Io {
            path: path.into(),
            source,
        }),
    }
}

impl Accounts {
    /// Loads the account list and the state file the configuration names.
    pub fn open(cfg: &AuthConfig) -> Result<Self, AccountError> {
        Self::open_clocked(cfg, Clock::default())
    }

    /// [`open`](Self::open), claims' last uses measured by `clock`.
    fn open_clocked(cfg: &AuthConfig, clock: Clock) -> Result<Self, AccountError> {
        let file = cfg.accounts.clone().filter(|p| !p.as_os_str().is_empty());
        let mut stamp = Stamp {
            meta: None,
            read_at: SystemTime::now(),
            digest: None,
            pending: None,
            held: HashMap::new(),
        };
        let table = match &file {
            Some(p) => {
                stamp.meta = meta_of(p);
                let text = read_list(p)?;
                stamp.digest = Some(Sha256::digest(&text).into());
                AccountFile::parse(&text, p)?.table()?
            }
            None => Table::default(),
        };
        Ok(Self {
            mode: cfg.mode,
            file,
            max_claims: cfg.max_claims_per_group,
            max_claims_per_account: cfg.max_claims_per_account,
            table: RwLock::new(Arc::new(table)),
            stamp: Mutex::new(stamp),
            state: Arc::new(Mutex::new(AuthState::open_with(
                cfg.state.as_deref(),
                cfg.claim_idle_ms,
                clock.clone(),
            )?)),
            live: Mutex::new(HashMap::new()),
            list_valid: std::sync::atomic::AtomicBool::new(true),
            reload_errors: std::sync::atomic::AtomicU64::new(0),
            revocations_held: std::sync::atomic::AtomicU64::new(0),
            revocations_deferred: std::sync::atomic::AtomicU64::new(0),
            reload_ms: cfg.reload_ms,
            clock,
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

    /// Waits until every auth-state line handed to the file's writer so far is on disk (at
    /// once without a file, or if the writer thread is gone). The relay's stop awaits it
    /// after the connections drained: the `used` lines of the claims their subscriptions
    /// held are written as the holds are given back, and the process must not end before
    /// they are on disk — a claim held for days has no other record of its last use.
    pub async fn flush(&self) {
        let Some((sent, mut durable)) = self
            .state()
            .writer
            .as_ref()
            .map(|w| (w.sent, w.durable.clone()))
        else {
            return;
        };
        let _ = durable.wait_for(|n| *n >= sent).await;
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
    /// (strict Ed25519) must cover `signed` — what the `Auth` says it signed
    /// (`Auth::sig_input`: this connection's nonce, the account key and, bound, the relay's
    /// name).
    pub fn verify(
        &self,
        account: &[u8; 32],
        signed: &[u8],
        sig: &[u8; 64],
    ) -> Option<Arc<Account>> {
        let t = self.table();
        let sig = Signature::from_bytes(sig);
        let Some((vk, acct)) = t.by_key.get(account) else {
            // An unlisted key is verified too, against a decoy, so the time to the answer
            // does not tell which keys are accounts (every key gets a Challenge for the same
            // reason); returning at once saved one verification an attacker could time.
            let _ = decoy_key().verify_strict(signed, &sig);
            #[cfg(test)]
            DECOY_VERIFICATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        };
        vk.verify_strict(signed, &sig).ok().map(|_| acct.clone())
    }

    /// Accounts listed with an account key (the ones that sign in by `Challenge`).
    pub fn key_count(&self) -> usize {
        self.table().by_key.len()
    }

    /// The current entry of an account (None once it was removed).
    pub fn current(&self, name: &str) -> Option<Arc<Account>> {
        self.table().by_name.get(name).cloned()
    }

    /// Records a connection that authenticated as `who` with `credential`: a reload closes
    /// it once the credential no longer names that account (same name, same identity), and
    /// sends on `rights_changed` when the account loses a right or changes group. `false`
    /// (nothing recorded): the credential was revoked since it was checked (a reload came
    /// in between).
    pub(crate) fn attach(
        &self,
        conn: ConnId,
        who: &Account,
        credential: Credential,
        out: &Arc<Outbound>,
        rights_changed: tokio::sync::mpsc::Sender<()>,
    ) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if !self
            .table()
            .account_of(&credential)
            .is_some_and(|a| a.same_identity(who))
        {
            return false;
        }
        live.insert(
            conn,
            Live {
                name: who.name.clone(),
                id: who.id,
                credential,
                out: out.clone(),
                rights_changed,
            },
        );
        true
    }

    /// Forgets a connection.
    pub(crate) fn detach(&self, conn: ConnId) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
    }

    /// May `who` (as it authenticated) do `need` on `key_id`? Claims the key id for the
    /// account's group when nobody holds it yet. As [`authorize_use`](Self::authorize_use)
    /// without a hold, and with a store that holds something under every key id (so no
    /// claim lapses for it).
    ///
    /// `Ok(Some(line))`: allowed, but the claim it relies on is state-file line `line`,
    /// not yet on disk: answer the request once [`durable`](Self::durable) reaches it.
    pub fn authorize(
        &self,
        who: &Account,
        key_id: &KeyId,
        need: Rights,
        shared: impl FnOnce(&str, bool) -> Result<Claim, StoreError>,
    ) -> Result<Option<u64>, Refusal> {
        self.authorize_use(who, key_id, need, false, shared, |_| Ok(true))
            .map(|g| g.pending)
    }

    /// May `who` (as it authenticated) do `need` on `key_id`? Claims the key id for the
    /// account's group when nobody holds it yet, and refreshes the claim's last use.
    ///
    /// `shared` asks a store shared by several relays (JetStream) for the claim, so one
    /// group holds a key id in the whole cluster ([`crate::store::Store::claim_key`]); it
    /// is called without this relay's state locked. A claim it reports is remembered here
    /// (such claims never move) and not written to the state file.
    ///
    /// A group at `auth.max_claims_per_group` asking for a new key id gets one of its own
    /// claims of this relay released instead, when one may lapse (see [`AuthState`]);
    /// `stored` tells whether the store holds anything under a key id
    /// ([`crate::store::Store::holds_key_id`]; asked under the state lock, for a few key
    /// ids at most). `hold`: a subscription asks, and keeps the [`Granted::hold`] while it
    /// lasts.
    pub fn authorize_use(
        &self,
        who: &Account,
        key_id: &KeyId,
        need: Rights,
        hold: bool,
        shared: impl FnOnce(&str, bool) -> Result<Claim, StoreError>,
        mut stored: impl FnMut(&KeyId) -> Result<bool, StoreError>,
    ) -> Result<Granted, Refusal> {
        if !self.required() {
            return Ok(Granted::default());
        }
        let acct = self.with_rights(who, need)?;
        let k = *key_id.as_bytes();
        let others = || Err(Self::claimed_by_others());
        let granted = |st: &mut AuthState, line: u64| {
            let held = st.touch(&k, hold);
            Granted {
                pending: st.pending(line),
                hold: held.then(|| ClaimHold {
                    state: self.state.clone(),
                    key: k,
                }),
            }
        };
        // A member of a group shared with other accounts holds at most its share of the
        // group's claims (an account alone in its group: the group's limit).
        let by = acct.owner();
        let table = self.table();
        let member_cap = if table.members.get(&acct.group).copied().unwrap_or(0) > 1 {
            self.max_claims_per_account
        } else {
            usize::MAX
        };
        let mut stored = |k: &[u8; 16]| {
            stored(&KeyId::from_bytes(*k)).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "store: is anything stored under a \
                    key id? (counted as yes)");
                true
            })
        };
        // At its limit a group (or member) may still use key ids it holds (at another
        // relay of the cluster, too): the shared store is then only asked, never written.
        let mut take_revoked = false;
        let full = {
            let mut st = self.state();
            match st.claims.get(&k) {
                // The publish hot path: a claim used within the refresh step needs no
                // second look-up.
                Some(e) if e.group == acct.group && !hold && st.fresh(e) => {
                    return Ok(Granted {
                        pending: st.pending(e.line),
                        hold: None,
                    });
                }
                Some(e) if e.group == acct.group => {
                    let line = e.line;
                    return Ok(granted(&mut st, line));
                }
                Some(_) | None => {}
            }
            // Another group's: free only if a revoked account's own group held it — and
            // released only once this request is granted room (below), so a request
            // refused at its group's limit releases nothing.
            if st.claims.contains_key(&k) {
                if !st.revoked_releasable(&k, &table.ids, &mut stored) {
                    return others();
                }
                take_revoked = true;
            }
            st.full(&acct.group, &by, member_cap, self.max_claims)
        };
        let claim = shared(&acct.group, full.is_none())
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        let mut st = self.state();
        match claim {
            // Only answered to a question without creating, i.e. at the limit: the key id
            // would be a new claim. The cluster's claims never lapse.
            Claim::Unclaimed => {
                let full = full.unwrap_or(Full::Group(self.max_claims, self.max_claims));
                return Err(self.over(
                    &mut st,
                    &acct,
                    full,
                    "claims shared by a cluster never lapse; an operator can raise the limit",
                ));
            }
            // Claims are this relay's own: decided below from its state.
            Claim::NotShared => {}
            Claim::Ours { new } => {
                // Counted per relay, when this call made it: a group can claim up to the
                // limit at each relay.
                let now = st.now();
                let claim = NewClaim {
                    group: acct.group.clone(),
                    by: new.then(|| by.clone()),
                    line: 0,
                    shared: true,
                    counted: new,
                };
                st.insert_claim(k, claim, now, now, false);
                return Ok(Granted::default());
            }
            // Not remembered here (the holding group's name is not known here, only its
            // tag): the store remembers it.
            Claim::Others => return others(),
        }
        match st.claims.get(&k) {
            Some(e) if e.group == acct.group => {
                let line = e.line;
                Ok(granted(&mut st, line))
            }
            Some(_) if !take_revoked => others(),
            _ => {
                // Room is made from the member's own idle claims at its cap, then from the
                // group's at the group's limit: one release each at most (a group above its
                // limit, lowered since, gives back one claim per new one).
                for _ in 0..2 {
                    let Some(full) = st.full(&acct.group, &by, member_cap, self.max_claims) else {
                        break;
                    };
                    let mine = matches!(full, Full::Member(..)).then_some(by.as_str());
                    if st.release_one(&acct.group, mine, &mut stored).is_none() {
                        let why = if st.lapsing() {
                            format!(
                                "none of them has been unused for auth.claim_idle_ms ({}) \
                                 with nothing stored under it and no subscription or durable \
                                 on it; an operator can raise the limit or release claims \
                                 with `whispeer-relay claims release` (relay stopped)",
                                human_ms(st.idle_ms)
                            )
                        } else {
                            "claims never lapse here (auth.claim_idle_ms = 0, or a cluster); \
                             an operator can raise the limit or release claims with \
                             `whispeer-relay claims release` (relay stopped)"
                                .to_string()
                        };
                        return Err(self.over(&mut st, &acct, full, &why));
                    }
                }
                // A revoked account's own group's claim, looked at again (the state was
                // unlocked meanwhile): released now that this request has room.
                if st.claims.contains_key(&k) && !st.release_revoked(&k, &table.ids, &mut stored) {
                    return others();
                }
                let used = st.lapsing().then(|| st.now());
                let line = st.append(&StateLine::Claim {
                    key_id: hex::encode(k),
                    group: acct.group.clone(),
                    used,
                    by: Some(by.clone()),
                });
                let now = used.unwrap_or(0);
                let held = hold && st.lapsing();
                let claim = NewClaim {
                    group: acct.group.clone(),
                    by: Some(by),
                    line,
                    shared: false,
                    counted: true,
                };
                st.insert_claim(k, claim, now, now, held);
                Ok(Granted {
                    pending: st.pending(line),
                    hold: held.then(|| ClaimHold {
                        state: self.state.clone(),
                        key: k,
                    }),
                })
            }
        }
    }

    /// The refusal of a new claim for `acct`, whose group (or itself, as a member) is at
    /// its limit (`full`); `why` none can go. It names the account holding the most of the
    /// group's claims, so an operator can act (remove it, or release its claims), and is
    /// logged at info — at most once a minute per group, never with a key id
    /// (relay/README.md: info logs never show them).
    fn over(&self, st: &mut AuthState, acct: &Account, full: Full, why: &str) -> Refusal {
        let holder = st
            .top_holder(&acct.group)
            .map(|(owner, n)| (owner.to_string(), n));
        // The client is told whether it is itself the top holder, never another member's
        // name or id (members of a group need not know each other); the log names it.
        let top_for_client = match &holder {
            Some((owner, n)) if *owner == acct.owner() => format!("this account, with {n}"),
            Some((_, n)) => format!("another member, with {n} (named in the relay's log)"),
            None => "none recorded (claims from before creators were recorded)".to_string(),
        };
        let top = match holder.as_ref().map(|(o, n)| (o.as_str(), *n)) {
            Some((owner, n)) => {
                let name = self
                    .table()
                    .owners
                    .get(owner)
                    .map_or_else(|| "a removed account".to_string(), |n| format!("{n:?}"));
                format!("{name} ({owner}) with {n}")
            }
            None => "none recorded (claims from before creators were recorded)".to_string(),
        };
        let (what, limit) = match full {
            Full::Member(n, cap) => (
                format!(
                    "this account holds {n} of its group's key ids, the most one member of a \
                     group shared with other accounts may claim \
                     (auth.max_claims_per_account = {cap})"
                ),
                "auth.max_claims_per_account",
            ),
            Full::Group(n, limit) => (
                format!(
                    "the account's group holds {n} key ids, the limit \
                     (auth.max_claims_per_group = {limit})"
                ),
                "auth.max_claims_per_group",
            ),
        };
        let now = st.now();
        let last = st.refusals_logged.entry(acct.group.clone()).or_insert(0);
        if *last == 0 || now.saturating_sub(*last) >= 60_000 {
            *last = now.max(1);
            tracing::info!(group = %acct.group, account = %acct.name, limit,
                most_claims = %top,
                "a new key-id claim refused: the limit is reached and no claim may lapse; the \
                 account holding the most of the group's claims is named");
        }
        Refusal::new(
            ErrorCode::QuotaExceeded,
            format!(
                "{what}; {why}; the member holding the most of the group's claims: \
                 {top_for_client}"
            ),
        )
    }

    /// Claims released since the start (lapsed for a group's new key id).
    pub fn claims_released(&self) -> u64 {
        self.state().released
    }

    /// The accounts' Prometheus lines.
    pub fn render_prometheus(&self) -> String {
        format!(
            "# HELP whispeer_relay_claims_released_total Key-id claims released because their \
             group needed room for a new key id and they were unused for auth.claim_idle_ms \
             (nothing stored, no subscription or durable).\n\
             # TYPE whispeer_relay_claims_released_total counter\n\
             whispeer_relay_claims_released_total {}\n\
             # HELP whispeer_relay_claims_released_revoked_total Key-id claims released for \
             another group because the account whose own group held them was revoked (no \
             subscription or durable on them, nothing stored).\n\
             # TYPE whispeer_relay_claims_released_revoked_total counter\n\
             whispeer_relay_claims_released_revoked_total {}\n{}",
            self.claims_released(),
            self.state().revoked_released,
            self.render_list_prometheus()
        )
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
    /// the account's [`Account::owner`] when authenticated (`account-id:HEX`, or
    /// `account:NAME` for a legacy entry), `sha256:HEX` of the `Sub.owner` secret, or None
    /// for a durable created without an owner (auth off, legacy clients). `Ok(Some(line))`
    /// as for [`authorize`](Self::authorize).
    ///
    /// Records are kept until the durable is deleted ([`forget_durable_owner`](Self::forget_durable_owner);
    /// in memory and as a state-file line): call it only once the
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

    /// Forgets the owner of a durable subscription that was deleted (a state-file line when
    /// one was recorded), if `gone` — asked under the state lock, which
    /// [`durable_owner`](Self::durable_owner) also takes after a `Sub` created the durable
    /// again — still says the durable does not exist: an owner recorded for a new durable
    /// of the same name is never dropped. Returns whether an owner was forgotten.
    pub fn forget_durable_owner(
        &self,
        key_id: &KeyId,
        name: &str,
        gone: impl FnOnce() -> bool,
    ) -> bool {
        let k = (*key_id.as_bytes(), name.to_owned());
        let mut st = self.state();
        if !st.owners.contains_key(&k) || !gone() {
            return false;
        }
        st.owners.remove(&k);
        st.append(&StateLine::Disown {
            key_id: hex::encode(k.0),
            name: k.1,
        });
        true
    }

    /// The current entry of the account `who` authenticated as (same name, same identity),
    /// if it holds every right of `need`.
    fn with_rights(&self, who: &Account, need: Rights) -> Result<Arc<Account>, Refusal> {
        let Some(acct) = self.current(&who.name).filter(|a| a.same_identity(who)) else {
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
        Ok(acct)
    }

    fn claimed_by_others() -> Refusal {
        Refusal::new(
            ErrorCode::AuthFailed,
            "this key id is claimed by another group of accounts".into(),
        )
    }

    /// Would [`authorize`](Self::authorize) still let `who` do `need` on `key_id`, which
    /// it allowed before? For a subscription already made, after the account list changed:
    /// the account must still hold the rights and its group the key id's claim. Claims
    /// nothing and asks no shared store: a key id in use here was claimed (or its claim
    /// learned from the store) when that use was authorized, and claims never move. Also
    /// the session's check before a new request: a claim of a revoked account's own group
    /// does not refuse it here — [`authorize_use`](Self::authorize_use) decides whether
    /// that claim is released for it.
    pub fn still_allowed(
        &self,
        who: &Account,
        key_id: &KeyId,
        need: Rights,
    ) -> Result<(), Refusal> {
        if !self.required() {
            return Ok(());
        }
        let acct = self.with_rights(who, need)?;
        let st = self.state();
        match st.claims.get(key_id.as_bytes()) {
            // A revoked account's own group's claim may be released for this request
            // ([`Accounts::authorize_use`] decides).
            Some(e) if e.group != acct.group && !st.revoked_own(e, &self.table().ids) => {
                Err(Self::claimed_by_others())
            }
            _ => Ok(()),
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
    ///
    /// Unchanged metadata (modification time, length, inode) is trusted once the file's
    /// modification time lay [`RACY_WINDOW`] before the last read; until then, and after any
    /// change of metadata, the file is read and its contents compared, so an edit that
    /// keeps the length within one timestamp tick is not missed.
    pub fn reload_if_changed(&self) -> Result<usize, AccountError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let now = SystemTime::now();
        let meta = meta_of(path);
        {
            let s = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            let settled = meta.is_some_and(|(mtime, ..)| {
                mtime
                    .checked_add(RACY_WINDOW)
                    .is_some_and(|t| t <= s.read_at)
            });
            // A text whose revocations await their confirming read is read again at each
            // look: an invalid one's, else a valid one's held revocations.
            let awaiting = s
                .pending
                .as_ref()
                .map_or(!s.held.is_empty(), |i| !i.applied);
            if s.meta == meta && (settled || meta.is_none()) && !awaiting {
                return Ok(0);
            }
        }
        self.load_and_install(path, meta, now, false)
    }

    /// Reloads the account file now (SIGHUP: the operator says the file is complete, so a
    /// valid list applies in full at once); closes connections of removed accounts and of
    /// replaced credentials, and tells those whose rights shrank.
    pub fn reload(&self) -> Result<usize, AccountError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        self.load_and_install(path, meta_of(path), SystemTime::now(), true)
    }

    /// Reads the file once and installs that text if it differs from the last one read
    /// (or `always`). The stamp moves on also when the file cannot be read or the list is
    /// invalid, so a bad file is reported once, not at every poll.
    fn load_and_install(
        &self,
        path: &Path,
        meta: Option<FileMeta>,
        read_at: SystemTime,
        always: bool,
    ) -> Result<usize, AccountError> {
        let text = read_list(path);
        let digest: Option<[u8; 32]> = text.as_ref().ok().map(|t| Sha256::digest(t).into());
        {
            let mut s = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            let same = digest.is_some() && s.digest == digest;
            (s.meta, s.read_at, s.digest) = (meta, read_at, digest);
            if same && !always {
                // The same text again: only one whose revocations wait for a confirming
                // read has anything to do (reported once already): an invalid text's
                // once a reload period has passed, a valid one's held revocations as they
                // come due ([`Accounts::install_file_table`]).
                let due = match (&mut s.pending, digest) {
                    (Some(i), Some(d)) if i.digest == d && !i.applied => {
                        i.applied = self.clock_ms().saturating_sub(i.first) >= self.reload_ms;
                        i.applied
                    }
                    _ => false,
                };
                let holding = s.pending.is_none() && !s.held.is_empty();
                drop(s);
                return Ok(match (&text, digest) {
                    (Ok(t), _) if due => self.revoke_unnamed(t),
                    (Ok(t), Some(d)) if holding => self.install_text(t, path, Some((d, false)))?,
                    _ => 0,
                });
            }
        }
        let text = text.inspect_err(|_| self.list_failed(None, None))?;
        self.install_text(&text, path, digest.map(|d| (d, always)))
    }

    /// Nothing waits for a confirming read any more (a list applied in full): forgets an
    /// invalid text's pending read and the held revocations, and zeroes the gauge.
    fn clear_pending(&self, s: &mut Stamp) {
        s.pending = None;
        s.held.clear();
        self.revocations_held
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The clock's Unix milliseconds.
    fn clock_ms(&self) -> u64 {
        (self.clock.0)()
    }

    /// Installs an account list given as TOML text (the cluster's list, from JetStream);
    /// closes the connections of accounts it no longer has. A list that does not parse or
    /// check leaves the previous one in force, less the accounts and credentials it no
    /// longer names ([`Accounts::list_failed`]).
    pub fn install(&self, text: &str) -> Result<usize, AccountError> {
        self.install_text(text, Path::new("<the cluster's account list>"), None)
    }

    /// Installs `text`, read from `origin`; `file`: the digest of a file's text (its
    /// revocations wait for a confirming read) and whether a SIGHUP asked for the read (a
    /// valid list then applies in full at once), `None` for the cluster's list (a whole
    /// message: never read half-written, acted on at once).
    fn install_text(
        &self,
        text: &str,
        origin: &Path,
        file: Option<([u8; 32], bool)>,
    ) -> Result<usize, AccountError> {
        match AccountFile::parse(text, origin).and_then(|f| f.table()) {
            Ok(table) => {
                self.list_valid
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(match file {
                    Some((_, forced)) => self.install_file_table(table, forced),
                    None => {
                        self.clear_pending(
                            &mut self.stamp.lock().unwrap_or_else(|p| p.into_inner()),
                        );
                        self.install_table(table)
                    }
                })
            }
            Err(e) => {
                self.list_failed(Some(text), file.map(|(d, _)| d));
                Err(e)
            }
        }
    }

    /// Puts the valid list `table`, read from the account file, in force — but what it
    /// revokes only once confirmed. A file cut at an entry boundary (an editor writing in
    /// place, a truncated copy, an emptied file) is a valid list, and would revoke every
    /// account after the cut — closing their connections — at the first read. So a list
    /// that removes or reduces accounts in force (an account gone or given another
    /// identity, a key or token no longer listed for it, a right taken away, another
    /// group) applies at once what it adds (new accounts, credentials and rights), and
    /// holds what it revokes ([`Revocation`]s) in force as it was.
    ///
    /// Each revocation is held from the first read that makes it, and applied by a read
    /// at least `auth.reload_ms` later that still makes it; a valid read that no longer
    /// makes it (the file restored after a cut) drops it: it revokes nothing. The wait is
    /// keyed on what is revoked, not on the text: edits elsewhere in the file (a tool
    /// rewriting a timestamp or comment every second, accounts being added) neither
    /// restart nor extend it, so a revocation every read repeats applies at the first read
    /// a reload period after it was first made — within two reload periods, since the
    /// reload task reads the file at each look (every `auth.reload_ms`) while anything is
    /// held ([`Accounts::reload_if_changed`]). An invalid read in between changes nothing
    /// of this. `forced` (SIGHUP: the operator says the file is complete) applies the list
    /// in full at once. Returns how many connections were closed.
    fn install_file_table(&self, table: Table, forced: bool) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let mut s = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if forced {
            self.clear_pending(&mut s);
            drop(s);
            return self.install_table(table);
        }
        // A valid list read: an invalid text's wait is over.
        s.pending = None;
        let now = self.clock_ms();
        let (mut applied, mut fresh, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        // Lock order: the stamp, then (in swap_table) the connections and the table.
        let (n, closed, rechecked) = self.swap_table(|old| {
            let revoked = revocations(old, &table);
            s.held.retain(|r, _| revoked.contains_key(r));
            for r in revoked.keys() {
                if !s.held.contains_key(r) {
                    s.held.insert(r.clone(), now);
                    fresh.push(r.clone());
                }
            }
            let due = |r: &Revocation| {
                s.held
                    .get(r)
                    .is_some_and(|first| now.saturating_sub(*first) >= self.reload_ms)
            };
            let t = hold_revocations(old, table, &revoked, &due);
            for (r, owner) in &revoked {
                if due(r) {
                    applied.push(r.clone());
                } else {
                    kept.push((r.clone(), owner.clone()));
                }
            }
            for r in &applied {
                s.held.remove(r);
            }
            t
        });
        drop(s);
        // The gauge: accounts held, and held credentials of accounts not held themselves.
        let mut accounts: Vec<&str> = kept
            .iter()
            .filter_map(|(r, _)| match r {
                Revocation::Account(a) => Some(a.as_str()),
                _ => None,
            })
            .collect();
        accounts.sort_unstable();
        let credentials = kept
            .iter()
            .filter(|(r, owner)| {
                !matches!(r, Revocation::Account(_)) && !accounts.contains(&owner.as_str())
            })
            .count();
        self.revocations_held
            .store((accounts.len() + credentials) as u64, Relaxed);
        if !fresh.is_empty() {
            self.revocations_deferred.fetch_add(1, Relaxed);
            tracing::warn!(accounts = n, closed, held = ?accounts, credentials_held = credentials,
                wait_ms = self.reload_ms,
                "account list read: what it adds applies now; its revocations wait until a \
                 read a reload period later still makes them (a file may be read mid-write \
                 or cut short); the accounts and credentials it removes or reduces stay as \
                 they were meanwhile");
        } else if kept.is_empty() || !applied.is_empty() {
            let mut removed: Vec<&str> = applied
                .iter()
                .filter_map(|r| match r {
                    Revocation::Account(a) => Some(a.as_str()),
                    _ => None,
                })
                .collect();
            removed.sort_unstable();
            let credentials_revoked = applied.len() - removed.len();
            tracing::info!(accounts = n, closed, rechecked, applied = ?removed,
                credentials_revoked, held = ?accounts, "account list reloaded");
        } else {
            tracing::debug!(accounts = n, closed, rechecked, held = ?accounts,
                "account list reloaded; its revocations are still held");
        }
        closed
    }

    /// An account list read is invalid (`text`) or unreadable (`None`): the previous list
    /// stays in force — but not the accounts and credentials the invalid text no longer
    /// names ([`Accounts::revoke_unnamed`]): an operator who removes an account (or rotates
    /// a key or token) and makes a typo elsewhere in the same edit expects the removal to
    /// hold.
    ///
    /// A file (`file`: its text's digest) can be read while it is being written in place,
    /// and a text cut after any entry would revoke every account after the cut. So a file's
    /// revocations are applied only once the same text is read a second time, at least
    /// `auth.reload_ms` after the first (the reload task reads a file awaiting that at each
    /// look, and the second read applies them: [`Accounts::reload_if_changed`]); a write
    /// that goes on changes the text, and its next read starts over. The cluster's list
    /// (`file` = `None`, a whole message) is acted on at once.
    fn list_failed(&self, text: Option<&str>, file: Option<[u8; 32]>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.list_valid.store(false, Relaxed);
        self.reload_errors.fetch_add(1, Relaxed);
        let Some(text) = text else {
            return;
        };
        if let Some(d) = file {
            let now = self.clock_ms();
            let mut s = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            let act = match &mut s.pending {
                Some(i) if i.digest == d => {
                    i.applied = i.applied || now.saturating_sub(i.first) >= self.reload_ms;
                    i.applied
                }
                _ => {
                    s.pending = Some(PendingRead {
                        digest: d,
                        first: now,
                        applied: false,
                    });
                    false
                }
            };
            if !act {
                tracing::debug!(
                    "the account list is invalid: the revocations it implies \
                    wait until the same text is read again (a file may be read mid-write)"
                );
                return;
            }
        }
        self.revoke_unnamed(text);
    }

    /// Revokes the accounts and credentials in force that the invalid list `text` no
    /// longer names, as far as it says so exactly; the rest of the list in force stays as
    /// it is (nothing is added, no right or group changes). Returns how many connections
    /// were closed.
    ///
    /// Text that is not TOML, or whose `account` is not an array, revokes nothing. Each
    /// `[[account]]` entry is read on its own ([`EntriesRead`]):
    /// - an entry that parses and checks by itself names exactly one account: an account
    ///   in force of its name stays only with the same identity (the same `id`, or none
    ///   for a legacy entry), and keeps only the key and token hash the entry lists;
    /// - an entry that does not parse (a misspelled field, a stray character in its `id`
    ///   or `key`, no `name`) keeps **exactly as it was** every account in force whose
    ///   name, id, key or token hash it carries as any of its values, and is otherwise
    ///   ignored (a header left behind when an entry's lines were deleted);
    /// - an account two parsing entries name stays as it was;
    /// - an account no entry names or carries is revoked.
    fn revoke_unnamed(&self, text: &str) -> usize {
        let Some(read) = EntriesRead::of(text) else {
            return 0;
        };
        let mut gone = Vec::new();
        let mut creds = 0;
        let (n, closed, _) = self.swap_table(|old| {
            let (t, g, c) = prune(old, &read);
            (gone, creds) = (g, c);
            t
        });
        if !gone.is_empty() || creds > 0 {
            gone.sort();
            tracing::warn!(accounts = n, closed, removed = ?gone, credentials_revoked = creds,
                "the account list is invalid: revoked the accounts and credentials it no \
                 longer names; the rest of the previous list stays in force until a valid \
                 list is written");
        }
        closed
    }

    /// Whether the account list in force is the last one read (the gauge), and how many
    /// invalid or unreadable lists were read (the counter): the accounts' Prometheus
    /// lines besides claims.
    fn render_list_prometheus(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        format!(
            "# HELP whispeer_relay_account_list_valid 1 while the last account list read (the \
             file, or the cluster's) is valid and in force; 0 while an invalid or unreadable \
             one was read since: the previous list stays in force, less the accounts and \
             credentials the invalid one no longer names.\n\
             # TYPE whispeer_relay_account_list_valid gauge\n\
             whispeer_relay_account_list_valid {}\n\
             # HELP whispeer_relay_account_reload_errors_total Account lists read that were \
             invalid or unreadable (each changed text once).\n\
             # TYPE whispeer_relay_account_reload_errors_total counter\n\
             whispeer_relay_account_reload_errors_total {}\n\
             # HELP whispeer_relay_account_revocations_held Revocations the account file's \
             valid lists make that are held until a read auth.reload_ms after the first \
             still makes them (a file read mid-write or cut short revokes nothing): accounts \
             removed or reduced, plus keys and token hashes of accounts not held \
             themselves.\n\
             # TYPE whispeer_relay_account_revocations_held gauge\n\
             whispeer_relay_account_revocations_held {}\n\
             # HELP whispeer_relay_account_revocations_deferred_total Account files read that \
             held a revocation not held before.\n\
             # TYPE whispeer_relay_account_revocations_deferred_total counter\n\
             whispeer_relay_account_revocations_deferred_total {}\n",
            u8::from(self.list_valid.load(Relaxed)),
            self.reload_errors.load(Relaxed),
            self.revocations_held.load(Relaxed),
            self.revocations_deferred.load(Relaxed)
        )
    }

    /// Puts `table` in force and walks the authenticated connections once: a connection
    /// whose credential no longer names its account gets a fatal `Err(auth_failed)` and is
    /// closed; one whose account lost a right or changed group is told to check its
    /// subscriptions (its session ends those that no longer hold). The rest cost a map
    /// look-up each. Returns how many connections were closed.
    fn install_table(&self, table: Table) -> usize {
        let (n, closed, rechecked) = self.swap_table(|_| table);
        tracing::info!(accounts = n, closed, rechecked, "account list reloaded");
        closed
    }

    /// [`install_table`](Self::install_table) of the table `make` builds from the one in
    /// force (atomically: no other list is installed in between); (accounts, connections
    /// closed, connections told to recheck).
    fn swap_table(&self, make: impl FnOnce(&Table) -> Table) -> (usize, usize, usize) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let (table, old) = {
            let mut slot = self.table.write().unwrap_or_else(|p| p.into_inner());
            let table = Arc::new(make(&slot));
            let old = std::mem::replace(&mut *slot, table.clone());
            (table, old)
        };
        let n = table.by_name.len();
        let (mut closed, mut rechecked) = (0, 0);
        live.retain(|_, c| {
            let now = table
                .account_of(&c.credential)
                .filter(|a| a.name == c.name && a.id == c.id);
            let Some(now) = now else {
                let message = match table.by_name.get(&c.name) {
                    Some(a) if a.id == c.id => {
                        "the account's key or token was replaced: the credential this \
                         connection authenticated with is no longer valid"
                    }
                    // Removed and added again (or given an id): another account now.
                    Some(_) => {
                        "the account was removed (its name now belongs to a new account, \
                         which shares nothing with it)"
                    }
                    None => "the account was removed",
                };
                let frame = codec::encode_prefixed(&Frame::Err(ErrFrame {
                    code: ErrorCode::AuthFailed,
                    message: message.into(),
                    fatal: true,
                    sub_id: None,
                    publish_id: None,
                }));
                if c.out.close_with(Some(frame)) {
                    closed += 1;
                }
                // Detached here: a later list that names the credential again must not
                // find it (the session detaches it again when it ends, harmlessly).
                return false;
            };
            let lost = old
                .by_name
                .get(&c.name)
                .is_none_or(|was| was.group != now.group || !now.rights.contains(was.rights));
            if lost {
                // Full: a notice is already pending, and it covers this change too.
                let _ = c.rights_changed.try_send(());
                rechecked += 1;
            }
            true
        });
        (n, closed, rechecked)
    }
}

/// What the valid list `new` revokes of `old`, each with the name of the account it
/// concerns: an account `new` no longer has, gives another identity, or reduces (a right
/// taken away, another group); a key or token hash of `old` that `new` no longer gives
/// the same account (also for an account revoked itself).
fn revocations(old: &Table, new: &Table) -> HashMap<Revocation, String> {
    let mut out = HashMap::new();
    for (name, o) in &old.by_name {
        let revoked = match new.by_name.get(name) {
            Some(n) if n.id == o.id => n.group != o.group || !n.rights.contains(o.rights),
            _ => true,
        };
        if revoked {
            out.insert(Revocation::Account(name.clone()), name.clone());
        }
    }
    let still =
        |cred: &Credential, o: &Account| new.account_of(cred).is_some_and(|n| n.same_identity(o));
    for (k, (_, o)) in &old.by_key {
        if !still(&Credential::Key(*k), o) {
            out.insert(Revocation::Key(*k), o.name.clone());
        }
    }
    for (h, o) in &old.by_token {
        if !still(&Credential::Token(*h), o) {
            out.insert(Revocation::Token(*h), o.name.clone());
        }
    }
    out
}

/// The valid list `new` with those of its `revoked` ([`revocations`] of `old`) that are
/// not `due` held back: the table to put in force until they are
/// ([`Accounts::install_file_table`]); `new` itself when nothing is held back. It is `new`
/// plus what `old` had that a held revocation keeps:
/// - an account held as removed (or given another identity: a new `id` under its name)
///   stays as it was;
/// - an account held as reduced keeps its group and the rights it had, plus those `new`
///   adds;
/// - a new account is added, unless its name or `id` is held by an account kept above
///   (a removal and an add of the same name, a renamed `id`);
/// - a key or token hash held keeps naming its old account if that account is in the
///   table with the same identity; a credential `new` gives another account than the one
///   it names in `old` stays the old account's meanwhile.
fn hold_revocations(
    old: &Table,
    new: Table,
    revoked: &HashMap<Revocation, String>,
    due: &dyn Fn(&Revocation) -> bool,
) -> Table {
    let held = |r: &Revocation| revoked.contains_key(r) && !due(r);
    if !revoked.keys().any(held) {
        return new;
    }
    let mut t = Table::default();
    for (name, o) in &old.by_name {
        let keep = held(&Revocation::Account(name.clone()));
        let a = match new.by_name.get(name) {
            Some(n) if n.id == o.id => {
                if !keep {
                    n.clone()
                } else {
                    Arc::new(Account {
                        group: o.group.clone(),
                        rights: Rights(o.rights.0 | n.rights.0),
                        ..(**n).clone()
                    })
                }
            }
            _ if keep => o.clone(),
            _ => continue,
        };
        t.by_name.insert(name.clone(), a);
    }
    let kept_ids: std::collections::HashSet<[u8; 16]> =
        t.by_name.values().filter_map(|a| a.id).collect();
    for (name, n) in &new.by_name {
        let id_held = n.id.is_some_and(|id| kept_ids.contains(&id));
        if !t.by_name.contains_key(name) && !id_held {
            t.by_name.insert(name.clone(), n.clone());
        }
    }
    t.ids = t.by_name.values().filter_map(|a| a.id).collect();
    // The old credentials held first (each naming its account if that is still in the
    // table with the same identity), then those of the new list for an account of the
    // same identity in the table.
    let same = |o: &Account| t.by_name.get(&o.name).filter(|a| a.id == o.id).cloned();
    let mut by_key = HashMap::new();
    let mut by_token = HashMap::new();
    for (k, (vk, o)) in &old.by_key {
        if held(&Revocation::Key(*k)) {
            if let Some(a) = same(o) {
                by_key.insert(*k, (*vk, a));
            }
        }
    }
    for (h, o) in &old.by_token {
        if held(&Revocation::Token(*h)) {
            if let Some(a) = same(o) {
                by_token.insert(*h, a);
            }
        }
    }
    for (k, (vk, n)) in &new.by_key {
        if let Some(a) = same(n) {
            by_key.entry(*k).or_insert_with(|| (*vk, a));
        }
    }
    for (h, n) in &new.by_token {
        if let Some(a) = same(n) {
            by_token.entry(*h).or_insert_with(|| a);
        }
    }
    (t.by_key, t.by_token) = (by_key, by_token);
    t.index()
}

/// An entry of an invalid list that parses and checks by itself: its identity, key and
/// token hash.
type ParsedEntry = (Option<[u8; 16]>, Option<[u8; 32]>, Option<[u8; 32]>);

/// What an invalid account list's text says for sure, each `[[account]]` entry read on
/// its own (see [`Accounts::revoke_unnamed`]).
#[derive(Debug, Default)]
struct EntriesRead {
    /// Entries that parse and check by themselves, by name.
    parsed: HashMap<String, Vec<ParsedEntry>>,
    /// The values carried by entries that do not parse: as names, ids, and keys or token
    /// hashes.
    broken_names: std::collections::HashSet<String>,
    broken_ids: std::collections::HashSet<[u8; 16]>,
    broken_hex: std::collections::HashSet<[u8; 32]>,
}

impl EntriesRead {
    /// `None` unless `text` is TOML whose `account` (if any) is an array.
    fn of(text: &str) -> Option<Self> {
        let v: toml::Table = toml::from_str(text).ok()?;
        let mut out = EntriesRead::default();
        let entries = match v.get("account") {
            None => return Some(out),
            Some(toml::Value::Array(a)) => a,
            Some(_) => return None,
        };
        for e in entries {
            let one = e.clone().try_into::<AccountEntry>().ok().and_then(|entry| {
                let t = AccountFile {
                    account: vec![entry],
                    ..AccountFile::default()
                }
                .table()
                .ok()?;
                let (name, a) = t.by_name.into_iter().next()?;
                let key = t.by_key.into_keys().next();
                let token = t.by_token.into_keys().next();
                Some((name, (a.id, key, token)))
            });
            match one {
                Some((name, read)) => out.parsed.entry(name).or_default().push(read),
                None => {
                    let mut strings = Vec::new();
                    strings_in(e, &mut strings, 0);
                    for s in strings {
                        if let Ok(id) = parse_id(s) {
                            out.broken_ids.insert(id);
                        }
                        if let Ok(h) = parse_hex32(s) {
                            out.broken_hex.insert(h);
                        }
                        out.broken_names.insert(s.to_owned());
                    }
                }
            }
        }
        Some(out)
    }
}

/// The strings in `v` (in arrays and tables too, a few levels deep).
fn strings_in<'a>(v: &'a toml::Value, out: &mut Vec<&'a str>, depth: usize) {
    match v {
        toml::Value::String(s) => out.push(s),
        toml::Value::Array(a) if depth < 4 => {
            a.iter().for_each(|v| strings_in(v, out, depth + 1));
        }
        toml::Value::Table(t) if depth < 4 => {
            t.values().for_each(|v| strings_in(v, out, depth + 1));
        }
        _ => {}
    }
}

/// `old` less the accounts and credentials `read` no longer names (see
/// [`Accounts::revoke_unnamed`]): the table, the names of the accounts dropped, and how
/// many credentials of kept accounts were dropped.
fn prune(old: &Table, read: &EntriesRead) -> (Table, Vec<String>, usize) {
    // Accounts an unparsable entry carries a value of: kept exactly as they were.
    let mut as_was: std::collections::HashSet<&str> = old
        .by_name
        .iter()
        .filter(|(name, a)| {
            read.broken_names.contains(*name)
                || a.id.is_some_and(|id| read.broken_ids.contains(&id))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    for (k, (_, a)) in &old.by_key {
        if read.broken_hex.contains(k) {
            as_was.insert(&a.name);
        }
    }
    for (h, a) in &old.by_token {
        if read.broken_hex.contains(h) {
            as_was.insert(&a.name);
        }
    }
    // The one parsing entry of an account's name, if exactly one.
    let only = |name: &str| match read.parsed.get(name).map(Vec::as_slice) {
        Some([e]) => Some(e),
        _ => None,
    };
    let mut t = Table::default();
    let mut gone = Vec::new();
    for (name, a) in &old.by_name {
        let kept = as_was.contains(name.as_str())
            || match read.parsed.get(name).map(Vec::as_slice) {
                Some([(id, ..)]) => *id == a.id,
                // Two entries of the name: which one is it? Left as it was.
                Some(_) => true,
                None => false,
            };
        if kept {
            t.by_name.insert(name.clone(), a.clone());
            if let Some(id) = a.id {
                t.ids.insert(id);
            }
        } else {
            gone.push(name.clone());
        }
    }
    // A kept account keeps a credential its one parsing entry lists, or all of them.
    let lists = |a: &Account, cred: &[u8; 32], key: bool| {
        t.by_name.contains_key(&a.name)
            && (as_was.contains(a.name.as_str())
                || only(&a.name).is_none_or(|(_, k, tok)| {
                    if key {
                        *k == Some(*cred)
                    } else {
                        *tok == Some(*cred)
                    }
                }))
    };
    let mut creds = 0;
    for (k, (vk, a)) in &old.by_key {
        if lists(a, k, true) {
            t.by_key.insert(*k, (*vk, a.clone()));
        } else if t.by_name.contains_key(&a.name) {
            creds += 1;
        }
    }
    for (h, a) in &old.by_token {
        if lists(a, h, false) {
            t.by_token.insert(*h, a.clone());
        } else if t.by_name.contains_key(&a.name) {
            creds += 1;
        }
    }
    (t.index(), gone, creds)
}

/// `ms` milliseconds for a message: "7 days", "1 day", "36 h", "90 min", "20 s", "200 ms"
/// (the largest unit that divides it).
fn human_ms(ms: u64) -> String {
    for (unit, name) in [
        (86_400_000, " days"),
        (3_600_000, " h"),
        (60_000, " min"),
        (1_000, " s"),
    ] {
        if ms >= unit && ms % unit == 0 {
            let n = ms / unit;
            let name = if n == 1 {
                name.trim_end_matches('s')
            } else {
                name
            };
            return format!("{n}{name}");
        }
    }
    format!("{ms} ms")
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

/// A fixed key no account holds: what an unlisted key's challenge response is verified
/// against (see [`Accounts::verify`]).
fn decoy_key() -> &'static VerifyingKey {
    static DECOY: std::sync::OnceLock<VerifyingKey> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| ed25519_dalek::SigningKey::from_bytes(&[0x5a; 32]).verifying_key())
}

/// Decoy verifications so far (tests).
#[cfg(test)]
static DECOY_VERIFICATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;
    use whispeer_protocol::frame::auth_sig_input;

    #[test]
    fn rights_and_table_checks() {
        let r = Rights::of(&[Right::Publish, Right::Subscribe]);
        assert!(r.contains(Rights::of(&[Right::Publish])));
        assert_eq!(
            r.missing(Rights::of(&[Right::Publish, Right::Durable])),
            vec![Right::Durable]
        );
        let f = AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: vec![AccountEntry {
                name: "a".into(),
                id: None,
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

    fn temp_file(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "whispeer-accounts-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("accounts.toml")
    }

    fn required(path: &Path) -> Accounts {
        Accounts::open(&AuthConfig {
            mode: AuthMode::Required,
            accounts: Some(path.to_owned()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn entry(name: &str, key: Option<[u8; 32]>, token: Option<&[u8]>) -> AccountEntry {
        AccountEntry {
            name: name.into(),
            id: None,
            group: Some("home".into()),
            key: key.map(hex::encode),
            token_sha256: token.map(|t| hex::encode(token_hash(t))),
            rights: all_rights(),
        }
    }

    /// The challenge response of a key no account holds is verified too (against a decoy),
    /// so the time to `Err(auth_failed)` does not tell listed keys from others; a listed
    /// key still verifies only with its own signature.
    #[test]
    fn an_unlisted_key_costs_a_verification_too() {
        use ed25519_dalek::Signer;
        let path = temp_file("decoy");
        let listed = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: vec![entry("dan", Some(listed.verifying_key().to_bytes()), None)],
        }
        .save(&path)
        .unwrap();
        let accounts = required(&path);
        let nonce = [9u8; 32];
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let sk = stranger.verifying_key().to_bytes();
        let sig = stranger.sign(&auth_sig_input(&nonce, &sk)).to_bytes();
        let before = DECOY_VERIFICATIONS.load(std::sync::atomic::Ordering::Relaxed);
        assert!(accounts
            .verify(&sk, &auth_sig_input(&nonce, &sk), &sig)
            .is_none());
        assert!(
            DECOY_VERIFICATIONS.load(std::sync::atomic::Ordering::Relaxed) > before,
            "the unlisted key's response was verified (against the decoy)"
        );
        let lk = listed.verifying_key().to_bytes();
        let signed = auth_sig_input(&nonce, &lk);
        let good = listed.sign(&signed).to_bytes();
        assert_eq!(accounts.key_count(), 1);
        assert!(accounts.verify(&lk, &signed, &good).is_some());
        assert!(accounts.verify(&lk, &signed, &sig).is_none());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// A token replaced in place within one timestamp tick changes neither the file's
    /// length, nor its inode, nor its modification time: only its contents. The reload
    /// still sees it (the file is read again while its mtime is recent): the new token at
    /// once, the old one revoked at the confirming read a reload period later.
    #[test]
    fn an_edit_keeping_length_inode_and_mtime_is_reloaded() {
        let path = temp_file("stamp");
        AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: vec![entry("bob", None, Some(b"token-one"))],
        }
        .save(&path)
        .unwrap();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
        let accounts = required_clocked(&path, &now);
        assert!(accounts.by_token(b"token-one").is_some());
        let before = meta_of(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap().replace(
            &hex::encode(token_hash(b"token-one")),
            &hex::encode(token_hash(b"token-two")),
        );
        std::fs::write(&path, text).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_modified(before.0).unwrap();
        drop(f);
        assert_eq!(meta_of(&path).unwrap(), before, "metadata unchanged");
        accounts.reload_if_changed().unwrap();
        assert!(
            accounts.by_token(b"token-two").is_some(),
            "the new token at once"
        );
        now.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
        accounts.reload_if_changed().unwrap();
        assert!(
            accounts.by_token(b"token-one").is_none(),
            "old token revoked"
        );
        assert!(
            accounts.by_token(b"token-two").is_some(),
            "new token listed"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// The reload's walk over live connections: a replaced credential closes exactly the
    /// connections that proved it (another credential of the same account stays); a right
    /// taken away or a group change notifies the account's connections, and only those.
    #[test]
    fn a_reload_closes_replaced_credentials_and_notifies_lost_rights() {
        use crate::config::SlowConsumerPolicy;
        use crate::outbound::Budget;
        let path = temp_file("walk");
        let (k1, k2) = (
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
            ed25519_dalek::SigningKey::from_bytes(&[2; 32]).verifying_key(),
        );
        let list = |alice_key: [u8; 32], bob: Rights, carol_group: &str| AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: vec![
                entry("alice", Some(alice_key), Some(b"alice-token")),
                AccountEntry {
                    rights: Right::ALL
                        .into_iter()
                        .filter(|r| bob.contains(Rights::of(&[*r])))
                        .collect(),
                    ..entry("bob", None, Some(b"bob-token"))
                },
                AccountEntry {
                    group: Some(carol_group.into()),
                    ..entry("carol", None, Some(b"carol-token"))
                },
                entry("dave", None, Some(b"dave-token")),
            ],
        };
        list(k1.to_bytes(), Rights::all(), "home")
            .save(&path)
            .unwrap();
        let accounts = required(&path);
        let budget = Arc::new(Budget::new(0));
        let mut conns = Vec::new();
        for (i, (name, cred)) in [
            ("alice", Credential::Key(k1.to_bytes())),
            ("alice", Credential::token(b"alice-token")),
            ("bob", Credential::token(b"bob-token")),
            ("carol", Credential::token(b"carol-token")),
            ("dave", Credential::token(b"dave-token")),
        ]
        .into_iter()
        .enumerate()
        {
            let out = Arc::new(Outbound::new(
                16,
                1 << 20,
                SlowConsumerPolicy::Drop,
                budget.clone(),
            ));
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let who = accounts.current(name).unwrap();
            assert!(accounts.attach(ConnId(i as u64), &who, cred, &out, tx));
            conns.push((out, rx));
        }
        // A credential that does not name the account is not attached.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let out = conns[0].0.clone();
        assert!(!accounts.attach(
            ConnId(9),
            &accounts.current("bob").unwrap(),
            Credential::token(b"alice-token"),
            &out,
            tx
        ));

        let closed = accounts.install_table(
            list(k2.to_bytes(), bob_without_subscribe(), "guests")
                .table()
                .unwrap(),
        );
        assert_eq!(closed, 1);
        let state: Vec<(bool, bool)> = conns
            .iter_mut()
            .map(|(out, rx)| (out.is_closing(), rx.try_recv().is_ok()))
            .collect();
        assert_eq!(
            state,
            vec![
                (true, false),  // alice by K1: replaced
                (false, false), // alice by token: unchanged
                (false, true),  // bob: lost subscribe
                (false, true),  // carol: moved to another group
                (false, false), // dave: unchanged
            ]
        );
        assert_eq!(accounts.live_count(), 4);
        let k = KeyId::from_bytes([7; 16]);
        let sub = Rights::of(&[Right::Subscribe]);
        let who = |name: &str| {
            accounts.current(name).unwrap_or_else(|| {
                Arc::new(Account {
                    name: name.into(),
                    id: None,
                    group: "home".into(),
                    rights: Rights::all(),
                })
            })
        };
        accounts
            .authorize(&who("dave"), &k, sub, |_, _| Ok(Claim::NotShared))
            .unwrap();
        assert!(accounts.still_allowed(&who("dave"), &k, sub).is_ok());
        let r = accounts.still_allowed(&who("bob"), &k, sub).unwrap_err();
        assert!(!r.fatal && r.message.contains("subscribe"), "{r:?}");
        let r = accounts.still_allowed(&who("carol"), &k, sub).unwrap_err();
        assert!(!r.fatal && r.message.contains("another group"), "{r:?}");
        assert!(
            accounts
                .still_allowed(&who("gone"), &k, sub)
                .unwrap_err()
                .fatal
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    const ID1: &str = "00112233445566778899aabbccddeeff";
    const ID2: &str = "ffeeddccbbaa99887766554433221100";

    fn parse(text: &str) -> Result<AccountFile, AccountError> {
        AccountFile::parse(text, Path::new("accounts.toml"))
    }

    /// Session 26 review, finding 2: only a legacy entry's own group (its name) is retired,
    /// and only once no remaining entry is in it; the retired list survives a save and
    /// load, and a list giving a retired group to anyone does not load.
    #[test]
    fn removing_the_last_member_of_a_legacy_group_retires_it() {
        let tok = |s: &str| hex::encode(token_hash(s.as_bytes()));
        let text = format!(
            "[[account]]\nname = \"old\"\ntoken_sha256 = \"{}\"\n\
             [[account]]\nname = \"pal\"\ngroup = \"old\"\ntoken_sha256 = \"{}\"\n\
             [[account]]\nname = \"team1\"\ngroup = \"team\"\ntoken_sha256 = \"{}\"\n\
             [[account]]\nname = \"new\"\nid = \"{ID1}\"\ntoken_sha256 = \"{}\"\n",
            tok("a"),
            tok("b"),
            tok("c"),
            tok("d"),
        );
        let mut f = parse(&text).unwrap();
        // pal is still in group "old": removing old retires nothing yet, but the group is
        // tracked and retired when pal, its last member, goes (review 27b, R5: before,
        // this order never retired it).
        assert_eq!(f.remove("old"), Some(None));
        assert_eq!(f.legacy_groups, ["old"]);
        assert_eq!(f.remove("pal"), Some(Some("old".into())));
        assert!(f.legacy_groups.is_empty());
        assert_eq!(f.remove("team1"), Some(None), "explicit groups stay");
        assert_eq!(
            f.remove("new"),
            Some(None),
            "id groups are never reusable anyway"
        );
        assert_eq!(f.remove("new"), None);
        assert_eq!(f.retired_groups, ["old"]);
        // Adopted, it is retired again when the adopter (an account with an id) leaves.
        assert!(f.adopt_retired("old"));
        assert!(!f.adopt_retired("old"), "no longer retired");
        f.account.push(AccountEntry {
            name: "x".into(),
            id: Some(ID2.into()),
            group: Some("old".into()),
            key: None,
            token_sha256: Some(tok("x")),
            rights: Right::ALL.to_vec(),
        });
        f.validate().unwrap();
        assert_eq!(f.remove("x"), Some(Some("old".into())));
        assert_eq!(f.retired_groups, ["old"]);

        let mut f = parse(&text).unwrap();
        assert_eq!(f.remove("pal"), Some(None));
        assert_eq!(f.remove("old"), Some(Some("old".into())));
        let back = parse(&f.to_toml().unwrap()).unwrap();
        assert_eq!(back.retired_groups, ["old"]);
        let mut again = back.clone();
        again.account.push(AccountEntry {
            name: "x".into(),
            id: Some(ID2.into()),
            group: Some("old".into()),
            key: None,
            token_sha256: Some(tok("e")),
            rights: Right::ALL.to_vec(),
        });
        assert!(matches!(
            again.validate(),
            Err(AccountError::RetiredGroup { group, .. }) if group == "old"
        ));
        // A legacy entry named like the retired group would be in it too.
        let legacy = format!(
            "retired_groups = [\"old\"]\n[[account]]\nname = \"old\"\ntoken_sha256 = \"{}\"\n",
            tok("f")
        );
        assert!(matches!(
            parse(&legacy),
            Err(AccountError::RetiredGroup { .. })
        ));
    }

    /// Review finding 17: an entry's `id` is its identity — default group, durable owner
    /// and store tenant derive from it; an entry without one (legacy) keeps the name-based
    /// identity it had before ids; an explicit group is kept as written.
    #[test]
    fn the_id_is_the_identity_and_legacy_entries_keep_the_name() {
        let tok = hex::encode(token_hash(b"t"));
        let text = format!(
            "[[account]]\nname = \"alice\"\nid = \"{ID1}\"\ntoken_sha256 = \"{tok}\"\n\
             [[account]]\nname = \"bob\"\ntoken_sha256 = \"{}\"\n\
             [[account]]\nname = \"carol\"\nid = \"{}\"\ngroup = \"alice\"\n\
             token_sha256 = \"{}\"\n",
            hex::encode(token_hash(b"u")),
            ID2.to_ascii_uppercase(),
            hex::encode(token_hash(b"v")),
        );
        let t = parse(&text).unwrap().table().unwrap();
        let (alice, bob, carol) = (&t.by_name["alice"], &t.by_name["bob"], &t.by_name["carol"]);
        let id1 = parse_id(ID1).unwrap();
        assert_eq!(alice.id, Some(id1));
        assert_eq!(alice.group, format!("account-id:{ID1}"));
        assert_eq!(alice.owner(), format!("account-id:{ID1}"));
        assert_eq!(alice.tenant(), Tenant::for_account_id(&id1));
        assert_ne!(alice.tenant(), Tenant::for_account("alice"));
        assert!(alice.id.is_some());
        // Legacy: exactly what the relay derived before ids.
        assert!(bob.id.is_none());
        assert_eq!(bob.group, "bob");
        assert_eq!(bob.owner(), "account:bob");
        assert_eq!(bob.tenant(), Tenant::for_account("bob"));
        // An explicit group naming an account is just a group name: not alice's group.
        assert_eq!(carol.group, "alice");
        assert_ne!(carol.group, alice.group);
        assert_eq!(
            carol.id,
            Some(parse_id(ID2).unwrap()),
            "hex case does not matter"
        );
        // Loading and writing back never adds an id to a legacy entry.
        let again = parse(&text).unwrap().to_toml().unwrap();
        let bob_part = &again[again.find("name = \"bob\"").unwrap()..];
        let bob_part = &bob_part[..bob_part.find("[[account]]").unwrap_or(bob_part.len())];
        assert!(!bob_part.contains("id ="), "{again}");
        assert!(new_id().unwrap() != new_id().unwrap());
        assert!(parse_id(&new_id().unwrap()).is_ok());
    }

    /// A malformed or repeated id is refused with an error naming the account.
    #[test]
    fn a_malformed_or_repeated_id_is_refused() {
        let tok = |n: u8| hex::encode(token_hash(&[n]));
        for bad in [
            "",
            "xyz",
            &ID1[..31],
            &format!("{ID1}00"),
            &ID1.replace('0', "g"),
        ] {
            let text = format!(
                "[[account]]\nname = \"alice\"\nid = \"{bad}\"\ntoken_sha256 = \"{}\"\n",
                tok(1)
            );
            let e = parse(&text).unwrap_err();
            assert!(
                matches!(&e, AccountError::Invalid { name, reason }
                    if name == "alice" && reason.starts_with("id:") && reason.contains("32 hex")),
                "{bad:?}: {e:?}"
            );
            assert!(e.to_string().contains("\"alice\""), "{e}");
        }
        let text = format!(
            "[[account]]\nname = \"a\"\nid = \"{ID1}\"\ntoken_sha256 = \"{}\"\n\
             [[account]]\nname = \"b\"\nid = \"{}\"\ntoken_sha256 = \"{}\"\n",
            tok(1),
            ID1.to_ascii_uppercase(),
            tok(2)
        );
        let e = parse(&text).unwrap_err();
        assert!(
            matches!(&e, AccountError::Invalid { name, reason }
                if name == "b" && reason.contains("id belongs to two")),
            "{e:?}"
        );
    }

    /// Default groups of accounts with an id live in a namespace no explicit group (nor a
    /// legacy entry's name standing for its group) may enter.
    #[test]
    fn groups_in_the_reserved_namespace_are_refused() {
        let tok = hex::encode(token_hash(b"t"));
        let taken = format!("account-id:{ID1}");
        for (entry, name, group) in [
            // An explicit group naming alice's default group.
            (
                format!("name = \"mallory\"\nid = \"{ID2}\"\ngroup = \"{taken}\""),
                "mallory",
                taken.as_str(),
            ),
            // Any group in the namespace, also of a legacy entry.
            (
                "name = \"old\"\ngroup = \"account-id:x\"".to_string(),
                "old",
                "account-id:x",
            ),
            // A legacy entry without group: its name is its group.
            (
                format!("name = \"{taken}\""),
                taken.as_str(),
                taken.as_str(),
            ),
        ] {
            let text = format!(
                "[[account]]\nname = \"alice\"\nid = \"{ID1}\"\ntoken_sha256 = \"{}\"\n\
                 [[account]]\n{entry}\ntoken_sha256 = \"{tok}\"\n",
                hex::encode(token_hash(b"a"))
            );
            let e = parse(&text).unwrap_err();
            match &e {
                AccountError::ReservedGroup { name: n, group: g } => {
                    assert_eq!((n.as_str(), g.as_str()), (name, group));
                }
                other => panic!("{entry}: {other:?}"),
            }
            let m = e.to_string();
            assert!(m.contains(name) && m.contains("reserved"), "{m}");
        }
        // An id'd account may be named like that (its name is no group); a legacy one
        // with an explicit group too.
        let text = format!(
            "[[account]]\nname = \"account-id:{ID2}\"\nid = \"{ID1}\"\ntoken_sha256 = \"{tok}\"\n"
        );
        assert!(parse(&text).is_ok());
    }

    /// A name removed and added again (a new id; here even with the same key) is another
    /// account: the old one's connections are closed, the old identity is refused as
    /// removed, and the new one may not use the old one's claims.
    #[test]
    fn a_name_added_again_is_another_account() {
        use crate::config::SlowConsumerPolicy;
        use crate::outbound::Budget;
        let path = temp_file("readd");
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32])
            .verifying_key()
            .to_bytes();
        let alice = |id: &str| AccountEntry {
            id: Some(id.into()),
            group: None,
            ..entry("alice", Some(key), None)
        };
        AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: vec![alice(ID1)],
        }
        .save(&path)
        .unwrap();
        let accounts = required(&path);
        let old = accounts.current("alice").unwrap();
        let k = KeyId::from_bytes([8; 16]);
        let sub = Rights::of(&[Right::Subscribe]);
        accounts
            .authorize(&old, &k, sub, |_, _| Ok(Claim::NotShared))
            .unwrap();
        let out = Arc::new(Outbound::new(
            16,
            1 << 20,
            SlowConsumerPolicy::Drop,
            Arc::new(Budget::new(0)),
        ));
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        assert!(accounts.attach(ConnId(1), &old, Credential::Key(key), &out, tx));

        let closed = accounts.install_table(
            AccountFile {
                retired_groups: Vec::new(),
                legacy_groups: Vec::new(),
                account: vec![
                    alice(ID2),
                    AccountEntry {
                        group: Some("alice".into()),
                        ..entry("mallory", None, Some(b"m"))
                    },
                ],
            }
            .table()
            .unwrap(),
        );
        assert_eq!(closed, 1, "the old identity's connection is closed");
        assert!(out.is_closing());
        let r = accounts.still_allowed(&old, &k, sub).unwrap_err();
        assert!(r.fatal && r.message.contains("removed"), "{r:?}");
        let new = accounts.current("alice").unwrap();
        assert_ne!(new.owner(), old.owner());
        assert_ne!(new.tenant(), old.tenant());
        for who in [new, accounts.current("mallory").unwrap()] {
            let r = accounts
                .authorize(&who, &k, sub, |_, _| Ok(Claim::NotShared))
                .unwrap_err();
            assert!(r.message.contains("another group"), "{}: {r:?}", who.name);
        }
        // The old connection's credential does not attach as the new account either.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        assert!(!accounts.attach(ConnId(2), &old, Credential::Key(key), &out, tx));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    fn bob_without_subscribe() -> Rights {
        Right::ALL
            .into_iter()
            .filter(|r| *r != Right::Subscribe)
            .fold(Rights::default(), Rights::with)
    }

    /// Accounts "alice" (group "home") and "eve" (group "other") with claims lapsing after
    /// `idle_ms`, at most `max` per group, measured by the clock `now` (Unix ms); the
    /// state file `state` if any.
    fn lapsing(
        dir: &Path,
        state: Option<&Path>,
        idle_ms: u64,
        max: usize,
        now: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Accounts {
        clocked(
            dir,
            vec![
                entry("alice", None, Some(b"a")),
                AccountEntry {
                    group: Some("other".into()),
                    ..entry("eve", None, Some(b"e"))
                },
            ],
            state,
            idle_ms,
            (max, max),
            now,
        )
    }

    /// `name` publishes on key id `[k; 16]` (claiming it) with the store answering
    /// `stored` for every key id.
    fn use_key(a: &Accounts, name: &str, k: u8, stored: bool) -> Result<Granted, Refusal> {
        a.authorize_use(
            &a.current(name).unwrap(),
            &KeyId::from_bytes([k; 16]),
            Rights::of(&[Right::Publish]),
            false,
            |_, _| Ok(Claim::NotShared),
            |_| Ok(stored),
        )
    }

    /// Waits until every line handed to the state file's writer is on disk.
    fn flushed(a: &Accounts) {
        let (sent, mut rx) = {
            let st = a.state();
            let w = st.writer.as_ref().unwrap();
            (w.sent, w.durable.clone())
        };
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(rx.wait_for(|n| *n >= sent))
            .unwrap();
    }

    const HOUR: u64 = 3_600_000;

    /// A claim lapses once unused for `claim_idle_ms` (here 2 h), only when its group at
    /// the limit needs a new key id, oldest first; its last use is written to the state
    /// file (a `used` line), so a restart keeps it, and released claims stay released. For
    /// an hour after a start nothing lapses.
    #[test]
    fn claims_lapse_by_their_last_use_which_survives_a_restart() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = temp_file("lapse").parent().unwrap().to_owned();
        let state = dir.join("auth-state");
        let _ = std::fs::remove_file(&state);
        let t0 = 1_700_000_000_000u64;
        let now = Arc::new(std::sync::atomic::AtomicU64::new(t0));
        let a = lapsing(&dir, Some(&state), 2 * HOUR, 2, &now);
        use_key(&a, "alice", 1, false).unwrap();
        use_key(&a, "alice", 2, false).unwrap();
        // Key 2 is used again later; key 1 is not.
        now.store(t0 + 5 * HOUR / 2, Relaxed);
        use_key(&a, "alice", 2, false).unwrap();
        flushed(&a);
        drop(a);

        // Restarted 3 h after t0: key 1 counts as used at start - 2 h + the 1 h grace.
        now.store(t0 + 3 * HOUR, Relaxed);
        let a = lapsing(&dir, Some(&state), 2 * HOUR, 2, &now);
        now.store(t0 + 4 * HOUR, Relaxed);
        use_key(&a, "alice", 3, false).expect("key 1 lapsed for key 3");
        let r = use_key(&a, "alice", 4, false).unwrap_err();
        assert_eq!(r.code, ErrorCode::QuotaExceeded, "{r:?}");
        assert!(
            r.message.contains("auth.claim_idle_ms (2 h)")
                && r.message.contains("whispeer-relay claims release"),
            "the refusal names the way out: {}",
            r.message
        );
        // Key 2's use at 2.5 h was written: it lapses only 2 h after that.
        now.store(t0 + 9 * HOUR / 2, Relaxed);
        use_key(&a, "alice", 4, false).expect("key 2 lapsed for key 4");
        assert_eq!(a.claims_released(), 2);
        // Released claims are anyone's again; the new ones are the group's.
        use_key(&a, "eve", 1, false).expect("key 1 is free");
        assert!(use_key(&a, "eve", 3, false).is_err(), "key 3 is home's");
        flushed(&a);
        let listed: Vec<(String, String)> = list_claims(&state)
            .unwrap()
            .into_iter()
            .map(|c| (c.key_id, c.group))
            .collect();
        let hexk = |k: u8| hex::encode([k; 16]);
        assert_eq!(
            listed,
            [
                (hexk(3), "home".to_string()),
                (hexk(4), "home".to_string()),
                (hexk(1), "other".to_string()),
            ]
        );
        drop(a);

        // Long after: still nothing lapses within the grace after a start.
        now.store(t0 + 10 * HOUR, Relaxed);
        let a = lapsing(&dir, Some(&state), 2 * HOUR, 2, &now);
        assert!(use_key(&a, "alice", 5, false).is_err(), "within the grace");
        now.store(t0 + 11 * HOUR, Relaxed);
        use_key(&a, "alice", 5, false).expect("after the grace");
        drop(a);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A claim a subscription holds is never looked at; one the store holds data under
    /// (or a durable owner) stays and counts as used, so each request looks at a bounded
    /// number of claims and the same ones are not looked at again before another idle
    /// period.
    #[test]
    fn holds_stored_data_and_durables_keep_claims_and_the_work_is_bounded() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = temp_file("holds").parent().unwrap().to_owned();
        let t0 = 1_700_000_000_000u64;
        let now = Arc::new(std::sync::atomic::AtomicU64::new(t0));
        let a = lapsing(&dir, None, 1000, 20, &now);
        let alice = a.current("alice").unwrap();
        let sub = |k: u8| {
            a.authorize_use(
                &alice,
                &KeyId::from_bytes([k; 16]),
                Rights::of(&[Right::Subscribe]),
                true,
                |_, _| Ok(Claim::NotShared),
                |_| Ok(false),
            )
            .unwrap()
            .hold
            .expect("a hold while claims may lapse")
        };
        // Held from its claim on, and held once claimed (two ways to a hold).
        let held0 = sub(0);
        use_key(&a, "alice", 1, false).unwrap();
        let held1 = sub(1);
        for k in 2..20 {
            use_key(&a, "alice", k, false).unwrap();
        }
        now.store(t0 + 2000, Relaxed);
        let asked = std::cell::RefCell::new(Vec::new());
        let ask = |k: u8, stored: &dyn Fn(&KeyId) -> bool| {
            a.authorize_use(
                &alice,
                &KeyId::from_bytes([k; 16]),
                Rights::of(&[Right::Publish]),
                false,
                |_, _| Ok(Claim::NotShared),
                |key| {
                    asked.borrow_mut().push(key.as_bytes()[0]);
                    Ok(stored(key))
                },
            )
        };
        let all = |_: &KeyId| true;
        assert!(ask(100, &all).is_err());
        assert_eq!(
            asked.take(),
            (2..=17).collect::<Vec<u8>>(),
            "oldest unheld first, 16 at most"
        );
        assert!(ask(100, &all).is_err());
        assert_eq!(asked.take(), [18, 19]);
        assert!(ask(100, &all).is_err());
        assert!(asked.take().is_empty(), "none is due again yet");

        // Held claims lapse only once unheld and idle; a durable owner keeps key 2.
        a.durable_owner(
            &KeyId::from_bytes([2; 16]),
            "d",
            Some("account:alice".into()),
        )
        .unwrap();
        drop((held0, held1));
        now.store(t0 + 3000, Relaxed);
        let none = |_: &KeyId| false;
        for k in [100, 101, 102] {
            ask(k, &none).expect("a claim lapsed");
        }
        assert!(
            !asked.take().contains(&2),
            "key 2 has a durable owner: the store is not even asked"
        );
        for k in [0, 1, 3] {
            use_key(&a, "eve", k, false).expect("lapsed: anyone's again");
        }
        assert!(use_key(&a, "eve", 2, false).is_err(), "key 2 is home's");
        assert_eq!(a.claims_released(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `auth.claim_idle_ms = 0`: nothing lapses, however long unused, and the refusal says
    /// so.
    #[test]
    fn claims_never_lapse_with_claim_idle_ms_0() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = temp_file("never").parent().unwrap().to_owned();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_000));
        let a = lapsing(&dir, None, 0, 1, &now);
        use_key(&a, "alice", 1, false).unwrap();
        now.store(u64::MAX / 2, Relaxed);
        let r = use_key(&a, "alice", 2, false).unwrap_err();
        assert!(r.message.contains("auth.claim_idle_ms = 0"), "{r:?}");
        assert!(a.state().groups.values().all(|g| g.idle.is_empty()));
        assert_eq!(a.claims_released(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Compaction keeps a released claim out, and its last use and creator in.
    #[test]
    fn compaction_drops_released_claims_and_keeps_last_uses() {
        let mut live = LiveState::default();
        let k = |b: u8| hex::encode([b; 16]);
        for line in [
            StateLine::Claim {
                key_id: k(1),
                group: "g".into(),
                used: None,
                by: None,
            },
            StateLine::Claim {
                key_id: k(2),
                group: "g".into(),
                used: Some(5),
                by: Some("account:a".into()),
            },
            StateLine::Used {
                key_id: k(2),
                at: 9,
            },
            StateLine::Release {
                key_id: k(1),
                group: "g".into(),
            },
            // Another group's release of key 2 does not touch g's claim.
            StateLine::Release {
                key_id: k(2),
                group: "h".into(),
            },
        ] {
            live.apply(&line);
        }
        let text = String::from_utf8(live.to_bytes()).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"t\":\"claim\",\"key_id\":\"{}\",\"group\":\"g\",\"used\":9,\
                 \"by\":\"account:a\"}}\n",
                k(2)
            )
        );
    }

    /// [`required`] with a fake clock (`auth.reload_ms` 1000).
    fn required_clocked(path: &Path, now: &Arc<std::sync::atomic::AtomicU64>) -> Accounts {
        let now = now.clone();
        Accounts::open_clocked(
            &AuthConfig {
                mode: AuthMode::Required,
                accounts: Some(path.to_owned()),
                reload_ms: 1000,
                ..AuthConfig::default()
            },
            Clock(Arc::new(move || {
                now.load(std::sync::atomic::Ordering::Relaxed)
            })),
        )
        .unwrap()
    }

    /// Attaches a connection per (name, token) and returns their queues (closing once
    /// revoked).
    fn attach_tokens(accounts: &Accounts, who: &[(&str, &[u8])]) -> Vec<Arc<Outbound>> {
        use crate::config::SlowConsumerPolicy;
        use crate::outbound::Budget;
        who.iter()
            .enumerate()
            .map(|(i, (name, t))| {
                let out = Arc::new(Outbound::new(
                    16,
                    1 << 20,
                    SlowConsumerPolicy::Drop,
                    Arc::new(Budget::new(0)),
                ));
                let (tx, _rx) = tokio::sync::mpsc::channel(1);
                let who = accounts.current(name).unwrap();
                assert!(accounts.attach(ConnId(i as u64), &who, Credential::token(t), &out, tx));
                out
            })
            .collect()
    }

    fn closing(conns: &[Arc<Outbound>]) -> Vec<bool> {
        conns.iter().map(|o| o.is_closing()).collect()
    }

    /// An invalid account list leaves the previous one in force, visibly (the gauge, the
    /// counter: once per changed text) — but an edit that removes an account or replaces
    /// a token and breaks another entry still revokes them: the invalid text names exactly
    /// who is left. Revocations from an invalid file wait for a second read of the same
    /// text a reload period later. Text that is not TOML revokes nothing.
    #[test]
    fn an_invalid_list_is_visible_and_still_revokes_what_it_no_longer_names() {
        use std::sync::atomic::Ordering::Relaxed;
        let path = temp_file("invalid");
        let tok = |t: &[u8]| hex::encode(token_hash(t));
        let list = |entries: &[(&str, &[u8], &str)]| {
            entries
                .iter()
                .map(|(name, token, rights)| {
                    format!(
                        "[[account]]\nname = \"{name}\"\ngroup = \"home\"\n\
                         token_sha256 = \"{}\"\nrights = [{rights}]\n",
                        tok(token)
                    )
                })
                .collect::<String>()
        };
        let all = "\"publish\", \"subscribe\"";
        std::fs::write(
            &path,
            list(&[
                ("alice", b"a1", all),
                ("bob", b"b", all),
                ("carol", b"c", all),
            ]),
        )
        .unwrap();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
        let accounts = required_clocked(&path, &now);
        let conns = attach_tokens(
            &accounts,
            &[("alice", b"a1"), ("bob", b"b"), ("carol", b"c")],
        );
        let valid = |a: &Accounts| (a.list_valid.load(Relaxed), a.reload_errors.load(Relaxed));
        assert_eq!(valid(&accounts), (true, 0));

        // bob removed, alice's token replaced, and a typo in carol's rights.
        std::fs::write(
            &path,
            list(&[
                ("alice", b"a2", all),
                ("carol", b"c", "\"pubish\", \"subscribe\""),
            ]),
        )
        .unwrap();
        assert!(accounts.reload().is_err());
        assert_eq!(valid(&accounts), (false, 1));
        assert!(accounts.current("bob").is_some(), "read once: nothing yet");
        // Read again a reload period later: now it holds.
        now.fetch_add(1000, Relaxed);
        assert_eq!(accounts.reload_if_changed().unwrap(), 2);
        assert_eq!(
            valid(&accounts),
            (false, 1),
            "the same text is counted once"
        );
        assert!(accounts.current("bob").is_none(), "bob was removed");
        assert!(
            accounts.by_token(b"a1").is_none(),
            "alice's old token revoked"
        );
        assert!(accounts.by_token(b"a2").is_none(), "nothing is added");
        assert!(accounts.by_token(b"c").is_some(), "carol stays as she was");
        assert_eq!(closing(&conns), [true, true, false]);
        let metrics = accounts.render_prometheus();
        assert!(
            metrics.contains("whispeer_relay_account_list_valid 0\n")
                && metrics.contains("whispeer_relay_account_reload_errors_total 1\n"),
            "{metrics}"
        );
        // The same text again is not counted again.
        accounts.reload_if_changed().unwrap();
        assert_eq!(valid(&accounts), (false, 1));

        // Not TOML: nobody is known to be removed, so nothing is revoked.
        std::fs::write(&path, "[[account]\nname = \"alice\"\n").unwrap();
        assert!(accounts.reload().is_err());
        now.fetch_add(1000, Relaxed);
        assert!(accounts.reload().is_err());
        assert_eq!(valid(&accounts), (false, 3));
        assert!(accounts.by_token(b"c").is_some());

        std::fs::write(&path, list(&[("alice", b"a2", all), ("carol", b"c", all)])).unwrap();
        accounts.reload().unwrap();
        assert_eq!(valid(&accounts), (true, 3));
        assert!(accounts.by_token(b"a2").is_some());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Accounts alice, bob and carol (ids ID1, ID2, ID3; alice with a key and a token, the
    /// others with tokens), as `account add` writes them: the entries' text.
    /// alice, bob and carol (ids and tokens `a`, `b`, `c`) in a file read by a clocked
    /// relay (`auth` required) starting at 1,000,000 ms, each with a connection attached.
    struct ThreeConnected {
        path: std::path::PathBuf,
        alice: String,
        bob: String,
        carol: String,
        /// The three entries, as written.
        all: String,
        now: Arc<std::sync::atomic::AtomicU64>,
        accounts: Accounts,
        conns: Vec<Arc<Outbound>>,
    }

    fn three_connected(tag: &str) -> ThreeConnected {
        let path = temp_file(tag);
        let [alice, bob, carol] = three_with_ids();
        let all = format!("{alice}{bob}{carol}");
        std::fs::write(&path, &all).unwrap();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
        let accounts = required_clocked(&path, &now);
        let conns = attach_tokens(
            &accounts,
            &[("alice", b"a"), ("bob", b"b"), ("carol", b"c")],
        );
        ThreeConnected {
            path,
            alice,
            bob,
            carol,
            all,
            now,
            accounts,
            conns,
        }
    }

    fn three_with_ids() -> [String; 3] {
        let tok = |t: &[u8]| hex::encode(token_hash(t));
        let alice_key = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[1; 32])
                .verifying_key()
                .as_bytes(),
        );
        [
            format!(
                "[[account]]\nname = \"alice\"\nid = \"{ID1}\"\ngroup = \"home\"\n\
                 key = \"{alice_key}\"\ntoken_sha256 = \"{}\"\n",
                tok(b"a")
            ),
            format!(
                "[[account]]\nname = \"bob\"\nid = \"{ID2}\"\ngroup = \"home\"\n\
                 token_sha256 = \"{}\"\n",
                tok(b"b")
            ),
            format!(
                "[[account]]\nname = \"carol\"\nid = \"{ID3}\"\ngroup = \"home\"\n\
                 token_sha256 = \"{}\"\n",
                tok(b"c")
            ),
        ]
    }

    const ID3: &str = "0123456789abcdef0123456789abcdef";

    /// Writes `text`, reads it twice a reload period apart (so its revocations apply),
    /// and returns the accounts left.
    fn read_twice(
        accounts: &Accounts,
        path: &Path,
        now: &Arc<std::sync::atomic::AtomicU64>,
        text: &str,
    ) -> Vec<String> {
        std::fs::write(path, text).unwrap();
        assert!(accounts.reload().is_err(), "invalid: {text}");
        now.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
        accounts.reload_if_changed().unwrap();
        let mut left: Vec<String> = accounts.table().by_name.keys().cloned().collect();
        left.sort();
        left
    }

    /// Review (M2): each entry of an invalid list is read on its own. bob's lines deleted
    /// but his `[[account]]` header left behind (or an entry with its `name` misspelled):
    /// before, one entry without a `name` made the whole text unreadable and nothing was
    /// revoked — bob stayed. Now a nameless entry that carries nothing of an account in
    /// force is ignored, and bob is revoked; carol's entry with `nmae` still carries her
    /// name, so she stays.
    #[test]
    fn a_nameless_entry_does_not_keep_a_removed_account() {
        let ThreeConnected {
            path,
            alice,
            bob,
            carol,
            now,
            accounts,
            conns,
            ..
        } = three_connected("nameless");
        let left = read_twice(
            &accounts,
            &path,
            &now,
            &format!("{alice}[[account]]\n{carol}"),
        );
        assert_eq!(left, ["alice", "carol"], "bob's header alone keeps nobody");
        assert_eq!(closing(&conns), [false, true, false]);

        let accounts = required_clocked(&path_reset(&path, &format!("{alice}{bob}{carol}")), &now);
        let misspelled = carol.replace("name = ", "nmae = ");
        let left = read_twice(&accounts, &path, &now, &format!("{alice}{misspelled}"));
        assert_eq!(
            left,
            ["alice", "carol"],
            "carol's entry still carries her name"
        );
        assert!(accounts.by_token(b"c").is_some());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Writes `text` to `path` and returns it.
    fn path_reset(path: &Path, text: &str) -> PathBuf {
        std::fs::write(path, text).unwrap();
        path.to_owned()
    }

    /// Review (M2): a slip inside an account's own entry keeps that account exactly as it
    /// was. Before, alice's entry with `idd` (or a stray character in her `id`) read as
    /// another identity and she was revoked, her connections closed; a stray character in
    /// her `key` line revoked that key. Now an entry that does not parse keeps every
    /// account whose name, id, key or token hash it carries, with all its credentials —
    /// while bob, removed in the same edit, is still revoked.
    #[test]
    fn a_typo_in_an_accounts_own_entry_keeps_it_as_it_was() {
        let path = temp_file("own-typo");
        let [alice, bob, carol] = three_with_ids();
        let all = format!("{alice}{bob}{carol}");
        std::fs::write(&path, &all).unwrap();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
        let alice_key = ed25519_dalek::SigningKey::from_bytes(&[1; 32])
            .verifying_key()
            .to_bytes();
        let key_hex = hex::encode(alice_key);
        for (what, typo) in [
            ("idd", alice.replace("id = ", "idd = ")),
            (
                "a stray character in id",
                alice.replace(ID1, &format!("{ID1}x")),
            ),
            (
                "a stray character in key",
                alice.replace(&key_hex, &format!("{key_hex}x")),
            ),
        ] {
            let accounts = required_clocked(&path_reset(&path, &all), &now);
            let conns = attach_tokens(&accounts, &[("alice", b"a"), ("bob", b"b")]);
            let left = read_twice(&accounts, &path, &now, &format!("{typo}{carol}"));
            assert_eq!(left, ["alice", "carol"], "{what}");
            assert_eq!(closing(&conns), [false, true], "{what}");
            assert!(accounts.by_token(b"a").is_some(), "{what}: alice's token");
            assert!(
                accounts.table().by_key.contains_key(&alice_key),
                "{what}: alice's key"
            );
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Review (M2, Low): a file written in place can be read mid-write, and a text cut
    /// after any entry would revoke every account after the cut. An invalid text read once
    /// revokes nothing — the write goes on and the next read sees the whole list — and the
    /// same text read again within a reload period neither; the same text stable across
    /// two reads a reload period apart does.
    #[test]
    fn an_invalid_text_read_mid_write_revokes_nothing_until_read_again() {
        use std::sync::atomic::Ordering::Relaxed;
        let ThreeConnected {
            path,
            all,
            now,
            accounts,
            conns,
            ..
        } = three_connected("mid-write");
        // Cut right after bob's name: bob's entry has no credential (invalid), carol is
        // not written yet.
        let cut = &all[..all.find("name = \"bob\"\n").unwrap() + "name = \"bob\"\n".len()];
        std::fs::write(&path, cut).unwrap();
        assert!(accounts.reload_if_changed().is_err());
        assert_eq!(closing(&conns), [false, false, false], "read once");
        now.fetch_add(999, Relaxed);
        accounts.reload_if_changed().unwrap();
        assert!(accounts.reload().is_err(), "a SIGHUP reads it too");
        assert_eq!(
            closing(&conns),
            [false, false, false],
            "within a reload period"
        );
        // The write ends: the whole list, and nobody was revoked.
        std::fs::write(&path, &all).unwrap();
        now.fetch_add(1000, Relaxed);
        accounts.reload_if_changed().unwrap();
        assert_eq!(closing(&conns), [false, false, false], "the write ended");
        assert!(accounts.current("carol").is_some());

        // The same cut, stable across two reads a reload period apart: carol is revoked.
        std::fs::write(&path, cut).unwrap();
        assert!(accounts.reload_if_changed().is_err());
        assert_eq!(closing(&conns), [false, false, false]);
        now.fetch_add(1000, Relaxed);
        assert_eq!(accounts.reload_if_changed().unwrap(), 1);
        assert_eq!(closing(&conns), [false, false, true]);
        assert!(
            accounts.current("bob").is_some(),
            "bob's entry carries his name"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    const ID4: &str = "fedcba9876543210fedcba9876543210";

    /// A file cut at an entry boundary — an editor writing in place, a truncated copy, an
    /// emptied file — is a valid list. Before, its first read revoked every account after
    /// the cut and closed their connections. Now a valid list's revocations (an account
    /// removed, a token no longer listed, a right taken away) wait until the same text is
    /// read again a reload period later, while what it adds applies at once; an operator's
    /// real removal still takes effect, one reload period later; SIGHUP applies a list in
    /// full at once.
    #[test]
    fn a_valid_list_cut_short_revokes_nothing_until_read_again() {
        use std::sync::atomic::Ordering::Relaxed;
        let ThreeConnected {
            path,
            alice,
            carol,
            all,
            now,
            accounts,
            conns,
            ..
        } = three_connected("valid-cut");
        let held = |a: &Accounts| {
            (
                a.revocations_held.load(Relaxed),
                a.revocations_deferred.load(Relaxed),
            )
        };
        for (n, cut) in [alice.clone(), String::new()].into_iter().enumerate() {
            std::fs::write(&path, &cut).unwrap();
            assert_eq!(accounts.reload_if_changed().unwrap(), 0);
            assert_eq!(closing(&conns), [false, false, false], "read once: {cut:?}");
            assert!(accounts.current("carol").is_some() && accounts.by_token(b"b").is_some());
            assert_eq!(held(&accounts), (if n == 0 { 2 } else { 3 }, n as u64 + 1));
            assert!(accounts
                .render_prometheus()
                .contains("whispeer_relay_account_revocations_held "));
            now.fetch_add(999, Relaxed);
            accounts.reload_if_changed().unwrap();
            assert_eq!(closing(&conns), [false, false, false], "within a period");
            // The write ends: the whole list, and nobody was revoked.
            std::fs::write(&path, &all).unwrap();
            now.fetch_add(1000, Relaxed);
            assert_eq!(accounts.reload_if_changed().unwrap(), 0);
            assert_eq!(closing(&conns), [false, false, false], "the write ended");
            assert_eq!(held(&accounts).0, 0);
        }

        // The operator's own edit: bob removed, carol's token rotated, alice's subscribe
        // right taken away, dave added.
        let tok = |t: &[u8]| hex::encode(token_hash(t));
        let dave = format!(
            "[[account]]\nname = \"dave\"\nid = \"{ID4}\"\ntoken_sha256 = \"{}\"\n",
            tok(b"d")
        );
        let alice2 = format!("{alice}rights = [\"publish\"]\n");
        let carol2 = carol.replace(&tok(b"c"), &tok(b"c2"));
        std::fs::write(&path, format!("{alice2}{carol2}{dave}")).unwrap();
        assert_eq!(accounts.reload_if_changed().unwrap(), 0);
        assert!(accounts.by_token(b"d").is_some(), "dave is added at once");
        assert!(
            accounts.by_token(b"c2").is_some(),
            "so is carol's new token"
        );
        assert!(accounts.by_token(b"c").is_some() && accounts.current("bob").is_some());
        let sub = Rights::of(&[Right::Subscribe]);
        assert!(accounts.current("alice").unwrap().rights.contains(sub));
        assert_eq!(closing(&conns), [false, false, false]);
        assert_eq!(
            held(&accounts),
            (1 + 1 + 1, 3),
            "bob and alice; carol's token (a credential rotation counts too)"
        );
        // A reload period later, the same text: now it holds.
        now.fetch_add(1000, Relaxed);
        assert_eq!(accounts.reload_if_changed().unwrap(), 2);
        assert_eq!(closing(&conns), [false, true, true]);
        assert!(accounts.current("bob").is_none() && accounts.by_token(b"c").is_none());
        assert!(!accounts.current("alice").unwrap().rights.contains(sub));
        assert!(accounts.by_token(b"c2").is_some() && accounts.by_token(b"d").is_some());
        assert_eq!(held(&accounts), (0, 3));

        // SIGHUP: the operator says the file is complete; it applies in full at once.
        std::fs::write(&path, format!("{alice2}{carol2}")).unwrap();
        accounts.reload().unwrap();
        assert!(accounts.current("dave").is_none());
        assert_eq!(held(&accounts), (0, 3));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Review (97aead4, Medium): a valid list's revocations waited until the **same text**
    /// was read twice a reload period apart, and any other text started the wait over — so
    /// a tool rewriting the file every second (a timestamp, a comment) or accounts being
    /// added kept a removed account, or a rotated token, in force and connected for good.
    /// Now the wait is keyed on what is revoked: edits elsewhere neither restart nor
    /// extend it, and a revocation every read repeats applies within two reload periods
    /// of its first read. The gauge counts a held credential rotation too. A file cut
    /// short and then restored (other text) still revokes nothing, however long ago the
    /// cut was first read.
    #[test]
    fn revocations_hold_through_unrelated_edits_and_apply_within_the_bound() {
        use std::sync::atomic::Ordering::Relaxed;
        let ThreeConnected {
            path,
            alice,
            carol,
            all,
            now,
            accounts,
            conns,
            ..
        } = three_connected("held-edits");
        let tok = |t: &[u8]| hex::encode(token_hash(t));
        let carol2 = carol.replace(&tok(b"c"), &tok(b"c2"));
        let dave = format!(
            "[[account]]\nname = \"dave\"\nid = \"{ID4}\"\ntoken_sha256 = \"{}\"\n",
            tok(b"d")
        );

        // A cut file (bob and carol gone), then the whole list restored with another
        // comment: nothing is revoked, then or later.
        std::fs::write(&path, format!("# t=0\n{alice}")).unwrap();
        assert_eq!(accounts.reload_if_changed().unwrap(), 0);
        assert_eq!(accounts.revocations_held.load(Relaxed), 2);
        now.fetch_add(400, Relaxed);
        std::fs::write(&path, format!("# t=1\n{all}")).unwrap();
        assert_eq!(accounts.reload_if_changed().unwrap(), 0);
        assert_eq!(accounts.revocations_held.load(Relaxed), 0);
        for t in 2..6 {
            now.fetch_add(1000, Relaxed);
            std::fs::write(&path, format!("# t={t}\n{all}")).unwrap();
            assert_eq!(accounts.reload_if_changed().unwrap(), 0);
        }
        // Cut again, long after the first cut was read: its first read revokes nothing.
        std::fs::write(&path, format!("# t=6\n{alice}")).unwrap();
        assert_eq!(accounts.reload_if_changed().unwrap(), 0);
        std::fs::write(&path, format!("# t=7\n{all}")).unwrap();
        assert_eq!(accounts.reload_if_changed().unwrap(), 0);
        assert_eq!(
            closing(&conns),
            [false, false, false],
            "a cut revokes nothing"
        );
        assert!(accounts.current("bob").is_some() && accounts.by_token(b"c").is_some());

        // The operator removes bob and rotates carol's token; a tool rewrites the file's
        // comment every 300 ms, and dave is onboarded meanwhile.
        let start = now.load(Relaxed);
        let mut revoked_at = None;
        for t in 0..12u64 {
            let extra = if t >= 2 { dave.as_str() } else { "" };
            std::fs::write(&path, format!("# rewritten {t}\n{alice}{carol2}{extra}")).unwrap();
            let closed = accounts.reload_if_changed().unwrap();
            let elapsed = now.load(Relaxed) - start;
            if elapsed < 1000 {
                assert_eq!(closed, 0, "held within a reload period ({elapsed} ms)");
                assert!(accounts.current("bob").is_some() && accounts.by_token(b"c").is_some());
                assert_eq!(
                    accounts.revocations_held.load(Relaxed),
                    2,
                    "bob, and carol's old token"
                );
            } else if revoked_at.is_none() {
                assert_eq!(closed, 2, "applied at the first read a period later");
                revoked_at = Some(elapsed);
            }
            assert!(
                accounts.by_token(b"c2").is_some(),
                "carol's new token at once"
            );
            assert_eq!(accounts.by_token(b"d").is_some(), t >= 2, "dave at once");
            now.fetch_add(300, Relaxed);
        }
        assert!(revoked_at.is_some_and(|e| e < 2000), "{revoked_at:?}");
        assert_eq!(closing(&conns), [false, true, true]);
        assert!(accounts.current("bob").is_none() && accounts.by_token(b"c").is_none());
        assert_eq!(accounts.revocations_held.load(Relaxed), 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Whether a process other than the lock's holder could take the auth-state file's
    /// lock now (a fresh open file description, as `claims release` makes).
    fn lockable(path: &Path) -> bool {
        try_lock(&File::open(path).unwrap()).unwrap()
    }

    /// Review (L1): the relay's lock on its state file holds through a compaction — the
    /// temporary file is locked before it takes the file's name and that very handle is
    /// kept — so no other process can take it in between, right after the rename or
    /// after. (Before, the temporary file's handle closed with its lock after the rename
    /// and the file was opened and locked again, the lock's failure ignored: a `claims
    /// release` could take the lock in that gap and append lines the relay's next
    /// compaction erased.) The writer thread's own compaction keeps it too.
    #[cfg(unix)]
    #[test]
    fn the_state_files_lock_is_held_through_a_compaction() {
        let dir = temp_file("lock").parent().unwrap().to_owned();
        let path = dir.join("auth-state");
        let _ = std::fs::remove_file(&path);
        let mut old = open_locked(&path).unwrap().expect("not locked yet");
        old.write_all(b"{}\n{}\n").unwrap();
        assert!(!lockable(&path), "locked by the relay");
        assert!(
            open_locked(&path).unwrap().is_none(),
            "a second locker is refused"
        );
        let mut during = None;
        let new = compact_then(&path, b"{}\n", || during = Some(lockable(&path))).unwrap();
        // The writer thread drops the old file's handle once compacted.
        drop(old);
        assert_eq!(during, Some(false), "lockable right after the rename");
        assert!(!lockable(&path), "lockable after the compaction");
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
        drop(new);
        assert!(lockable(&path), "released with the relay's handle");

        // The writer thread: owners made and deleted until the file is compacted.
        let _ = std::fs::remove_file(&path);
        let st = AuthState::open(Some(&path)).unwrap();
        let ino = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().ino()
        };
        let first = ino(&path);
        let st = Mutex::new(st);
        let mut i = 0u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while ino(&path) == first {
            assert!(std::time::Instant::now() < deadline, "never compacted");
            let mut s = st.lock().unwrap();
            for _ in 0..64 {
                i += 1;
                let key_id = hex::encode([7u8; 16]);
                let name = format!("durable-{i}-{}", "x".repeat(100));
                s.append(&StateLine::Owner {
                    key_id: key_id.clone(),
                    name: name.clone(),
                    owner: "o".into(),
                });
                s.append(&StateLine::Disown { key_id, name });
            }
            let (sent, mut rx) = {
                let w = s.writer.as_ref().unwrap();
                (w.sent, w.durable.clone())
            };
            drop(s);
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(rx.wait_for(|n| *n >= sent))
                .unwrap();
        }
        assert!(
            !lockable(&path),
            "still locked after the writer's compaction"
        );
        drop(st);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Accounts alice, bob and carol (legacy entries) sharing group "home", and dan alone
    /// in "solo": at most `max` claims per group and `per` per member, lapsing after
    /// `idle_ms`, measured by `now`; the state file `state` if any.
    fn members(
        dir: &Path,
        state: Option<&Path>,
        idle_ms: u64,
        (max, per): (usize, usize),
        now: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Accounts {
        clocked(
            dir,
            vec![
                entry("alice", None, Some(b"a")),
                entry("bob", None, Some(b"b")),
                entry("carol", None, Some(b"c")),
                AccountEntry {
                    group: Some("solo".into()),
                    ..entry("dan", None, Some(b"d"))
                },
            ],
            state,
            idle_ms,
            (max, per),
            now,
        )
    }

    /// Accounts `entries` (their file in `dir`) with claims lapsing after `idle_ms`, at most
    /// `max` per group and `per` per member, measured by the clock `now` (Unix ms); the
    /// state file `state` if any.
    fn clocked(
        dir: &Path,
        entries: Vec<AccountEntry>,
        state: Option<&Path>,
        idle_ms: u64,
        (max, per): (usize, usize),
        now: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Accounts {
        let path = dir.join("accounts.toml");
        AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: entries,
        }
        .save(&path)
        .unwrap();
        let now = now.clone();
        Accounts::open_clocked(
            &AuthConfig {
                mode: AuthMode::Required,
                accounts: Some(path),
                state: state.map(Path::to_owned),
                max_claims_per_group: max,
                max_claims_per_account: per,
                claim_idle_ms: idle_ms,
                ..AuthConfig::default()
            },
            Clock(Arc::new(move || {
                now.load(std::sync::atomic::Ordering::Relaxed)
            })),
        )
        .unwrap()
    }

    /// `name` subscribes on key id `[k; 16]`: the hold its subscription keeps.
    fn sub_key(a: &Accounts, name: &str, k: u8) -> Result<Granted, Refusal> {
        a.authorize_use(
            &a.current(name).unwrap(),
            &KeyId::from_bytes([k; 16]),
            Rights::of(&[Right::Subscribe]),
            true,
            |_, _| Ok(Claim::NotShared),
            |_| Ok(false),
        )
    }

    /// Review (M1): holds never lapse, so one member subscribed on junk key ids and staying
    /// connected kept its group at `max_claims_per_group` for good. Now a member of a
    /// shared group makes at most `max_claims_per_account` of its claims (default: a
    /// quarter of the group's limit) and another member still claims new key ids; a refusal
    /// tells the client whether it holds the most itself (the log names the account). An account alone
    /// in its group is bounded by the group's limit only.
    #[test]
    fn one_member_cannot_fill_a_shared_groups_claims() {
        let dir = temp_file("member-cap").parent().unwrap().to_owned();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000));
        let a = members(&dir, None, 1000, (8, 2), &now);
        let held: Vec<Granted> = [1, 2].map(|k| sub_key(&a, "alice", k).unwrap()).into();
        let r = sub_key(&a, "alice", 3).unwrap_err();
        assert_eq!(r.code, ErrorCode::QuotaExceeded, "{r:?}");
        assert!(
            r.message.contains("auth.max_claims_per_account = 2")
                && r.message.contains("this account, with 2"),
            "{}",
            r.message
        );
        // However long: the held ones never lapse, and another member still claims.
        now.fetch_add(10 * HOUR, std::sync::atomic::Ordering::Relaxed);
        assert!(sub_key(&a, "alice", 3).is_err());
        use_key(&a, "bob", 10, false).expect("another member claims a new key id");
        // Alone in its group: up to the group's limit.
        for k in 20..28 {
            use_key(&a, "dan", k, false).expect("dan is alone in his group");
        }
        drop(held);

        // The group's limit: the refusal names the member holding the most.
        let dir2 = dir.join("group");
        std::fs::create_dir_all(&dir2).unwrap();
        let a = members(&dir2, None, 0, (5, 3), &now);
        for (name, k) in [
            ("alice", 1),
            ("alice", 2),
            ("alice", 3),
            ("bob", 10),
            ("carol", 20),
        ] {
            use_key(&a, name, k, false).unwrap();
        }
        let r = use_key(&a, "carol", 21, false).unwrap_err();
        // Carol is told another member holds the most, not who (the log names alice).
        assert!(
            r.message.contains("auth.max_claims_per_group = 5")
                && r.message.contains("another member, with 3")
                && !r.message.contains("alice"),
            "{}",
            r.message
        );
        let r = use_key(&a, "alice", 4, false).unwrap_err();
        assert!(r.message.contains("this account, with 3"), "{}", r.message);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// At its own limit a member's new key id takes the place of its own longest-unused
    /// claim (as claim_idle_ms allows), never another member's, older as that may be.
    #[test]
    fn at_its_limit_a_members_own_idle_claim_lapses() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = temp_file("member-lapse").parent().unwrap().to_owned();
        let t0 = 1_700_000_000_000u64;
        let now = Arc::new(std::sync::atomic::AtomicU64::new(t0));
        let a = members(&dir, None, 1000, (10, 2), &now);
        use_key(&a, "bob", 5, false).unwrap();
        now.store(t0 + 10, Relaxed);
        use_key(&a, "alice", 1, false).unwrap();
        use_key(&a, "alice", 2, false).unwrap();
        now.store(t0 + 2000, Relaxed);
        use_key(&a, "alice", 3, false).expect("alice's key 1 lapsed");
        assert_eq!(a.claims_released(), 1);
        use_key(&a, "dan", 1, false).expect("key 1 is anyone's again");
        assert!(
            use_key(&a, "dan", 5, false).is_err(),
            "bob's key 5 stays home's"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Session 42's note holds: a removed account's own group (`account-id:…`) kept its
    /// key-id claims until an operator ran `claims release` — claims lapse only for a
    /// member's new key id, and no member is left — so every other group was refused those
    /// key ids (the epochs the account shared with others). Now another group's request
    /// for such a key id releases the claim, under `release_one`'s rules less the idle
    /// time: not while a subscription holds it, a durable is recorded under it or the
    /// store holds something under it (each looked at again at the next request); a
    /// `release` line makes a restart agree. An explicit group keeps its claims (an
    /// operator gives it again on purpose), and so does an id under a new name.
    #[test]
    fn a_revoked_accounts_own_group_gives_its_claims_up_to_another_group() {
        let dir = temp_file("revoked-claims").parent().unwrap().to_owned();
        let state = dir.join("auth-state");
        let _ = std::fs::remove_file(&state);
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000));
        let own = |name: &str, id: &str, t: &'static [u8]| AccountEntry {
            id: Some(id.into()),
            group: None,
            ..entry(name, None, Some(t))
        };
        let bob = own("bob", ID2, b"b");
        let carol = AccountEntry {
            id: Some(ID3.into()),
            ..entry("carol", None, Some(b"c"))
        };
        let entries = vec![
            own("alice", ID1, b"a"),
            bob.clone(),
            carol,
            own("dave", ID4, b"d"),
        ];
        let a = clocked(&dir, entries, Some(&state), HOUR, (100, 100), &now);
        use_key(&a, "alice", 1, true).unwrap();
        let held = sub_key(&a, "alice", 2).unwrap().hold.expect("a hold");
        use_key(&a, "alice", 3, true).unwrap();
        let alice = a.current("alice").unwrap();
        a.durable_owner(&KeyId::from_bytes([3; 16]), "d", Some(alice.owner()))
            .unwrap();
        use_key(&a, "alice", 6, true).unwrap();
        use_key(&a, "carol", 4, true).unwrap();
        use_key(&a, "dave", 5, true).unwrap();
        assert!(
            use_key(&a, "bob", 1, false).is_err(),
            "alice's, while listed"
        );

        // alice and carol removed, dave renamed david (same id); a SIGHUP applies it.
        AccountFile {
            retired_groups: Vec::new(),
            legacy_groups: Vec::new(),
            account: vec![bob, own("david", ID4, b"d")],
        }
        .save(&dir.join("accounts.toml"))
        .unwrap();
        a.reload().unwrap();
        use_key(&a, "bob", 1, false).expect("alice's claim is released for bob");
        assert!(
            use_key(&a, "bob", 2, false).is_err(),
            "a subscription holds it"
        );
        drop(held);
        use_key(&a, "bob", 2, false).expect("released once its subscription ended");
        assert!(use_key(&a, "bob", 3, false).is_err(), "a durable under it");
        assert!(a.forget_durable_owner(&KeyId::from_bytes([3; 16]), "d", || true));
        use_key(&a, "bob", 3, false).expect("released once its durable was deleted");
        assert!(
            use_key(&a, "bob", 6, true).is_err(),
            "something stored under it"
        );
        use_key(&a, "bob", 6, false).expect("released once the store holds nothing");
        assert!(
            use_key(&a, "bob", 4, false).is_err(),
            "an explicit group keeps its claims"
        );
        assert!(
            use_key(&a, "bob", 5, false).is_err(),
            "dave's id is david's"
        );
        use_key(&a, "david", 5, false).expect("the same group");
        assert!(
            a.render_prometheus()
                .contains("whispeer_relay_claims_released_revoked_total 4\n"),
            "{}",
            a.render_prometheus()
        );
        assert_eq!(a.claims_released(), 0, "none lapsed");
        flushed(&a);
        drop(a);
        // A restart agrees (the state file's release lines).
        let groups: Vec<(String, String)> = list_claims(&state)
            .unwrap()
            .into_iter()
            .map(|c| (c.key_id, c.group))
            .collect();
        let hexk = |k: u8| hex::encode([k; 16]);
        let id = |h: &str| id_group(&parse_id(h).unwrap());
        let mut want = vec![
            (hexk(1), id(ID2)),
            (hexk(2), id(ID2)),
            (hexk(3), id(ID2)),
            (hexk(6), id(ID2)),
            (hexk(5), id(ID4)),
            (hexk(4), "home".to_string()),
        ];
        want.sort_by(|x, y| (&x.1, &x.0).cmp(&(&y.1, &y.0)));
        assert_eq!(groups, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review of dd9d279 (Low): the revoked account's claim was released before the
    /// requesting group's room was checked, so a request refused at its group's limit had
    /// already released it (a `release` line, the counter, a log line saying it was
    /// released for another group). Now it is released only once the request has room.
    /// And an `account-id:` group without members counted as revoked — also that of an
    /// account in force moved to an explicit group, whose key ids another group then took
    /// (moving it back found them gone). Now revoked means: its id is no account's in
    /// force.
    #[test]
    fn a_revoked_claim_is_released_only_for_a_granted_request_of_a_revoked_id() {
        let dir = temp_file("revoked-room").parent().unwrap().to_owned();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000));
        let own = |name: &str, id: &str, t: &'static [u8]| AccountEntry {
            id: Some(id.into()),
            group: None,
            ..entry(name, None, Some(t))
        };
        let save = |entries: Vec<AccountEntry>| {
            AccountFile {
                retired_groups: Vec::new(),
                legacy_groups: Vec::new(),
                account: entries,
            }
            .save(&dir.join("accounts.toml"))
            .unwrap();
        };
        let released = |a: &Accounts| a.state().revoked_released;
        let group_of =
            |a: &Accounts, k: u8| a.state().claims.get(&[k; 16]).map(|e| e.group.clone());
        let alice_group = id_group(&parse_id(ID1).unwrap());

        // Bob's group is at its limit (1): his request for alice's key id is refused, and
        // her claim stays hers.
        let a = clocked(
            &dir,
            vec![own("alice", ID1, b"a"), own("bob", ID2, b"b")],
            None,
            HOUR,
            (1, 1),
            &now,
        );
        use_key(&a, "alice", 1, false).unwrap();
        use_key(&a, "bob", 7, false).unwrap();
        save(vec![own("bob", ID2, b"b")]);
        a.reload().unwrap();
        let r = use_key(&a, "bob", 1, false).unwrap_err();
        assert_eq!(r.code, ErrorCode::QuotaExceeded, "{r:?}");
        assert_eq!(released(&a), 0, "nothing released for a refused request");
        assert_eq!(group_of(&a, 1), Some(alice_group.clone()));
        // With room (bob's claim lapsed), it is released for him.
        now.fetch_add(HOUR, std::sync::atomic::Ordering::Relaxed);
        use_key(&a, "bob", 1, false).expect("room made, then alice's claim released");
        assert_eq!(released(&a), 1);
        assert_eq!(group_of(&a, 1), Some(id_group(&parse_id(ID2).unwrap())));
        drop(a);

        // Alice, in force, moved to an explicit group: her own group keeps its claims.
        let a = clocked(
            &dir,
            vec![own("alice", ID1, b"a"), own("bob", ID2, b"b")],
            None,
            HOUR,
            (100, 100),
            &now,
        );
        use_key(&a, "alice", 1, false).unwrap();
        let moved = AccountEntry {
            group: Some("team".into()),
            ..own("alice", ID1, b"a")
        };
        save(vec![moved, own("bob", ID2, b"b")]);
        a.reload().unwrap();
        assert!(
            use_key(&a, "bob", 1, false).is_err(),
            "alice is in force: her own group's claim is not released"
        );
        assert_eq!(released(&a), 0);
        save(vec![own("alice", ID1, b"a"), own("bob", ID2, b"b")]);
        a.reload().unwrap();
        assert_eq!(group_of(&a, 1), Some(alice_group));
        use_key(&a, "alice", 1, false).expect("moved back: her key id is still hers");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Dropping the accounts writes their last lines and unlocks the state file before it
    /// returns: opened again at once (a relay restarted in the same process), the file is
    /// not `Locked` and holds every claim. The writer thread used to let go of the file
    /// only once it noticed the end, and an open right after the drop was refused under
    /// load (CI, once; without the wait this test fails in its first round here).
    #[test]
    fn a_dropped_state_file_is_unlocked_and_complete_at_once() {
        let dir = temp_file("drop-unlocks").parent().unwrap().to_owned();
        let state = dir.join("auth-state");
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000));
        for round in 0u8..40 {
            let a = members(&dir, Some(&state), 0, (100, 100), &now);
            // Not waited for: the drop must write it.
            use_key(&a, "alice", round, false).unwrap();
            drop(a);
            let a = members(&dir, Some(&state), 0, (100, 100), &now);
            drop(a);
            let claims = list_claims(&state).unwrap();
            assert_eq!(claims.len(), usize::from(round) + 1, "round {round}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Each claim's creator is in the state file (`by`), so a restart counts a member's
    /// claims again; a line without one (an older file) counts for the group only. `claims
    /// list` shows creators.
    #[test]
    fn creators_survive_a_restart_and_older_lines_count_for_the_group() {
        let dir = temp_file("member-restart").parent().unwrap().to_owned();
        let state = dir.join("auth-state");
        std::fs::write(
            &state,
            format!(
                "{{\"t\":\"claim\",\"key_id\":\"{}\",\"group\":\"home\"}}\n",
                hex::encode([9u8; 16])
            ),
        )
        .unwrap();
        let now = Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000));
        let a = members(&dir, Some(&state), 0, (4, 2), &now);
        use_key(&a, "alice", 1, false).unwrap();
        use_key(&a, "alice", 2, false).unwrap();
        flushed(&a);
        drop(a);
        let a = members(&dir, Some(&state), 0, (4, 2), &now);
        let r = use_key(&a, "alice", 3, false).unwrap_err();
        assert!(r.message.contains("max_claims_per_account"), "{r:?}");
        use_key(&a, "bob", 10, false).expect("the group holds 3 of 4");
        let r = use_key(&a, "carol", 20, false).unwrap_err();
        assert!(r.message.contains("max_claims_per_group"), "{r:?}");
        flushed(&a);
        let by: Vec<(String, Option<String>)> = list_claims(&state)
            .unwrap()
            .into_iter()
            .map(|c| (c.key_id, c.by))
            .collect();
        let hexk = |k: u8| hex::encode([k; 16]);
        let alice = Some("account:alice".to_string());
        assert_eq!(
            by,
            [
                (hexk(1), alice.clone()),
                (hexk(2), alice),
                (hexk(9), None),
                (hexk(10), Some("account:bob".to_string())),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
