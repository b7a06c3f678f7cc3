//! Sealing and opening envelopes: `payload (CBOR) → zstd or LZ4 → pad → sign → AEAD` (the
//! envelope's suite: XChaCha20-Poly1305 or AES-256-GCM, [`crate::aead`]),
//! and the reverse with every check of CRYPTO.md "What a receiver checks", failing closed
//! with the one opaque [`OpenError`].
//!
//! Body plaintext (inside the AEAD):
//! ```text
//! sig_scheme u8                 0 = unsigned, 1 = Ed25519, 2 = batch signature
//! sender_pk[32] ‖ sig[64]       only when sig_scheme = 1
//! sender_pk[32] ‖ sig[64] ‖ u32be count ‖ u32be index ‖ salt[32] ‖ u8 path_len ‖
//!   path[32·path_len]           only when sig_scheme = 2 (see [`crate::batch`])
//! msg_id[16] ‖ u64be ts_ms ‖ lp(content_type) ‖ codec u8 ‖ pad_scheme u8
//! u32be payload_len ‖ payload[payload_len] ‖ zero padding
//! ```
//! The signature covers a fixed layout (never re-serialized CBOR):
//! `"whispeer/v2/msg-sig\0" ‖ tree_id ‖ u64be(epoch) ‖ lp(topic) ‖ msg_id ‖ u64be(ts_ms) ‖
//! lp(content_type) ‖ codec ‖ pad_scheme ‖ BLAKE3(payload as compressed)`.

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::aead::{open_detached, seal_detached, suite_parts};
use crate::batch::{
    BatchNodes, BatchPolicy, BatchProof, BatchSigner, RootCache, SenderKeys, SharedRoots,
    VerifiedRoots,
};
use crate::compress::{
    lz4_compress, zstd_declared_size, zstd_dict_compress, zstd_dict_compressor, zstd_dict_parts,
    Decompressors, CODEC_LZ4, CODEC_MAX, CODEC_NONE, CODEC_ZSTD, CODEC_ZSTD_DICT, LZ4_SIZE_LEN,
};
use crate::dict::DictId;
use crate::envelope_header::{
    Envelope, HeaderFields, Suite, COMMIT_LEN, NAME_PAD, NONCE_LEN, TAG_LEN,
};
use crate::error_keys::{BodyError, KeyError, OpenError, SealError};
use crate::identity::{Identity, SenderId};
use crate::kdf::{lp, tag, xof, Secret32};
use crate::keyring::{Keyring, TopicKey};
use crate::limits::{DEFAULT_MAX_PAYLOAD, MAX_CONTENT_TYPE_LEN};
use crate::memo::KeyMemo;
use crate::topic::Topic;
use crate::tree::{EpochKeys, Provenance, TreeId};

const SIG_CONTEXT: &[u8] = b"whispeer/v2/msg-sig\0";
const SIG_NONE: u8 = 0;
const SIG_ED25519: u8 = 1;
const SIG_BATCH: u8 = 2;

/// The body's signature scheme (registry in PROTOCOL.md §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureScheme {
    /// 0: unsigned (any key holder could have written it).
    None,
    /// 1: one Ed25519 signature per message.
    Ed25519,
    /// 2: batch signature: one Ed25519 signature over a Merkle root, an inclusion path per
    /// message ([`crate::batch`]).
    Batch,
}

impl SignatureScheme {
    /// The scheme byte.
    pub fn to_byte(self) -> u8 {
        match self {
            SignatureScheme::None => SIG_NONE,
            SignatureScheme::Ed25519 => SIG_ED25519,
            SignatureScheme::Batch => SIG_BATCH,
        }
    }
    /// Parses a scheme byte: 0, 1 and 2 (batch signature: a Merkle root signed once, a
    /// per-message inclusion path); every other value is refused with
    /// [`KeyError::UnsupportedSignatureScheme`].
    pub fn from_byte(b: u8) -> Result<Self, KeyError> {
        match b {
            SIG_NONE => Ok(SignatureScheme::None),
            SIG_ED25519 => Ok(SignatureScheme::Ed25519),
            SIG_BATCH => Ok(SignatureScheme::Batch),
            _ => Err(KeyError::UnsupportedSignatureScheme(b)),
        }
    }
}
const PAD_NONE: u8 = 0;
const PAD_PADME: u8 = 1;

/// A sender-chosen 128-bit message id (random), used for dedup by receivers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        MessageId(b)
    }
}
impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}
impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Payload compression, chosen per topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Store the payload as is.
    None,
    /// zstd at this level (1..=22). A payload that does not shrink is stored uncompressed.
    Zstd(i32),
    /// LZ4 block (`codec = 2`): a fraction of zstd's CPU cost for a worse ratio; pure Rust,
    /// so it is the same code in wasm. A payload that does not shrink is stored uncompressed.
    Lz4,
    /// zstd at `level` (1..=22) with the dictionary `dict` (`codec = 3`, PROTOCOL.md
    /// §4.6.1): small messages that share structure (JSON telemetry, chat) shrink far more.
    /// The sealing key ([`crate::TopicKey`], from a [`crate::Keyring`] holding the
    /// dictionary) must carry it, else sealing fails with
    /// [`SealError::MissingDictionary`]. Receivers need the dictionary too: share it as keys
    /// are shared ([`crate::Dictionary::to_key_string`]). A payload that does not shrink is
    /// stored uncompressed.
    ZstdDict {
        /// zstd level, 1..=22.
        level: i32,
        /// The dictionary's id.
        dict: DictId,
    },
}

impl Compression {
    /// Parses `none`, `zstd` (level 3), `zstd:N` / `zstdN` (level N, 1..=22), `lz4`, or
    /// `zstd-dict:ID` / `zstd-dict:ID:N` (the dictionary with that 32-hex-digit id, level 3
    /// or N).
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "none" | "off" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd(3)),
            "lz4" => Some(Compression::Lz4),
            z if z.starts_with("zstd-dict:") => {
                let rest = &z["zstd-dict:".len()..];
                let (id, level) = match rest.split_once(':') {
                    Some((id, l)) => (id, l.parse().ok()?),
                    None => (rest, 3),
                };
                let dict = DictId::from_hex(id)?;
                (1..=22)
                    .contains(&level)
                    .then_some(Compression::ZstdDict { level, dict })
            }
            z => {
                let l = z.strip_prefix("zstd:").or_else(|| z.strip_prefix("zstd"))?;
                let l: i32 = l.parse().ok()?;
                (1..=22).contains(&l).then_some(Compression::Zstd(l))
            }
        }
    }
}

impl fmt::Display for Compression {
    /// `none`, `zstd:N` or `lz4` (what [`Compression::from_name`] parses back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::ZstdDict { level, dict } => write!(f, "zstd-dict:{dict}:{level}"),
        }
    }
}

/// Length hiding for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Exact length (leaks the compressed size to the relay).
    None,
    /// Padmé: pad the body to a length that leaks at most O(log log n) bits.
    Padme,
}

/// Per-topic sealing options. Default: zstd level 3, Padmé padding, XChaCha20-Poly1305.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealOptions {
    /// Compression.
    pub compression: Compression,
    /// Padding.
    pub padding: Padding,
    /// AEAD suite of the envelope (every receiver opens every suite).
    pub suite: Suite,
}

impl Default for SealOptions {
    fn default() -> Self {
        SealOptions {
            compression: Compression::Zstd(3),
            padding: Padding::Padme,
            suite: Suite::XChaCha20Poly1305,
        }
    }
}

/// One message to seal.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The serialized value (CBOR for typed messages).
    pub payload: &'a [u8],
    /// What the payload is, e.g. `application/cbor; type=my_app::Reading`.
    pub content_type: &'a str,
    /// Unique id.
    pub msg_id: MessageId,
    /// Sender's clock, Unix milliseconds.
    pub ts_ms: u64,
}

/// An opened message.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// The topic it was published on (checked against the routing tokens).
    pub topic: Topic,
    /// The verified sender, or `None` for an unsigned message.
    pub sender: Option<SenderId>,
    /// The sender's message id.
    pub msg_id: MessageId,
    /// The sender's timestamp (Unix ms).
    pub ts_ms: u64,
    /// The content type.
    pub content_type: String,
    /// The decompressed payload.
    pub payload: Vec<u8>,
    /// Tree.
    pub tree_id: TreeId,
    /// Epoch.
    pub epoch: u64,
    /// Provenance of the grant whose key opened it.
    pub provenance: Provenance,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("topic", &self.topic)
            .field("sender", &self.sender)
            .field("msg_id", &self.msg_id)
            .field("ts_ms", &self.ts_ms)
            .field("content_type", &self.content_type)
            .field("payload_len", &self.payload.len())
            .field("tree_id", &self.tree_id)
            .field("epoch", &self.epoch)
            .field("provenance", &self.provenance)
            .finish()
    }
}

/// An envelope opened up to its payload (§4.10 steps 1–9): decrypted, its topic checked
/// against the routing tokens, its date accepted by its epoch and its signature verified;
/// the payload still as stored (compressed). [`Opener::authenticate_shared`] makes one,
/// [`Opener::decompress`] finishes it: a receiver can run its own checks (dedup above all)
/// on what is known here and decompress only what it will deliver, so a duplicate of a
/// small envelope that decompresses to megabytes costs it nothing more.
pub struct Authentic {
    /// The topic it was published on (checked against the routing tokens).
    pub topic: Topic,
    /// The verified sender, or `None` for an unsigned message.
    pub sender: Option<SenderId>,
    /// The sender's message id.
    pub msg_id: MessageId,
    /// The sender's timestamp (Unix ms).
    pub ts_ms: u64,
    /// The content type.
    pub content_type: String,
    /// Tree.
    pub tree_id: TreeId,
    /// Epoch.
    pub epoch: u64,
    /// Provenance of the grant whose key opened it.
    pub provenance: Provenance,
    codec: u8,
    /// The decrypted body; the payload as stored is `body[payload]`.
    body: Zeroizing<Vec<u8>>,
    payload: std::ops::Range<usize>,
}

