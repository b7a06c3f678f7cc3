//! Identities: an Ed25519 key that signs messages (its public key is the sender id) and an
//! X25519 key, signed by the Ed25519 key, for receiving invites.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::error_keys::KeyError;
use crate::text::{self, hrp, Cursor};

const FORMAT: u8 = 1;
const X25519_CONTEXT: &[u8] = b"whispeer/v1/x25519-key\0";

/// A user's or device's secret keys. Secrets are wiped on drop (the dalek types zeroize).
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    x_secret: StaticSecret,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("sender", &self.sender_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity from the operating system's randomness (`crypto.getRandomValues`
    /// in a browser).
    pub fn generate() -> Self {
        Self::generate_with(&mut rand_core::OsRng)
    }

    /// A fresh identity from the caller's CSPRNG.
    pub fn generate_with(rng: &mut impl CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut seed[..]);
        let mut x = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut x[..]);
        Self::from_seeds(&seed, &x)
    }

    /// From the two 32-byte secrets (Ed25519 seed, X25519 scalar).
    pub fn from_seeds(ed_seed: &[u8; 32], x_secret: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(ed_seed),
            x_secret: StaticSecret::from(*x_secret),
        }
    }

    /// The sender id (Ed25519 public key) that receivers see on this identity's messages.
    pub fn sender_id(&self) -> SenderId {
        SenderId(self.signing.verifying_key())
    }

    /// A 32-byte secret for another purpose, derived from the signing seed with
    /// `BLAKE3-derive_key(context, seed)`: stable for this identity, unlinkable to it without
    /// the seed. The client derives its durable-subscription owner secrets this way
    /// (context `"whispeer v2 durable owner"`), so a restarted client still owns them.
    pub fn derive_secret(&self, context: &str) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(context, self.signing.as_bytes()))
    }

    /// The public identity to hand out for invites.
    pub fn public_id(&self) -> PublicId {
        let x = XPublic::from(&self.x_secret).to_bytes();
        let sig = self.signing.sign(&x25519_sig_input(&x));
        PublicId {
            ed: self.signing.verifying_key(),
            x,
            sig,
        }
    }

    /// The secret key string (`wssec1…`). Treat it like a password.
    pub fn to_secret_string(&self) -> Zeroizing<String> {
        let mut b = Zeroizing::new(Vec::with_capacity(65));
        b.push(FORMAT);
        b.extend_from_slice(self.signing.as_bytes());
        b.extend_from_slice(self.x_secret.as_bytes());
        Zeroizing::new(text::encode(hrp::SECRET, &b))
    }

    /// Parses a secret key string.
    pub fn from_secret_string(s: &str) -> Result<Self, KeyError> {
        let b = Zeroizing::new(text::decode(hrp::SECRET, s)?);
        let mut c = Cursor::new(&b, "identity");
        let v = c.u8()?;
        if v != FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: "identity",
                version: v,
            });
        }
        let ed = Zeroizing::new(c.arr::<32>()?);
        let x = Zeroizing::new(c.arr::<32>()?);
        c.finish()?;
        Ok(Self::from_seeds(&ed, &x))
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> Signature {
        self.signing.sign(msg)
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub(crate) fn x25519_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.x_secret.to_bytes())
    }
}

fn x25519_sig_input(x: &[u8; 32]) -> Vec<u8> {
    let mut m = X25519_CONTEXT.to_vec();
    m.extend_from_slice(x);
    m
}

/// The Ed25519 public key that signs messages: who sent a message.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SenderId(pub(crate) VerifyingKey);

impl SenderId {
    /// From 32 bytes; fails for an invalid point.
    pub fn from_bytes(b: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(b)
            .map(SenderId)
            .map_err(|_| KeyError::InvalidPublicKey("sender id"))
    }
    /// The 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl fmt::Display for SenderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::encode(hrp::SENDER, self.0.as_bytes()))
    }
}
impl fmt::Debug for SenderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SenderId({self})")
    }
}
impl FromStr for SenderId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let b = text::decode(hrp::SENDER, s)?;
        let arr: [u8; 32] = b
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::InvalidString {
                kind: "sender id",
                reason: "must be 32 bytes".into(),
            })?;
        SenderId::from_bytes(&arr)
    }
}

/// A public identity: sender id plus an X25519 key signed by it. Parsing checks the
/// signature, so an attacker cannot swap in their own X25519 key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicId {
    ed: VerifyingKey,
    x: [u8; 32],
    sig: Signature,
}

