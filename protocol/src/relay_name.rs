//! Relay names: what a relay-bound `Auth` signs (PROTOCOL §3.5.6 "Relay names").
//!
//! A relay name is `host ":" port` — the relay as the client dialed it — in one canonical
//! text form, so the client that signs it and the relay that checks it against its
//! `auth.names` compare equal strings:
//!
//! - `host` is what the WHATWG URL Standard's host parser gives for a `ws://` URL (what
//!   `new URL("ws://" + host).hostname` returns): a domain in ASCII lowercase, with
//!   international labels in their `xn--` form; an IPv4 address in dotted decimal; an IPv6
//!   address in brackets, compressed as that standard serializes it (lowercase hex, no
//!   leading zeros, the first longest run of two or more zero groups written `::`, never an
//!   embedded IPv4 part).
//! - `port` is the port dialed — the scheme's default when the URL has none — in decimal
//!   without leading zeros.
//!
//! This module checks and normalizes the parts it can without a URL parser (ASCII case,
//! IPv6 text, the port); turning an international name into its `xn--` form is the URL
//! parser's job (the Rust client's `url` crate, the browser's `URL`).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest relay name: its length is one byte of the signature input.
pub const MAX_LEN: usize = 255;

/// Why a host or relay name is not one (a static reason, for errors and logs).
pub type Invalid = &'static str;

/// The canonical form of a relay's host (module documentation): ASCII letters lowercased,
/// an IPv6 address (with or without brackets) compressed and put in brackets. Refused: an
/// empty host, non-ASCII text (write an international name in its `xn--` form), characters
/// no host name has, and a name ending in a number that is not a dotted-decimal IPv4
/// address (`127.1`, `0x7f.1`: a URL parser reads those as IPv4 addresses).
pub fn host(h: &str) -> Result<String, Invalid> {
    if let Some(inner) = h.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or("an IPv6 address in brackets lacks its ']'")?;
        let a: Ipv6Addr = inner
            .parse()
            .map_err(|_| "not an IPv6 address in brackets")?;
        return Ok(format!("[{}]", ipv6_text(&a)));
    }
    if h.contains(':') {
        let a: Ipv6Addr = h.parse().map_err(|_| "':' in a host name")?;
        return Ok(format!("[{}]", ipv6_text(&a)));
    }
    if let Ok(a) = h.parse::<Ipv4Addr>() {
        return Ok(a.to_string());
    }
    if h.is_empty() {
        return Err("an empty host");
    }
    if !h.is_ascii() {
        return Err("a host name must be ASCII (write an international name in its xn-- form)");
    }
    let lower = h.to_ascii_lowercase();
    if !lower
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err("a host name has only letters, digits, '-', '_' and '.'");
    }
    // As the URL parser: the last label (before one trailing dot) being a number makes the
    // host an IPv4 address, and only dotted decimal is that address's canonical text.
    let last = lower
        .strip_suffix('.')
        .unwrap_or(&lower)
        .rsplit('.')
        .next()
        .unwrap_or("");
    let numeric = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|x| x.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric || hex {
        return Err("ends in a number but is not an IPv4 address in dotted decimal");
    }
    Ok(lower)
}

/// The relay name of `host` (any form [`host`] takes) and `port`, at most [`MAX_LEN`]
/// bytes.
pub fn name(h: &str, port: u16) -> Result<String, Invalid> {
    let n = format!("{}:{port}", host(h)?);
    if n.len() > MAX_LEN {
        return Err("a relay name is at most 255 bytes");
    }
    Ok(n)
}

/// Splits a relay name into its host and port at the last `:`. `None` when the port is not
/// decimal without leading zeros (or over 65535), or nothing precedes it.
pub fn split(name: &str) -> Option<(&str, u16)> {
    let (h, p) = name.rsplit_once(':')?;
    let port: u16 = p.parse().ok()?;
    (!h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p == port.to_string())
        .then_some((h, port))
}

