//! Numbered test envelopes, shared by the relay's integration tests (`common`) and its
//! durable benchmark (`#[path]`): the relay never opens an envelope, so a numbered
//! ciphertext is enough to check order and loss.

use bytes::Bytes;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::{Envelope, KeyId, TopicToken};

/// An envelope on `[key, tok(level)]` whose ciphertext starts with `i` (little endian; read
/// back by [`index_of`]), `body` ciphertext bytes after the 48-byte prefix (at least 16).
pub fn indexed_on(key: KeyId, level: u8, i: u64, body: usize) -> Envelope {
    let tokens = [TopicToken::from_bytes([level; 16])];
    let mut out = Vec::new();
    HeaderFields {
        flags: 0,
        key_id: key,
        nonce: [3; 24],
        commit: [4; 32],
        tokens: &tokens,
    }
    .write_prefix(48, &mut out);
    out.extend_from_slice(&[0x5a; 48]);
    out.extend_from_slice(&i.to_le_bytes());
    out.extend((8..body.max(16)).map(|j| (j as u64 ^ i) as u8));
    Envelope::from_bytes(Bytes::from(out)).expect("valid envelope")
}

/// The index written by [`indexed_on`].
pub fn index_of(env: &Envelope) -> u64 {
    u64::from_le_bytes(env.ciphertext()[..8].try_into().expect("8 bytes"))
}
