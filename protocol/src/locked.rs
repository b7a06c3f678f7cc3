//! Locked secret strings (`wslocked1…`): a key string or identity secret sealed under a
//! passphrase, for keeping at rest (a broker's key file). Argon2id derives a 32-byte key from
//! the passphrase and a random salt; XChaCha20-Poly1305 seals the secret string with a random
//! nonce; the header (version, Argon2id parameters, salt, nonce) is authenticated. Any
//! failure to open — wrong passphrase, damaged or altered string — is one opaque error,
//! [`KeyError::Locked`]. Layout in PROTOCOL.md §2 ("Locked secret strings").

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::error_keys::KeyError;
use crate::text::{self, hrp};
use crate::tree::PassphraseParams;

const VERSION: u8 = 1;
const AAD_CONTEXT: &[u8] = b"whispeer locked secret v1";
/// version 1 + m_kib 4 + t 4 + p 4 + salt 16 + nonce 24.
const HEADER: usize = 1 + 12 + 16 + 24;
/// Ceilings on the Argon2id cost a string may name, refused before deriving when opening and
/// when locking. A string read from a file chooses its own cost and Argon2 must run before
/// anything is authenticated, so whoever can write a broker's key directory could otherwise
/// make every start allocate this much per key file. 1 GiB and 16 passes are 4× and 8× the
/// default (256 MiB, t = 2) and more than a key file needs; `lock_secret_string` refuses the
/// same, so no honest writer produces a string its reader refuses.
const MAX_M_KIB: u32 = 1024 * 1024;
const MAX_T: u32 = 16;
const MAX_P: u32 = 16;

/// Floors on the Argon2id cost [`lock_secret_string`] writes: m ≥ 64 MiB and t ≥ 2 (the
/// cheapest of the passphrase-tree parameters PROTOCOL §5.9 allows, 64 MiB / t = 3 and the
/// default 256 MiB / t = 2, both pass; RFC 9106 §4 recommends 64 MiB as the
/// memory-constrained minimum). A locked key file is a target for offline guessing by
/// whoever copies it, and the passphrase is all that protects it; `m = 8 KiB, t = 1` would
/// make each guess a few microseconds. Reading does not apply them (strings written before
/// the floors existed must still open): see [`is_below_floor`].
pub const MIN_M_KIB: u32 = 64 * 1024;
/// See [`MIN_M_KIB`].
pub const MIN_T: u32 = 2;

/// Whether `params` are below the floors [`lock_secret_string`] applies ([`MIN_M_KIB`],
/// [`MIN_T`]): a string [`locked_params`] reports so was written before them, opens, and
/// should be sealed again (the broker does so when it loads one).
pub fn is_below_floor(params: PassphraseParams) -> bool {
    params.m_kib < MIN_M_KIB || params.t < MIN_T || params.p == 0
}

/// The Argon2id parameters a `wslocked1…` string names, read without deriving anything
/// (nothing is authenticated yet: use them to decide, e.g. [`is_below_floor`], not to trust).
pub fn locked_params(locked: &str) -> Result<PassphraseParams, KeyError> {
    Ok(parse(&text::decode(hrp::LOCKED, locked)?)?.0)
}

/// Refuses parameters beyond the ceilings (a typed error: nothing secret is involved yet).
fn check_params(params: PassphraseParams) -> Result<(), KeyError> {
    if params.m_kib > MAX_M_KIB || params.t > MAX_T || params.p > MAX_P {
        return Err(KeyError::InvalidString {
            kind: "locked secret",
            reason: format!(
                "Argon2id parameters beyond the limits (m ≤ {MAX_M_KIB} KiB, t ≤ {MAX_T}, p ≤ {MAX_P})"
            ),
        });
    }
    Ok(())
}

fn derive(
    passphrase: &[u8],
    salt: &[u8],
    params: PassphraseParams,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let p = Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|e| KeyError::Passphrase(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
        .hash_password_into(passphrase, salt, &mut key[..])
        .map_err(|e| KeyError::Passphrase(e.to_string()))?;
    Ok(key)
}

/// Seals `secret` (e.g. a `wstree1…` key string) under `passphrase`. Parameters beyond the
/// ceilings [`unlock_secret_string`] accepts (m ≤ 1 GiB, t ≤ 16, p ≤ 16) or below the
/// floors ([`MIN_M_KIB`], [`MIN_T`]: m ≥ 64 MiB, t ≥ 2) are refused
/// ([`KeyError::InvalidString`]) before anything is derived.
pub fn lock_secret_string(
    secret: &str,
    passphrase: &[u8],
    params: PassphraseParams,
    rng: &mut impl CryptoRngCore,
) -> Result<String, KeyError> {
    check_params(params)?;
    if is_below_floor(params) {
        return Err(KeyError::InvalidString {
            kind: "locked secret",
            reason: format!(
                "Argon2id parameters below the floor for writing (m = {} KiB, t = {}, p = {}; \
                 at least m = {MIN_M_KIB} KiB, t = {MIN_T}, p = 1): a cheaper cost makes \
                 guessing the passphrase of a copied key file cheaper",
                params.m_kib, params.t, params.p
            ),
        });
    }
    seal(secret, passphrase, params, rng)
}

/// [`lock_secret_string`] without the floors (the ceilings are the caller's): tests write
/// the strings older writers could.
fn seal(
    secret: &str,
    passphrase: &[u8],
    params: PassphraseParams,
    rng: &mut impl CryptoRngCore,
) -> Result<String, KeyError> {
    let mut header = Vec::with_capacity(HEADER);
    header.push(VERSION);
    header.extend_from_slice(&params.m_kib.to_be_bytes());
    header.extend_from_slice(&params.t.to_be_bytes());
    header.extend_from_slice(&params.p.to_be_bytes());
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    header.extend_from_slice(&salt);
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    header.extend_from_slice(&nonce);
    let key = derive(passphrase, &salt, params)?;
    let aad = [AAD_CONTEXT, &header[..]].concat();
    let ct = XChaCha20Poly1305::new(key.as_ref().into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: secret.as_bytes(),
                aad: &aad,
            },
        )
        .map_err(|_| KeyError::Locked)?;
    header.extend_from_slice(&ct);
    Ok(text::encode(hrp::LOCKED, &header))
}

