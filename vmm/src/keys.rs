//! Node keys as the operator handles them: static X25519 key pairs in base64, as `wg genkey`
//! and `wg pubkey` write them. The key itself is `keyhold_devices::crypto::node_key::NodeKey`,
//! made and decoded in secret memory.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyhold_devices::crypto::node_key::{NodeKey, NodeKeyError};
use thiserror::Error;
use zeroize::Zeroize;

/// Bytes of an X25519 key.
pub const KEY_LEN: usize = 32;

/// Why a key was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not base64.
    #[error("not a base64 key")]
    NotBase64,
    /// Base64 of the wrong length.
    #[error("a key is {KEY_LEN} bytes (44 base64 characters), this is {0} bytes")]
    WrongLength(usize),
    /// The key could not be made or held.
    #[error("{0}")]
    Host(String),
}

impl From<NodeKeyError> for KeyError {
    fn from(e: NodeKeyError) -> Self {
        match e {
            NodeKeyError::NotBase64 => Self::NotBase64,
            NodeKeyError::WrongLength(n) => Self::WrongLength(n),
            other => Self::Host(other.to_string()),
        }
    }
}

/// A new private key.
pub fn generate() -> Result<NodeKey, KeyError> {
    Ok(NodeKey::generate()?)
}

/// A public key in base64.
pub fn encode(bytes: &[u8; KEY_LEN]) -> String {
    STANDARD.encode(bytes)
}

/// The 32 bytes of a base64 public key (surrounding whitespace ignored).
pub fn decode(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let mut raw = STANDARD.decode(text.trim()).map_err(|_| KeyError::NotBase64)?;
    let result =
        <[u8; KEY_LEN]>::try_from(raw.as_slice()).map_err(|_| KeyError::WrongLength(raw.len()));
    raw.zeroize();
    result
}

/// A private key from base64 (decoded in secret memory).
pub fn decode_private(text: &str) -> Result<NodeKey, KeyError> {
    Ok(NodeKey::from_base64(text.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_match_a_known_vector() {
        let secret = generate().unwrap();
        let text = secret.private_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(decode_private(&text).unwrap().public(), secret.public());
        // RFC 7748 section 6.1: Alice's key pair.
        let alice = decode_private("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(alice.public_base64(), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(decode("not base64!").unwrap_err(), KeyError::NotBase64);
        assert_eq!(decode("AAAA").unwrap_err(), KeyError::WrongLength(3));
        assert!(decode("  hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\n").is_ok());
        assert_eq!(decode_private("AAAA").unwrap_err(), KeyError::WrongLength(3));
    }
}
