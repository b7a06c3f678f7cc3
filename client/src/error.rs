//! One error enum per failure domain.

use thiserror::Error;
use whispeer_protocol::{ErrorCode, KeyError, SealError, TopicError};

/// The underlying error a variant keeps as its [`source`](std::error::Error::source) (from
/// the library that failed: `url`, `rustls`, `tungstenite`...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why connecting to a relay failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not `ws://`, `wss://`, `tcp://` or `tls://` with a host and port.
    #[error("invalid relay URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
        /// The URL parser's error, when it refused the URL.
        #[source]
        source: Option<BoxError>,
    },
    /// The socket could not be opened.
    #[error("cannot reach relay at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// TLS setup or handshake failed.
    #[error("TLS error: {message}")]
    Tls {
        /// What failed, and what to do about it.
        message: String,
        /// The TLS library's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The WebSocket handshake failed.
    #[error("WebSocket handshake failed: {source}")]
    WebSocket {
        /// The WebSocket library's error.
        #[source]
        source: BoxError,
    },
    /// The relay answered the handshake with an error.
    #[error("relay refused the connection: {message} ({code:?})")]
    Rejected { code: ErrorCode, message: String },
    /// The relay closed or sent something unexpected during the handshake.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The client would not sign the relay's `Challenge` with its account key: the sign-in
    /// could not be bound to the relay's name (PROTOCOL §3.5.6) — binding is required
    /// ([`ClientBuilder::require_bound_auth`](crate::ClientBuilder::require_bound_auth))
    /// and the relay does not ask for it, or it asks and the address has no relay name.
    #[error("relay account sign-in refused: {0}")]
    AuthNotBound(AuthNotBound),
    /// No answer within the connect timeout.
    #[error("relay did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The builder was given no transport.
    #[error("no transport configured: add .with(WebSocket::new(url)) or .with(Tcp::new(addr))")]
    NoTransport,
    /// The client state file (`Persistence`) could not be opened.
    #[cfg(feature = "persistence")]
    #[error(transparent)]
    State(#[from] PersistError),
    /// The keyring cannot be used with the client state: e.g. a grant of a tree whose
    /// admin pinned in the state file is another key ([`KeyError::AdminMismatch`]).
    #[error("keyring: {0}")]
    Keys(#[from] KeyError),
}

/// Why a publish failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic name is invalid.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// No key covers the topic, or another key problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Sealing failed (payload too large, compression).
    #[error(transparent)]
    Seal(SealError),
    /// The value could not be serialized to CBOR.
    #[error("cannot serialize value: {0}")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// The relay refused the message.
    #[error("relay refused the publish: {message} ({code:?})")]
    Rejected { code: ErrorCode, message: String },
    /// The client is closed.
    #[error("client is closed")]
    Closed,
    /// The outbox for disconnected periods is full.
    #[error("not connected and the reconnect buffer ({0} bytes) is full")]
    BufferFull(usize),
    /// The connection dropped before the relay acknowledged the message.
    #[error("connection lost before the relay acknowledged the message")]
    NotAcknowledged,
    /// A client plugin refused the message.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A type's tag cannot be carried in a content type.
    #[error("unusable type tag: {0}")]
    TypeTag(String),
    /// The topic is a typed topic (`topic::<T>()`) of another type.
    #[error("topic {topic:?} carries type {expected:?}, not {found:?}")]
    TypeMismatch {
        /// The topic.
        topic: String,
        /// The tag the topic was registered with.
        expected: String,
        /// The type (or tag) given.
        found: String,
    },
}

impl From<SealError> for PublishError {
    fn from(e: SealError) -> Self {
        match e {
            SealError::Key(k) => PublishError::Key(k),
            e => PublishError::Seal(e),
        }
    }
}

/// Why a subscription could not be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The filter is invalid.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// No held grant could cover any topic matching the filter.
    #[error("no key covers any topic matching '{filter}' (add a grant for it)")]
    NoKey { filter: String },
    /// A key error: [`KeyError::AmbiguousTree`] when grants of several trees overlap the
    /// filter and the subscription names none (`SubscribeOptions::tree`): a subscription
    /// is bound to one tree, as a publish is (PROTOCOL §4.11).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The relay refused the subscription.
    #[error("relay refused the subscription: {message} ({code:?})")]
    Rejected { code: ErrorCode, message: String },
    /// The client is closed.
    #[error("client is closed")]
    Closed,
    /// A client plugin refused the subscription.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// Why a delivered message could not be turned into the subscriber's type. Two errors are
/// equal when they say the same (the decoder's `source` is not compared).
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The message's content type is not what this subscription decodes.
    #[error("message has content type {found:?}; this subscription expects {expected:?}")]
    ContentType {
        expected: &'static str,
        found: String,
    },
    /// The CBOR payload does not fit the subscriber's type.
    #[error("cannot decode message on {topic} as the subscribed type: {reason}")]
    Decode {
        /// The message's topic.
        topic: String,
        /// What the decoder said.
        reason: String,
        /// The decoder's error.
        #[source]
        source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// This many messages were lost before the next one; the stream goes on. At most once:
    /// the subscription's buffer was full, or the relay dropped them for a slow consumer.
    /// Any subscription: messages the relay's store did not keep, skipped while the relay
    /// had it paused (a `Gap` naming it); messages held back from it for another
    /// subscription of the connection that never came again (`CoreStats::withheld_lost`);
    /// unnumbered messages (live-only with the cluster's JetStream store) it had no room
    /// for or the relay dropped (PROTOCOL §3.3.11, §3.5.5, §4.11).
    #[error("subscription fell behind: {0} messages lost")]
    Lagged(u64),
    /// The relay ended this subscription: a durable subscription was refused on a resume
    /// (a reconnect, a failover) with a code retrying cannot change — for example
    /// `not_allowed`, its owner differs at the relay now used. The stream ends after this.
    #[error("the relay ended the subscription: {message} ({code:?})")]
    Ended {
        /// The relay's code.
        code: ErrorCode,
        /// The relay's detail.
        message: String,
    },
    /// A typed subscription received a message of another type (another tag, or none):
    /// refused, counted in `ClientStats::type_mismatches`, never decoded.
    #[error("message on {topic} has type {found:?}; this subscription takes {expected:?}")]
    TypeMismatch {
        /// The message's topic.
        topic: String,
        /// The subscription's type tag.
        expected: &'static str,
        /// The message's content type.
        found: String,
    },
}

impl PartialEq for ReceiveError {
    fn eq(&self, other: &Self) -> bool {
        use ReceiveError::*;
        match (self, other) {
            (
                ContentType { expected, found },
                ContentType {
                    expected: e,
                    found: f,
                },
            ) => expected == e && found == f,
            (
                Decode { topic, reason, .. },
                Decode {
                    topic: t,
                    reason: r,
                    ..
                },
            ) => topic == t && reason == r,
            (Lagged(a), Lagged(b)) => a == b,
            (
                Ended { code, message },
                Ended {
                    code: c,
                    message: m,
                },
            ) => code == c && message == m,
            (
                TypeMismatch {
                    topic,
                    expected,
                    found,
                },
                TypeMismatch {
                    topic: t,
                    expected: e,
                    found: f,
                },
            ) => topic == t && expected == e && found == f,
            _ => false,
        }
    }
}

impl Eq for ReceiveError {}

/// Why a flush or close did not complete.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The client is closed.
    #[error("client is closed")]
    Closed,
    /// The connection dropped before the relay answered.
    #[error("connection lost during flush")]
    Disconnected,
}

