//! The key schedule's one primitive: BLAKE3 in keyed mode, with a domain label.
//!
//! `kh(k, tag, parts)` = `BLAKE3-keyed(k, "wsp1" ‖ tag ‖ parts…)` (32 bytes) and
//! `xof(k, tag, parts, n)` its n-byte extendable output. Each derivation has its own tag
//! byte (table in `docs/PROTOCOL.md`), so no input to one can collide with another.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// ASCII prefix of every label.
pub const LABEL: &[u8; 4] = b"wsp1";

/// Tag bytes of every derivation.
pub mod tag {
    /// `B = kh(root_e, 0x01 ‖ tree_id ‖ u64be(epoch))`
    pub const BASE: u8 = 0x01;
    /// `R = kh(B, 0x02)`
    pub const ROUTING: u8 = 0x02;
    /// `N = kh(B, 0x03)`
    pub const NAME: u8 = 0x03;
    /// `S("") = kh(B, 0x04)`
    pub const SUBTREE_ROOT: u8 = 0x04;
    /// `S(p/s) = kh(S(p), 0x05 ‖ lp(s))`
    pub const SUBTREE: u8 = 0x05;
    /// `M(t) = kh(S(t), 0x06)`
    pub const MESSAGE: u8 = 0x06;
    /// `T(i, s) = xof(R, 0x07 ‖ u16be(i) ‖ lp(s), 16)`
    pub const TOKEN: u8 = 0x07;
    /// `key_id = xof(R, 0x08 ‖ tree_id ‖ u64be(epoch), 16)` (v2: bound to tree and epoch)
    pub const KEY_ID: u8 = 0x08;
    /// body key and commitment: `xof(M(t), 0x0A ‖ nonce, 64)`
    pub const BODY: u8 = 0x0A;
    /// sealed-name key: `xof(N, 0x0B ‖ nonce, 32)`
    pub const SEALED_NAME: u8 = 0x0B;
    /// grant key commitment: `kh(grant_key, 0x0C)` (what the admin or a narrower signs;
    /// never the key itself)
    pub const GRANT_COMMIT: u8 = 0x0C;
}

/// A 32-byte secret that is wiped when dropped.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret32(pub(crate) [u8; 32]);

impl Secret32 {
    /// Wraps raw bytes (they are wiped when this value drops).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Secret32(b)
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

fn hasher(key: &[u8; 32], tag: u8, parts: &[&[u8]]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(LABEL);
    h.update(&[tag]);
    for p in parts {
        h.update(p);
    }
    h
}

/// `kh(key, "wsp1" ‖ tag ‖ parts…)`.
pub fn kh(key: &[u8; 32], tag: u8, parts: &[&[u8]]) -> Secret32 {
    Secret32(*hasher(key, tag, parts).finalize().as_bytes())
}

/// `xof(key, "wsp1" ‖ tag ‖ parts…, out.len())`.
pub fn xof(key: &[u8; 32], tag: u8, parts: &[&[u8]], out: &mut [u8]) {
    hasher(key, tag, parts).finalize_xof().fill(out);
}

/// `lp(x) = u16be(len(x)) ‖ x`, written as two parts. Callers guarantee `len(x) ≤ 65535`
/// (topic segments are at most 255 bytes, names at most 1024).
pub fn lp(x: &[u8]) -> [u8; 2] {
    debug_assert!(x.len() <= u16::MAX as usize);
    (x.len() as u16).to_be_bytes()
}