/// Whether `name` is a relay name in canonical form (what [`name`] makes).
pub fn is_canonical(n: &str) -> bool {
    split(n).is_some_and(|(h, p)| name(h, p).as_deref() == Ok(n))
}

/// The canonical form of one entry of a relay's list of its own names (`auth.names`):
/// `host` (any port) or `host:port` (that port only), `host` in any form [`host`] takes —
/// an IPv6 address in brackets. Blanks around it are ignored.
pub fn entry(e: &str) -> Result<String, Invalid> {
    let e = e.trim();
    let (h, port) = if let Some(rest) = e.strip_prefix('[') {
        let close = rest
            .find(']')
            .ok_or("an IPv6 address in brackets lacks its ']'")?;
        let (h, tail) = e.split_at(close + 2);
        match tail {
            "" => (h, None),
            t => (
                h,
                Some(
                    t.strip_prefix(':')
                        .ok_or("expected ':' and a port after ']'")?,
                ),
            ),
        }
    } else {
        match e.split_once(':') {
            None => (e, None),
            Some((_, p)) if p.contains(':') => {
                return Err(
                    "write an IPv6 address in brackets ([2001:db8::1] or [2001:db8::1]:443)",
                )
            }
            Some((h, p)) => (h, Some(p)),
        }
    };
    match port {
        None => host(h),
        Some(p) => {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err("a port is a decimal number");
            }
            name(h, p.parse().map_err(|_| "a port is at most 65535")?)
        }
    }
}

/// Whether `name` (an `Auth.relay`) is one of `entries` (canonical [`entry`] forms): equal
/// to a `host:port` entry, or a `host` entry's host with any port.
pub fn matches(entries: &[String], name: &str) -> bool {
    let Some((h, _)) = split(name) else {
        return false;
    };
    entries.iter().any(|e| e == name || e == h)
}

/// Why a relay with names of its own refuses an `Auth` before verifying its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The `Auth` names no relay (the legacy form): a client from before relay binding, or
    /// a relay passing this one's challenge on that dropped `Challenge.bound`.
    Unbound,
    /// The `Auth` names a relay this one is not: the client dialed it by a name missing
    /// from its list, or the signature was made for another relay that passed this one's
    /// challenge on.
    OtherRelay,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Unbound => {
                "this relay takes only relay-bound sign-ins and the Auth names no relay"
            }
            Refused::OtherRelay => "the Auth is bound to a name that is not this relay's",
        })
    }
}

/// What a relay whose own names are `entries` (canonical; empty: none set) says of an
/// `Auth` carrying `relay`, before it verifies the signature: with names, the `Auth` must
/// name one of them; without, anything goes (a bound signature is verified over the name it
/// carries, a legacy one as before).
pub fn check(entries: &[String], relay: Option<&str>) -> Result<(), Refused> {
    match relay {
        _ if entries.is_empty() => Ok(()),
        None => Err(Refused::Unbound),
        Some(n) if matches(entries, n) => Ok(()),
        Some(_) => Err(Refused::OtherRelay),
    }
}

