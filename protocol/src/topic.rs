//! Topic names and filters, validated once here so every party agrees on what is a topic.
//!
//! Rules (see `docs/PROTOCOL.md`, "Topics"): UTF-8 in Unicode NFC; levels separated by `/`;
//! no empty level; no `+`, `#` or NUL inside a level; at most [`MAX_LEVELS`] levels,
//! [`MAX_SEGMENT_LEN`] bytes per level and [`MAX_TOPIC_LEN`] bytes in all. Filters may use
//! `+` (exactly one level) and `#` (zero or more remaining levels, last only).

use std::fmt;
use std::str::FromStr;

use unicode_normalization::is_nfc;

use crate::error::TopicError;
use crate::limits::{MAX_LEVELS, MAX_SEGMENT_LEN, MAX_TOPIC_LEN};

/// A validated topic name such as `sensor/kitchen/temp`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

/// A validated topic filter such as `sensor/+/temp` or `sensor/#`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(String);

/// One level of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterLevel<'a> {
    /// A literal level.
    Exact(&'a str),
    /// `+`
    One,
    /// `#`
    Rest,
}

fn check_common(s: &str) -> Result<usize, TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: MAX_TOPIC_LEN,
        });
    }
    let levels = s.split('/').count();
    if levels > MAX_LEVELS {
        return Err(TopicError::TooDeep {
            levels,
            max: MAX_LEVELS,
        });
    }
    for (level, seg) in s.split('/').enumerate() {
        if seg.is_empty() {
            return Err(TopicError::EmptySegment { level });
        }
        if seg.len() > MAX_SEGMENT_LEN {
            return Err(TopicError::SegmentTooLong {
                level,
                len: seg.len(),
                max: MAX_SEGMENT_LEN,
            });
        }
        if seg.contains('\0') {
            return Err(TopicError::ForbiddenChar { level, ch: '\0' });
        }
    }
    if !is_nfc(s) {
        return Err(TopicError::NotNfc);
    }
    Ok(levels)
}

impl Topic {
    /// Validates a topic name.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        check_common(&s)?;
        for (level, seg) in s.split('/').enumerate() {
            for w in ['+', '#'] {
                if seg.contains(w) {
                    return Err(if seg.len() == 1 {
                        TopicError::WildcardInTopic { wildcard: w }
                    } else {
                        TopicError::ForbiddenChar { level, ch: w }
                    });
                }
            }
        }
        Ok(Topic(s))
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The levels, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.split('/')
    }
    /// Number of levels.
    pub fn levels(&self) -> usize {
        self.segments().count()
    }
    /// True when `self` equals `prefix` or lies below it (`a/b` is under `a` and `a/b`).
    pub fn is_under(&self, prefix: &Topic) -> bool {
        self.0 == prefix.0
            || (self.0.starts_with(&prefix.0) && self.0.as_bytes()[prefix.0.len()] == b'/')
    }
}

impl TopicFilter {
    /// Validates a filter.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        let levels = check_common(&s)?;
        for (level, seg) in s.split('/').enumerate() {
            if seg.len() > 1 && (seg.contains('+') || seg.contains('#')) {
                return Err(TopicError::PartialWildcard { level });
            }
            if seg == "#" && level != levels - 1 {
                return Err(TopicError::HashNotLast { level });
            }
        }
        Ok(TopicFilter(s))
    }
    /// The filter text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The levels, in order.
    pub fn levels(&self) -> impl Iterator<Item = FilterLevel<'_>> + '_ {
        self.0.split('/').map(|s| match s {
            "+" => FilterLevel::One,
            "#" => FilterLevel::Rest,
            s => FilterLevel::Exact(s),
        })
    }
    /// Does `topic` match this filter? (`a/#` matches `a` itself, as in MQTT.)
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut segs = topic.segments();
        for level in self.levels() {
            match level {
                FilterLevel::Rest => return true,
                FilterLevel::One => {
                    if segs.next().is_none() {
                        return false;
                    }
                }
                FilterLevel::Exact(e) => {
                    if segs.next() != Some(e) {
                        return false;
                    }
                }
            }
        }
        segs.next().is_none()
    }
    /// Could some topic at or under `prefix` match this filter? Used to decide which grants
    /// a subscription concerns.
    pub fn intersects_subtree(&self, prefix: &Topic) -> bool {
        let mut pre = prefix.segments();
        for level in self.levels() {
            match (level, pre.next()) {
                (FilterLevel::Rest, _) => return true,
                (_, None) => return true, // the filter continues below the prefix
                (FilterLevel::One, Some(_)) => {}
                (FilterLevel::Exact(e), Some(p)) => {
                    if e != p {
                        return false;
                    }
                }
            }
        }
        // Filter ended: it matches exactly `filter`-shaped topics; the prefix must not be deeper.
        pre.next().is_none()
    }
    /// A filter matching exactly one topic.
    pub fn exact(topic: &Topic) -> Self {
        TopicFilter(topic.0.clone())
    }
}

