//! Invites: a grant sealed to one recipient's X25519 key with HPKE (RFC 9180, mode Base,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, info `"whispeer/v2/invite"`)
//! through the `hpke` crate. Inside, the inviter signs who it is for, what it grants and
//! until when. An invite is safe to send over the relay itself.
//!
//! ```text
//! invite string  = bech32m("wsinv", 0x02 ‖ enc[32] ‖ hpke_ciphertext)
//! aad            = recipient X25519 public key
//! plaintext      = 0x02 ‖ inviter_pk[32] ‖ u64be expiry_ms ‖ sig[64] ‖ grant bytes
//! sig            = Ed25519(inviter, "whispeer/v2/invite\0" ‖ recipient_ed[32] ‖ recipient_x[32]
//!                  ‖ tree_id ‖ u64be epoch ‖ lp(scope) ‖ u64be expiry_ms ‖ BLAKE3(grant bytes))
//! ```

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::CryptoRngCore;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::error_keys::{InviteError, KeyError};
use crate::identity::{Identity, PublicId, SenderId};
use crate::text::{self, hrp, put_lp, Cursor};
use crate::tree::Grant;

type Kem = X25519HkdfSha256;
const FORMAT: u8 = 2;
const INFO: &[u8] = b"whispeer/v2/invite";
const SIG_CONTEXT: &[u8] = b"whispeer/v2/invite\0";

/// An opened invite.
#[derive(Debug, Clone)]
pub struct Invite {
    /// The grant it carries.
    pub grant: Grant,
    /// Who signed it.
    pub inviter: SenderId,
    /// Unix ms after which it is refused.
    pub expiry_ms: u64,
}

fn sig_input(recipient: &PublicId, grant: &Grant, grant_bytes: &[u8], expiry_ms: u64) -> Vec<u8> {
    let mut m = SIG_CONTEXT.to_vec();
    m.extend_from_slice(&recipient.sender_id().to_bytes());
    m.extend_from_slice(recipient.x25519());
    m.extend_from_slice(&grant.epoch_keys().tree_id().0);
    m.extend_from_slice(&grant.epoch_keys().epoch().to_be_bytes());
    put_lp(&mut m, grant.scope().to_string().as_bytes());
    m.extend_from_slice(&expiry_ms.to_be_bytes());
    m.extend_from_slice(blake3::hash(grant_bytes).as_bytes());
    m
}

impl Invite {
    /// Seals `grant` to `recipient`, signed by `inviter`, valid until `expiry_ms`.
    pub fn seal(
        grant: &Grant,
        inviter: &Identity,
        recipient: &PublicId,
        expiry_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<String, InviteError> {
        let gb = grant.to_bytes();
        let sig = inviter.sign(&sig_input(recipient, grant, &gb, expiry_ms));
        let mut pt = Zeroizing::new(Vec::with_capacity(gb.len() + 105));
        pt.push(FORMAT);
        pt.extend_from_slice(&inviter.sender_id().to_bytes());
        pt.extend_from_slice(&expiry_ms.to_be_bytes());
        pt.extend_from_slice(&sig.to_bytes());
        pt.extend_from_slice(&gb);
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
        let mut out = vec![FORMAT];
        out.extend_from_slice(&enc.to_bytes());
        out.extend_from_slice(&ct);
        Ok(text::encode(hrp::INVITE, &out))
    }

    /// Opens an invite addressed to `me`, checking the inviter's signature and expiry.
    /// The caller decides whether it trusts `inviter`.
    pub fn open(s: &str, me: &Identity, now_ms: u64) -> Result<Invite, InviteError> {
        let b = text::decode(hrp::INVITE, s)?;
        let mut c = Cursor::new(&b, "invite");
        let v = c.u8()?;
        if v == 1 {
            return Err(KeyError::OldVersion {
                kind: "invite",
                version: v,
            }
            .into());
        }
        if v != FORMAT {
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
        let mut c = Cursor::new(&pt, "invite");
        if c.u8()? != FORMAT {
            return Err(InviteError::CannotOpen);
        }
        let inviter = VerifyingKey::from_bytes(&c.arr()?).map_err(|_| InviteError::BadSignature)?;
        let expiry_ms = c.u64()?;
        let sig = Signature::from_bytes(&c.arr()?);
        let gb = c.b;
        let grant = Grant::from_bytes(gb)?;
        inviter
            .verify_strict(&sig_input(&me.public_id(), &grant, gb, expiry_ms), &sig)
            .map_err(|_| InviteError::BadSignature)?;
        if now_ms > expiry_ms {
            return Err(InviteError::Expired { expiry_ms, now_ms });
        }
        Ok(Invite {
            grant,
            inviter: SenderId(inviter),
            expiry_ms,
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
    use crate::topic::Topic;
    use crate::tree::{Scope, TreeKey};
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn invite_roundtrip_and_failures() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(21);
        let tk = TreeKey::generate_with("home", &mut rng).unwrap();
        let alice = Identity::generate_with(&mut rng);
        let bob = Identity::generate_with(&mut rng);
        let eve = Identity::generate_with(&mut rng);
        let grant = tk.grant(&Scope::Subtree(Topic::new("sensor").unwrap()));
        let inv = Invite::seal(&grant, &alice, &bob.public_id(), 1000, &mut rng).unwrap();
        assert!(inv.starts_with("wsinv1"));
        let got = Invite::open(&inv, &bob, 500).unwrap();
        assert_eq!(got.inviter, alice.sender_id());
        assert_eq!(got.grant.scope(), grant.scope());
        assert_eq!(
            Invite::open(&inv, &eve, 500).unwrap_err(),
            InviteError::CannotOpen
        );
        assert!(matches!(
            Invite::open(&inv, &bob, 1001),
            Err(InviteError::Expired { .. })
        ));
    }
}
