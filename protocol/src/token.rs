//! Opaque routing values the relay sees: key ids, per-level topic tokens, token paths (a
//! message's route) and token patterns (a subscription's filter).
//!
//! Tokens are keyed hashes under a tree's routing key `R` (computed in [`crate::tree`]);
//! this module only holds and compares them, so it is available without the `keys` feature.
//! Tokens are *position-bound, not chained*: level `i` of topic `a/b/c` is `T(i, seg_i)`
//! regardless of the other levels, which is what lets the relay evaluate `+` and `#` on
//! opaque values.

use std::fmt;

use crate::error::DecodeError;
use crate::limits::{MAX_LEVELS, TOKEN_LEN};

fn fmt_hex(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! id16 {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name([u8; TOKEN_LEN]);

        // The 16 bytes in one `write`, without the length prefix a derived `Hash` of an
        // array adds: the relay hashes a key id and a token per level for every routed
        // message (SipHash, keyed: the bytes come from strangers), and the prefix was one
        // more block of it (callgrind, relay 1→1: relay/README.md "Allocator").
        impl core::hash::Hash for $name {
            fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
                state.write(&self.0);
            }
        }

        impl $name {
            /// Wraps 16 raw bytes.
            pub const fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Self {
                Self(bytes)
            }
            /// Checked constructor from a slice of exactly 16 bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
                let arr: [u8; TOKEN_LEN] = bytes.try_into().map_err(|_| DecodeError::InvalidField {
                    frame: "token",
                    field: $what,
                    reason: "must be exactly 16 bytes",
                })?;
                Ok(Self(arr))
            }
            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                fmt_hex(&self.0, f)?;
                write!(f, ")")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt_hex(&self.0, f)
            }
        }
    };
}

id16!(
    /// Names a (tree, epoch) to the relay and to receivers: `xof(R, "wsp1"‖0x08, 16)`.
    /// It is the first element of every routing path and every filter.
    KeyId,
    "key_id"
);
id16!(
    /// One level of a topic, `T(i, segment) = xof(R, "wsp1"‖0x07‖u16be(i)‖lp(segment), 16)`.
    TopicToken,
    "token"
);

/// A message's route: the key id and one token per topic level (1 to [`MAX_LEVELS`]).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TokenPath {
    key_id: KeyId,
    tokens: Vec<TopicToken>,
}

impl TokenPath {
    /// Checked constructor: between 1 and [`MAX_LEVELS`] tokens.
    pub fn new(key_id: KeyId, tokens: Vec<TopicToken>) -> Result<Self, DecodeError> {
        if tokens.is_empty() {
            return Err(DecodeError::InvalidPattern(
                "a token path needs at least one level",
            ));
        }
        if tokens.len() > MAX_LEVELS {
            return Err(DecodeError::TooLarge {
                what: "token path",
                len: tokens.len(),
                max: MAX_LEVELS,
                unit: "elements",
            });
        }
        Ok(Self { key_id, tokens })
    }
    /// The tree/epoch this path belongs to.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }
    /// One token per level.
    pub fn tokens(&self) -> &[TopicToken] {
        &self.tokens
    }
}

/// One element of a token pattern.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PatternElem {
    /// Exactly this token at this level.
    Token(TopicToken),
    /// `+`: any single level.
    One,
    /// `#`: zero or more remaining levels (MQTT semantics: `a/#` also matches `a`).
    /// Only valid as the last element.
    Rest,
}

/// A compiled subscription filter: a concrete key id, then 1 to [`MAX_LEVELS`] elements.
///
/// The relay calls [`TokenPattern::matches`]; it never sees the topic names behind the
/// tokens, and a filter can never be a wildcard over all trees because the key id is always
/// concrete.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TokenPattern {
    key_id: KeyId,
    elems: Vec<PatternElem>,
}

impl TokenPattern {
    /// Checked constructor: 1..=[`MAX_LEVELS`] elements, `Rest` only as the last one.
    pub fn new(key_id: KeyId, elems: Vec<PatternElem>) -> Result<Self, DecodeError> {
        if elems.is_empty() {
            return Err(DecodeError::InvalidPattern(
                "a filter needs at least one level",
            ));
        }
        if elems.len() > MAX_LEVELS {
            return Err(DecodeError::TooLarge {
                what: "filter",
                len: elems.len(),
                max: MAX_LEVELS,
                unit: "elements",
            });
        }
        if elems[..elems.len() - 1]
            .iter()
            .any(|e| matches!(e, PatternElem::Rest))
        {
            return Err(DecodeError::InvalidPattern(
                "'#' may only be the last level",
            ));
        }
        Ok(Self { key_id, elems })
    }
    /// The tree/epoch this pattern selects.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }
    /// The per-level elements.
    pub fn elems(&self) -> &[PatternElem] {
        &self.elems
    }
    /// True when the pattern has no wildcard, i.e. selects exactly one path.
    pub fn is_exact(&self) -> bool {
        self.elems
            .iter()
            .all(|e| matches!(e, PatternElem::Token(_)))
    }

    /// Does a message routed as `path` match this pattern?
    pub fn matches(&self, path: &TokenPath) -> bool {
        if self.key_id != path.key_id {
            return false;
        }
        let tokens = path.tokens();
        for (i, elem) in self.elems.iter().enumerate() {
            match elem {
                PatternElem::Rest => return true,
                PatternElem::One => {
                    if i >= tokens.len() {
                        return false;
                    }
                }
                PatternElem::Token(t) => {
                    if tokens.get(i) != Some(t) {
                        return false;
                    }
                }
            }
        }
        tokens.len() == self.elems.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(b: u8) -> TopicToken {
        TopicToken::from_bytes([b; 16])
    }
    const K: KeyId = KeyId::from_bytes([9; 16]);

    #[test]
    fn matching_rules() {
        let path = TokenPath::new(K, vec![t(1), t(2), t(3)]).unwrap();
        let p = |e: Vec<PatternElem>| TokenPattern::new(K, e).unwrap();
        use PatternElem::*;
        assert!(p(vec![Token(t(1)), Token(t(2)), Token(t(3))]).matches(&path));
        assert!(p(vec![Token(t(1)), One, Token(t(3))]).matches(&path));
        assert!(p(vec![Token(t(1)), Rest]).matches(&path));
        assert!(p(vec![Rest]).matches(&path));
        assert!(p(vec![Token(t(1)), Token(t(2)), Token(t(3)), Rest]).matches(&path));
        assert!(!p(vec![Token(t(1)), One]).matches(&path));
        assert!(!p(vec![Token(t(1)), Token(t(2)), Token(t(3)), One]).matches(&path));
        assert!(!p(vec![Token(t(2)), Rest]).matches(&path));
        let other = TokenPattern::new(KeyId::from_bytes([8; 16]), vec![Rest]).unwrap();
        assert!(!other.matches(&path));
    }

    #[test]
    fn shape_rules() {
        assert!(TokenPattern::new(K, vec![]).is_err());
        assert!(TokenPattern::new(K, vec![PatternElem::Rest, PatternElem::One]).is_err());
        assert!(TokenPattern::new(K, vec![PatternElem::One; MAX_LEVELS + 1]).is_err());
        assert!(TokenPath::new(K, vec![]).is_err());
        assert!(TokenPath::new(K, vec![t(0); MAX_LEVELS + 1]).is_err());
    }
}
