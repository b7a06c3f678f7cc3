//! Error types, one enum per failure domain. All are `#[non_exhaustive]` so adding a case is
//! not a breaking change.

use thiserror::Error;

/// Why bytes from the network (a frame, an envelope header, a length prefix) were rejected.
///
/// Decoders never panic and never allocate beyond the configured limit; they return this.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the item was complete.
    #[error("truncated input: {what} needs {needed} more bytes")]
    Truncated { what: &'static str, needed: usize },
    /// A length prefix, length field or count is larger than allowed (`unit` says what
    /// `len` counts: bytes, or the elements of an array, the entries of a map).
    #[error("{what} of {len} {unit} exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
        unit: &'static str,
    },
    /// The envelope or frame version is not one this implementation speaks.
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion { what: &'static str, version: u64 },
    /// The envelope names a cipher suite this implementation does not know.
    #[error("unsupported cipher suite {0}")]
    UnsupportedSuite(u8),
    /// A frame type number that is not defined.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u64),
    /// The CBOR is malformed or uses a form the protocol forbids (indefinite lengths, tags).
    #[error("invalid CBOR at byte {offset}: {reason}")]
    Cbor { offset: usize, reason: &'static str },
    /// A field has the wrong CBOR type or an out-of-range value.
    #[error("invalid field {field} in {frame}: {reason}")]
    InvalidField {
        frame: &'static str,
        field: &'static str,
        reason: &'static str,
    },
    /// A required field is absent.
    #[error("missing field {field} in {frame}")]
    MissingField {
        frame: &'static str,
        field: &'static str,
    },
    /// The same map key appears twice.
    #[error("duplicate field {key} in {frame}")]
    DuplicateField { frame: &'static str, key: u64 },
    /// Bytes remain after a complete item.
    #[error("{0} trailing bytes after a complete frame")]
    TrailingBytes(usize),
    /// A token pattern or path violates its shape rules.
    #[error("invalid token pattern: {0}")]
    InvalidPattern(&'static str),
    /// An envelope header field is out of range.
    #[error("invalid envelope header: {0}")]
    InvalidHeader(&'static str),
}

/// Why a topic name or topic filter is invalid. Each case names the problem so a user can
/// fix the string they typed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic has {levels} levels; the limit is {max}")]
    TooDeep { levels: usize, max: usize },
    #[error("level {level} is empty (leading, trailing or doubled '/')")]
    EmptySegment { level: usize },
    #[error("level {level} is {len} bytes; the limit is {max}")]
    SegmentTooLong {
        level: usize,
        len: usize,
        max: usize,
    },
    #[error("level {level} contains a forbidden character {ch:?}")]
    ForbiddenChar { level: usize, ch: char },
    #[error("topic is not in Unicode NFC form")]
    NotNfc,
    #[error("wildcard '{wildcard}' is not allowed in a topic name (only in filters)")]
    WildcardInTopic { wildcard: char },
    #[error("wildcard at level {level} must be a whole level ('+' or '#' alone)")]
    PartialWildcard { level: usize },
    #[error("'#' must be the last level of a filter (found at level {level})")]
    HashNotLast { level: usize },
}
