//! Text encodings of keys and identities: bech32m with a type prefix (the HRP) and a
//! checksum, so a mistyped or truncated key string is caught and a grant cannot be pasted
//! where an identity is expected.
//!
//! Grants can be longer than bech32m's 1023-character code length (a scope path may be up
//! to 1024 bytes), so these strings use bech32m's generator and target residue with the
//! length limit raised to 4096 characters. Up to 1023 characters this is exactly bech32m;
//! beyond it the checksum still catches a random error with probability 1 − 2⁻³⁰.

use bech32::primitives::decode::CheckedHrpstring;
use bech32::{Checksum, Hrp};

use crate::error_keys::KeyError;

/// Bech32m with a 4096-character code length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bech32mLong {}

impl Checksum for Bech32mLong {
    type MidstateRepr = u32;
    const CODE_LENGTH: usize = 4096;
    const CHECKSUM_LENGTH: usize = 6;
    const GENERATOR_SH: [u32; 5] = <bech32::Bech32m as Checksum>::GENERATOR_SH;
    const TARGET_RESIDUE: u32 = <bech32::Bech32m as Checksum>::TARGET_RESIDUE;
}

/// Bech32m with a code length that holds a 112 KiB dictionary (`wsdict`, §6.4): the
/// checksum catches a random error with probability 1 − 2⁻³⁰ at this length, and the
/// string also carries the dictionary's BLAKE3-derived id, which the parser recomputes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bech32mDict {}

impl Checksum for Bech32mDict {
    type MidstateRepr = u32;
    const CODE_LENGTH: usize = 200_000;
    const CHECKSUM_LENGTH: usize = 6;
    const GENERATOR_SH: [u32; 5] = <bech32::Bech32m as Checksum>::GENERATOR_SH;
    const TARGET_RESIDUE: u32 = <bech32::Bech32m as Checksum>::TARGET_RESIDUE;
}

/// Type prefixes (HRPs) of every key string.
pub mod hrp {
    /// A tree's admin key (root of one epoch plus the admin signing key).
    pub const TREE: &str = "wstree";
    /// A grant: a subtree key or a single topic key, with the signed epoch certificate.
    pub const GRANT: &str = "wskey";
    /// An identity's secret keys.
    pub const SECRET: &str = "wssec";
    /// A public identity (Ed25519 + signed X25519 key), for invites.
    pub const PUBLIC_ID: &str = "wsid";
    /// A sender id: the Ed25519 public key that signs messages.
    pub const SENDER: &str = "wspk";
    /// An invite sealed to a recipient.
    pub const INVITE: &str = "wsinv";
    /// A secret string sealed under a passphrase (`locked`).
    pub const LOCKED: &str = "wslocked";
    /// A zstd dictionary (content shared like a key, §6.4).
    pub const DICT: &str = "wsdict";
}

/// Bech32m with the code length of an invite (`wsinv`, §7): up to 1,048,576 characters, so
/// an invite can carry zstd dictionaries (format 3). An invite is also authenticated by
/// its HPKE AEAD, which catches any change the checksum misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bech32mInvite {}

impl Checksum for Bech32mInvite {
    type MidstateRepr = u32;
    const CODE_LENGTH: usize = MAX_INVITE_CHARS;
    const CHECKSUM_LENGTH: usize = 6;
    const GENERATOR_SH: [u32; 5] = <bech32::Bech32m as Checksum>::GENERATOR_SH;
    const TARGET_RESIDUE: u32 = <bech32::Bech32m as Checksum>::TARGET_RESIDUE;
}

/// Most characters in an invite string (`wsinv`, §7).
pub const MAX_INVITE_CHARS: usize = 1 << 20;

fn encode_with<Ck: Checksum>(hrp: &'static str, data: &[u8]) -> Result<String, KeyError> {
    let hrp = Hrp::parse(hrp).expect("static HRPs are valid");
    bech32::encode::<Ck>(hrp, data).map_err(|e| KeyError::InvalidString {
        kind: "key string",
        reason: e.to_string(),
    })
}

fn decode_with<Ck: Checksum>(expected: &'static str, s: &str) -> Result<Vec<u8>, KeyError> {
    let s = s.trim();
    let checked = CheckedHrpstring::new::<Ck>(s).map_err(|e| KeyError::InvalidString {
        kind: expected,
        reason: e.to_string(),
    })?;
    let found = checked.hrp().to_lowercase();
    if found != expected {
        return Err(KeyError::WrongKind { expected, found });
    }
    Ok(checked.byte_iter().collect())
}

/// Encodes `data` under the type prefix `hrp` (lowercase).
pub fn encode(hrp: &'static str, data: &[u8]) -> String {
    encode_with::<Bech32mLong>(hrp, data).expect("key material is below the code length")
}

/// Decodes a string that must carry the type prefix `expected`.
pub fn decode(expected: &'static str, s: &str) -> Result<Vec<u8>, KeyError> {
    decode_with::<Bech32mLong>(expected, s)
}