impl fmt::Debug for Authentic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authentic")
            .field("topic", &self.topic)
            .field("sender", &self.sender)
            .field("msg_id", &self.msg_id)
            .field("ts_ms", &self.ts_ms)
            .field("content_type", &self.content_type)
            .field("codec", &self.codec)
            .field("stored_len", &self.payload.len())
            .field("tree_id", &self.tree_id)
            .field("epoch", &self.epoch)
            .field("provenance", &self.provenance)
            .finish()
    }
}

impl Authentic {
    /// The payload as stored (compressed when its codec is 1, 2 or 3).
    pub fn stored(&self) -> &[u8] {
        &self.body[self.payload.clone()]
    }

    /// Whether the payload is stored compressed (codec 1, 2 or 3): otherwise
    /// [`Opener::finish`] hands the decrypted body itself over, with nothing to decompress.
    pub fn compressed(&self) -> bool {
        self.codec != CODEC_NONE
    }

    /// The size the payload says it decompresses to, read without decompressing (§4.6:
    /// the length itself for codec 0, the zstd Frame_Content_Size for 1 and 3, the size
    /// prefix for 2); `None` when unreadable (decompressing fails then). Decompressing
    /// yields exactly this many bytes or fails.
    pub fn declared_len(&self) -> Option<u64> {
        let p = self.stored();
        match self.codec {
            CODEC_NONE => Some(p.len() as u64),
            CODEC_ZSTD => zstd_declared_size(p, usize::MAX).ok().map(|n| n as u64),
            CODEC_LZ4 => p
                .first_chunk::<LZ4_SIZE_LEN>()
                .map(|n| u64::from(u32::from_be_bytes(*n))),
            CODEC_ZSTD_DICT => zstd_dict_parts(p)
                .and_then(|(_, frame)| zstd_declared_size(frame, usize::MAX))
                .ok()
                .map(|n| n as u64),
            _ => None,
        }
    }

    /// The opened message of a payload stored uncompressed (codec 0): the body buffer,
    /// moved to the payload's start and cut after its end. Over `max` fails as
    /// [`Opener::decompress`] does.
    fn into_opened_uncompressed(mut self, max: usize) -> Result<Opened, OpenError> {
        let body = self.take_uncompressed(max)?;
        Ok(self.into_opened(body))
    }

    /// The payload of a message stored uncompressed (codec 0), taken out of the decrypted
    /// body (moved to its start and cut after its end): what [`Opener::finish`] would hand
    /// over, for [`Authentic::into_opened`]. `None` for a compressed payload (decompress
    /// it with [`Opener::decompress`]). Taking it on the thread that decrypted the body
    /// moves bytes still in that core's cache (a client's open workers do, see
    /// `whispeer::core::jobs`). Afterwards [`Authentic::stored`] is empty.
    pub fn take_payload_if_uncompressed(
        &mut self,
        max: usize,
    ) -> Option<Result<Vec<u8>, OpenError>> {
        (self.codec == CODEC_NONE).then(|| self.take_uncompressed(max))
    }

    fn take_uncompressed(&mut self, max: usize) -> Result<Vec<u8>, OpenError> {
        debug_assert_eq!(self.codec, CODEC_NONE);
        if self.payload.len() > max {
            return Err(OpenError::OPAQUE);
        }
        // Taken out of the `Zeroizing` wrapper, which then wipes an empty vector.
        let mut body = std::mem::take(&mut *self.body);
        body.truncate(self.payload.end);
        body.drain(..self.payload.start);
        self.payload = 0..0;
        Ok(body)
    }

    /// The opened message, with `payload` (what [`Opener::decompress`] returned for it).
    pub fn into_opened(self, payload: Vec<u8>) -> Opened {
        Opened {
            topic: self.topic,
            sender: self.sender,
            msg_id: self.msg_id,
            ts_ms: self.ts_ms,
            content_type: self.content_type,
            payload,
            tree_id: self.tree_id,
            epoch: self.epoch,
            provenance: self.provenance,
        }
    }
}

/// Padmé length (Nikitin et al., PETS 2019) for a plaintext of `len` bytes.
pub fn padme(len: usize) -> usize {
    if len < 2 {
        return len;
    }
    let e = usize::BITS - 1 - len.leading_zeros();
    let s = u32::BITS - e.leading_zeros();
    let last_bits = e - s;
    let mask = (1usize << last_bits) - 1;
    (len + mask) & !mask
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn sig_input(
    tree_id: &TreeId,
    epoch: u64,
    topic: &str,
    msg_id: &MessageId,
    ts_ms: u64,
    content_type: &str,
    codec: u8,
    pad: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIG_CONTEXT.len() + 128 + topic.len() + content_type.len());
    m.extend_from_slice(SIG_CONTEXT);
    m.extend_from_slice(&tree_id.0);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&lp(topic.as_bytes()));
    m.extend_from_slice(topic.as_bytes());
    m.extend_from_slice(&msg_id.0);
    m.extend_from_slice(&ts_ms.to_be_bytes());
    m.extend_from_slice(&lp(content_type.as_bytes()));
    m.extend_from_slice(content_type.as_bytes());
    m.push(codec);
    m.push(pad);
    m.extend_from_slice(blake3::hash(payload).as_bytes());
    m
}

/// `x = xof(M(t), "wsp1" ‖ 0x0A ‖ nonce [‖ suite], 64)`: body key `x[..32]`, commitment
/// `x[32..]` (§4.3; the suite byte only for suites after 1, [`suite_parts`]).
fn body_keys(
    message_key: &Secret32,
    nonce: &[u8; NONCE_LEN],
    suite: Suite,
) -> (Zeroizing<[u8; 32]>, [u8; COMMIT_LEN]) {
    let mut x = Zeroizing::new([0u8; 64]);
    xof(
        message_key.as_bytes(),
        tag::BODY,
        &[nonce, suite_parts(suite)],
        &mut x[..],
    );
    let key = Zeroizing::new(<[u8; 32]>::try_from(&x[..32]).expect("32"));
    let commit = <[u8; 32]>::try_from(&x[32..]).expect("32");
    (key, commit)
}

/// `xof(N, "wsp1" ‖ 0x0B ‖ nonce [‖ suite], 32)` (§4.3).
fn name_key(keys: &EpochKeys, nonce: &[u8; NONCE_LEN], suite: Suite) -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    xof(
        keys.name_key().as_bytes(),
        tag::SEALED_NAME,
        &[nonce, suite_parts(suite)],
        &mut k[..],
    );
    k
}

fn sealed_name_len(topic: &str) -> usize {
    (2 + topic.len()).div_ceil(NAME_PAD) * NAME_PAD + TAG_LEN
}

/// Seals messages. Keeps a zstd compression context for reuse (a fresh context per message
/// costs about 3×), so keep one `Sealer` per thread or connection.
pub struct Sealer {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
    /// A context holding one dictionary at one level (codec 3).
    zstd_dict: Option<(i32, DictId, zstd::bulk::Compressor<'static>)>,
    max_payload: usize,
    /// Tokens and message keys of the topics sealed on ([`Sealer::topic_key`]).
    memo: KeyMemo,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("zstd_level", &self.zstd.as_ref().map(|z| z.0))
            .finish()
    }
}

impl Default for Sealer {
    fn default() -> Self {
        Self::new()
    }
}

impl Sealer {
    /// A sealer accepting payloads up to the default limit (16 MiB).
    pub fn new() -> Self {
        Sealer {
            zstd: None,
            zstd_dict: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            memo: KeyMemo::default(),
        }
    }

    /// [`Keyring::topic_key`] (or [`Keyring::topic_key_in`] when `tree` is given), with the
    /// topic's tokens and message key remembered between calls: the keyring still picks
    /// the grant on every call (so a grant added or an epoch rotated applies at once), and
    /// a remembered derivation is used only for the very same grant, epoch keys and topic.
    pub fn topic_key(
        &mut self,
        keyring: &Keyring,
        tree: Option<TreeId>,
        topic: &Topic,
    ) -> Result<TopicKey, KeyError> {
        keyring.topic_key_memo(tree, topic, &mut self.memo)
    }

    /// Sets the largest payload accepted (receivers enforce their own limit too).
    pub fn with_max_payload(mut self, max: usize) -> Self {
        self.max_payload = max;
        self
    }

    fn compress(&mut self, level: i32, data: &[u8]) -> Result<Vec<u8>, SealError> {
        let err = |e: std::io::Error| SealError::Compression(e.to_string());
        match &mut self.zstd {
            Some((l, c)) if *l == level => c.compress(data).map_err(err),
            slot => {
                let mut c = zstd::bulk::Compressor::new(level).map_err(err)?;
                let out = c.compress(data).map_err(err)?;
                *slot = Some((level, c));
                Ok(out)
            }
        }
    }

    fn compress_dict(
        &mut self,
        key: &TopicKey,
        level: i32,
        id: DictId,
        data: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        // Checked on every call, cached compressor or not: dictionaries are tied to trees,
        // and a compressor loaded for one tree's topic must not seal another tree's topic
        // whose members do not hold the dictionary (an id names its content, so the cached
        // compressor is the right one whenever the key holds the id).
        let d = key
            .dictionary(&id)
            .ok_or(SealError::MissingDictionary(id))?;
        let ctx = match &mut self.zstd_dict {
            Some((l, i, c)) if *l == level && *i == id => c,
            slot => &mut slot.insert((level, id, zstd_dict_compressor(level, d)?)).2,
        };
        zstd_dict_compress(ctx, &id, data)
    }

