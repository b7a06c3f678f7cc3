//! Text chosen by others made safe for a log line.
//!
//! Topics (any UTF-8 but NUL), content types (any UTF-8, up to 255 bytes) and errors quoting
//! them come from whoever published a message. `tracing-subscriber`'s fmt layer escapes
//! only the `message` field: a named `%` field is written raw, so a topic holding
//! `ESC ] 0 ; … BEL` or `\r\n WARN …` would retitle the terminal or forge log lines
//! (security review F2/F3). Every such string the library logs goes through `Printable`;
//! the CLI prints through [`escape_hostile`] — one rule for both.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` acts on a terminal or reorders what is shown around it: C0, DEL and C1
/// controls (CR, LF and ESC among them), the line and paragraph separators, the bidi
/// controls (embeddings, overrides, isolates, LRM/RLM, the Arabic letter mark) and the
/// interlinear annotation controls (U+FFF9–FFFB), which hide or reorder text in some
/// renderers.
pub fn is_terminal_hostile(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

/// Displays its value with every [`is_terminal_hostile`] character written as a Rust-style
/// escape (`\n`, `\r`, `\t`, else `\u{1b}`) and `\` as `\\`, so an escape in the output
/// always stands for one character of the input and the output is one line.
#[derive(Clone, Copy)]
pub(crate) struct Printable<T>(pub(crate) T);

impl<T: fmt::Display> fmt::Display for Printable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        write!(Escaping(f), "{}", self.0)
    }
}

impl<T: fmt::Display> fmt::Debug for Printable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Writes through to the formatter, escaping on the way.
struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_str(&escape_hostile(s, true))
    }
}

/// `s` with every [`is_terminal_hostile`] character written as a Rust-style escape (`\n`,
/// `\r`, `\t`, else `\u{1b}`) and, if `backslash`, `\` as `\\` (then an escape in the
/// output always stands for one character of the input). Borrowed when nothing needs it.
pub fn escape_hostile(s: &str, backslash: bool) -> Cow<'_, str> {
    let special = |c: char| (backslash && c == '\\') || is_terminal_hostile(c);
    if !s.chars().any(special) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' if backslash => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_terminal_hostile(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_acts_on_a_terminal_and_nothing_else() {
        assert_eq!(
            Printable("home/kitchen ünï").to_string(),
            "home/kitchen ünï"
        );
        assert_eq!(
            Printable("a\u{1b}[2Kb\r\nc\u{7f}\u{9b}\u{202e}\u{2066}\u{2069}\u{2028}\t\\")
                .to_string(),
            "a\\u{1b}[2Kb\\r\\nc\\u{7f}\\u{9b}\\u{202e}\\u{2066}\\u{2069}\\u{2028}\\t\\\\"
        );
        assert_eq!(
            Printable("\u{200e}\u{200f}\u{61c}\u{7}").to_string(),
            "\\u{200e}\\u{200f}\\u{61c}\\u{7}"
        );
        // The interlinear annotation controls (anchor, separator, terminator), as the CLI.
        assert_eq!(
            Printable("a\u{fff9}b\u{fffa}c\u{fffb}d").to_string(),
            "a\\u{fff9}b\\u{fffa}c\\u{fffb}d"
        );
        // Zero-width joiners and other format characters that reorder nothing stay, and so
        // do the specials beside the annotation controls (object replacement, U+FFFD).
        assert_eq!(Printable("a\u{200d}b").to_string(), "a\u{200d}b");
        assert_eq!(
            Printable("\u{fff8}\u{fffc}\u{fffd}").to_string(),
            "\u{fff8}\u{fffc}\u{fffd}"
        );
        // Any Display: an error quoting a topic.
        let e = crate::ReceiveError::Decode {
            topic: "t/\u{1b}]0;x\u{7}\nWARN".into(),
            reason: "r".into(),
            source: None,
        };
        let shown = Printable(&e).to_string();
        assert!(!shown.chars().any(is_terminal_hostile), "{shown}");
        assert!(shown.contains("t/\\u{1b}]0;x\\u{7}\\nWARN"), "{shown}");
    }
}
