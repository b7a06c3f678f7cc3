//! Invites: a grant — and the zstd dictionaries its topics use — sealed to one recipient's
//! X25519 key with HPKE (RFC 9180, mode Base, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20-Poly1305, info `"whispeer/v2/invite"`) through the `hpke` crate. Inside, the
//! inviter signs who it is for, what it grants (and the dictionaries) and until when. An
//! invite is safe to send over the relay itself. PROTOCOL.md §7.
//!
//! ```text
//! invite string  = bech32m("wsinv", format ‖ enc[32] ‖ hpke_ciphertext)  (≤ 1,048,576 chars)
//! aad            = recipient X25519 public key
//! format 2 (no dictionaries):
//! plaintext      = 0x02 ‖ inviter_pk[32] ‖ u64be expiry_ms ‖ sig[64] ‖ grant bytes
//! sig            = Ed25519(inviter, "whispeer/v2/invite\0" ‖ recipient_ed[32] ‖ recipient_x[32]
//!                  ‖ tree_id ‖ u64be epoch ‖ lp(scope) ‖ u64be expiry_ms ‖ BLAKE3(grant bytes))
//! format 3 (with dictionaries):
//! plaintext      = 0x03 ‖ inviter_pk[32] ‖ u64be expiry_ms ‖ sig[64] ‖ u16be len ‖ grant bytes
//!                  ‖ dicts
//! dicts          = u8 n (1..=255) ‖ n × (dict_id[16] ‖ u32be len ‖ dictionary), ids ascending
//! sig            = Ed25519(inviter, "whispeer/v2/invite3\0" ‖ … the format-2 fields …
//!                  ‖ BLAKE3(dicts))
//! ```
//!
//! An invite without dictionaries is written in format 2, byte for byte as before, so
//! receivers that predate format 3 still open it.

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::CryptoRngCore;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::dict::{DictId, Dictionary, DICT_ID_LEN, MAX_DICT_LEN, MIN_DICT_LEN};
use crate::error_keys::{InviteError, KeyError};
use crate::identity::{Identity, PublicId, SenderId};
use crate::text::{self, put_lp, Cursor, MAX_INVITE_CHARS};
use crate::tree::Grant;

type Kem = X25519HkdfSha256;
/// Format of an invite carrying a grant only.
pub const FORMAT_GRANT: u8 = 2;
/// Format of an invite carrying a grant and zstd dictionaries.
pub const FORMAT_DICTIONARIES: u8 = 3;
/// Most dictionaries one invite carries.
pub const MAX_INVITE_DICTIONARIES: usize = 255;
const INFO: &[u8] = b"whispeer/v2/invite";
const SIG_CONTEXT: &[u8] = b"whispeer/v2/invite\0";
const SIG_CONTEXT_DICTIONARIES: &[u8] = b"whispeer/v2/invite3\0";
/// `enc` (32) + the AEAD tag (16) around the plaintext, after the format byte.
const SEAL_OVERHEAD: usize = 32 + 16;

/// An opened invite.
#[derive(Debug, Clone)]
pub struct Invite {
    /// The grant it carries.
    pub grant: Grant,
    /// Who signed it.
    pub inviter: SenderId,
    /// Unix ms after which it is refused.
    pub expiry_ms: u64,
    /// The zstd dictionaries it carries (codec 3, §4.6.1), by ascending id; empty for a
    /// format-2 invite. [`crate::Keyring::accept_invite`] adds them with the grant.
    pub dictionaries: Vec<Dictionary>,
}

impl Invite {
    /// The inviter is the tree's admin key (the grant's certificate's `admin_pk`), not a
    /// member. Only the admin knows whether an epoch is current: a member removed by a
    /// rotation still holds the old epoch's admin-signed grant and can seal it to a
    /// newcomer, who cannot tell that a newer epoch exists (PROTOCOL §10). An invite from
    /// anyone else deserves a check with the admin that its epoch is current. (In a
    /// passphrase tree every member holds the admin key, and there is only epoch 0.)
    pub fn inviter_is_admin(&self) -> bool {
        self.inviter == self.grant.cert().admin()
    }
}

