//! The relay account a connection presents in `Hello` (never the message identity).

use std::sync::Arc;

use whispeer_protocol::frame::{self, Auth, Hello};

/// An Ed25519 account key (answers the relay's `Challenge`) or a bearer token (sent in
/// `Hello`).
#[derive(Clone)]
#[non_exhaustive]
pub enum AccountAuth {
    /// An account key.
    Key(Arc<ed25519_dalek::SigningKey>),
    /// A bearer token.
    Token(zeroize::Zeroizing<String>),
}

impl AccountAuth {
    /// The account's public key (`None` for a token).
    pub fn public_key(&self) -> Option<[u8; 32]> {
        match self {
            AccountAuth::Key(k) => Some(k.verifying_key().to_bytes()),
            AccountAuth::Token(_) => None,
        }
    }

    /// Puts the account (key) or the token into a `Hello`.
    pub fn fill_hello(&self, h: &mut Hello) {
        match self {
            AccountAuth::Key(k) => h.account = Some(k.verifying_key().to_bytes()),
            AccountAuth::Token(t) => h.auth = Some(bytes::Bytes::copy_from_slice(t.as_bytes())),
        }
    }

    /// The `Auth` frame answering a `Challenge` (`None` for a token, or a `relay` name that
    /// is empty or over 255 bytes): bound to `relay` — the name of the relay as dialed
    /// (PROTOCOL §3.5.6) — when given, else the legacy form.
    pub fn answer(&self, nonce: &[u8; 32], relay: Option<&str>) -> Option<Auth> {
        use ed25519_dalek::Signer;
        match self {
            AccountAuth::Key(k) => {
                let pk = k.verifying_key().to_bytes();
                let msg = match relay {
                    Some(name) => frame::auth_bound_sig_input(nonce, &pk, name)?,
                    None => frame::auth_sig_input(nonce, &pk),
                };
                Some(Auth {
                    sig: k.sign(&msg).to_bytes(),
                    relay: relay.map(str::to_owned),
                })
            }
            AccountAuth::Token(_) => None,
        }
    }
}

impl std::fmt::Debug for AccountAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountAuth::Key(_) => f.write_str("AccountAuth::Key(..)"),
            AccountAuth::Token(_) => f.write_str("AccountAuth::Token(..)"),
        }
    }
}