/// An IPv6 address as the WHATWG URL Standard serializes it (without the brackets).
fn ipv6_text(a: &Ipv6Addr) -> String {
    use std::fmt::Write as _;
    let s = a.segments();
    // The first longest run of at least two zero pieces.
    let mut compress = None;
    let mut best = 1;
    let mut i = 0;
    while i < 8 {
        if s[i] == 0 {
            let start = i;
            while i < 8 && s[i] == 0 {
                i += 1;
            }
            if i - start > best {
                best = i - start;
                compress = Some(start);
            }
        } else {
            i += 1;
        }
    }
    let mut out = String::new();
    let mut ignore0 = false;
    for (i, p) in s.iter().enumerate() {
        if ignore0 && *p == 0 {
            continue;
        }
        ignore0 = false;
        if compress == Some(i) {
            out.push_str(if i == 0 { "::" } else { ":" });
            ignore0 = true;
            continue;
        }
        let _ = write!(out, "{p:x}");
        if i != 7 {
            out.push(':');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized_as_a_url_parser_does() {
        for (given, want) in [
            ("Relay.Example.COM", "relay.example.com"),
            ("relay.example.com.", "relay.example.com."),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "[::1]"),
            ("::1", "[::1]"),
            ("[2001:DB8:0:0:0:0:0:1]", "[2001:db8::1]"),
            ("[2001:db8:0:0:1:0:0:1]", "[2001:db8::1:0:0:1]"),
            ("[0:0:1:0:0:0:0:0]", "[0:0:1::]"),
            ("[1:0:1:0:1:0:1:0]", "[1:0:1:0:1:0:1:0]"),
            ("[::ffff:192.0.2.1]", "[::ffff:c000:201]"),
            ("[::]", "[::]"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("relay_1.internal", "relay_1.internal"),
        ] {
            assert_eq!(host(given).as_deref(), Ok(want), "{given}");
            assert_eq!(host(want).as_deref(), Ok(want), "{want} is canonical");
        }
        for bad in [
            "",
            "bücher.example",
            "relay example",
            "127.1",
            "127.0.0.1.",
            "0x7f.0.0.1",
            "a.0x1f",
            "01.2.3.4",
            "127.000.0.1",
            "127.0.0.01",
            "[::1",
            "[relay]",
            "relay:80",
            "relay/x",
        ] {
            assert!(host(bad).is_err(), "{bad:?} is refused");
        }
        // A label that only starts like a number is a name.
        assert_eq!(host("a.1x").as_deref(), Ok("a.1x"));
    }

    #[test]
    fn entries_and_matching() {
        for (given, want) in [
            ("Relay.Example.COM", "relay.example.com"),
            (" relay.example.com:443 ", "relay.example.com:443"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
            ("[2001:DB8::1]:8443", "[2001:db8::1]:8443"),
            ("127.0.0.1:07070", "127.0.0.1:7070"),
        ] {
            assert_eq!(entry(given).as_deref(), Ok(want), "{given}");
        }
        for bad in [
            "2001:db8::1",
            "relay:",
            "relay:x",
            "relay:65536",
            "[::1]x",
            "[::1]:",
            "",
        ] {
            assert!(entry(bad).is_err(), "{bad:?} is refused");
        }
        let names = vec!["relay.example.com".to_string(), "[::1]:7070".to_string()];
        assert!(matches(&names, "relay.example.com:443"));
        assert!(matches(&names, "relay.example.com:8443"));
        assert!(matches(&names, "[::1]:7070"));
        assert!(!matches(&names, "[::1]:7071"));
        assert!(!matches(&names, "evil.example:443"));
        assert!(!matches(&names, "relay.example.com"));
        assert!(!matches(&names, "sub.relay.example.com:443"));
        assert_eq!(check(&names, None), Err(Refused::Unbound));
        assert_eq!(
            check(&names, Some("evil.example:443")),
            Err(Refused::OtherRelay)
        );
        assert_eq!(check(&names, Some("relay.example.com:443")), Ok(()));
        assert_eq!(check(&[], None), Ok(()));
        assert_eq!(check(&[], Some("evil.example:443")), Ok(()));
    }

    #[test]
    fn names_split_and_are_checked() {
        assert_eq!(
            name("Relay.Example.com", 443).as_deref(),
            Ok("relay.example.com:443")
        );
        assert_eq!(name("::1", 7070).as_deref(), Ok("[::1]:7070"));
        assert_eq!(split("[::1]:7070"), Some(("[::1]", 7070)));
        assert_eq!(split("relay:0443"), None);
        assert_eq!(split("relay:+443"), None);
        assert_eq!(split("relay:65536"), None);
        assert_eq!(split(":443"), None);
        assert!(is_canonical("relay.example.com:443"));
        assert!(!is_canonical("Relay.example.com:443"));
        assert!(!is_canonical("relay.example.com"));
        let long = format!("{}.example", "a".repeat(250));
        assert!(name(&long, 1).is_err(), "over 255 bytes");
        assert_eq!(name(&"a".repeat(253), 1).map(|n| n.len()), Ok(255));
    }
}