impl PublicId {
    /// The sender id part.
    pub fn sender_id(&self) -> SenderId {
        SenderId(self.ed)
    }
    /// The X25519 public key invites are sealed to.
    pub fn x25519(&self) -> &[u8; 32] {
        &self.x
    }
    /// Parses 128 bytes `ed_pk ‖ x_pk ‖ sig` and verifies the signature.
    pub fn from_bytes(b: &[u8]) -> Result<Self, KeyError> {
        let mut c = Cursor::new(b, "public id");
        let ed = VerifyingKey::from_bytes(&c.arr::<32>()?)
            .map_err(|_| KeyError::InvalidPublicKey("public id"))?;
        let x = c.arr::<32>()?;
        let sig = Signature::from_bytes(&c.arr::<64>()?);
        c.finish()?;
        ed.verify_strict(&x25519_sig_input(&x), &sig)
            .map_err(|_| KeyError::BadSignature("public id"))?;
        Ok(PublicId { ed, x, sig })
    }
    /// The 128-byte encoding.
    pub fn to_bytes(&self) -> [u8; 128] {
        let mut out = [0u8; 128];
        out[..32].copy_from_slice(self.ed.as_bytes());
        out[32..64].copy_from_slice(&self.x);
        out[64..].copy_from_slice(&self.sig.to_bytes());
        out
    }
}

impl fmt::Display for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = vec![FORMAT];
        b.extend_from_slice(&self.to_bytes());
        f.write_str(&text::encode(hrp::PUBLIC_ID, &b))
    }
}
impl fmt::Debug for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicId({})", self.sender_id())
    }
}
impl FromStr for PublicId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let b = text::decode(hrp::PUBLIC_ID, s)?;
        match b.split_first() {
            Some((&FORMAT, rest)) => PublicId::from_bytes(rest),
            Some((&v, _)) => Err(KeyError::UnsupportedVersion {
                kind: "public id",
                version: v,
            }),
            None => Err(KeyError::InvalidString {
                kind: "public id",
                reason: "empty".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn strings_roundtrip_and_typecheck() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let id = Identity::generate_with(&mut rng);
        let s = id.to_secret_string();
        assert!(s.starts_with("wssec1"));
        let back = Identity::from_secret_string(&s).unwrap();
        assert_eq!(back.sender_id(), id.sender_id());
        let p = id.public_id().to_string();
        assert!(p.starts_with("wsid1"));
        assert_eq!(p.parse::<PublicId>().unwrap(), id.public_id());
        let snd = id.sender_id().to_string();
        assert_eq!(snd.parse::<SenderId>().unwrap(), id.sender_id());
        // A public id is not a secret, and a flipped character fails the checksum.
        assert!(matches!(
            Identity::from_secret_string(&p),
            Err(KeyError::WrongKind { .. })
        ));
        let mut bad = p.clone().into_bytes();
        let i = bad.len() - 10;
        bad[i] = if bad[i] == b'q' { b'p' } else { b'q' };
        assert!(String::from_utf8(bad).unwrap().parse::<PublicId>().is_err());
    }

    #[test]
    fn public_id_signature_is_checked() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let id = Identity::generate_with(&mut rng);
        let mut b = id.public_id().to_bytes();
        b[40] ^= 1; // swap in another X25519 key
        assert_eq!(
            PublicId::from_bytes(&b),
            Err(KeyError::BadSignature("public id"))
        );
    }

    /// PROTOCOL §1.3: a public key decodes as curve25519-dalek 4 decodes it — `y` taken mod p
    /// (so `y ≥ p` is accepted), `x = 0` with the sign bit set accepted — and keeps the bytes
    /// as given; only a `y` with no curve point is refused. `verify_strict` refuses a key of
    /// small order even where the cofactorless equation holds.
    #[test]
    fn public_keys_decode_as_dalek_does() {
        use ed25519_dalek::{Signature, Verifier};
        // p = 2^255 − 19, little-endian: ed ff … ff 7f.
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        // y = p + 3: a non-canonical encoding of the point with y = 3 (on the curve).
        let mut y3 = p;
        y3[0] += 3;
        let non_canonical = SenderId::from_bytes(&y3).unwrap();
        assert_eq!(non_canonical.to_bytes(), y3, "kept as given");
        let mut canonical = [0u8; 32];
        canonical[0] = 3;
        assert_ne!(SenderId::from_bytes(&canonical).unwrap(), non_canonical);
        let again: SenderId = non_canonical.to_string().parse().unwrap();
        assert_eq!(again, non_canonical);
        // y = 2 is not the y of a curve point (nor is y = p + 2).
        let mut y2 = [0u8; 32];
        y2[0] = 2;
        assert!(SenderId::from_bytes(&y2).is_err());
        let mut p2 = p;
        p2[0] += 2;
        assert!(SenderId::from_bytes(&p2).is_err());
        // The neutral point (0, 1) with the sign bit set ("x = −0") decodes. It has small
        // order: with R = B (the base point) and S = 1, [S]B − [k]A = R for every message,
        // which `verify` accepts and `verify_strict` refuses.
        let mut neutral = [0u8; 32];
        neutral[0] = 1;
        neutral[31] = 0x80;
        let a = VerifyingKey::from_bytes(&neutral).unwrap();
        let mut sig = [0u8; 64];
        sig[0] = 0x58;
        sig[1..32].fill(0x66);
        sig[32] = 1;
        let sig = Signature::from_bytes(&sig);
        assert!(a.verify(b"any message", &sig).is_ok());
        assert!(a.verify_strict(b"any message", &sig).is_err());
    }
}