/// Why deleting a durable subscription ([`crate::Subscription::delete_durable`]) failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeleteError {
    /// The client is closed.
    #[error("client is closed")]
    Closed,
    /// Not connected, or the connection dropped before the relay answered: whether the
    /// durable was deleted is not known (subscribe to it again and delete it again).
    #[error("not connected to the relay, or the connection dropped before it answered")]
    Disconnected,
    /// The relay did not grant `DURABLE_DELETE` (an older relay, or a store that cannot
    /// delete durables): nothing was sent, the subscription goes on.
    #[error("the relay does not delete durable subscriptions (no DURABLE_DELETE feature)")]
    Unsupported,
    /// The subscription has no durable name: nothing was sent, it goes on.
    #[error("the subscription is not durable")]
    NotDurable,
    /// The relay refused the deletion (the subscription is ended all the same).
    #[error("relay refused to delete the durable subscription: {message} ({code:?})")]
    Rejected {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
}

/// A plugin refused a publish or a subscription.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("plugin {plugin} refused: {reason}")]
#[non_exhaustive]
pub struct PluginError {
    /// The plugin's name.
    pub plugin: String,
    /// Why.
    pub reason: String,
}

impl PluginError {
    /// A refusal by `plugin` for `reason`.
    pub fn new(plugin: &str, reason: impl Into<String>) -> Self {
        PluginError {
            plugin: plugin.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Why the client state file could not be used.
#[cfg(feature = "persistence")]
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PersistError {
    /// SQLite failed (I/O, corruption, locked).
    #[error("client state file {path}: {source}")]
    Sqlite {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is a SQLite database of something else.
    #[error("client state file {path} is not a whispeer client state file ({reason}); refusing to touch it")]
    Foreign {
        /// The file.
        path: std::path::PathBuf,
        /// What did not match.
        reason: String,
    },
    /// The file is a whispeer client state written by a newer release (a higher schema
    /// version than this release reads). It is left as it is.
    #[error("client state file {path} was written by a newer release of whispeer (format version {version}, this release reads up to {supported}); not modified")]
    Newer {
        /// The file.
        path: std::path::PathBuf,
        /// Its format (schema) version.
        version: i64,
        /// The highest this release reads.
        supported: i64,
    },
    /// The file at the state path, or one SQLite keeps beside it (`-wal`, `-shm`,
    /// `-journal`), is not one this client may trust: a symbolic link, not a regular file,
    /// another user's, or writable by others (Unix). It is left as it is.
    #[error("client state file {path}: {reason}; refusing to use it")]
    Unsafe {
        /// The file (the state file or its `-wal`/`-shm`/`-journal`).
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: UnsafeFile,
    },
    /// The file opened, but a part of it the client loads at start — the dedup window with
    /// the retained high-water marks, the kept publishes, what durables are owed, when
    /// epochs were superseded — cannot be read (an I/O error, or damage SQLite detects in
    /// the middle of the file) or brought to its bounds (the file cannot be written). The
    /// client is not started with that part empty (adversarial review, clients: it was,
    /// with an error in the log only): an empty dedup window accepts again messages this
    /// client already accepted, an empty outbox loses publishes never acknowledged, an
    /// epoch's grace restarts. Nothing is deleted to get past it. A torn last write is no such
    /// failure: SQLite's write-ahead log drops a transaction a crash cut short, and the
    /// file opens with what was committed before it. A missing file is a fresh start.
    ///
    /// Only for damage (`SQLITE_CORRUPT`, `SQLITE_NOTADB`, a value SQLite cannot give
    /// back): a file that could not be read, locked or written just now is
    /// [`PersistError::Unavailable`], whose advice is not to move it aside.
    #[error("client state file {path}: cannot load its {part}: {source}; not starting with it empty (that would accept again messages this client already accepted, or lose publishes it kept). Restore the file from a backup, or move it aside to start afresh with a new one (accepting that risk)")]
    Unreadable {
        /// The file.
        path: std::path::PathBuf,
        /// Which part: `dedup window`, `outbox`, `messages owed to durables`, `epoch
        /// supersede times`.
        part: &'static str,
        /// SQLite's error (`SQLITE_IOERR…`, `SQLITE_CORRUPT`, `SQLITE_READONLY`, …).
        #[source]
        source: rusqlite::Error,
    },
    /// A part the client loads at start (as for [`PersistError::Unreadable`]) could not be
    /// read just now, for a reason that says nothing against the file: another process
    /// holds its lock (`SQLITE_BUSY`, `SQLITE_LOCKED`: past the 5 s wait), it is read-only
    /// (`SQLITE_READONLY`, a read-only mount), the disk is full (`SQLITE_FULL`), or an I/O
    /// error, a permission or memory failure. The connect fails (the part is not used
    /// empty) and the advice is to fix that and connect again — not to move the file aside:
    /// a new file would accept again messages this client already accepted (review of
    /// e8ad48c: these were reported as damage, with that advice). Writes the start only
    /// tidies with (dropping malformed rows, bringing dates down to their bound, pruning
    /// what durables are no longer owed) never fail the connect: they are logged and done
    /// at a later start.
    #[error("client state file {path}: cannot load its {part} now: {source}; the file is not known to be damaged (another process holding it, a read-only file system, a full disk or an I/O error): fix that and connect again, keeping the file (a new one would accept again messages this client already accepted)")]
    Unavailable {
        /// The file.
        path: std::path::PathBuf,
        /// Which part (as in [`PersistError::Unreadable`]).
        part: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The state file could not be created, or its directory or itself looked at.
    #[error("client state file {path}: {source}")]
    Io {
        /// The file (or its directory).
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a file at a persistence path is refused ([`PersistError::Unsafe`]; Unix only).
#[cfg(feature = "persistence")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsafeFile {
    /// A symbolic link: never followed (another user could point it at any file, or at a
    /// database of their own).
    Symlink,
    /// Not a regular file (a directory, FIFO, socket or device).
    NotRegular {
        /// What it is.
        kind: &'static str,
    },
    /// Owned by another user (a database they made, holding what they chose).
    OtherOwner {
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// Writable by its group or by others.
    WritableByOthers {
        /// Its permission bits.
        mode: u32,
    },
}

#[cfg(feature = "persistence")]
impl std::fmt::Display for UnsafeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnsafeFile::Symlink => f.write_str("is a symbolic link (not followed)"),
            UnsafeFile::NotRegular { kind } => write!(f, "is not a regular file (a {kind})"),
            UnsafeFile::OtherOwner { owner, uid } => write!(
                f,
                "belongs to another user (uid {owner}; this process runs as uid {uid})"
            ),
            UnsafeFile::WritableByOthers { mode } => write!(
                f,
                "is writable by group or others (mode {:03o}; `chmod 600` it if it is yours)",
                mode & 0o7777
            ),
        }
    }
}

/// Why the client would not sign a relay's `Challenge` with its account key: the sign-in
/// could not be bound to the relay it dialed (PROTOCOL §3.5.6 "Relay-bound sign-ins").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthNotBound {
    /// Binding is required (`require_bound_auth`) and the relay's `Challenge` does not ask
    /// for a bound signature: the relay sets no `auth.names`, so it would take a sign-in
    /// forwarded by any relay the account is used with (or the relay is older, or one in
    /// between dropped the request).
    NotOffered {
        /// The relay name the client dialed (`host:port`), if it has one.
        relay: Option<String>,
    },
    /// The relay asks for a bound signature but the address dialed has no relay name (an
    /// in-process relay, or a host that is not a relay name).
    NoName,
}

impl std::fmt::Display for AuthNotBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthNotBound::NotOffered { relay } => {
                f.write_str("the relay does not ask for a sign-in bound to its name")?;
                if let Some(r) = relay {
                    write!(f, " ({r})")?;
                }
                f.write_str(
                    " and require_bound_auth is set: it sets no auth.names, so any relay this \
                     account key is used with could sign in there as this client (PROTOCOL \
                     §3.5.6); ask its operator to set auth.names, or turn require_bound_auth off",
                )
            }
            AuthNotBound::NoName => f.write_str(
                "the relay asks for a sign-in bound to its name, but the address dialed has no \
                 relay name (host:port) to sign",
            ),
        }
    }
}