    fn compress_for<'p>(
        &mut self,
        key: &TopicKey,
        msg: &Outgoing<'p>,
        opts: &SealOptions,
        compressed: &'p mut Vec<u8>,
    ) -> Result<(u8, u8, bool), SealError> {
        // (codec, pad_scheme, whether `compressed` holds the stored payload)
        if msg.content_type.len() > MAX_CONTENT_TYPE_LEN {
            return Err(SealError::ContentTypeTooLong(msg.content_type.len()));
        }
        if msg.payload.len() > self.max_payload {
            return Err(SealError::PayloadTooLarge {
                len: msg.payload.len(),
                max: self.max_payload,
            });
        }
        let (codec, use_compressed) = match opts.compression {
            Compression::Zstd(level) => {
                *compressed = self.compress(level, msg.payload)?;
                if compressed.len() < msg.payload.len() {
                    (CODEC_ZSTD, true)
                } else {
                    (CODEC_NONE, false)
                }
            }
            Compression::Lz4 => {
                *compressed = lz4_compress(msg.payload)?;
                if compressed.len() < msg.payload.len() {
                    (CODEC_LZ4, true)
                } else {
                    (CODEC_NONE, false)
                }
            }
            Compression::ZstdDict { level, dict } => {
                *compressed = self.compress_dict(key, level, dict, msg.payload)?;
                if compressed.len() < msg.payload.len() {
                    (CODEC_ZSTD_DICT, true)
                } else {
                    (CODEC_NONE, false)
                }
            }
            Compression::None => (CODEC_NONE, false),
        };
        let pad = match opts.padding {
            Padding::None => PAD_NONE,
            Padding::Padme => PAD_PADME,
        };
        Ok((codec, pad, use_compressed))
    }

    /// Seals `msg` on the key's topic. `signer` signs it (sealed sender: the relay cannot
    /// see who); `None` sends it unsigned, so any key holder could have written it.
    pub fn seal(
        &mut self,
        key: &TopicKey,
        msg: &Outgoing<'_>,
        opts: &SealOptions,
        signer: Option<&Identity>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Envelope, SealError> {
        let mut compressed = Vec::new();
        let (codec, pad, use_c) = self.compress_for(key, msg, opts, &mut compressed)?;
        let payload: &[u8] = if use_c { &compressed } else { msg.payload };
        let signing = match signer {
            Some(id) => Signing::Ed25519(id),
            None => Signing::Unsigned,
        };
        let fields = Fields {
            suite: opts.suite,
            msg_id: &msg.msg_id,
            ts_ms: msg.ts_ms,
            content_type: msg.content_type,
            codec,
            pad,
            payload,
        };
        Ok(seal_fields(key, &fields, None, signing, rng))
    }

    /// Checks and compresses `msg` for `key`'s topic and computes the bytes a signature
    /// covers (§4.8), without sealing: push it to a [`BatchSigner`], then seal it with
    /// [`Sealer::seal_prepared`] and its [`BatchProof`].
    pub fn prepare(
        &mut self,
        key: &TopicKey,
        msg: &Outgoing<'_>,
        opts: &SealOptions,
    ) -> Result<Prepared, SealError> {
        let mut compressed = Vec::new();
        let (codec, pad, use_c) = self.compress_for(key, msg, opts, &mut compressed)?;
        let payload = if use_c {
            compressed
        } else {
            msg.payload.to_vec()
        };
        let sig_input = sig_input(
            &key.keys.tree_id(),
            key.keys.epoch(),
            key.topic.as_str(),
            &msg.msg_id,
            msg.ts_ms,
            msg.content_type,
            codec,
            pad,
            &payload,
        );
        Ok(Prepared {
            key: key.clone(),
            suite: opts.suite,
            msg_id: msg.msg_id,
            ts_ms: msg.ts_ms,
            content_type: msg.content_type.to_owned(),
            codec,
            pad,
            payload,
            sig_input,
        })
    }

    /// Seals a prepared message. With [`Signing::Batch`], the proof MUST be the one
    /// [`BatchSigner::sign`] returned for this message (same index as its push), or
    /// receivers refuse it.
    pub fn seal_prepared(
        &mut self,
        msg: &Prepared,
        signing: Signing<'_>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Envelope, SealError> {
        let fields = Fields {
            suite: msg.suite,
            msg_id: &msg.msg_id,
            ts_ms: msg.ts_ms,
            content_type: &msg.content_type,
            codec: msg.codec,
            pad: msg.pad,
            payload: &msg.payload,
        };
        Ok(seal_fields(
            &msg.key,
            &fields,
            Some(&msg.sig_input),
            signing,
            rng,
        ))
    }

    /// Seals `msgs` (all of one tree and epoch, 1..=4096 of them) as one batch: a salt per
    /// message from `rng`, one signature over the Merkle root, then each envelope (a nonce
    /// each from `rng`), in order.
    pub fn seal_batch(
        &mut self,
        msgs: &[Prepared],
        signer: &Identity,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<Envelope>, SealError> {
        let mut b = BatchSigner::new(BatchPolicy {
            max_messages: u32::try_from(msgs.len()).unwrap_or(u32::MAX),
            max_wait_us: u64::MAX,
        });
        for m in msgs {
            b.push(m, 0, rng)?;
        }
        let proofs = b.sign(signer)?;
        msgs.iter()
            .zip(&proofs)
            .map(|(m, p)| self.seal_prepared(m, Signing::Batch(p), rng))
            .collect()
    }
}

/// How a message is signed.
#[derive(Debug, Clone, Copy)]
pub enum Signing<'a> {
    /// `sig_scheme = 0`.
    Unsigned,
    /// `sig_scheme = 1`: sign this message alone.
    Ed25519(&'a Identity),
    /// `sig_scheme = 2`: this message's proof from a signed batch.
    Batch(&'a BatchProof),
}

/// A message checked, compressed and ready to sign and seal ([`Sealer::prepare`]).
#[derive(Clone)]
pub struct Prepared {
    pub(crate) key: TopicKey,
    suite: Suite,
    msg_id: MessageId,
    ts_ms: u64,
    content_type: String,
    codec: u8,
    pad: u8,
    payload: Vec<u8>,
    pub(crate) sig_input: Vec<u8>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("topic", &self.key.topic)
            .field("msg_id", &self.msg_id)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.key.topic
    }
    /// The tree.
    pub fn tree_id(&self) -> TreeId {
        self.key.keys.tree_id()
    }
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.key.keys.epoch()
    }
    /// Bytes of the (compressed) payload to be sealed.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }
    /// The bytes a signature covers (§4.8); a batch leaf hashes them with its salt.
    pub fn sig_input(&self) -> &[u8] {
        &self.sig_input
    }
}

struct Fields<'a> {
    suite: Suite,
    msg_id: &'a MessageId,
    ts_ms: u64,
    content_type: &'a str,
    codec: u8,
    pad: u8,
    payload: &'a [u8],
}

fn seal_fields(
    key: &TopicKey,
    f: &Fields<'_>,
    sig_in: Option<&[u8]>,
    signing: Signing<'_>,
    rng: &mut impl CryptoRngCore,
) -> Envelope {
    let topic = key.topic.as_str();
    let ct = f.content_type;
    let (codec, pad, payload) = (f.codec, f.pad, f.payload);

    // Header.
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let suite = f.suite;
    let (body_key, commit) = body_keys(&key.message_key, &nonce, suite);
    let name_len = sealed_name_len(topic);
    let sig_len = match signing {
        Signing::Unsigned => 0,
        Signing::Ed25519(_) => 96,
        Signing::Batch(p) => p.encoded_len(),
    };
    let body_len = 1 + sig_len + 16 + 8 + 2 + ct.len() + 2 + 4 + payload.len();
    let body_total = if pad == PAD_PADME {
        padme(body_len)
    } else {
        body_len
    };
    let hdr = HeaderFields {
        flags: 0,
        key_id: key.keys.key_id(),
        nonce,
        commit,
        tokens: &key.tokens,
    };
    let mut out = Vec::with_capacity(80 + 16 * key.tokens.len() + name_len + body_total + TAG_LEN);
    hdr.write_prefix_in(suite, name_len, &mut out);

    // Sealed name: u16be(len) ‖ name ‖ zeros, to a multiple of 32, under N.
    let name_ad_len = out.len();
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.resize(name_ad_len + name_len - TAG_LEN, 0);
    let nk = name_key(&key.keys, &nonce, suite);
    let (ad, name_pt) = out.split_at_mut(name_ad_len);
    let tag = seal_detached(suite, &nk, &nonce, ad, name_pt);
    out.extend_from_slice(&tag);
    let header_len = out.len();

    // Body.
    match signing {
        Signing::Unsigned => out.push(SIG_NONE),
        Signing::Ed25519(id) => {
            out.push(SIG_ED25519);
            let computed;
            let m = match sig_in {
                Some(m) => m,
                None => {
                    computed = sig_input(
                        &key.keys.tree_id(),
                        key.keys.epoch(),
                        topic,
                        f.msg_id,
                        f.ts_ms,
                        ct,
                        codec,
                        pad,
                        payload,
                    );
                    &computed
                }
            };
            let sig = id.sign(m);
            out.extend_from_slice(id.signing_key().verifying_key().as_bytes());
            out.extend_from_slice(&sig.to_bytes());
        }
        Signing::Batch(p) => {
            out.push(SIG_BATCH);
            p.write(&mut out);
        }
    }
    out.extend_from_slice(&f.msg_id.0);
    out.extend_from_slice(&f.ts_ms.to_be_bytes());
    out.extend_from_slice(&lp(ct.as_bytes()));
    out.extend_from_slice(ct.as_bytes());
    out.push(codec);
    out.push(pad);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.resize(header_len + body_total, 0);
    let (ad, body) = out.split_at_mut(header_len);
    let tag = seal_detached(suite, &body_key, &nonce, ad, body);
    out.extend_from_slice(&tag);
    Envelope::from_bytes(out.into()).expect("a sealed envelope has a valid header")
}

/// Opens envelopes. Keeps a zstd decompression context for reuse.
pub struct Opener {
    zstd: Decompressors,
    max_payload: usize,
    roots: VerifiedRoots,
    /// Authenticated nodes of the last batches verified here (no lock: per opener).
    nodes: BatchNodes,
    keys: SenderKeys,
    /// Valid topic names, tokens and message keys of the topics opened
    /// ([`crate::memo`]).
    memo: KeyMemo,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("max_payload", &self.max_payload)
            .field("roots", &self.roots)
            .finish()
    }
}

impl Default for Opener {
    fn default() -> Self {
        Self::new()
    }
}

enum SenderProof {
    None,
    Ed25519(VerifyingKey, Signature),
    Batch(BatchProof),
}

struct Body<'a> {
    sender: SenderProof,
    msg_id: MessageId,
    ts_ms: u64,
    content_type: &'a str,
    codec: u8,
    pad: u8,
    payload: &'a [u8],
}

fn parse_body(b: &[u8]) -> Result<Body<'_>, BodyError> {
    parse_body_with(b, None)
}