/// [`encode`] with the dictionary code length ([`Bech32mDict`], up to 200,000 characters).
pub fn encode_long(hrp: &'static str, data: &[u8]) -> String {
    encode_with::<Bech32mDict>(hrp, data).expect("a dictionary is below the code length")
}

/// [`decode`] with the dictionary code length ([`Bech32mDict`]).
pub fn decode_long(expected: &'static str, s: &str) -> Result<Vec<u8>, KeyError> {
    decode_with::<Bech32mDict>(expected, s)
}

/// An invite string (`wsinv`) with the invite code length ([`Bech32mInvite`]); an error
/// when `data` is too long for it.
pub fn encode_invite(data: &[u8]) -> Result<String, KeyError> {
    encode_with::<Bech32mInvite>(hrp::INVITE, data)
}

/// Decodes an invite string (`wsinv`, up to [`MAX_INVITE_CHARS`] characters).
pub fn decode_invite(s: &str) -> Result<Vec<u8>, KeyError> {
    decode_with::<Bech32mInvite>(hrp::INVITE, s)
}

/// Reads fields out of decoded key-string bytes, failing with a typed error when short.
pub(crate) struct Cursor<'a> {
    pub(crate) b: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(b: &'a [u8], kind: &'static str) -> Self {
        Self { b, kind }
    }
    fn short(&self) -> KeyError {
        KeyError::InvalidString {
            kind: self.kind,
            reason: "too short".into(),
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], KeyError> {
        if self.b.len() < n {
            return Err(self.short());
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    pub(crate) fn arr<const N: usize>(&mut self) -> Result<[u8; N], KeyError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    pub(crate) fn u8(&mut self) -> Result<u8, KeyError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, KeyError> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, KeyError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, KeyError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    pub(crate) fn lp_str(&mut self) -> Result<String, KeyError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| KeyError::InvalidString {
            kind: self.kind,
            reason: "text is not UTF-8".into(),
        })
    }
    pub(crate) fn finish(&self) -> Result<(), KeyError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(KeyError::InvalidString {
                kind: self.kind,
                reason: "trailing bytes".into(),
            })
        }
    }
}

pub(crate) fn put_lp(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bech32::{ByteIterExt, Fe32, Fe32IterExt};

    /// `data`'s 5-bit groups, then `extra` groups, under `hrp` with a valid checksum.
    fn with_groups(hrp: &str, data: &[u8], extra: &[Fe32]) -> String {
        let hrp = Hrp::parse(hrp).unwrap();
        data.iter()
            .copied()
            .bytes_to_fes()
            .chain(extra.iter().copied())
            .with_checksum::<Bech32mLong>(&hrp)
            .chars()
            .collect()
    }

    /// PROTOCOL §6.1: the decoder drops the bits left after the last whole byte, whatever
    /// their number and value; the length limit is that of the kind expected, checked before
    /// the HRP is compared.
    #[test]
    fn leftover_bits_and_length_limits() {
        // 65 bytes are exactly 104 groups: one surplus group (5 bits) adds no byte.
        let b = [7u8; 65];
        let s = with_groups(hrp::SECRET, &b, &[Fe32::Q]);
        assert_eq!(decode(hrp::SECRET, &s).unwrap(), b);
        let s = with_groups(hrp::SECRET, &b, &[Fe32::L]);
        assert_eq!(decode(hrp::SECRET, &s).unwrap(), b);
        // 32 bytes are 52 groups with 4 padding bits: non-zero padding is not refused.
        let b = [0u8; 32];
        let mut fes: Vec<Fe32> = b.iter().copied().bytes_to_fes().collect();
        // The last group's first bit is the last data bit (0), its other four are padding.
        *fes.last_mut().unwrap() = Fe32::try_from(0b01111u8).unwrap();
        let hrp_pk = Hrp::parse(hrp::SENDER).unwrap();
        let s: String = fes
            .into_iter()
            .with_checksum::<Bech32mLong>(&hrp_pk)
            .chars()
            .collect();
        assert_eq!(decode(hrp::SENDER, &s).unwrap(), b);
        assert_eq!(encode(hrp::SENDER, &b).len(), s.len());
        // The limit is the expected kind's: a 4,097-character string of another (valid) HRP
        // is an invalid string where a grant is expected, a shorter one a wrong kind.
        let long = with_groups("wsother", &[1u8; 2551], &[Fe32::Q]);
        assert_eq!(long.len(), 4097);
        assert!(matches!(
            decode(hrp::GRANT, &long),
            Err(KeyError::InvalidString { .. })
        ));
        assert!(matches!(
            decode_long(hrp::DICT, &long),
            Err(KeyError::WrongKind { .. })
        ));
        let limit = with_groups("wsother", &[1u8; 2551], &[]);
        assert_eq!(limit.len(), 4096);
        assert!(matches!(
            decode(hrp::GRANT, &limit),
            Err(KeyError::WrongKind { .. })
        ));
    }
}
