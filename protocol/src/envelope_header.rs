//! The envelope: what the relay stores and forwards and can never open.
//!
//! ```text
//! off  size  field
//!   0     1  version        = 2 (1 is refused with a version error)
//!   1     1  suite          = 1 (XChaCha20-Poly1305) or 3 (AES-256-GCM); BLAKE3 KDF,
//!                             Ed25519 signatures, static keys either way; 2 is reserved
//!   2     1  flags          = 0 (relays ignore unknown bits, receivers reject them)
//!   3    16  key_id
//!  19    24  nonce
//!  43    32  commit         (key commitment for the body key)
//!  75     1  n              number of topic tokens, 1..=32
//!  76  16·n  tokens
//!   …     2  u16be len      length of sealed_name
//!   …   len  sealed_name    topic name sealed under the tree's name key N
//!   …     …  ciphertext     AEAD body (at least the 16-byte tag)
//! ```
//! Everything before `ciphertext` is the *header*; it is the AEAD associated data exactly as
//! received, so a relay (or anyone) that changes a header byte makes opening fail.
//!
//! This module parses and builds that layout; it holds no keys, so the relay uses it to read
//! the routing path of a published envelope.

use std::fmt;

use bytes::Bytes;

use crate::error::DecodeError;
use crate::limits::{MAX_LEVELS, MAX_TOPIC_LEN, TOKEN_LEN};
use crate::token::{KeyId, TokenPath, TopicToken};

/// Envelope format version (2 since the trusted-key format; 1 is refused).
pub const ENVELOPE_VERSION: u8 = 2;
/// Suite 1: XChaCha20-Poly1305 + BLAKE3 key schedule + Ed25519 signatures (static keys).
pub const SUITE_V1: u8 = 1;
/// Suite 3: AES-256-GCM + the same key schedule and signatures as suite 1. (Suite 2 stays
/// reserved for a forward-secret suite.)
pub const SUITE_AES256GCM: u8 = 3;

/// The AEAD suite of an envelope (header byte 1), chosen by the sealer per topic. Every
/// receiver opens every suite; the relay only checks that the byte is a known one.
///
/// Both suites share the key schedule, the key commitment, the header layout and the body;
/// only the AEAD that seals the name and the body differs (PROTOCOL.md §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Suite {
    /// 1: XChaCha20-Poly1305 — constant time everywhere without hardware support; the
    /// default.
    #[default]
    XChaCha20Poly1305,
    /// 3: AES-256-GCM — faster where the CPU has AES and carry-less multiply instructions
    /// (AES-NI + PCLMULQDQ, ARMv8 crypto extensions), a constant-time bitsliced fallback
    /// elsewhere (wasm32 included).
    Aes256Gcm,
}

impl Suite {
    /// Every suite this implementation seals and opens.
    pub const ALL: [Suite; 2] = [Suite::XChaCha20Poly1305, Suite::Aes256Gcm];

    /// The header byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Suite::XChaCha20Poly1305 => SUITE_V1,
            Suite::Aes256Gcm => SUITE_AES256GCM,
        }
    }

    /// Parses a header byte; 2 (reserved) and every unknown value are refused with
    /// [`DecodeError::UnsupportedSuite`].
    pub fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            SUITE_V1 => Ok(Suite::XChaCha20Poly1305),
            SUITE_AES256GCM => Ok(Suite::Aes256Gcm),
            _ => Err(DecodeError::UnsupportedSuite(b)),
        }
    }

    /// The short name used by the CLI, the npm package and the vectors: `xchacha` or
    /// `aes-gcm`.
    pub fn name(self) -> &'static str {
        match self {
            Suite::XChaCha20Poly1305 => "xchacha",
            Suite::Aes256Gcm => "aes-gcm",
        }
    }

    /// Parses [`Suite::name`] (also accepts the long forms `xchacha20poly1305` and
    /// `aes256gcm`).
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "xchacha" | "xchacha20poly1305" | "xchacha20-poly1305" => {
                Some(Suite::XChaCha20Poly1305)
            }
            "aes-gcm" | "aes256gcm" | "aes-256-gcm" => Some(Suite::Aes256Gcm),
            _ => None,
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
/// Length of the XChaCha20 nonce.
pub const NONCE_LEN: usize = 24;
/// Length of the key commitment.
pub const COMMIT_LEN: usize = 32;
/// Length of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// The sealed topic name is padded to a multiple of this many bytes before sealing.
pub const NAME_PAD: usize = 32;
/// Offset of the token count byte.
pub const OFF_N: usize = 75;
/// Smallest possible envelope: one token, the shortest sealed name, an empty-body tag.
pub const MIN_ENVELOPE_LEN: usize = OFF_N + 1 + TOKEN_LEN + 2 + NAME_PAD + TAG_LEN + TAG_LEN;
/// Largest sealed name a valid topic can produce.
pub const MAX_SEALED_NAME: usize = (2 + MAX_TOPIC_LEN).div_ceil(NAME_PAD) * NAME_PAD + TAG_LEN;