/// Opens a `wslocked1…` string with `passphrase`. Argon2id parameters beyond the ceilings
/// are refused before deriving ([`KeyError::InvalidString`]); every later failure is
/// [`KeyError::Locked`]. Parameters below the writing floors are accepted (strings written
/// before them must still open): check [`locked_params`] with [`is_below_floor`] to warn
/// and seal again.
pub fn unlock_secret_string(
    locked: &str,
    passphrase: &[u8],
) -> Result<Zeroizing<String>, KeyError> {
    let b = text::decode(hrp::LOCKED, locked)?;
    let (params, b) = parse(&b)?;
    check_params(params)?;
    let (header, ct) = b.split_at(HEADER);
    let key = derive(passphrase, &header[13..29], params).map_err(|_| KeyError::Locked)?;
    let aad = [AAD_CONTEXT, header].concat();
    let pt = Zeroizing::new(
        XChaCha20Poly1305::new(key.as_ref().into())
            .decrypt(
                XNonce::from_slice(&header[29..53]),
                Payload { msg: ct, aad: &aad },
            )
            .map_err(|_| KeyError::Locked)?,
    );
    let s = std::str::from_utf8(&pt).map_err(|_| KeyError::Locked)?;
    Ok(Zeroizing::new(s.to_owned()))
}