fn sig_input(
    recipient: &PublicId,
    grant: &Grant,
    grant_bytes: &[u8],
    expiry_ms: u64,
    dictionaries: Option<&[u8]>,
) -> Vec<u8> {
    let context = match dictionaries {
        None => SIG_CONTEXT,
        Some(_) => SIG_CONTEXT_DICTIONARIES,
    };
    let mut m = context.to_vec();
    m.extend_from_slice(&recipient.sender_id().to_bytes());
    m.extend_from_slice(recipient.x25519());
    m.extend_from_slice(&grant.epoch_keys().tree_id().0);
    m.extend_from_slice(&grant.epoch_keys().epoch().to_be_bytes());
    put_lp(&mut m, grant.scope().to_string().as_bytes());
    m.extend_from_slice(&expiry_ms.to_be_bytes());
    m.extend_from_slice(blake3::hash(grant_bytes).as_bytes());
    if let Some(d) = dictionaries {
        m.extend_from_slice(blake3::hash(d).as_bytes());
    }
    m
}

/// `u8 n ‖ n × (dict_id ‖ u32be len ‖ bytes)` of dictionaries sorted by id, no duplicates.
fn dictionaries_section(dicts: &[&Dictionary]) -> Zeroizing<Vec<u8>> {
    let len = 1 + dicts
        .iter()
        .map(|d| DICT_ID_LEN + 4 + d.len())
        .sum::<usize>();
    let mut b = Zeroizing::new(Vec::with_capacity(len));
    b.push(dicts.len() as u8);
    for d in dicts {
        b.extend_from_slice(&d.id().0);
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d.as_bytes());
    }
    b
}

/// Characters of a `wsinv` string holding `bytes` payload bytes.
fn invite_chars(bytes: usize) -> usize {
    "wsinv1".len() + (bytes * 8).div_ceil(5) + 6
}

fn invalid(reason: impl Into<String>) -> KeyError {
    KeyError::InvalidString {
        kind: "invite",
        reason: reason.into(),
    }
}

/// The framing of a format-3 dictionary section (count, ids, lengths, order), not yet the
/// dictionaries themselves: `(id, bytes)` per entry.
fn split_dictionaries(section: &[u8]) -> Result<Vec<(DictId, &[u8])>, KeyError> {
    let mut c = Cursor::new(section, "invite");
    let n = c.u8()? as usize;
    if n == 0 {
        return Err(invalid("format 3 with no dictionary"));
    }
    let mut out: Vec<(DictId, &[u8])> = Vec::with_capacity(n);
    for i in 0..n {
        let id = DictId(c.arr()?);
        let len = c.u32()? as usize;
        if !(MIN_DICT_LEN..=MAX_DICT_LEN).contains(&len) {
            return Err(invalid(format!(
                "dictionary {} of {len} bytes; {MIN_DICT_LEN} to {MAX_DICT_LEN} allowed",
                i + 1
            )));
        }
        if out.last().is_some_and(|(prev, _)| *prev >= id) {
            return Err(invalid("dictionary ids not in ascending order"));
        }
        out.push((id, c.take(len)?));
    }
    c.finish()?;
    Ok(out)
}

