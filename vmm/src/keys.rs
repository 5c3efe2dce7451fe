//! Node keys: static X25519 key pairs in base64, as `wg genkey` and `wg pubkey` write them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
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
    /// The system's random source failed.
    #[error("no entropy from the kernel: {0}")]
    Entropy(String),
}

/// A new private key.
pub fn generate() -> Result<StaticSecret, KeyError> {
    let mut bytes = [0u8; KEY_LEN];
    keyhold_devices::entropy::fill(&mut bytes).map_err(|e| KeyError::Entropy(e.to_string()))?;
    let secret = StaticSecret::from(bytes);
    bytes.zeroize();
    Ok(secret)
}

/// A key in base64.
pub fn encode(bytes: &[u8; KEY_LEN]) -> String {
    STANDARD.encode(bytes)
}

/// The 32 bytes of a base64 key (surrounding whitespace ignored).
pub fn decode(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let mut raw = STANDARD.decode(text.trim()).map_err(|_| KeyError::NotBase64)?;
    let result =
        <[u8; KEY_LEN]>::try_from(raw.as_slice()).map_err(|_| KeyError::WrongLength(raw.len()));
    raw.zeroize();
    result
}

/// A private key from base64.
pub fn decode_private(text: &str) -> Result<StaticSecret, KeyError> {
    let mut bytes = decode(text)?;
    let secret = StaticSecret::from(bytes);
    bytes.zeroize();
    Ok(secret)
}

/// The public key of `secret`, in base64.
pub fn public_of(secret: &StaticSecret) -> String {
    encode(PublicKey::from(secret).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_match_a_known_vector() {
        let secret = generate().unwrap();
        let text = encode(&secret.to_bytes());
        assert_eq!(text.len(), 44);
        assert_eq!(decode_private(&text).unwrap().to_bytes(), secret.to_bytes());
        // RFC 7748 section 6.1: Alice's key pair.
        let alice = decode_private("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(public_of(&alice), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(decode("not base64!").unwrap_err(), KeyError::NotBase64);
        assert_eq!(decode("AAAA").unwrap_err(), KeyError::WrongLength(3));
        assert!(decode("  hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\n").is_ok());
    }
}