const OFF_KEY_ID: usize = 3;
const OFF_NONCE: usize = 19;
const OFF_COMMIT: usize = 43;

/// A parsed, shape-checked envelope. Cheap to clone (the bytes are shared).
///
/// Construction checks only what the relay can check: version, suite, lengths and bounds.
/// Authenticity is established by opening it with keys (`Opener`, feature `keys`).
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    bytes: Bytes,
    header_len: usize,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print envelope bytes: logs must not carry ciphertext around.
        f.debug_struct("Envelope")
            .field("len", &self.bytes.len())
            .field("key_id", &self.key_id())
            .field("levels", &self.levels())
            .finish()
    }
}

impl Envelope {
    /// Parses and checks the header of `bytes`.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, DecodeError> {
        let header_len = parse_header_len(&bytes)?;
        Ok(Self { bytes, header_len })
    }

    /// Convenience for a borrowed slice (copies it).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::copy_from_slice(bytes))
    }

    /// All bytes of the envelope.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }
    /// Consumes the envelope, returning its bytes.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    /// Never true for a valid envelope; provided for API completeness.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The version byte.
    pub fn version(&self) -> u8 {
        self.bytes[0]
    }
    /// The suite byte.
    pub fn suite(&self) -> u8 {
        self.bytes[1]
    }
    /// The suite (the byte was checked when parsing).
    pub fn cipher_suite(&self) -> Suite {
        Suite::from_byte(self.bytes[1]).expect("checked when parsing")
    }
    /// The flags byte.
    pub fn flags(&self) -> u8 {
        self.bytes[2]
    }
    /// The key id (tree and epoch).
    pub fn key_id(&self) -> KeyId {
        KeyId::from_slice(&self.bytes[OFF_KEY_ID..OFF_KEY_ID + TOKEN_LEN]).expect("checked length")
    }
    /// The 24-byte nonce.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        self.bytes[OFF_NONCE..OFF_NONCE + NONCE_LEN]
            .try_into()
            .expect("checked length")
    }
    /// The 32-byte key commitment.
    pub fn commit(&self) -> &[u8; COMMIT_LEN] {
        self.bytes[OFF_COMMIT..OFF_COMMIT + COMMIT_LEN]
            .try_into()
            .expect("checked length")
    }
    /// Number of topic levels.
    pub fn levels(&self) -> usize {
        self.bytes[OFF_N] as usize
    }
    /// The topic tokens, one per level.
    pub fn tokens(&self) -> impl ExactSizeIterator<Item = TopicToken> + '_ {
        self.bytes[OFF_N + 1..OFF_N + 1 + self.levels() * TOKEN_LEN]
            .chunks_exact(TOKEN_LEN)
            .map(|c| TopicToken::from_slice(c).expect("chunks are 16 bytes"))
    }
    /// The routing path `[key_id, T0, T1, …]` the relay routes on.
    pub fn token_path(&self) -> TokenPath {
        TokenPath::new(self.key_id(), self.tokens().collect()).expect("checked level count")
    }
    /// The sealed topic name.
    pub fn sealed_name(&self) -> &[u8] {
        let off = OFF_N + 1 + self.levels() * TOKEN_LEN;
        &self.bytes[off + 2..self.header_len]
    }
    /// The bytes before the sealed name (associated data of the sealed name).
    pub fn name_ad(&self) -> &[u8] {
        &self.bytes[..OFF_N + 1 + self.levels() * TOKEN_LEN + 2]
    }
    /// The whole header: the AEAD associated data of the body.
    pub fn header(&self) -> &[u8] {
        &self.bytes[..self.header_len]
    }
    /// The AEAD ciphertext of the body, tag included.
    pub fn ciphertext(&self) -> &[u8] {
        &self.bytes[self.header_len..]
    }
}

fn parse_header_len(b: &[u8]) -> Result<usize, DecodeError> {
    if b.len() < OFF_N + 1 {
        return Err(DecodeError::Truncated {
            what: "envelope header",
            needed: OFF_N + 1 - b.len(),
        });
    }
    if b[0] != ENVELOPE_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "envelope",
            version: b[0] as u64,
        });
    }
    Suite::from_byte(b[1])?;
    let n = b[OFF_N] as usize;
    if n == 0 {
        return Err(DecodeError::InvalidHeader(
            "an envelope needs at least one topic token",
        ));
    }
    if n > MAX_LEVELS {
        return Err(DecodeError::TooLarge {
            what: "envelope token count",
            len: n,
            max: MAX_LEVELS,
            unit: "tokens",
        });
    }
    let len_off = OFF_N + 1 + n * TOKEN_LEN;
    if b.len() < len_off + 2 {
        return Err(DecodeError::Truncated {
            what: "envelope tokens",
            needed: len_off + 2 - b.len(),
        });
    }
    let name_len = u16::from_be_bytes([b[len_off], b[len_off + 1]]) as usize;
    if name_len > MAX_SEALED_NAME {
        return Err(DecodeError::TooLarge {
            what: "sealed name",
            len: name_len,
            max: MAX_SEALED_NAME,
            unit: "bytes",
        });
    }
    if name_len < NAME_PAD + TAG_LEN || (name_len - TAG_LEN) % NAME_PAD != 0 {
        return Err(DecodeError::InvalidHeader(
            "sealed name length is not 16 + a multiple of 32",
        ));
    }
    let header_len = len_off + 2 + name_len;
    let need = header_len + TAG_LEN;
    if b.len() < need {
        return Err(DecodeError::Truncated {
            what: "envelope",
            needed: need - b.len(),
        });
    }
    Ok(header_len)
}