impl Invite {
    /// Seals `grant` to `recipient`, signed by `inviter`, valid until `expiry_ms` (format 2).
    pub fn seal(
        grant: &Grant,
        inviter: &Identity,
        recipient: &PublicId,
        expiry_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<String, InviteError> {
        Self::seal_with_dictionaries(grant, &[], inviter, recipient, expiry_ms, rng)
    }

    /// Seals `grant` and the zstd `dictionaries` its topics use (codec 3) to `recipient`,
    /// signed by `inviter`, valid until `expiry_ms`. Without dictionaries this is
    /// [`Invite::seal`] (format 2, which older receivers open); with them, format 3
    /// (duplicates dropped). Refused when more than [`MAX_INVITE_DICTIONARIES`] are given or
    /// the invite would exceed [`MAX_INVITE_CHARS`] characters.
    pub fn seal_with_dictionaries(
        grant: &Grant,
        dictionaries: &[Dictionary],
        inviter: &Identity,
        recipient: &PublicId,
        expiry_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<String, InviteError> {
        let mut dicts: Vec<&Dictionary> = dictionaries.iter().collect();
        dicts.sort_by_key(|d| d.id());
        dicts.dedup_by_key(|d| d.id());
        if dicts.len() > MAX_INVITE_DICTIONARIES {
            return Err(InviteError::TooManyDictionaries { count: dicts.len() });
        }
        let section = (!dicts.is_empty()).then(|| dictionaries_section(&dicts));
        let gb = grant.to_bytes();
        let format = match section {
            None => FORMAT_GRANT,
            Some(_) => FORMAT_DICTIONARIES,
        };
        let sig = inviter.sign(&sig_input(
            recipient,
            grant,
            &gb,
            expiry_ms,
            section.as_deref().map(Vec::as_slice),
        ));
        let extra = section.as_ref().map_or(0, |d| 2 + d.len());
        let mut pt = Zeroizing::new(Vec::with_capacity(105 + gb.len() + extra));
        pt.push(format);
        pt.extend_from_slice(&inviter.sender_id().to_bytes());
        pt.extend_from_slice(&expiry_ms.to_be_bytes());
        pt.extend_from_slice(&sig.to_bytes());
        if let Some(d) = &section {
            pt.extend_from_slice(&(gb.len() as u16).to_be_bytes());
            pt.extend_from_slice(&gb);
            pt.extend_from_slice(d);
        } else {
            pt.extend_from_slice(&gb);
        }
        let chars = invite_chars(1 + SEAL_OVERHEAD + pt.len());
        if chars > MAX_INVITE_CHARS {
            return Err(InviteError::TooLarge { chars });
        }
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient.x25519())
            .map_err(|_| InviteError::SealFailed)?;
        let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
            &OpModeS::Base,
            &pk,
            INFO,
            &pt,
            recipient.x25519(),
            &mut RngAdapter(rng),
        )
        .map_err(|_| InviteError::SealFailed)?;
        let mut out = vec![format];
        out.extend_from_slice(&enc.to_bytes());
        out.extend_from_slice(&ct);
        text::encode_invite(&out).map_err(|_| InviteError::TooLarge { chars })
    }