fn parse_body_with<'b>(b: &'b [u8], keys: Option<&mut SenderKeys>) -> Result<Body<'b>, BodyError> {
    const M: BodyError = BodyError::Malformed;
    let mut keys = keys;
    let (&scheme, mut rest) = b.split_first().ok_or(M)?;
    let sender = match SignatureScheme::from_byte(scheme)
        .map_err(|_| BodyError::UnsupportedScheme(scheme))?
    {
        SignatureScheme::None => SenderProof::None,
        SignatureScheme::Ed25519 => {
            if rest.len() < 96 {
                return Err(M);
            }
            let pk: &[u8; 32] = rest[..32].try_into().expect("32");
            let pk = match keys.as_deref_mut() {
                Some(k) => k.decode(pk),
                None => VerifyingKey::from_bytes(pk).ok(),
            }
            .ok_or(M)?;
            let sig = Signature::from_bytes(rest[32..96].try_into().expect("64"));
            rest = &rest[96..];
            SenderProof::Ed25519(pk, sig)
        }
        SignatureScheme::Batch => {
            let (p, r) = BatchProof::parse_with(rest, keys)?;
            rest = r;
            SenderProof::Batch(p)
        }
    };
    let mut take = |n: usize| -> Result<&[u8], BodyError> {
        if rest.len() < n {
            return Err(M);
        }
        let (a, r) = rest.split_at(n);
        rest = r;
        Ok(a)
    };
    let msg_id = MessageId(take(16)?.try_into().map_err(|_| M)?);
    let ts_ms = u64::from_be_bytes(take(8)?.try_into().map_err(|_| M)?);
    let ct_len = u16::from_be_bytes(take(2)?.try_into().map_err(|_| M)?) as usize;
    if ct_len > MAX_CONTENT_TYPE_LEN {
        return Err(M);
    }
    let content_type = std::str::from_utf8(take(ct_len)?).map_err(|_| M)?;
    let codec = take(1)?[0];
    let pad = take(1)?[0];
    let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| M)?) as usize;
    let payload = take(len)?;
    let padding = rest;
    let pad_ok = match pad {
        PAD_NONE => padding.is_empty(),
        // Exactly the Padmé length, all zeros: one valid plaintext per message.
        PAD_PADME => b.len() == padme(b.len() - padding.len()) && padding.iter().all(|b| *b == 0),
        _ => false,
    };
    if !pad_ok || codec > CODEC_MAX {
        return Err(M);
    }
    Ok(Body {
        sender,
        msg_id,
        ts_ms,
        content_type,
        codec,
        pad,
        payload,
    })
}

/// Step 9 of §4.10: the sender, verified over the bound fields (scheme 1: one signature;
/// scheme 2: the inclusion path to a root whose signature verified, or is in `cache`).
fn verify_sender(
    b: &Body<'_>,
    tree_id: &TreeId,
    epoch: u64,
    topic: &str,
    cache: RootCache<'_>,
    nodes: Option<&mut BatchNodes>,
) -> Result<Option<SenderId>, BodyError> {
    let input = || {
        sig_input(
            tree_id,
            epoch,
            topic,
            &b.msg_id,
            b.ts_ms,
            b.content_type,
            b.codec,
            b.pad,
            b.payload,
        )
    };
    match &b.sender {
        SenderProof::None => Ok(None),
        SenderProof::Ed25519(pk, sig) => {
            pk.verify_strict(&input(), sig)
                .map_err(|_| BodyError::BadSignature)?;
            Ok(Some(SenderId(*pk)))
        }
        SenderProof::Batch(p) => p
            .verify_in(tree_id, epoch, &input(), cache, nodes)
            .map(Some),
    }
}

/// Parses a decrypted body plaintext of a message of `topic` in tree `tree_id`, epoch
/// `epoch`, and verifies its signature (no cache) — the body checks of §4.10 steps 8 and 9
/// with a typed reason. [`Opener`] applies the same checks and reports only [`OpenError`];
/// this is for code that already holds the plaintext (tests, vectors, tools).
pub fn check_body(
    tree_id: &TreeId,
    epoch: u64,
    topic: &Topic,
    body: &[u8],
) -> Result<Option<SenderId>, BodyError> {
    let b = parse_body(body)?;
    verify_sender(&b, tree_id, epoch, topic.as_str(), RootCache::None, None)
}

impl Opener {
    /// An opener with the default payload cap (16 MiB).
    pub fn new() -> Self {
        Self::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }

    /// An opener that rejects payloads that decompress beyond `max` bytes.
    pub fn with_max_payload(max: usize) -> Self {
        Opener {
            zstd: Decompressors::new().expect("zstd context"),
            max_payload: max,
            roots: VerifiedRoots::default(),
            nodes: BatchNodes::default(),
            keys: SenderKeys::default(),
            memo: KeyMemo::default(),
        }
    }

    /// Replaces the cache of verified batch roots (default: [`VerifiedRoots::DEFAULT_CAPACITY`]).
    pub fn with_verified_roots(mut self, roots: VerifiedRoots) -> Self {
        self.nodes = if roots.is_enabled() {
            BatchNodes::default()
        } else {
            BatchNodes::off()
        };
        self.roots = roots;
        self
    }

    /// The cache of verified batch roots.
    pub fn verified_roots(&self) -> &VerifiedRoots {
        &self.roots
    }

    /// Opens a live message (see [`Opener::open_with`] with `live = true`).
    pub fn open(
        &mut self,
        keyring: &Keyring,
        env: &Envelope,
        now_ms: u64,
    ) -> Result<Opened, OpenError> {
        self.open_with(keyring, env, now_ms, true)
    }

    /// Opens `env` with the keys in `keyring`, at time `now_ms`. `live` says whether the
    /// relay delivered it live (`true`) or replayed it from history (`false`): a message of
    /// a superseded epoch must be dated before the rotation cutoff either way, and when live
    /// must also arrive within the grace period ([`Keyring::accepts_message`]). Every
    /// failure is the same [`OpenError`].
    pub fn open_with(
        &mut self,
        keyring: &Keyring,
        env: &Envelope,
        now_ms: u64,
        live: bool,
    ) -> Result<Opened, OpenError> {
        self.open_in(keyring, env, now_ms, live, None)
    }

    /// [`Opener::open_with`], looking batch roots up in `roots` (shared with openers on
    /// other threads) instead of this opener's own cache: a subscriber that opens on
    /// several threads still verifies each batch signature once.
    pub fn open_shared(
        &mut self,
        keyring: &Keyring,
        env: &Envelope,
        now_ms: u64,
        live: bool,
        roots: &SharedRoots,
    ) -> Result<Opened, OpenError> {
        self.open_in(keyring, env, now_ms, live, Some(roots))
    }

    /// The cap [`Opener::open`] and its variants decompress under.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// [`Opener::open_shared`] up to the payload (§4.10 steps 1–9): every check but
    /// decompression, with the same opaque error. [`Opener::decompress`] finishes it.
    pub fn authenticate_shared(
        &mut self,
        keyring: &Keyring,
        env: &Envelope,
        now_ms: u64,
        live: bool,
        roots: &SharedRoots,
    ) -> Result<Authentic, OpenError> {
        self.authenticate_in(keyring, env, now_ms, live, Some(roots))
    }

    /// Step 10 of §4.10: decompresses `a`'s payload under the cap `max` (declared size
    /// checked before allocating, §4.6). Every failure is the opaque [`OpenError`] but a
    /// dictionary the keyring does not hold (the body is authentic and the cause is local).
    pub fn decompress(
        &mut self,
        keyring: &Keyring,
        a: &Authentic,
        max: usize,
    ) -> Result<Vec<u8>, OpenError> {
        // Only the dictionaries that came with the message's tree (§4.6.1): a member of one
        // tree must not make a message of it copy bytes out of another tree's dictionary.
        let tree = a.tree_id;
        self.zstd
            .decompress(a.codec, a.stored(), max, |id| {
                keyring.dictionary_for(tree, id)
            })
            .map_err(|e| match e {
                BodyError::MissingDictionary(id) => OpenError::missing(id),
                _ => OpenError::OPAQUE,
            })
    }

    /// The whole message from an authenticated one: the payload decompressed under `max`
    /// ([`Opener::decompress`]), or, stored uncompressed (codec 0), the decrypted body itself
    /// cut down to the payload — no copy, and no zeroizing of a buffer whose plaintext the
    /// caller gets anyway (a copy handed out beside a wiped original protects nothing).
    pub fn finish(
        &mut self,
        keyring: &Keyring,
        a: Authentic,
        max: usize,
    ) -> Result<Opened, OpenError> {
        if a.codec != CODEC_NONE {
            let payload = self.decompress(keyring, &a, max)?;
            return Ok(a.into_opened(payload));
        }
        a.into_opened_uncompressed(max)
    }

    fn open_in(
        &mut self,
        keyring: &Keyring,
        env: &Envelope,
        now_ms: u64,
        live: bool,
        shared: Option<&SharedRoots>,
    ) -> Result<Opened, OpenError> {
        let a = self.authenticate_in(keyring, env, now_ms, live, shared)?;
        // 5. Decompress with a hard cap (declared size checked before allocating).
        self.finish(keyring, a, self.max_payload)
    }