/// The parameters of a decoded locked string (length and version checked), and its bytes.
fn parse(b: &[u8]) -> Result<(PassphraseParams, &[u8]), KeyError> {
    if b.len() < HEADER + 16 {
        return Err(KeyError::InvalidString {
            kind: "locked secret",
            reason: "too short".into(),
        });
    }
    if b[0] != VERSION {
        return Err(KeyError::UnsupportedVersion {
            kind: "locked secret",
            version: b[0],
        });
    }
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let params = PassphraseParams {
        m_kib: u32_at(1),
        t: u32_at(5),
        p: u32_at(9),
    };
    Ok((params, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    const FAST: PassphraseParams = PassphraseParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    #[test]
    fn a_locked_string_opens_with_its_passphrase_only() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let secret = "wstree1secretsecret";
        let locked = seal(secret, b"pass", FAST, &mut rng).unwrap();
        assert!(locked.starts_with("wslocked1"));
        assert!(!locked.contains("secret"));
        assert_eq!(&*unlock_secret_string(&locked, b"pass").unwrap(), secret);
        assert_eq!(
            unlock_secret_string(&locked, b"wrong").unwrap_err(),
            KeyError::Locked
        );
        // Any altered byte (here the Argon2id t, then the ciphertext) fails, opaquely.
        let mut b = text::decode(hrp::LOCKED, &locked).unwrap();
        b[8] ^= 1;
        let altered = text::encode(hrp::LOCKED, &b);
        assert_eq!(
            unlock_secret_string(&altered, b"pass").unwrap_err(),
            KeyError::Locked
        );
        let mut b = text::decode(hrp::LOCKED, &locked).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        let altered = text::encode(hrp::LOCKED, &b);
        assert_eq!(
            unlock_secret_string(&altered, b"pass").unwrap_err(),
            KeyError::Locked
        );
        // Absurd parameters are refused before any work.
        let mut b = text::decode(hrp::LOCKED, &locked).unwrap();
        b[1] = 0xff;
        assert!(matches!(
            unlock_secret_string(&text::encode(hrp::LOCKED, &b), b"pass"),
            Err(KeyError::InvalidString { .. })
        ));
    }

    /// A string read from a file names its own Argon2id cost, and Argon2 must run before the
    /// string is authenticated: whoever can write a broker's key directory must not be able
    /// to make it allocate 4 GiB or run 64 passes per key file at start (review F8).
    #[test]
    fn argon2_costs_beyond_what_lock_writes_are_refused_before_deriving() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        let locked = seal("wstree1x", b"pass", FAST, &mut rng).unwrap();
        let with = |m_kib: u32, t: u32, p: u32| {
            let mut b = text::decode(hrp::LOCKED, &locked).unwrap();
            b[1..5].copy_from_slice(&m_kib.to_be_bytes());
            b[5..9].copy_from_slice(&t.to_be_bytes());
            b[9..13].copy_from_slice(&p.to_be_bytes());
            text::encode(hrp::LOCKED, &b)
        };
        // Refused as parameters (not the opaque `Locked`, which only comes after deriving).
        let beyond = |m_kib, t, p| {
            matches!(
                unlock_secret_string(&with(m_kib, t, p), b"pass"),
                Err(KeyError::InvalidString { .. })
            )
        };
        assert!(beyond(1024 * 1024 + 1, 1, 1), "m = 1 GiB + 1 KiB");
        assert!(beyond(64, 17, 1), "t = 17");
        assert!(beyond(64, 1, 17), "p = 17");
        // At the ceilings the key is derived, and the altered header then fails opaquely.
        assert_eq!(
            unlock_secret_string(&with(256, 16, 16), b"pass").unwrap_err(),
            KeyError::Locked
        );
        // The writer refuses what the reader would, so no broker writes a file it cannot read.
        let big = PassphraseParams {
            m_kib: 1024 * 1024 + 1,
            t: 1,
            p: 1,
        };
        assert!(matches!(
            lock_secret_string("wstree1x", b"pass", big, &mut rng),
            Err(KeyError::InvalidString { .. })
        ));
        // The default (256 MiB, t = 2) stays well inside.
        assert!(check_params(PassphraseParams::default()).is_ok());
        assert!(check_params(PassphraseParams {
            m_kib: 1024 * 1024,
            t: 16,
            p: 16
        })
        .is_ok());
    }

    /// A locked key file is a target for offline guessing: `lock_secret_string` refuses a
    /// cost below m = 64 MiB or t = 2 (it wrote `m = 8 KiB, t = 1`), before deriving; a
    /// string an older writer made that cheap still opens (refusing it would lock its owner
    /// out) and `locked_params` + `is_below_floor` say it should be sealed again.
    #[test]
    fn locking_refuses_a_cost_below_the_floor_and_reading_still_opens_one() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let mut below = |m_kib, t| {
            matches!(
                lock_secret_string("wstree1x", b"pass", PassphraseParams { m_kib, t, p: 1 }, &mut rng),
                Err(KeyError::InvalidString { reason, .. }) if reason.contains("below the floor")
            )
        };
        assert!(below(8, 1), "m = 8 KiB, t = 1");
        assert!(below(64, 1), "the old test parameters");
        assert!(below(MIN_M_KIB - 1, 3), "m just below the floor");
        assert!(below(256 * 1024, 1), "t = 1");
        assert!(below(MIN_M_KIB, 0), "t = 0");
        let zero_p = PassphraseParams {
            m_kib: MIN_M_KIB,
            t: MIN_T,
            p: 0,
        };
        assert!(lock_secret_string("wstree1x", b"pass", zero_p, &mut rng).is_err());
        // The spec's passphrase-tree parameters and the floor itself are accepted.
        assert!(!is_below_floor(PassphraseParams::SPEC));
        assert!(!is_below_floor(PassphraseParams::V1));
        let floor = PassphraseParams {
            m_kib: MIN_M_KIB,
            t: MIN_T,
            p: 1,
        };
        let locked = lock_secret_string("wstree1x", b"pass", floor, &mut rng).unwrap();
        assert_eq!(locked_params(&locked).unwrap(), floor);
        assert!(!is_below_floor(floor));
        assert_eq!(
            &*unlock_secret_string(&locked, b"pass").unwrap(),
            "wstree1x"
        );

        // Written before the floors (8 KiB, t = 1): opens, and is reported as below them.
        let old = PassphraseParams {
            m_kib: 8,
            t: 1,
            p: 1,
        };
        let weak = seal("wstree1x", b"pass", old, &mut rng).unwrap();
        assert_eq!(&*unlock_secret_string(&weak, b"pass").unwrap(), "wstree1x");
        assert_eq!(locked_params(&weak).unwrap(), old);
        assert!(is_below_floor(locked_params(&weak).unwrap()));
        assert!(locked_params("wstree1x").is_err());
    }

    /// Prints the cost of the default parameters (no threshold):
    /// `cargo test -p whispeer-protocol --lib locked -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_the_default_cost() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let t = std::time::Instant::now();
        let locked =
            lock_secret_string("wstree1x", b"pass", PassphraseParams::default(), &mut rng).unwrap();
        let lock = t.elapsed();
        let t = std::time::Instant::now();
        unlock_secret_string(&locked, b"pass").unwrap();
        println!(
            "default Argon2id (256 MiB, t=2): lock {lock:?}, unlock {:?}",
            t.elapsed()
        );
    }
}