    /// Opens an invite addressed to `me`, checking the inviter's signature, the expiry and
    /// every dictionary it carries. The caller decides whether it trusts `inviter`.
    pub fn open(s: &str, me: &Identity, now_ms: u64) -> Result<Invite, InviteError> {
        let b = text::decode_invite(s)?;
        let mut c = Cursor::new(&b, "invite");
        let v = c.u8()?;
        if v == 1 {
            return Err(KeyError::OldVersion {
                kind: "invite",
                version: v,
            }
            .into());
        }
        if v != FORMAT_GRANT && v != FORMAT_DICTIONARIES {
            return Err(KeyError::UnsupportedVersion {
                kind: "invite",
                version: v,
            }
            .into());
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(c.take(32)?)
            .map_err(|_| InviteError::CannotOpen)?;
        let sk_bytes = me.x25519_secret_bytes();
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&sk_bytes[..])
            .map_err(|_| InviteError::CannotOpen)?;
        let my_x = XPublic::from(&StaticSecret::from(*sk_bytes)).to_bytes();
        let pt = Zeroizing::new(
            hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
                &OpModeR::Base,
                &sk,
                &enc,
                INFO,
                c.b,
                &my_x,
            )
            .map_err(|_| InviteError::CannotOpen)?,
        );
        Self::open_plaintext(v, &pt, &me.public_id(), now_ms)
    }

    /// Steps 3–8 of opening (§7) on an HPKE plaintext: `format` is the string's format byte
    /// and `me` the recipient. Public for the fuzz target; use [`Invite::open`].
    #[doc(hidden)]
    pub fn open_plaintext(
        format: u8,
        pt: &[u8],
        me: &PublicId,
        now_ms: u64,
    ) -> Result<Invite, InviteError> {
        let mut c = Cursor::new(pt, "invite");
        if c.u8()? != format {
            return Err(InviteError::CannotOpen);
        }
        let inviter = VerifyingKey::from_bytes(&c.arr()?).map_err(|_| InviteError::BadSignature)?;
        let expiry_ms = c.u64()?;
        let sig = Signature::from_bytes(&c.arr()?);
        let (gb, section) = match format {
            FORMAT_DICTIONARIES => {
                let n = c.u16()? as usize;
                let gb = c.take(n)?;
                (gb, Some(c.b))
            }
            _ => (c.b, None),
        };
        let grant = Grant::from_bytes(gb)?;
        let entries = section.map(split_dictionaries).transpose()?;
        inviter
            .verify_strict(&sig_input(me, &grant, gb, expiry_ms, section), &sig)
            .map_err(|_| InviteError::BadSignature)?;
        if now_ms > expiry_ms {
            return Err(InviteError::Expired { expiry_ms, now_ms });
        }
        let dictionaries = entries
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, (id, bytes))| {
                let d = Dictionary::new(bytes.to_vec())
                    .map_err(|e| invalid(format!("dictionary {} ({id}): {e}", i + 1)))?;
                if d.id() != id {
                    return Err(invalid(format!(
                        "dictionary {} ({id}): id does not match its bytes",
                        i + 1
                    )));
                }
                Ok(d)
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        Ok(Invite {
            grant,
            inviter: SenderId(inviter),
            expiry_ms,
            dictionaries,
        })
    }
}

/// `hpke` 0.12 wants `rand_core::{RngCore, CryptoRng}` by value type; adapt a trait object.
struct RngAdapter<'a, R: CryptoRngCore + ?Sized>(&'a mut R);

impl<R: CryptoRngCore + ?Sized> rand_core::RngCore for RngAdapter<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}
impl<R: CryptoRngCore + ?Sized> rand_core::CryptoRng for RngAdapter<'_, R> {}

