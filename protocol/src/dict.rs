//! Per-topic zstd dictionaries (codec 3, PROTOCOL.md §4.6.1, key strings §6.4).
//!
//! A dictionary is content: it is trained on messages and reveals what they have in common,
//! so it travels only as keys do (a `wsdict1…` key string, a line of a key file, or inside
//! an invite with the grant, [`crate::Invite::seal_with_dictionaries`]) and never through
//! the relay in the clear. A sealed body names it by its [`DictId`]:
//! `derive_key("whispeer v2 zstd dictionary id", bytes)[0..16]`, so the id is a function of
//! the exact bytes, needs no registry, and is inside the AEAD (the relay never sees it).
//!
//! Dictionaries are held by the [`crate::Keyring`] next to the grants; [`crate::TopicKey`]s
//! it hands out carry them, so a [`crate::Sealer`] finds the one a topic's
//! [`crate::Compression::ZstdDict`] names, and an [`crate::Opener`] finds the one a body
//! names. A receiver that does not hold it gets a typed error
//! ([`crate::OpenError::missing_dictionary`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::error_keys::KeyError;
use crate::text::{self, hrp};

/// Most bytes in a dictionary (112 KiB; zstd's trainer defaults to 110 KiB).
pub const MAX_DICT_LEN: usize = 112 * 1024;
/// Fewest bytes in a dictionary (libzstd ignores a dictionary of under 8 bytes).
pub const MIN_DICT_LEN: usize = 8;
/// Length of a [`DictId`].
pub const DICT_ID_LEN: usize = 16;
/// BLAKE3 `derive_key` context of a dictionary id.
pub const DICT_ID_CONTEXT: &str = "whispeer v2 zstd dictionary id";
/// Format byte of a `wsdict` key string.
pub const DICT_STRING_FORMAT: u8 = 0x01;
/// The zstd dictionary magic number (RFC 8878 §5), little-endian as it appears in the bytes.
pub const ZSTD_DICT_MAGIC: [u8; 4] = [0x37, 0xa4, 0x30, 0xec];

/// A dictionary's id: the first 16 bytes of `derive_key("whispeer v2 zstd dictionary id",
/// dictionary bytes)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DictId(pub [u8; DICT_ID_LEN]);

impl DictId {
    /// The id of these dictionary bytes.
    pub fn of(bytes: &[u8]) -> Self {
        let k = blake3::derive_key(DICT_ID_CONTEXT, bytes);
        DictId(k[..DICT_ID_LEN].try_into().expect("16 bytes"))
    }
    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 2 * DICT_ID_LEN || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; DICT_ID_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(DictId(out))
    }
}

impl fmt::Display for DictId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
impl fmt::Debug for DictId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DictId({self})")
    }
}

/// A zstd dictionary (8 bytes to 112 KiB) with its id. Cheap to clone; the bytes are wiped
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Dictionary {
    id: DictId,
    bytes: Arc<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dictionary")
            .field("id", &self.id)
            .field("len", &self.bytes.len())
            .field("zstd_format", &self.is_zstd_format())
            .finish()
    }
}

impl PartialEq for Dictionary {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.bytes[..] == other.bytes[..]
    }
}
impl Eq for Dictionary {}

fn invalid(reason: impl Into<String>) -> KeyError {
    KeyError::InvalidString {
        kind: hrp::DICT,
        reason: reason.into(),
    }
}

impl Dictionary {
    /// A dictionary from its bytes: either a zstd dictionary (starting with the magic
    /// `37 a4 30 ec`, as `whispeer dict train` and `zstd --train` write) or raw content.
    /// Refused when shorter than 8 bytes, longer than 112 KiB, or when zstd cannot use it
    /// (checked by compressing and decompressing a short input with it).
    pub fn new(bytes: Vec<u8>) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(bytes);
        if bytes.len() < MIN_DICT_LEN {
            return Err(invalid(format!(
                "dictionary of {} bytes; at least {MIN_DICT_LEN}",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_DICT_LEN {
            return Err(invalid(format!(
                "dictionary of {} bytes exceeds the limit of {MAX_DICT_LEN} (112 KiB)",
                bytes.len()
            )));
        }
        check_usable(&bytes)?;
        Ok(Dictionary {
            id: DictId::of(&bytes),
            bytes: Arc::new(bytes),
        })
    }

    /// The id a sealed body names it by.
    pub fn id(&self) -> DictId {
        self.id
    }

    /// The dictionary bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it is in zstd's dictionary format (magic, entropy tables, content), rather
    /// than raw content.
    pub fn is_zstd_format(&self) -> bool {
        self.bytes.starts_with(&ZSTD_DICT_MAGIC)
    }

    /// The `wsdict1…` key string: `0x01 ‖ id(16) ‖ bytes` (§6.4). Secret like a key.
    pub fn to_key_string(&self) -> Zeroizing<String> {
        let mut b = Zeroizing::new(Vec::with_capacity(1 + DICT_ID_LEN + self.bytes.len()));
        b.push(DICT_STRING_FORMAT);
        b.extend_from_slice(&self.id.0);
        b.extend_from_slice(&self.bytes);
        Zeroizing::new(text::encode_long(hrp::DICT, &b))
    }

    /// Parses a `wsdict1…` string; refuses another format byte, an id that does not match
    /// the bytes, and a dictionary [`Dictionary::new`] refuses.
    pub fn from_key_string(s: &str) -> Result<Self, KeyError> {
        let b = Zeroizing::new(text::decode_long(hrp::DICT, s)?);
        let (&format, rest) = b.split_first().ok_or_else(|| invalid("empty"))?;
        if format != DICT_STRING_FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: hrp::DICT,
                version: format,
            });
        }
        if rest.len() < DICT_ID_LEN {
            return Err(invalid("too short"));
        }
        let (id, bytes) = rest.split_at(DICT_ID_LEN);
        let d = Dictionary::new(bytes.to_vec())?;
        if d.id.0 != id {
            return Err(invalid(
                "dictionary id does not match its bytes (damaged string)",
            ));
        }
        Ok(d)
    }
}