    fn authenticate_in(
        &mut self,
        keyring: &Keyring,
        env: &Envelope,
        now_ms: u64,
        live: bool,
        shared: Option<&SharedRoots>,
    ) -> Result<Authentic, OpenError> {
        // 1. The key id names a tree and epoch we hold (its dates are checked below).
        if env.flags() != 0 {
            return Err(OpenError::OPAQUE);
        }
        let keys = keyring.held_epoch(&env.key_id()).ok_or(OpenError::OPAQUE)?;
        let nonce = env.nonce();
        let suite = env.cipher_suite();

        // 2. Open the sealed name, check it is a valid topic, recompute every token.
        let sealed = env.sealed_name();
        let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut name = Zeroizing::new(ct.to_vec());
        let nk = name_key(keys, nonce, suite);
        open_detached(suite, &nk, nonce, env.name_ad(), &mut name, tag)?;
        let n = u16::from_be_bytes([name[0], name[1]]) as usize;
        if 2 + n > name.len()
            || name[2 + n..].iter().any(|b| *b != 0)
            || sealed_name_len_of(n) != sealed.len()
        {
            return Err(OpenError::OPAQUE);
        }
        let topic = std::str::from_utf8(&name[2..2 + n])
            .map_err(|_| OpenError::OPAQUE)
            .and_then(|s| self.memo.topic(s).ok_or(OpenError::OPAQUE))?;
        if topic.levels() != env.levels() {
            return Err(OpenError::OPAQUE);
        }
        let mut same = subtle::Choice::from(1u8);
        for (want, tok) in self.memo.tokens(keys, &topic).iter().zip(env.tokens()) {
            same &= want.as_bytes().ct_eq(tok.as_bytes());
        }
        if !bool::from(same) {
            return Err(OpenError::OPAQUE);
        }

        // 3. Derive M(t) from a held grant, check the key commitment, open the body.
        let ok = keyring
            .open_key_memo(&env.key_id(), &topic, &mut self.memo)
            .ok_or(OpenError::OPAQUE)?;
        let (body_key, commit) = body_keys(&ok.key, nonce, suite);
        if !bool::from(commit.ct_eq(env.commit())) {
            return Err(OpenError::OPAQUE);
        }
        let ctext = env.ciphertext();
        let (ct, tag) = ctext.split_at(ctext.len() - TAG_LEN);
        let mut body = Zeroizing::new(ct.to_vec());
        open_detached(suite, &body_key, nonce, env.header(), &mut body, tag)?;
        let b = parse_body_with(&body, Some(&mut self.keys)).map_err(|_| OpenError::OPAQUE)?;
        // The epoch accepts a message of this date (cutoff, not_after, live grace).
        if !keyring.accepts_message(&env.key_id(), b.ts_ms, now_ms, live) {
            return Err(OpenError::OPAQUE);
        }

        // 4. Verify the signature over the bound fields, before decompressing.
        let sender = verify_sender(
            &b,
            &keys.tree_id(),
            keys.epoch(),
            topic.as_str(),
            match shared {
                Some(s) => RootCache::Shared(s),
                None => RootCache::Own(&mut self.roots),
            },
            Some(&mut self.nodes),
        )
        .map_err(|_| OpenError::OPAQUE)?;

        // The payload's place in the body (it borrows from it): kept with the body for
        // step 10, decompression (`Opener::decompress`).
        let start = b.payload.as_ptr() as usize - body.as_ptr() as usize;
        let payload = start..start + b.payload.len();
        let (msg_id, ts_ms, codec) = (b.msg_id, b.ts_ms, b.codec);
        let content_type = b.content_type.to_owned();
        Ok(Authentic {
            topic,
            sender,
            msg_id,
            ts_ms,
            content_type,
            tree_id: keys.tree_id(),
            epoch: keys.epoch(),
            provenance: ok.provenance,
            codec,
            body,
            payload,
        })
    }
}