impl<R: CryptoRngCore + ?Sized> fmt::Debug for RngAdapter<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RngAdapter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Keyring;
    use crate::topic::Topic;
    use crate::tree::{Scope, TreeKey};
    use rand_chacha::rand_core::SeedableRng;

    /// Alice invites Bob to `sensor/#` of a fresh tree.
    struct Fx {
        rng: rand_chacha::ChaCha20Rng,
        grant: Grant,
        alice: Identity,
        bob: Identity,
    }

    impl Fx {
        fn new() -> Fx {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(21);
            let tk = TreeKey::generate_with("home", &mut rng).unwrap();
            let alice = Identity::generate_with(&mut rng);
            let bob = Identity::generate_with(&mut rng);
            let grant = tk.grant(&Scope::Subtree(Topic::new("sensor").unwrap()));
            Fx {
                rng,
                grant,
                alice,
                bob,
            }
        }

        fn seal(&mut self, dicts: &[Dictionary], expiry_ms: u64) -> Result<String, InviteError> {
            let to = self.bob.public_id();
            Invite::seal_with_dictionaries(
                &self.grant,
                dicts,
                &self.alice,
                &to,
                expiry_ms,
                &mut self.rng,
            )
        }
    }

    fn dict(fill: &str) -> Dictionary {
        let text = format!("{{\"room\":\"{fill}\",\"celsius\":21.5}}");
        Dictionary::new(text.repeat(4).into_bytes()).unwrap()
    }

    #[test]
    fn invite_roundtrip_and_failures() {
        let mut f = Fx::new();
        let eve = Identity::generate_with(&mut f.rng);
        let inv = Invite::seal(&f.grant, &f.alice, &f.bob.public_id(), 1000, &mut f.rng).unwrap();
        assert!(inv.starts_with("wsinv1"));
        assert_eq!(text::decode_invite(&inv).unwrap()[0], FORMAT_GRANT);
        // Without dictionaries, seal_with_dictionaries is seal (format 2).
        assert_eq!(
            text::decode_invite(&f.seal(&[], 1000).unwrap()).unwrap()[0],
            FORMAT_GRANT
        );
        let got = Invite::open(&inv, &f.bob, 500).unwrap();
        assert_eq!(got.inviter, f.alice.sender_id());
        assert_eq!(got.grant.scope(), f.grant.scope());
        assert!(got.dictionaries.is_empty());
        assert_eq!(
            Invite::open(&inv, &eve, 500).unwrap_err(),
            InviteError::CannotOpen
        );
        assert!(matches!(
            Invite::open(&inv, &f.bob, 1001),
            Err(InviteError::Expired { .. })
        ));
    }

    #[test]
    fn dictionaries_travel_sorted_and_deduplicated() {
        let mut f = Fx::new();
        let (a, b) = (dict("kitchen"), dict("garage"));
        let inv = f.seal(&[a.clone(), b.clone(), a.clone()], 1000).unwrap();
        assert_eq!(text::decode_invite(&inv).unwrap()[0], FORMAT_DICTIONARIES);
        let got = Invite::open(&inv, &f.bob, 1000).unwrap();
        let mut want = vec![a, b];
        want.sort_by_key(|d| d.id());
        assert_eq!(got.dictionaries, want);
        // Accepting adds the grant and the dictionaries.
        let mut kr = Keyring::new();
        kr.accept_invite_at(&got, 0).unwrap();
        assert_eq!(kr.dictionaries().len(), 2);
        assert!(kr.topic_key(&Topic::new("sensor/kitchen").unwrap()).is_ok());
    }

    #[test]
    fn a_refused_grant_adds_no_dictionary() {
        let mut f = Fx::new();
        let got = Invite::open(&f.seal(&[dict("attic")], 1000).unwrap(), &f.bob, 0).unwrap();
        // Another tree claiming the same id with another admin: the pin refuses the grant.
        let mut kr = Keyring::new();
        let tree_id = got.grant.epoch_keys().tree_id();
        let other = TreeKey::from_parts(tree_id, 0, "home", [9; 32], [8; 32]).unwrap();
        kr.add_tree_key_at(&other, 0).unwrap();
        assert!(kr.accept_invite_at(&got, 0).is_err());
        assert!(kr.dictionaries().is_empty());
    }

    #[test]
    fn size_limits_are_refused_when_sealing() {
        let mut f = Fx::new();
        let many: Vec<Dictionary> = (0..=MAX_INVITE_DICTIONARIES)
            .map(|i| dict(&format!("room-{i}")))
            .collect();
        assert_eq!(
            f.seal(&many, 1),
            Err(InviteError::TooManyDictionaries {
                count: MAX_INVITE_DICTIONARIES + 1
            })
        );
        let big: Vec<Dictionary> = (0..6u8)
            .map(|k| {
                let bytes = (0..MAX_DICT_LEN).map(|i| (i * 7 + usize::from(k)) as u8 ^ k);
                Dictionary::new(bytes.collect()).unwrap()
            })
            .collect();
        assert!(matches!(f.seal(&big, 1), Err(InviteError::TooLarge { .. })));
        // Five of them fit, and open.
        let inv = f.seal(&big[..5], 1).unwrap();
        assert!(inv.len() > 4096 && inv.len() <= MAX_INVITE_CHARS);
        assert_eq!(Invite::open(&inv, &f.bob, 0).unwrap().dictionaries.len(), 5);
    }
}
