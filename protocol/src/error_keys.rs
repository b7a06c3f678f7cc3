//! Error types of the key-holding half.

use thiserror::Error;

use crate::dict::DictId;
use crate::error::TopicError;

/// Problems with keys, key strings, identities, grants and the keyring.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The string is not a valid key string of this kind (checksum, characters, length).
    #[error("invalid {kind} string: {reason}")]
    InvalidString { kind: &'static str, reason: String },
    /// A key string of another kind was given (e.g. an identity where a grant was expected).
    #[error("expected a '{expected}…' string but found a '{found}…' string")]
    WrongKind {
        expected: &'static str,
        found: String,
    },
    /// A key string from a newer format version.
    #[error("unsupported {kind} format version {version}")]
    UnsupportedVersion { kind: &'static str, version: u8 },
    /// An Ed25519 or X25519 key that is not a valid point.
    #[error("invalid public key in {0}")]
    InvalidPublicKey(&'static str),
    /// A signature (on an epoch certificate, public id or invite) does not verify.
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    /// A grant for a tree whose pinned admin key differs.
    #[error("grant for tree {tree} is signed by a different admin than the one pinned")]
    AdminMismatch { tree: String },
    /// No held grant covers the topic.
    #[error("no key covers topic '{topic}' (add a grant for it or a parent subtree)")]
    NoKeyForTopic { topic: String },
    /// Grants of two or more trees cover the topic (publishing: `Keyring::topic_key_in`
    /// names the tree) or overlap the filter (subscribing, `topic` holds the filter: the
    /// subscription names its tree). Another tree never wins silently.
    #[error(
        "'{topic}' is covered by grants of trees {trees}; name the tree to publish or subscribe in"
    )]
    AmbiguousTree { topic: String, trees: String },
    /// A derivation outside the grant's scope (a sibling, a parent, or below a topic grant).
    #[error("'{target}' is outside the grant's scope '{scope}'")]
    OutOfScope { scope: String, target: String },
    /// A topic or filter in a key string or argument is invalid.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// Argon2id failed (bad parameters).
    #[error("passphrase derivation failed: {0}")]
    Passphrase(String),
    /// Argon2id parameters a passphrase tree may not use: PROTOCOL §5.9 fixes them
    /// ([`PassphraseParams::check`](crate::PassphraseParams::check)).
    #[error(
        "Argon2id parameters m = {m_kib} KiB, t = {t}, p = {p} are not allowed for a passphrase \
         tree: PROTOCOL §5.9 fixes m = 262144 KiB, t = 2, p = 1 (the default), or m = 65536 \
         KiB, t = 3, p = 1 to reproduce a version-1 tree"
    )]
    PassphraseParams {
        /// Memory in KiB, as given.
        m_kib: u32,
        /// Iterations, as given.
        t: u32,
        /// Lanes, as given.
        p: u32,
    },
    /// A tree name that is empty or too long.
    #[error("invalid tree name: {0}")]
    InvalidTreeName(&'static str),
    /// A key string of an older format version: convert it with `whispeer key upgrade`.
    #[error("{kind} string is format version {version}; convert it with `whispeer key upgrade`")]
    OldVersion { kind: &'static str, version: u8 },
    /// A version-1 grant has no admin signature and cannot be converted.
    #[error("{0}")]
    NeedsReissue(&'static str),
    /// A second tree (another tree id or admin) claims a key id the keyring already holds.
    #[error(
        "key id {key_id} already belongs to tree {held_tree}; refusing tree {new_tree} claiming it"
    )]
    KeyIdConflict {
        key_id: String,
        held_tree: String,
        new_tree: String,
    },
    /// Two certificates of the same tree and epoch disagree (other routing or name key).
    #[error("tree {tree} epoch {epoch}: a second epoch certificate with another routing or name key (R, N)")]
    EpochConflict { tree: String, epoch: u64 },
    /// A grant whose key contradicts the key derived from a broader grant (or a narrower
    /// verified grant) the keyring holds.
    #[error("grant for '{scope}' contradicts the key derived from the held grant for '{held}' (tree {tree})")]
    Contradicts {
        tree: String,
        scope: String,
        held: String,
    },
    /// Only a delegated (unverifiable) grant covers the topic; sealing with it needs an
    /// explicit opt-in (`Keyring::allow_sealing`).
    #[error("topic '{topic}' is covered only by a grant for '{scope}' delegated by {by} that cannot be verified; opt in with allow_sealing to publish with it")]
    NotSealable {
        topic: String,
        scope: String,
        by: String,
    },
    /// No held grant of that tree has that scope.
    #[error("no grant for '{scope}' held in tree {tree}")]
    NoSuchGrant { tree: String, scope: String },
    /// A certificate or pin that contradicts the pinned one (passphrase flag differs).
    #[error("tree {tree}: {reason}")]
    PinMismatch { tree: String, reason: &'static str },
    /// A passphrase tree accepts no epoch after 0: every member knows its admin key.
    #[error("passphrase tree {tree}: epoch {epoch} refused (every member knows a passphrase tree's admin key, so it has only epoch 0; rotate by choosing a new passphrase)")]
    PassphraseEpoch { tree: String, epoch: u64 },
    /// A signature scheme that is unknown (3 and above).
    #[error("unsupported signature scheme {0}")]
    UnsupportedSignatureScheme(u8),
    /// A locked secret string did not open: wrong passphrase, or damaged (one error).
    #[error("locked secret could not be opened (wrong passphrase, or damaged)")]
    Locked,
    /// Adding these zstd dictionaries would make the keyring hold more than it may
    /// (`keyring::MAX_DICTIONARIES`): a bound on the memory invites can take.
    #[error("the keyring holds {held} zstd dictionaries; adding {adding} more would exceed the limit of {max} (remove some first)")]
    TooManyDictionaries {
        /// Dictionaries held.
        held: usize,
        /// New dictionaries being added.
        adding: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a message could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// No key for the topic, or another key problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The content type is longer than 255 bytes.
    #[error("content type is {0} bytes; the limit is 255")]
    ContentTypeTooLong(usize),
    /// The payload exceeds the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    /// The compressor failed.
    #[error("compression failed: {0}")]
    Compression(String),
    /// A batch holds messages of one (tree, epoch) only: sign it and start a new one.
    #[error("a batch never spans two (tree, epoch) pairs: sign this batch and start another")]
    BatchTreeEpoch,
    /// The topic's compression names a zstd dictionary the keyring does not hold.
    #[error("compression names zstd dictionary {0}, which is not held (add it to the keyring)")]
    MissingDictionary(DictId),
    /// The batch already holds its maximum number of messages.
    #[error("the batch is full ({0} messages)")]
    BatchFull(u32),
    /// Signing a batch without messages.
    #[error("the batch is empty")]
    BatchEmpty,
}

/// Why a decrypted body (its signature part, or its payload's decompression) was refused ([`crate::seal::check_body`] and
/// [`crate::batch::BatchProof`]). Opening an envelope never reports it: [`OpenError`] stays
/// opaque. It serves code that already holds the plaintext (tests, vectors, tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BodyError {
    /// A field is missing, out of range, or does not decode.
    #[error("malformed body")]
    Malformed,
    /// An unknown signature scheme.
    #[error("unsupported signature scheme {0}")]
    UnsupportedScheme(u8),
    /// The signature (scheme 1) or the batch root's signature (scheme 2) does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A batch count outside 1..=4096.
    #[error("batch count {0} outside 1..=4096")]
    BatchCount(u32),
    /// A leaf index not below the batch count.
    #[error("batch index {index} not below count {count}")]
    BatchIndex { index: u32, count: u32 },
    /// An inclusion path whose length is not the depth `(index, count)` implies.
    #[error("batch path length {len}, expected {expected}")]
    BatchPathLength { len: usize, expected: usize },
    /// A `codec` value outside the registry (§4.13).
    #[error("unsupported codec {0}")]
    UnsupportedCodec(u8),
    /// The payload declares (or, uncompressed, has) more bytes than the receiver's cap;
    /// refused before anything is allocated for it.
    #[error("payload of {declared} bytes exceeds the decompression cap of {max}")]
    PayloadTooLarge { declared: u64, max: usize },
    /// The compressed payload does not decode into exactly its declared size.
    #[error("payload does not decompress: {0}")]
    Decompression(&'static str),
    /// Codec 3 names a zstd dictionary the receiver does not hold.
    #[error("payload needs zstd dictionary {0}, which is not held")]
    MissingDictionary(DictId),
}

/// The one error for every failure to open an envelope, with one exception.
///
/// Deliberately carries no reason: wrong key, unknown tree, expired epoch, tampered header,
/// bad signature, bad padding and a decompression bomb all look the same, so nothing a
/// receiver reveals can serve as an oracle.
///
/// The exception ([`OpenError::missing_dictionary`]): a body that decrypted, parsed and
/// whose signature verified (so it comes from a key holder, not from the relay), but whose
/// payload is compressed with a zstd dictionary (codec 3) the receiver does not hold. Its
/// id is reported so the application can say which dictionary to import (PROTOCOL.md
/// §4.10 step 10). Like every other failure it sends nothing to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenError {
    missing_dictionary: Option<DictId>,
}

impl OpenError {
    /// The opaque error.
    pub const OPAQUE: OpenError = OpenError {
        missing_dictionary: None,
    };

    /// The message is authentic but needs a dictionary that is not held.
    pub fn missing(id: DictId) -> Self {
        OpenError {
            missing_dictionary: Some(id),
        }
    }

    /// The id of the zstd dictionary the message needs and the keyring does not hold
    /// (only after the body decrypted and its signature verified); `None` for every other
    /// failure, which stays opaque.
    pub fn missing_dictionary(&self) -> Option<DictId> {
        self.missing_dictionary
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.missing_dictionary {
            None => f.write_str("message could not be opened"),
            Some(id) => write!(
                f,
                "message could not be opened: it needs zstd dictionary {id}, which is not \
                 held (import its wsdict key string)"
            ),
        }
    }
}

impl std::error::Error for OpenError {}

/// Why an invite could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum InviteError {
    /// Not an invite string, or malformed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The invite is not for this identity, or was tampered with (one opaque case).
    #[error("invite could not be opened (not addressed to this identity, or damaged)")]
    CannotOpen,
    /// The inviter's signature does not verify.
    #[error("invite signature does not verify")]
    BadSignature,
    /// The invite expired.
    #[error("invite expired at {expiry_ms} (now {now_ms})")]
    Expired { expiry_ms: u64, now_ms: u64 },
    /// HPKE failed while sealing.
    #[error("invite sealing failed")]
    SealFailed,
    /// More dictionaries than one invite carries (255).
    #[error("{count} dictionaries do not fit one invite (at most 255): send the rest as wsdict key strings")]
    TooManyDictionaries { count: usize },
    /// The invite would exceed the longest invite string (1,048,576 characters).
    #[error("the invite would be {chars} characters, more than the 1048576 an invite may have: carry fewer dictionaries and send the rest as wsdict key strings")]
    TooLarge { chars: usize },
}