macro_rules! text_impls {
    ($t:ident) => {
        impl FromStr for $t {
            type Err = TopicError;
            fn from_str(s: &str) -> Result<Self, TopicError> {
                $t::new(s)
            }
        }
        impl TryFrom<&str> for $t {
            type Error = TopicError;
            fn try_from(s: &str) -> Result<Self, TopicError> {
                $t::new(s)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:?})"), self.0)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
text_impls!(Topic);
text_impls!(TopicFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        assert!(Topic::new("sensor/kitchen/temp").is_ok());
        assert!(Topic::new("ünïcode/ok").is_ok());
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert_eq!(
            Topic::new("a//b"),
            Err(TopicError::EmptySegment { level: 1 })
        );
        assert_eq!(Topic::new("/a"), Err(TopicError::EmptySegment { level: 0 }));
        assert_eq!(Topic::new("a/"), Err(TopicError::EmptySegment { level: 1 }));
        assert_eq!(
            Topic::new("a/+"),
            Err(TopicError::WildcardInTopic { wildcard: '+' })
        );
        assert_eq!(
            Topic::new("a/b#"),
            Err(TopicError::ForbiddenChar { level: 1, ch: '#' })
        );
        assert_eq!(
            Topic::new("a\0b"),
            Err(TopicError::ForbiddenChar { level: 0, ch: '\0' })
        );
        assert!(matches!(
            Topic::new("x".repeat(256)),
            Err(TopicError::SegmentTooLong { .. })
        ));
        assert!(matches!(
            Topic::new(vec!["a"; 33].join("/")),
            Err(TopicError::TooDeep { .. })
        ));
        assert!(Topic::new(vec!["a"; 32].join("/")).is_ok());
        assert!(matches!(
            Topic::new(vec!["x".repeat(200); 6].join("/")),
            Err(TopicError::TooLong { .. })
        ));
        // "é" as e + combining acute is not NFC.
        assert_eq!(Topic::new("cafe\u{301}"), Err(TopicError::NotNfc));
    }

    #[test]
    fn filter_rules() {
        assert!(TopicFilter::new("a/+/c").is_ok());
        assert!(TopicFilter::new("#").is_ok());
        assert_eq!(
            TopicFilter::new("a/#/c"),
            Err(TopicError::HashNotLast { level: 1 })
        );
        assert_eq!(
            TopicFilter::new("a/b+"),
            Err(TopicError::PartialWildcard { level: 1 })
        );
    }

    #[test]
    fn matching() {
        let t = |s| Topic::new(s).unwrap();
        let f = |s| TopicFilter::new(s).unwrap();
        assert!(f("a/#").matches(&t("a")));
        assert!(f("a/#").matches(&t("a/b/c")));
        assert!(f("a/+").matches(&t("a/b")));
        assert!(!f("a/+").matches(&t("a")));
        assert!(!f("a/+").matches(&t("a/b/c")));
        assert!(f("+/+").matches(&t("x/y")));
        assert!(t("a/b").is_under(&t("a")));
        assert!(!t("ab").is_under(&t("a")));
        assert!(f("a/+/c").intersects_subtree(&t("a/b")));
        assert!(f("a/+/c").intersects_subtree(&t("a/b/c")));
        assert!(!f("a/+/c").intersects_subtree(&t("a/b/c/d")));
        assert!(!f("x/#").intersects_subtree(&t("a")));
        assert!(f("#").intersects_subtree(&t("a/b")));
    }
}
