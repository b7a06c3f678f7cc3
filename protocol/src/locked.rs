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
/// ceilings [`unlock_secret_string`] accepts (m ≤ 1 GiB, t ≤ 16, p ≤ 16) are refused.
pub fn lock_secret_string(
    secret: &str,
    passphrase: &[u8],
    params: PassphraseParams,
    rng: &mut impl CryptoRngCore,
) -> Result<String, KeyError> {
    check_params(params)?;
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
/// [`KeyError::Locked`].
pub fn unlock_secret_string(
    locked: &str,
    passphrase: &[u8],
) -> Result<Zeroizing<String>, KeyError> {
    let b = text::decode(hrp::LOCKED, locked)?;
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
        let locked = lock_secret_string(secret, b"pass", FAST, &mut rng).unwrap();
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
        let locked = lock_secret_string("wstree1x", b"pass", FAST, &mut rng).unwrap();
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
