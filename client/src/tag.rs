//! Type tags: the name a Rust type declares for itself on the wire ([`TypeTag`]), carried
//! in the sealed and signed content type of each message of a typed topic as
//! `application/cbor; type="<tag>"` (the payload stays CBOR, so untyped subscribers still
//! decode it). JS declares the same tags as strings.

/// A type's wire name: `#[derive(TypeTag)] #[whispeer(type = "myapp.MyData/v1")]`, or by
/// hand. Changing a type incompatibly should change its tag (e.g. the `/v1` suffix).
///
/// ```
/// use whispeer::TypeTag;
/// #[derive(serde::Serialize, serde::Deserialize, TypeTag)]
/// #[whispeer(type = "myapp.MyData/v1")]
/// struct MyData { name: String, id: i32 }
/// assert_eq!(MyData::TAG, "myapp.MyData/v1");
/// ```
pub trait TypeTag {
    /// The tag: printable ASCII without `"` or `\` (checked when a topic is made).
    const TAG: &'static str;
}

/// The content type of untagged typed publishes (serde → CBOR).
pub const CBOR: &str = crate::core::CBOR;
const TAGGED_PREFIX: &str = "application/cbor; type=\"";

/// The content type that carries `tag`.
pub fn content_type(tag: &str) -> String {
    format!("{TAGGED_PREFIX}{tag}\"")
}

/// The tag of a content type, `None` when it carries none.
pub fn tag_of(content_type: &str) -> Option<&str> {
    content_type
        .strip_prefix(TAGGED_PREFIX)
        .and_then(|r| r.strip_suffix('"'))
}

/// Whether the payload is CBOR (`application/cbor`, tagged or not).
pub fn is_cbor(content_type: &str) -> bool {
    content_type == CBOR || tag_of(content_type).is_some()
}

/// Why a tag is not usable (it must fit in a quoted MIME parameter).
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > 128 {
        return Err(format!("type tag {tag:?} must be 1 to 128 bytes"));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !c.is_ascii_graphic() || *c == '"' || *c == '\\')
    {
        return Err(format!(
            "type tag {tag:?} has {c:?}: printable ASCII without quotes, backslashes or spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_through_the_content_type() {
        let ct = content_type("myapp.MyData/v1");
        assert_eq!(ct, "application/cbor; type=\"myapp.MyData/v1\"");
        assert_eq!(tag_of(&ct), Some("myapp.MyData/v1"));
        assert!(is_cbor(&ct) && is_cbor(CBOR));
        assert_eq!(tag_of(CBOR), None);
        assert!(!is_cbor("text/plain"));
        assert!(check_tag("a.B/v1").is_ok());
        assert!(check_tag("a \"b").is_err());
        assert!(check_tag("").is_err());
    }
}
