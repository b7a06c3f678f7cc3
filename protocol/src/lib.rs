//! # whispeer-protocol
//!
//! The only place that knows whispeer's bytes on the wire and its key design. It is
//! *sans-IO*: no sockets, no async runtime, no clock and no RNG of its own — time is a
//! parameter and randomness comes from a [`rand_core::CryptoRngCore`] the caller passes —
//! so the same code runs in the tokio client, the relay, and WebAssembly.
//!
//! ## Module map
//! Always built (everything the relay may see):
//! - [`limits`] — hard limits that bound allocation on untrusted input.
//! - [`error`] — [`DecodeError`], [`TopicError`].
//!   (Key-side errors: `error_keys` — `KeyError`, `SealError`, `OpenError`, `InviteError`.)
//! - [`token`] — [`KeyId`], [`TopicToken`], [`TokenPath`], [`TokenPattern`] and matching.
//! - [`envelope_header`] — [`Envelope`]: the opaque sealed message and its routing header.
//! - [`frame`] — relay frames (`Hello`, `Sub`, `Pub`, `Msg`, …) as CBOR maps.
//! - [`codec`] — the incremental length-prefix framing for TCP.
//! - [`relay_name`] — relay names (`host:port`) a relay-bound `Auth` signs.
//!
//! With the `keys` feature (default; the relay builds without it):
//! - [`topic`] — topic names and filters: validation, wildcards.
//! - [`kdf`] — the BLAKE3 key schedule with its labels.
//! - [`identity`] — Ed25519 + X25519 identities, public ids, text encodings.
//! - [`tree`] — topic trees, epochs, grants, key strings, passphrases, tokens.
//! - [`keyring`] — grants held by a client, epoch grace, finding a key for a topic.
//! - [`seal`] — sealing and opening envelopes (CBOR → zstd/LZ4 → pad → sign → AEAD).
//! - [`aead`] — the AEAD of each suite (XChaCha20-Poly1305, AES-256-GCM).
//! - [`compress`] — the body codecs (none, zstd, LZ4, zstd with a dictionary) and the
//!   decompression cap.
//! - [`dict`] — zstd dictionaries: ids, `wsdict` key strings, the set a keyring holds.
//! - [`batch`] — batch signatures (`sig_scheme = 2`): Merkle root signed once, per-message
//!   inclusion paths, the verified-root cache.
//! - [`invite`] — HPKE-sealed grants for a recipient's X25519 key.
//! - [`text`] — bech32m key strings with type prefixes.
#![forbid(unsafe_code)]

pub mod codec;
pub mod envelope_header;
pub mod error;
pub mod frame;
pub mod limits;
pub mod relay_name;
pub mod token;

mod cbor;

#[cfg(feature = "keys")]
pub mod aead;
#[cfg(feature = "keys")]
pub mod batch;
#[cfg(feature = "keys")]
pub mod compress;
#[cfg(feature = "keys")]
pub mod dict;
#[cfg(feature = "keys")]
pub mod error_keys;
#[cfg(feature = "keys")]
pub mod identity;
#[cfg(feature = "keys")]
pub mod invite;
#[cfg(feature = "keys")]
pub mod kdf;
#[cfg(feature = "keys")]
pub mod keyring;
#[cfg(feature = "keys")]
pub mod locked;
#[cfg(feature = "keys")]
mod memo;
#[cfg(feature = "keys")]
pub mod seal;
#[cfg(feature = "keys")]
pub mod text;
#[cfg(feature = "keys")]
pub mod topic;
#[cfg(feature = "keys")]
pub mod tree;

#[cfg(feature = "keys")]
pub use batch::{BatchPolicy, BatchProof, BatchSigner, SharedRoots, VerifiedRoots};
#[cfg(feature = "keys")]
pub use dict::{DictId, Dictionaries, Dictionary};
#[cfg(feature = "keys")]
pub use error_keys::{BodyError, InviteError, KeyError, OpenError, SealError};
#[cfg(feature = "keys")]
pub use identity::{Identity, PublicId, SenderId};
#[cfg(feature = "keys")]
pub use invite::Invite;
#[cfg(feature = "keys")]
pub use keyring::{
    Accepted, Added, DroppedGrant, Ignored, Keyring, Pin, TopicKey, MAX_DICTIONARIES,
};
#[cfg(feature = "keys")]
pub use seal::{
    Compression, MessageId, Opened, Opener, Outgoing, Padding, Prepared, SealOptions, Sealer,
    SignatureScheme, Signing,
};
#[cfg(feature = "keys")]
pub use topic::{Topic, TopicFilter};
#[cfg(feature = "keys")]
pub use tree::{
    upgrade_key_string, EpochCert, EpochKeys, Grant, PassphraseParams, Provenance, Scope, TreeId,
    TreeKey, Upgraded,
};

pub use codec::FrameDecoder;
pub use envelope_header::{Envelope, Suite};
pub use error::{DecodeError, TopicError};
pub use frame::{ErrorCode, Frame, Qos, Replay};
pub use token::{KeyId, PatternElem, TokenPath, TokenPattern, TopicToken};
