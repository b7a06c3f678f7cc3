//! The AEADs of the envelope suites (PROTOCOL.md §4.3): one place that maps a [`Suite`] to
//! its cipher, so sealing, opening and tools cannot disagree on nonces or tag placement.
//!
//! Every key given here is a per-envelope key from the BLAKE3 key schedule (the sealed-name
//! key and the body key are derived from the envelope's fresh 24-byte random nonce, and
//! suite 3's derivations also take the suite byte, [`suite_parts`]), so each key seals
//! exactly one plaintext. That is why AES-256-GCM can use a fixed-position 12-byte nonce:
//! the first 12 bytes of the header nonce. GCM's nonce-reuse catastrophe needs two
//! plaintexts under one key; a 96-bit random nonce here only adds margin should a key ever
//! repeat.

use aes_gcm::Aes256Gcm;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use crate::envelope_header::{Suite, NONCE_LEN, SUITE_AES256GCM, TAG_LEN};
use crate::error_keys::OpenError;

/// Length of the AES-GCM nonce: the first 12 bytes of the 24-byte header nonce.
pub const GCM_NONCE_LEN: usize = 12;

/// The extra input of the suite's key derivations after the nonce (tags `0x0A`, `0x0B`):
/// nothing for suite 1 (its derivation predates suite 3 and keeps its bytes), the suite byte
/// for every later suite. So one nonce never gives the same key to two algorithms: a relay
/// that flips the suite byte of a stored envelope makes the receiver open the sealed name
/// (the first AEAD it runs) under a key derived for the other suite, which fails there.
pub fn suite_parts(suite: Suite) -> &'static [u8] {
    match suite {
        Suite::XChaCha20Poly1305 => &[],
        Suite::Aes256Gcm => &[SUITE_AES256GCM],
    }
}

/// Encrypts `buf` in place under `key` with the suite's nonce from `nonce` and associated
/// data `ad`; returns the 16-byte tag (appended after the ciphertext on the wire).
pub fn seal_detached(
    suite: Suite,
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    buf: &mut [u8],
) -> [u8; TAG_LEN] {
    // Both ciphers fail only above ~2^36 bytes; envelopes are bounded far below (u32 lengths).
    let tag =
        match suite {
            Suite::XChaCha20Poly1305 => XChaCha20Poly1305::new(key.into())
                .encrypt_in_place_detached(XNonce::from_slice(nonce), ad, buf),
            Suite::Aes256Gcm => Aes256Gcm::new(key.into()).encrypt_in_place_detached(
                aes_gcm::Nonce::from_slice(&nonce[..GCM_NONCE_LEN]),
                ad,
                buf,
            ),
        }
        .expect("the AEAD seals any length an envelope can have");
    tag.into()
}

/// Decrypts `buf` in place and checks `tag` (16 bytes); any failure is the one
/// [`OpenError`].
pub fn open_detached(
    suite: Suite,
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    buf: &mut [u8],
    tag: &[u8],
) -> Result<(), OpenError> {
    if tag.len() != TAG_LEN {
        return Err(OpenError::OPAQUE);
    }
    let tag = Tag::from_slice(tag);
    match suite {
        Suite::XChaCha20Poly1305 => XChaCha20Poly1305::new(key.into()).decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            ad,
            buf,
            tag,
        ),
        Suite::Aes256Gcm => Aes256Gcm::new(key.into()).decrypt_in_place_detached(
            aes_gcm::Nonce::from_slice(&nonce[..GCM_NONCE_LEN]),
            ad,
            buf,
            tag,
        ),
    }
    .map_err(|_| OpenError::OPAQUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NIST SP 800-38D / McGrew–Viega test case 16 (AES-256, 96-bit IV, with AD): the GCM
    /// wiring (key, 12-byte nonce, AD, tag) is the standard one.
    #[test]
    fn aes256_gcm_known_answer() {
        let key: [u8; 32] = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..12].copy_from_slice(&hex::<12>("cafebabefacedbaddecaf888"));
        nonce[12..].fill(0xee); // ignored by suite 3
        let ad = hex::<20>("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let pt = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
        let mut buf: Vec<u8> = (0..pt.len() / 2)
            .map(|i| u8::from_str_radix(&pt[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let tag = seal_detached(Suite::Aes256Gcm, &key, &nonce, &ad, &mut buf);
        assert_eq!(tag, hex::<16>("76fc6ece0f4e1768cddf8853bb2d551b"));
        assert_eq!(&buf[..4], &[0x52, 0x2d, 0xc1, 0xf0]);
        open_detached(Suite::Aes256Gcm, &key, &nonce, &ad, &mut buf, &tag).unwrap();
        assert_eq!(buf[0], 0xd9);
    }

    #[test]
    fn suites_do_not_open_each_other() {
        let (key, nonce) = ([7u8; 32], [9u8; NONCE_LEN]);
        for s in Suite::ALL {
            let mut buf = b"hello".to_vec();
            let tag = seal_detached(s, &key, &nonce, b"ad", &mut buf);
            for o in Suite::ALL {
                let mut b = buf.clone();
                assert_eq!(
                    open_detached(o, &key, &nonce, b"ad", &mut b, &tag).is_ok(),
                    o == s
                );
            }
            let mut b = buf.clone();
            assert!(open_detached(s, &key, &nonce, b"AD", &mut b, &tag).is_err());
            assert!(open_detached(s, &key, &nonce, b"ad", &mut b, &tag[..15]).is_err());
        }
    }

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        core::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
    }
}