/// Refuses bytes libzstd cannot use as a dictionary (a zstd-format dictionary with broken
/// entropy tables): compresses and decompresses a short input with them.
fn check_usable(bytes: &[u8]) -> Result<(), KeyError> {
    const PROBE: &[u8] = b"{\"whispeer\":\"dictionary check\",\"n\":[1,2,3]}";
    let bad = |_| invalid("zstd cannot use these bytes as a dictionary");
    let mut c = zstd::bulk::Compressor::with_dictionary(1, bytes).map_err(bad)?;
    let frame = c.compress(PROBE).map_err(bad)?;
    let mut d = zstd::bulk::Decompressor::with_dictionary(bytes).map_err(bad)?;
    let out = d.decompress(&frame, PROBE.len()).map_err(bad)?;
    if out != PROBE {
        return Err(invalid("zstd cannot use these bytes as a dictionary"));
    }
    Ok(())
}

/// A set of dictionaries by id (what a [`crate::Keyring`] holds). Cheap to clone
/// (copy-on-write).
#[derive(Clone, Default)]
pub struct Dictionaries(Arc<BTreeMap<DictId, Dictionary>>);

impl fmt::Debug for Dictionaries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Dictionaries {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// The dictionary with this id.
    pub fn get(&self, id: &DictId) -> Option<&Dictionary> {
        self.0.get(id)
    }
    /// Adds a dictionary; `false` if one with its id was already held.
    pub fn insert(&mut self, d: Dictionary) -> bool {
        if self.0.contains_key(&d.id) {
            return false;
        }
        Arc::make_mut(&mut self.0).insert(d.id, d);
        true
    }
    /// Removes a dictionary; `true` if it was held.
    pub fn remove(&mut self, id: &DictId) -> bool {
        if !self.0.contains_key(id) {
            return false;
        }
        Arc::make_mut(&mut self.0).remove(id).is_some()
    }
    /// Every dictionary, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Dictionary> + '_ {
        self.0.values()
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// None held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_string_roundtrip_and_limits() {
        let d = Dictionary::new(b"{\"temp\":21.5,\"room\":\"kitchen\"}".repeat(4)).unwrap();
        assert_eq!(d.id(), DictId::of(d.as_bytes()));
        assert!(!d.is_zstd_format());
        let s = d.to_key_string();
        assert!(s.starts_with("wsdict1"));
        let back = Dictionary::from_key_string(&s).unwrap();
        assert_eq!(back, d);
        assert_eq!(DictId::from_hex(&d.id().to_string()), Some(d.id()));
        // Uppercase decodes too (like every key string).
        assert_eq!(
            Dictionary::from_key_string(&s.to_ascii_uppercase()).unwrap(),
            d
        );
        assert!(Dictionary::new(vec![7; MIN_DICT_LEN - 1]).is_err());
        assert!(Dictionary::new(vec![7; MAX_DICT_LEN + 1]).is_err());
        let big =
            Dictionary::new((0..MAX_DICT_LEN).map(|i| (i * 7 % 251) as u8).collect()).unwrap();
        assert_eq!(
            Dictionary::from_key_string(&big.to_key_string()).unwrap(),
            big
        );
    }

    #[test]
    fn wrong_id_or_format_is_refused() {
        let d = Dictionary::new(b"abcdefgh-abcdefgh-abcdefgh".to_vec()).unwrap();
        let mut b = vec![DICT_STRING_FORMAT];
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(d.as_bytes());
        let e = Dictionary::from_key_string(&text::encode_long(hrp::DICT, &b)).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        b[0] = 2;
        assert!(matches!(
            Dictionary::from_key_string(&text::encode_long(hrp::DICT, &b)),
            Err(KeyError::UnsupportedVersion { version: 2, .. })
        ));
        // A zstd-format header with garbage entropy tables.
        let mut bad = ZSTD_DICT_MAGIC.to_vec();
        bad.extend_from_slice(&[0xff; 200]);
        assert!(Dictionary::new(bad).is_err());
        // Another kind of key string is a wrong-kind error.
        let g = text::encode(hrp::GRANT, &[2, 0, 0]);
        assert!(matches!(
            Dictionary::from_key_string(&g),
            Err(KeyError::WrongKind { .. })
        ));
    }
}