fn sealed_name_len_of(name_len: usize) -> usize {
    (2 + name_len).div_ceil(NAME_PAD) * NAME_PAD + TAG_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Scope, TreeKey};
    use rand_chacha::rand_core::SeedableRng;

    fn setup() -> (rand_chacha::ChaCha20Rng, TreeKey, Keyring, Identity) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let tk = TreeKey::generate_with("home", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let id = Identity::generate_with(&mut rng);
        (rng, tk, kr, id)
    }

    fn msg(payload: &[u8]) -> Outgoing<'_> {
        Outgoing {
            payload,
            content_type: "application/cbor",
            msg_id: MessageId([5; 16]),
            ts_ms: 1_700_000_000_000,
        }
    }

    /// An open worker takes an uncompressed payload out of the body itself: the same bytes
    /// as `finish` hands over, under the same cap; a compressed one is left for `decompress`.
    #[test]
    fn an_uncompressed_payload_taken_early_is_what_finish_hands_over() {
        let (mut rng, _tk, kr, id) = setup();
        let topic = Topic::new("a/b").unwrap();
        let key = kr.topic_key(&topic).unwrap();
        let payload = b"seventeen bytes!!".repeat(9);
        let mut sealer = Sealer::new();
        let roots = SharedRoots::default();
        let mut opener = Opener::new();
        let plain_opts = SealOptions {
            compression: Compression::None,
            ..SealOptions::default()
        };
        let env = sealer
            .seal(&key, &msg(&payload), &plain_opts, Some(&id), &mut rng)
            .unwrap();
        let auth = |o: &mut Opener, e: &Envelope| o.authenticate_shared(&kr, e, 0, false, &roots);
        let mut a = auth(&mut opener, &env).unwrap();
        assert!(!a.compressed());
        let taken = a
            .take_payload_if_uncompressed(payload.len())
            .unwrap()
            .unwrap();
        assert_eq!(taken, payload);
        assert!(a.stored().is_empty());
        let again = auth(&mut opener, &env).unwrap();
        let whole = opener.finish(&kr, again, usize::MAX).unwrap();
        assert_eq!(a.into_opened(taken), whole);
        // Over the cap: refused as `finish` refuses it.
        let mut a = auth(&mut opener, &env).unwrap();
        assert_eq!(
            a.take_payload_if_uncompressed(payload.len() - 1),
            Some(Err(OpenError::OPAQUE))
        );
        // Compressed: nothing taken, the body intact for `decompress`.
        let zstd = SealOptions {
            compression: Compression::Zstd(3),
            ..SealOptions::default()
        };
        let env = sealer
            .seal(&key, &msg(&payload), &zstd, Some(&id), &mut rng)
            .unwrap();
        let mut a = auth(&mut opener, &env).unwrap();
        assert!(a.compressed());
        assert_eq!(a.take_payload_if_uncompressed(usize::MAX), None);
        assert_eq!(opener.decompress(&kr, &a, usize::MAX).unwrap(), payload);
    }

    #[test]
    fn zstd_dict_seals_opens_and_reports_a_missing_dictionary() {
        use crate::dict::Dictionary;
        let (mut rng, tk, mut kr, id) = setup();
        let topic = Topic::new("sensor/kitchen/temp").unwrap();
        let sample =
            br#"{"device":"th-0042","room":"kitchen","celsius":21.50,"humidity":41,"ok":true}"#;
        let dict = Dictionary::new(sample.repeat(3)).unwrap();
        let opts = SealOptions {
            compression: Compression::ZstdDict {
                level: 3,
                dict: dict.id(),
            },
            ..SealOptions::default()
        };
        // Not held: sealing names the dictionary it lacks.
        let key = kr.topic_key(&topic).unwrap();
        assert_eq!(
            Sealer::new()
                .seal(&key, &msg(sample), &opts, Some(&id), &mut rng)
                .unwrap_err(),
            SealError::MissingDictionary(dict.id())
        );
        assert!(kr.add_dictionary(dict.clone()));
        assert!(!kr.add_dictionary(dict.clone()));
        let key = kr.topic_key(&topic).unwrap();
        let mut sealer = Sealer::new();
        let env = sealer
            .seal(&key, &msg(sample), &opts, Some(&id), &mut rng)
            .unwrap();
        let plain = sealer
            .seal(
                &key,
                &msg(sample),
                &SealOptions::default(),
                Some(&id),
                &mut rng,
            )
            .unwrap();
        assert!(env.as_bytes().len() < plain.as_bytes().len());
        let o = Opener::new().open(&kr, &env, 0).unwrap();
        assert_eq!(o.payload, sample);
        // A receiver without it: the typed error, naming the id (the body was authentic).
        let mut other = Keyring::new();
        other.add_tree_key_at(&tk, 0).unwrap();
        let e = Opener::new().open(&other, &env, 0).unwrap_err();
        assert_eq!(e.missing_dictionary(), Some(dict.id()));
        assert!(e.to_string().contains(&dict.id().to_string()));
        // Every other failure stays opaque.
        let mut bad = env.as_bytes().to_vec();
        *bad.last_mut().unwrap() ^= 1;
        let bad = Envelope::from_slice(&bad).unwrap();
        assert_eq!(Opener::new().open(&kr, &bad, 0), Err(OpenError::OPAQUE));
        // Names round-trip.
        let c = opts.compression;
        assert_eq!(Compression::from_name(&c.to_string()), Some(c));
        assert_eq!(
            Compression::from_name(&format!("zstd-dict:{}", dict.id())),
            Some(Compression::ZstdDict {
                level: 3,
                dict: dict.id()
            })
        );
        assert_eq!(Compression::from_name("zstd-dict:00"), None);
    }

    /// A zstd frame (RFC 8878) with no literals and one sequence copying the last `len`
    /// (3..=34) bytes before the output: with a raw-content dictionary, the dictionary's.
    fn frame_copying_dictionary_tail(len: u8) -> Vec<u8> {
        assert!((3..=34).contains(&len));
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
        // Single segment, 1-byte Frame_Content_Size, no Dictionary_ID, no checksum.
        f.extend_from_slice(&[0x20, len]);
        // Offset_Value = len + 3 = (1 << code) + extra bits, read from a backward stream.
        let ov = u32::from(len) + 3;
        let code = 31 - ov.leading_zeros();
        let extra = ov - (1 << code);
        let bits = (1u32 << code) | extra; // the end marker above `code` extra bits
        let mut stream = bits.to_le_bytes().to_vec();
        stream.truncate((code as usize + 1).div_ceil(8));
        let mut block = vec![
            0x00, // Raw literals, 0 of them
            0x01, // one sequence
            0x54, // RLE for literal lengths, offsets and match lengths
            0x00, // literal length 0
            code as u8,
            len - 3, // match length code: len
        ];
        block.extend_from_slice(&stream);
        let header = 1 | (2 << 1) | ((block.len() as u32) << 3); // last, compressed
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.extend_from_slice(&block);
        f
    }

    /// Review finding (B): dictionaries were not tied to a tree. A member of tree A who
    /// learned the id of tree B's dictionary sent a tree-A codec-3 message whose frame
    /// copies bytes out of B's dictionary, and the victim's client output B's dictionary
    /// content as a tree-A message. A tree's messages now decode only with dictionaries
    /// that came with that tree (or were added without a tree by the application).
    #[test]
    fn a_message_of_one_tree_cannot_read_another_trees_dictionary() {
        use crate::dict::Dictionary;
        use crate::invite::Invite;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(12);
        let tree_a = TreeKey::generate_with("team-a", &mut rng).unwrap();
        let tree_b = TreeKey::generate_with("team-b", &mut rng).unwrap();
        let (admin_b, mallory, victim) = (
            Identity::generate_with(&mut rng),
            Identity::generate_with(&mut rng),
            Identity::generate_with(&mut rng),
        );
        let secret = b"tree B only: the door code is 4711, the safe 0815, be discreet";
        let dict_b = Dictionary::new(secret.to_vec()).unwrap();
        let tail = &secret[secret.len() - 32..];
        // The victim holds tree A and, from B's admin, tree B with its dictionary.
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tree_a, 0).unwrap();
        let inv = Invite::seal_with_dictionaries(
            &tree_b.grant_all(),
            std::slice::from_ref(&dict_b),
            &admin_b,
            &victim.public_id(),
            u64::MAX,
            &mut rng,
        )
        .unwrap();
        let out = kr
            .accept_invite_at(&Invite::open(&inv, &victim, 0).unwrap(), 0)
            .unwrap();
        assert_eq!(out.dictionaries_added, vec![dict_b.id()]);
        assert_eq!(
            kr.dictionary_for(tree_b.tree_id(), &dict_b.id()),
            Some(&dict_b)
        );
        assert_eq!(kr.dictionary_for(tree_a.tree_id(), &dict_b.id()), None);

        // Mallory, a member of tree A, seals a tree-A message naming B's dictionary.
        let topic = Topic::new("chat/general").unwrap();
        let mut mallorys = Keyring::new();
        mallorys.add_tree_key_at(&tree_a, 0).unwrap();
        let key_a = mallorys.topic_key(&topic).unwrap();
        let mut payload = dict_b.id().0.to_vec();
        payload.extend_from_slice(&frame_copying_dictionary_tail(32));
        // (The frame does decode to the tail of B's dictionary, given it.)
        let mut dicts = crate::dict::Dictionaries::new();
        dicts.insert(dict_b.clone());
        assert_eq!(
            crate::compress::decompress_dict(CODEC_ZSTD_DICT, &payload, 1 << 20, &dicts).unwrap(),
            tail
        );
        let fields = Fields {
            suite: Suite::XChaCha20Poly1305,
            msg_id: &MessageId([7; 16]),
            ts_ms: 1_700_000_000_000,
            content_type: "text/plain",
            codec: CODEC_ZSTD_DICT,
            pad: PAD_NONE,
            payload: &payload,
        };
        let env = seal_fields(&key_a, &fields, None, Signing::Ed25519(&mallory), &mut rng);
        let e = Opener::new()
            .open(&kr, &env, 1_700_000_000_000)
            .unwrap_err();
        assert_eq!(e.missing_dictionary(), Some(dict_b.id()));
        // The victim cannot seal tree A's topics with it either.
        let opts = SealOptions {
            compression: Compression::ZstdDict {
                level: 3,
                dict: dict_b.id(),
            },
            ..SealOptions::default()
        };
        let sample = secret.repeat(4);
        assert_eq!(
            Sealer::new()
                .seal(
                    &kr.topic_key_in(tree_a.tree_id(), &topic).unwrap(),
                    &msg(&sample),
                    &opts,
                    Some(&victim),
                    &mut rng
                )
                .unwrap_err(),
            SealError::MissingDictionary(dict_b.id())
        );
        // Tree B's own messages still use it.
        let env_b = Sealer::new()
            .seal(
                &kr.topic_key_in(tree_b.tree_id(), &topic).unwrap(),
                &msg(&sample),
                &opts,
                Some(&victim),
                &mut rng,
            )
            .unwrap();
        let o = Opener::new().open(&kr, &env_b, 1_700_000_000_000).unwrap();
        assert_eq!(o.payload, sample);

        // The same dictionary carried for tree A too (an invite of A) is kept for each.
        let inv_a = Invite::seal_with_dictionaries(
            &tree_a.grant_all(),
            std::slice::from_ref(&dict_b),
            &mallory,
            &victim.public_id(),
            u64::MAX,
            &mut rng,
        )
        .unwrap();
        let out = kr
            .accept_invite_at(&Invite::open(&inv_a, &victim, 0).unwrap(), 0)
            .unwrap();
        assert_eq!(out.dictionaries_added, vec![dict_b.id()]);
        assert_eq!(kr.dictionaries().len(), 1, "held once");
        let o = Opener::new().open(&kr, &env, 1_700_000_000_000).unwrap();
        assert_eq!(o.payload, tail);
        // Removing it removes it for every tree.
        assert!(kr.remove_dictionary(&dict_b.id()));
        assert_eq!(kr.dictionary_for(tree_b.tree_id(), &dict_b.id()), None);
        assert_eq!(kr.dictionary_for(tree_a.tree_id(), &dict_b.id()), None);
        // A dictionary the application adds without a tree serves every tree.
        assert!(kr.add_dictionary(dict_b.clone()));
        assert!(Opener::new().open(&kr, &env, 1_700_000_000_000).is_ok());
    }

    /// Review finding: the sealer's dictionary compressor, cached by (level, id), was
    /// reused without asking the topic key for the dictionary, so one long-lived sealer
    /// that sealed tree B with B's dictionary then sealed a tree-A topic set to the same
    /// dictionary, which tree A's members do not hold (and cannot open).
    #[test]
    fn a_cached_dictionary_compressor_does_not_seal_another_trees_topic() {
        use crate::dict::Dictionary;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(13);
        let tree_a = TreeKey::generate_with("team-a", &mut rng).unwrap();
        let tree_b = TreeKey::generate_with("team-b", &mut rng).unwrap();
        let id = Identity::generate_with(&mut rng);
        let sample = b"tree B's dictionary text, tree B's dictionary text".repeat(8);
        let dict_b = Dictionary::new(sample.clone()).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tree_a, 0).unwrap();
        kr.add_tree_key_at(&tree_b, 0).unwrap();
        assert!(kr
            .add_dictionary_for(tree_b.tree_id(), dict_b.clone())
            .unwrap());
        let topic = Topic::new("chat/general").unwrap();
        let opts = SealOptions {
            compression: Compression::ZstdDict {
                level: 3,
                dict: dict_b.id(),
            },
            ..SealOptions::default()
        };
        let mut sealer = Sealer::new();
        let key_b = kr.topic_key_in(tree_b.tree_id(), &topic).unwrap();
        let env = sealer
            .seal(&key_b, &msg(&sample), &opts, Some(&id), &mut rng)
            .unwrap();
        let o = Opener::new().open(&kr, &env, 1_700_000_000_000).unwrap();
        assert_eq!(o.payload, sample);
        let key_a = kr.topic_key_in(tree_a.tree_id(), &topic).unwrap();
        assert_eq!(
            sealer
                .seal(&key_a, &msg(&sample), &opts, Some(&id), &mut rng)
                .unwrap_err(),
            SealError::MissingDictionary(dict_b.id())
        );
        // Tree B still seals with the same sealer afterwards.
        assert!(sealer
            .seal(&key_b, &msg(&sample), &opts, Some(&id), &mut rng)
            .is_ok());
    }

    #[test]
    fn padme_values() {
        assert_eq!(padme(0), 0);
        assert_eq!(padme(1), 1);
        assert_eq!(padme(9), 10);
        assert_eq!(padme(1000), 1024);
        assert_eq!(padme(1025), 1088); // E = 10, S = 4: round up to a multiple of 64
        for n in 2..5000 {
            let p = padme(n);
            assert!(p >= n && p - n <= n / 8 + 1, "{n} -> {p}");
        }
    }

    #[test]
    fn roundtrip_all_modes() {
        let (mut rng, _tk, kr, id) = setup();
        let topic = Topic::new("sensor/kitchen/temp").unwrap();
        let key = kr.topic_key(&topic).unwrap();
        let mut sealer = Sealer::new();
        let mut opener = Opener::new();
        let data = b"hello hello hello hello hello hello hello".repeat(10);
        for (compression, suite) in [
            Compression::None,
            Compression::Zstd(1),
            Compression::Zstd(3),
            Compression::Lz4,
        ]
        .into_iter()
        .flat_map(|c| Suite::ALL.map(|s| (c, s)))
        {
            for padding in [Padding::None, Padding::Padme] {
                for signer in [None, Some(&id)] {
                    let opts = SealOptions {
                        compression,
                        padding,
                        suite,
                    };
                    let env = sealer
                        .seal(&key, &msg(&data), &opts, signer, &mut rng)
                        .unwrap();
                    assert_eq!(env.cipher_suite(), suite);
                    assert!(
                        compression == Compression::None || env.len() < data.len(),
                        "{compression} compresses"
                    );
                    let o = opener.open(&kr, &env, 0).unwrap();
                    assert_eq!(o.payload, data);
                    assert_eq!(o.topic, topic);
                    assert_eq!(o.sender, signer.map(|s| s.sender_id()));
                    assert_eq!(o.content_type, "application/cbor");
                    assert_eq!(o.msg_id, MessageId([5; 16]));
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_fails() {
        let (mut rng, _tk, kr, id) = setup();
        let key = kr.topic_key(&Topic::new("a/b").unwrap()).unwrap();
        for suite in Suite::ALL {
            let opts = SealOptions {
                suite,
                compression: Compression::Lz4,
                ..SealOptions::default()
            };
            let env = Sealer::new()
                .seal(&key, &msg(&[b'x'; 64]), &opts, Some(&id), &mut rng)
                .unwrap();
            let mut opener = Opener::new();
            let bytes = env.as_bytes().to_vec();
            for i in 0..bytes.len() {
                for x in [0x01, 0x02, 0x80] {
                    let mut b = bytes.clone();
                    b[i] ^= x;
                    if let Ok(e) = Envelope::from_slice(&b) {
                        assert_eq!(opener.open(&kr, &e, 0), Err(OpenError::OPAQUE), "byte {i}");
                    }
                }
            }
        }
    }

    /// Suite 1 ↔ 3 (a relay rewriting header byte 1 to another known suite): the
    /// envelope still parses, but the key commitment (derived with the suite) and the AD
    /// both differ, so it does not open; and suite 3 really is AES-256-GCM under the
    /// derived keys.
    #[test]
    fn suite_byte_is_bound_and_suite_3_is_aes_gcm() {
        let (mut rng, tk, kr, _id) = setup();
        let topic = Topic::new("a/b").unwrap();
        let key = kr.topic_key(&topic).unwrap();
        for suite in Suite::ALL {
            let opts = SealOptions {
                suite,
                ..SealOptions::default()
            };
            let env = Sealer::new()
                .seal(&key, &msg(b"hi"), &opts, None, &mut rng)
                .unwrap();
            let mut b = env.as_bytes().to_vec();
            b[1] = if suite == Suite::Aes256Gcm { 1 } else { 3 };
            let e = Envelope::from_slice(&b).unwrap();
            assert_eq!(Opener::new().open(&kr, &e, 0), Err(OpenError::OPAQUE));
            // The same nonce gives another key and commitment per suite.
            let mk = tk.grant_all().message_key(&topic).unwrap();
            let (k1, c1) = body_keys(&mk, env.nonce(), Suite::XChaCha20Poly1305);
            let (k3, c3) = body_keys(&mk, env.nonce(), Suite::Aes256Gcm);
            assert_ne!(*k1, *k3);
            assert_ne!(c1, c3);
            let (bk, commit) = body_keys(&mk, env.nonce(), suite);
            assert_eq!(&commit, env.commit());
            let ct = env.ciphertext();
            let (c, tg) = ct.split_at(ct.len() - TAG_LEN);
            let mut body = c.to_vec();
            if suite == Suite::Aes256Gcm {
                use aes_gcm::aead::{AeadInPlace, KeyInit};
                aes_gcm::Aes256Gcm::new(bk.as_ref().into())
                    .decrypt_in_place_detached(
                        aes_gcm::Nonce::from_slice(&env.nonce()[..12]),
                        env.header(),
                        &mut body,
                        aes_gcm::Tag::from_slice(tg),
                    )
                    .unwrap();
            } else {
                open_detached(suite, &bk, env.nonce(), env.header(), &mut body, tg).unwrap();
            }
            assert_eq!(body[0], SIG_NONE);
        }
    }

    /// LZ4 payloads that lie about their size are refused (opaquely) before allocating,
    /// and the cap applies to LZ4 exactly as to zstd.
    #[test]
    fn lz4_cap_and_bad_size_refused() {
        let (mut rng, tk, kr, _id) = setup();
        let topic = Topic::new("a").unwrap();
        let key = kr.topic_key(&topic).unwrap();
        let big = vec![0u8; 1 << 20];
        let opts = SealOptions {
            compression: Compression::Lz4,
            padding: Padding::None,
            suite: Suite::Aes256Gcm,
        };
        let env = Sealer::new()
            .seal(&key, &msg(&big), &opts, None, &mut rng)
            .unwrap();
        assert!(env.len() < 1 << 13, "LZ4 shrinks zeros: {}", env.len());
        assert_eq!(
            Opener::with_max_payload((1 << 20) - 1).open(&kr, &env, 0),
            Err(OpenError::OPAQUE)
        );
        assert_eq!(
            Opener::with_max_payload(1 << 20)
                .open(&kr, &env, 0)
                .unwrap()
                .payload,
            big
        );
        // Rewrite the declared size inside a validly encrypted, unsigned body.
        let mk = tk.grant_all().message_key(&topic).unwrap();
        let (bk, _) = body_keys(&mk, env.nonce(), Suite::Aes256Gcm);
        let ct = env.ciphertext();
        let (c, tg) = ct.split_at(ct.len() - TAG_LEN);
        let mut body = c.to_vec();
        open_detached(
            Suite::Aes256Gcm,
            &bk,
            env.nonce(),
            env.header(),
            &mut body,
            tg,
        )
        .unwrap();
        let p = parse_body(&body).unwrap();
        assert_eq!(p.codec, CODEC_LZ4);
        let off = body.len() - p.payload.len();
        for declared in [u32::MAX, (1 << 20) + 1, (1 << 20) - 1] {
            let mut b = body.clone();
            b[off..off + 4].copy_from_slice(&declared.to_be_bytes());
            let tag = seal_detached(Suite::Aes256Gcm, &bk, env.nonce(), env.header(), &mut b);
            let mut e = env.header().to_vec();
            e.extend_from_slice(&b);
            e.extend_from_slice(&tag);
            let e = Envelope::from_slice(&e).unwrap();
            assert_eq!(
                Opener::with_max_payload(1 << 21).open(&kr, &e, 0),
                Err(OpenError::OPAQUE),
                "declared {declared}"
            );
        }
    }

    #[test]
    fn incompressible_payload_is_stored_with_codec_0() {
        let (mut rng, _tk, kr, _id) = setup();
        let key = kr.topic_key(&Topic::new("a").unwrap()).unwrap();
        let mut noise = vec![0u8; 300];
        rand_chacha::rand_core::RngCore::fill_bytes(&mut rng, &mut noise);
        let mut sealer = Sealer::new();
        for compression in [Compression::Lz4, Compression::Zstd(3)] {
            let opts = SealOptions {
                compression,
                ..SealOptions::default()
            };
            let p = sealer.prepare(&key, &msg(&noise), &opts).unwrap();
            assert_eq!(p.codec, CODEC_NONE, "{compression}");
            assert_eq!(p.payload, noise);
        }
    }

    #[test]
    fn compression_names_round_trip() {
        for c in [
            Compression::None,
            Compression::Zstd(1),
            Compression::Zstd(19),
            Compression::Lz4,
        ] {
            assert_eq!(Compression::from_name(&c.to_string()), Some(c));
        }
        assert_eq!(Compression::from_name("zstd"), Some(Compression::Zstd(3)));
        assert_eq!(Compression::from_name("zstd7"), Some(Compression::Zstd(7)));
        assert_eq!(Compression::from_name("zstd:23"), None);
        assert_eq!(Compression::from_name("lz5"), None);
        for s in Suite::ALL {
            assert_eq!(Suite::from_name(s.name()), Some(s));
        }
    }

    #[test]
    fn remembered_derivations_never_outlive_the_keyring_that_allowed_them() {
        let (mut rng, tk, kr, id) = setup();
        let door = Topic::new("sensor/garage/door").unwrap();
        let mut sealer = Sealer::new();
        let mut opener = Opener::new();
        let seal = |s: &mut Sealer, kr: &Keyring, rng: &mut rand_chacha::ChaCha20Rng| {
            let key = s.topic_key(kr, None, &door).unwrap();
            s.seal(&key, &msg(b"open"), &SealOptions::default(), Some(&id), rng)
                .unwrap()
        };
        // Sealed and opened twice with one sealer and one opener: the second time from
        // their memos, with the same result as deriving afresh.
        let e1 = seal(&mut sealer, &kr, &mut rng);
        let e2 = seal(&mut sealer, &kr, &mut rng);
        assert_eq!(
            sealer.topic_key(&kr, None, &door).unwrap().tokens,
            kr.topic_key(&door).unwrap().tokens
        );
        for e in [&e1, &e2, &e1] {
            assert_eq!(opener.open(&kr, e, 0).unwrap().payload, b"open");
        }
        // The same opener with a keyring that does not cover the topic refuses it, though
        // it remembers the topic's keys.
        let mut kitchen = Keyring::new();
        kitchen
            .add_grant_at(
                tk.grant(&Scope::Subtree(Topic::new("sensor/kitchen").unwrap())),
                0,
            )
            .unwrap();
        assert_eq!(opener.open(&kitchen, &e1, 0), Err(OpenError::OPAQUE));
        // Another tree's keyring: the sealer seals with that tree's key, not the
        // remembered one, and only that tree opens it.
        let mut other = Keyring::new();
        other
            .add_tree_key_at(&TreeKey::generate_with("other", &mut rng).unwrap(), 0)
            .unwrap();
        let e3 = seal(&mut sealer, &other, &mut rng);
        assert_eq!(e3.key_id(), other.topic_key(&door).unwrap().keys.key_id());
        assert_eq!(opener.open(&other, &e3, 0).unwrap().payload, b"open");
        assert_eq!(opener.open(&kr, &e3, 0), Err(OpenError::OPAQUE));
        assert_eq!(opener.open(&other, &e1, 0), Err(OpenError::OPAQUE));
        assert_eq!(opener.open(&kr, &e1, 0).unwrap().payload, b"open");
    }

    #[test]
    fn scope_is_enforced_and_wrong_keys_fail() {
        let (mut rng, tk, kr, id) = setup();
        let env = Sealer::new()
            .seal(
                &kr.topic_key(&Topic::new("sensor/garage/door").unwrap())
                    .unwrap(),
                &msg(b"open"),
                &SealOptions::default(),
                Some(&id),
                &mut rng,
            )
            .unwrap();
        // A kitchen-only member learns the topic name exists but cannot open it.
        let mut kitchen = Keyring::new();
        kitchen
            .add_grant_at(
                tk.grant(&Scope::Subtree(Topic::new("sensor/kitchen").unwrap())),
                0,
            )
            .unwrap();
        assert_eq!(
            Opener::new().open(&kitchen, &env, 0),
            Err(OpenError::OPAQUE)
        );
        // Another tree entirely.
        let mut other = Keyring::new();
        other
            .add_tree_key_at(&TreeKey::generate_with("other", &mut rng).unwrap(), 0)
            .unwrap();
        assert_eq!(Opener::new().open(&other, &env, 0), Err(OpenError::OPAQUE));
    }

    #[test]
    fn decompression_bomb_is_capped() {
        let (mut rng, _tk, kr, id) = setup();
        let key = kr.topic_key(&Topic::new("a").unwrap()).unwrap();
        let big = vec![0u8; 1 << 20];
        let env = Sealer::new()
            .seal(
                &key,
                &msg(&big),
                &SealOptions::default(),
                Some(&id),
                &mut rng,
            )
            .unwrap();
        assert!(env.len() < 1 << 12, "compresses well");
        assert_eq!(
            Opener::with_max_payload(1 << 19).open(&kr, &env, 0),
            Err(OpenError::OPAQUE)
        );
        assert_eq!(
            Opener::with_max_payload(1 << 20)
                .open(&kr, &env, 0)
                .unwrap()
                .payload
                .len(),
            1 << 20
        );
    }

    /// Authenticating and decompressing apart give what `open` gives; the declared size is
    /// known before decompressing, for every codec, and the cap is the caller's.
    #[test]
    fn authenticate_then_decompress_is_open() {
        let (mut rng, _tk, kr, id) = setup();
        let key = kr.topic_key(&Topic::new("a").unwrap()).unwrap();
        let roots = SharedRoots::new(4);
        let mut seal = |payload: &[u8], compression| {
            let opts = SealOptions {
                compression,
                ..SealOptions::default()
            };
            Sealer::new()
                .seal(&key, &msg(payload), &opts, Some(&id), &mut rng)
                .unwrap()
        };
        let payload = vec![3u8; 100_000];
        for compression in [Compression::None, Compression::Zstd(3), Compression::Lz4] {
            let env = seal(&payload, compression);
            let mut o = Opener::new();
            let a = o.authenticate_shared(&kr, &env, 0, true, &roots).unwrap();
            assert_eq!(a.declared_len(), Some(100_000), "{compression:?}");
            assert_eq!(a.sender, Some(id.sender_id()));
            assert_eq!(o.decompress(&kr, &a, 99_999), Err(OpenError::OPAQUE));
            let p = o.decompress(&kr, &a, 100_000).unwrap();
            let whole = Opener::new().open(&kr, &env, 0).ok();
            assert_eq!(Some(a.into_opened(p)), whole, "{compression:?}");
            // `finish` (the body itself when stored uncompressed) gives the same, under
            // the same cap.
            let a = o.authenticate_shared(&kr, &env, 0, true, &roots).unwrap();
            assert_eq!(a.compressed(), compression != Compression::None);
            assert_eq!(o.finish(&kr, a, 99_999), Err(OpenError::OPAQUE));
            let a = o.authenticate_shared(&kr, &env, 0, true, &roots).unwrap();
            assert_eq!(o.finish(&kr, a, 100_000).ok(), whole, "{compression:?}");
        }
        // An uncompressed payload of every small length, padded or not, comes out whole.
        for len in [0usize, 1, 2, 31, 32, 33, 1000, 1024, 1025] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let env = seal(&payload, Compression::None);
            let mut o = Opener::new();
            let a = o.authenticate_shared(&kr, &env, 0, true, &roots).unwrap();
            assert!(!a.compressed());
            assert_eq!(o.finish(&kr, a, len).unwrap().payload, payload, "{len}");
        }
    }

    #[test]
    fn batch_scheme_parses_and_a_malformed_batch_body_is_refused() {
        assert_eq!(SignatureScheme::from_byte(2), Ok(SignatureScheme::Batch));
        assert_eq!(
            SignatureScheme::from_byte(3),
            Err(KeyError::UnsupportedSignatureScheme(3))
        );
        assert_eq!(
            SignatureScheme::from_byte(9),
            Err(KeyError::UnsupportedSignatureScheme(9))
        );
        assert_eq!(SignatureScheme::from_byte(1), Ok(SignatureScheme::Ed25519));
        assert_eq!(SignatureScheme::from_byte(0), Ok(SignatureScheme::None));
        // A validly encrypted unsigned body that claims scheme 2 does not open.
        let (mut rng, tk, kr, _id) = setup();
        let topic = Topic::new("a").unwrap();
        let key = kr.topic_key(&topic).unwrap();
        let env = Sealer::new()
            .seal(&key, &msg(b"x"), &SealOptions::default(), None, &mut rng)
            .unwrap();
        let mut opener = Opener::new();
        assert!(opener.open(&kr, &env, 0).is_ok());
        let mk = tk.grant_all().message_key(&topic).unwrap();
        let suite = env.cipher_suite();
        let (bk, _) = body_keys(&mk, env.nonce(), suite);
        let ct = env.ciphertext();
        let (c, tg) = ct.split_at(ct.len() - TAG_LEN);
        let mut body = c.to_vec();
        open_detached(suite, &bk, env.nonce(), env.header(), &mut body, tg).unwrap();
        assert_eq!(body[0], SIG_NONE);
        body[0] = SIG_BATCH;
        let tag = seal_detached(suite, &bk, env.nonce(), env.header(), &mut body);
        let mut b = env.header().to_vec();
        b.extend_from_slice(&body);
        b.extend_from_slice(&tag);
        let e = Envelope::from_slice(&b).unwrap();
        assert_eq!(opener.open(&kr, &e, 0), Err(OpenError::OPAQUE));
    }

    #[test]
    fn shared_roots_one_verification_across_openers_and_races_counted() {
        let (mut rng, _tk, kr, id) = setup();
        let mut sealer = Sealer::new();
        let key = kr.topic_key(&Topic::new("s/t").unwrap()).unwrap();
        let prepared: Vec<Prepared> = (0..6u8)
            .map(|i| {
                sealer
                    .prepare(&key, &msg(&[i]), &SealOptions::default())
                    .unwrap()
            })
            .collect();
        let envs = sealer.seal_batch(&prepared, &id, &mut rng).unwrap();
        let shared = SharedRoots::new(16);
        // Two openers (two worker threads) take turns: one verification for the batch.
        let (mut a, mut b) = (Opener::new(), Opener::new());
        for (i, e) in envs.iter().enumerate() {
            let o = if i % 2 == 0 { &mut a } else { &mut b };
            let opened = o.open_shared(&kr, e, 0, true, &shared).unwrap();
            assert_eq!(opened.payload, [i as u8]);
            assert_eq!(opened.sender, Some(id.sender_id()));
        }
        assert_eq!(shared.lock().len(), 1);
        assert_eq!(shared.lock().hits(), 5);
        assert_eq!(a.verified_roots().hits(), 0, "the own cache is not used");
        // Two openers that both missed the new root (racing) verify twice: counted.
        let fresh = SharedRoots::new(16);
        let root = |e: &Envelope| {
            let mut o = Opener::new();
            o.open(&kr, e, 0).unwrap();
            o.roots.order[0]
        };
        let k = root(&envs[0]);
        fresh.lock().insert(k);
        fresh.lock().insert(k);
        let f = fresh.lock();
        assert_eq!((f.len(), f.raced()), (1, 1));
    }

    #[test]
    fn sender_keys_cached_decode_like_fresh_ones() {
        let (_, _, _, id) = setup();
        let mut keys = SenderKeys::default();
        let pk = id.sender_id().to_bytes();
        assert_eq!(
            keys.decode(&pk),
            Some(VerifyingKey::from_bytes(&pk).unwrap())
        );
        assert_eq!(
            keys.decode(&pk),
            Some(VerifyingKey::from_bytes(&pk).unwrap())
        );
        // Not a point: refused, and not remembered.
        let mut bad = [0u8; 32];
        bad[0] = 2;
        bad[31] = 0x80;
        if VerifyingKey::from_bytes(&bad).is_err() {
            assert_eq!(keys.decode(&bad), None);
        }
    }

    #[test]
    fn batch_roundtrip_one_verification_and_mixed_epochs_refused() {
        let (mut rng, tk, kr, id) = setup();
        let mut sealer = Sealer::new();
        let topics = ["a", "a/b", "c/d/e", "f", "g"];
        let prepared: Vec<Prepared> = topics
            .iter()
            .map(|t| {
                let key = kr.topic_key(&Topic::new(*t).unwrap()).unwrap();
                sealer
                    .prepare(&key, &msg(t.as_bytes()), &SealOptions::default())
                    .unwrap()
            })
            .collect();
        let envs = sealer.seal_batch(&prepared, &id, &mut rng).unwrap();
        let mut opener = Opener::new();
        for (t, e) in topics.iter().zip(&envs) {
            let o = opener.open(&kr, e, 0).unwrap();
            assert_eq!(o.topic.as_str(), *t);
            assert_eq!(o.payload, t.as_bytes());
            assert_eq!(o.sender, Some(id.sender_id()));
        }
        assert_eq!(opener.verified_roots().len(), 1);
        assert_eq!(opener.verified_roots().hits(), 4);
        // Caching off: no root and no batch node is remembered, each message verifies.
        let mut cold = Opener::new().with_verified_roots(VerifiedRoots::new(0));
        for e in &envs {
            assert!(cold.open(&kr, e, 0).is_ok());
        }
        assert_eq!(
            (cold.verified_roots().len(), cold.verified_roots().hits()),
            (0, 0)
        );
        assert_eq!((cold.nodes.len(), opener.nodes.len()), (0, 1));
        // A subscriber of one topic only opens its message alone.
        let mut one = Keyring::new();
        one.add_grant_at(tk.grant(&Scope::Topic(Topic::new("c/d/e").unwrap())), 0)
            .unwrap();
        assert!(Opener::new().open(&one, &envs[2], 0).is_ok());
        assert_eq!(
            Opener::new().open(&one, &envs[1], 0),
            Err(OpenError::OPAQUE)
        );
        // Another epoch in the same batch is refused.
        let tk1 = tk.rotate(0, &mut rng).unwrap();
        let mut kr1 = Keyring::new();
        kr1.add_tree_key_at(&tk1, 0).unwrap();
        let other = sealer
            .prepare(
                &kr1.topic_key(&Topic::new("a").unwrap()).unwrap(),
                &msg(b"x"),
                &SealOptions::default(),
            )
            .unwrap();
        let mut b = BatchSigner::new(BatchPolicy::default());
        b.push(&prepared[0], 0, &mut rng).unwrap();
        assert_eq!(b.push(&other, 0, &mut rng), Err(SealError::BatchTreeEpoch));
        // So is another tree in the same epoch (0): the pair, not the epoch alone.
        let tk2 = TreeKey::generate_with("other", &mut rng).unwrap();
        assert_eq!((tk2.epoch(), tk.epoch()), (0, 0));
        let mut kr2 = Keyring::new();
        kr2.add_tree_key_at(&tk2, 0).unwrap();
        let other_tree = sealer
            .prepare(
                &kr2.topic_key(&Topic::new("a").unwrap()).unwrap(),
                &msg(b"x"),
                &SealOptions::default(),
            )
            .unwrap();
        assert_eq!(
            b.push(&other_tree, 0, &mut rng),
            Err(SealError::BatchTreeEpoch)
        );
        assert_eq!((b.len(), b.tree_epoch()), (1, Some((tk.tree_id(), 0))));
    }
}