/// The fields a sender writes into a header (used by sealing, tests and vector generation).
#[derive(Debug, Clone)]
pub struct HeaderFields<'a> {
    /// Flags byte (0 in version 1).
    pub flags: u8,
    /// Key id of the tree epoch.
    pub key_id: KeyId,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Key commitment.
    pub commit: [u8; COMMIT_LEN],
    /// One token per level.
    pub tokens: &'a [TopicToken],
}

impl HeaderFields<'_> {
    /// Writes everything up to and including the sealed-name length; the caller appends the
    /// sealed name of exactly `sealed_name_len` bytes and then the ciphertext.
    pub fn write_prefix(&self, sealed_name_len: usize, out: &mut Vec<u8>) {
        self.write_prefix_in(Suite::XChaCha20Poly1305, sealed_name_len, out);
    }

    /// [`HeaderFields::write_prefix`] for an envelope of `suite` (header byte 1). A separate
    /// method rather than a field, so code that builds suite-1 headers (relay tests and
    /// benches) is unchanged.
    pub fn write_prefix_in(&self, suite: Suite, sealed_name_len: usize, out: &mut Vec<u8>) {
        debug_assert!(!self.tokens.is_empty() && self.tokens.len() <= MAX_LEVELS);
        debug_assert!(sealed_name_len <= u16::MAX as usize);
        out.push(ENVELOPE_VERSION);
        out.push(suite.to_byte());
        out.push(self.flags);
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.commit);
        out.push(self.tokens.len() as u8);
        for t in self.tokens {
            out.extend_from_slice(t.as_bytes());
        }
        out.extend_from_slice(&(sealed_name_len as u16).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, body: usize) -> Vec<u8> {
        let toks: Vec<TopicToken> = (0..n)
            .map(|i| TopicToken::from_bytes([i as u8; 16]))
            .collect();
        let f = HeaderFields {
            flags: 0,
            key_id: KeyId::from_bytes([7; 16]),
            nonce: [1; 24],
            commit: [2; 32],
            tokens: &toks,
        };
        let mut out = Vec::new();
        f.write_prefix(48, &mut out);
        out.extend_from_slice(&[3; 48]);
        out.extend(std::iter::repeat_n(4, body));
        out
    }

    #[test]
    fn parse_roundtrip() {
        let b = sample(3, 40);
        let e = Envelope::from_slice(&b).unwrap();
        assert_eq!(e.levels(), 3);
        assert_eq!(e.key_id(), KeyId::from_bytes([7; 16]));
        assert_eq!(e.sealed_name(), &[3; 48]);
        assert_eq!(e.ciphertext(), &[4; 40]);
        assert_eq!(e.token_path().tokens()[2], TopicToken::from_bytes([2; 16]));
        assert_eq!(e.header().len() + 40, b.len());
        assert_eq!(MIN_ENVELOPE_LEN, sample(1, 16).len());
    }

    #[test]
    fn rejects_bad_shapes() {
        let b = sample(2, 16);
        for cut in 0..b.len() {
            assert!(Envelope::from_slice(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v = b.clone();
        v[0] = 1;
        assert!(matches!(
            Envelope::from_slice(&v),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
        let mut v = b.clone();
        v[1] = 9;
        assert!(matches!(
            Envelope::from_slice(&v),
            Err(DecodeError::UnsupportedSuite(9))
        ));
        for (byte, ok) in [(0u8, false), (1, true), (2, false), (3, true), (4, false)] {
            let mut v = b.clone();
            v[1] = byte;
            let r = Envelope::from_slice(&v);
            assert_eq!(r.is_ok(), ok, "suite {byte}");
            if ok {
                assert_eq!(r.unwrap().cipher_suite().to_byte(), byte);
            } else {
                assert_eq!(r, Err(DecodeError::UnsupportedSuite(byte)));
            }
        }
        let mut v = b.clone();
        v[OFF_N] = 0;
        assert!(Envelope::from_slice(&v).is_err());
        let mut v = b.clone();
        v[OFF_N] = 33;
        assert!(Envelope::from_slice(&v).is_err());
        let mut v = b;
        let lo = OFF_N + 1 + 32;
        v[lo..lo + 2].copy_from_slice(&47u16.to_be_bytes());
        assert!(Envelope::from_slice(&v).is_err());
    }
}
