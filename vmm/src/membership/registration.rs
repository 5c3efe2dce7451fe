//! A node's registration in the membership directory: `{id, address, public key}`, signed by
//! the cluster's operator key (Ed25519), so that write access to the directory alone can
//! neither add a node nor swap a node's key (docs/SECURITY.md, "Membership").
//!
//! The signature covers this exact text (UTF-8, each line ending in `\n`):
//!
//! ```text
//! keyhold node registration v1
//! <id in decimal>
//! <address as IP:PORT, IPv6 in brackets>
//! <public key in base64>
//! ```
//!
//! The registration is stored as JSON: `{"id": 3, "address": "10.0.0.3:7000", "public_key":
//! "<base64>", "signature": "<base64>"}`.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a registration was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegistrationError {
    /// Not the JSON object a registration is, or a field that does not decode.
    #[error("malformed registration: {0}")]
    Malformed(String),
    /// The operator key did not sign it.
    #[error("its signature is not the operator key's")]
    BadSignature,
}

impl RegistrationError {
    /// The reason as the audit log names it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
        }
    }
}

/// A node's registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The node's ID.
    pub id: u32,
    /// Where it listens for links.
    pub address: SocketAddr,
    /// Its static X25519 public key.
    pub public_key: [u8; 32],
    /// The operator key's signature over [`Registration::signed_text`].
    pub signature: [u8; 64],
}

#[derive(Serialize, Deserialize)]
struct Stored {
    id: u32,
    address: String,
    public_key: String,
    signature: String,
}

/// The text the operator key signs for `(id, address, public_key)`.
pub fn signed_text(id: u32, address: &SocketAddr, public_key: &[u8; 32]) -> String {
    format!("keyhold node registration v1\n{id}\n{address}\n{}\n", STANDARD.encode(public_key))
}

/// The operator's signature over `(id, address, public_key)`.
pub fn sign(
    operator: &SigningKey,
    id: u32,
    address: &SocketAddr,
    public_key: &[u8; 32],
) -> [u8; 64] {
    operator.sign(signed_text(id, address, public_key).as_bytes()).to_bytes()
}

fn decode<const N: usize>(field: &str, text: &str) -> Result<[u8; N], RegistrationError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| RegistrationError::Malformed(format!("{field} is not base64")))?;
    bytes.try_into().map_err(|_| RegistrationError::Malformed(format!("{field} is not {N} bytes")))
}

impl Registration {
    /// Decodes a stored registration and checks its signature against `operator`.
    pub fn verified(bytes: &[u8], operator: &VerifyingKey) -> Result<Self, RegistrationError> {
        let stored: Stored = serde_json::from_slice(bytes)
            .map_err(|e| RegistrationError::Malformed(e.to_string()))?;
        let address = stored
            .address
            .parse()
            .map_err(|_| RegistrationError::Malformed("address is not IP:PORT".into()))?;
        let registration = Self {
            id: stored.id,
            address,
            public_key: decode("public_key", &stored.public_key)?,
            signature: decode("signature", &stored.signature)?,
        };
        let text = signed_text(registration.id, &registration.address, &registration.public_key);
        operator
            .verify(text.as_bytes(), &Signature::from_bytes(&registration.signature))
            .map_err(|_| RegistrationError::BadSignature)?;
        Ok(registration)
    }

    /// The registration as it is stored.
    pub fn to_json(&self) -> String {
        let stored = Stored {
            id: self.id,
            address: self.address.to_string(),
            public_key: STANDARD.encode(self.public_key),
            signature: STANDARD.encode(self.signature),
        };
        serde_json::to_string(&stored).unwrap_or_default()
    }
}

/// Decodes an operator public key (base64 Ed25519).
pub fn operator_public_key(text: &str) -> Result<VerifyingKey, RegistrationError> {
    let bytes: [u8; 32] = decode("operator_public_key", text)?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| RegistrationError::Malformed("operator_public_key is no Ed25519 key".into()))
}

/// Decodes a signature (base64, 64 bytes).
pub fn signature(text: &str) -> Result<[u8; 64], RegistrationError> {
    decode("registration_signature", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn registration(operator: &SigningKey) -> Registration {
        let address: SocketAddr = "10.0.0.3:7000".parse().unwrap();
        let public_key = [3; 32];
        Registration {
            id: 3,
            address,
            public_key,
            signature: sign(operator, 3, &address, &public_key),
        }
    }

    #[test]
    fn a_signed_registration_verifies_and_a_changed_one_does_not() {
        let operator = operator();
        let good = registration(&operator);
        let verified = Registration::verified(good.to_json().as_bytes(), &operator.verifying_key());
        assert_eq!(verified, Ok(good.clone()));
        for changed in [
            Registration { id: 4, ..good.clone() },
            Registration { address: "10.0.0.4:7000".parse().unwrap(), ..good.clone() },
            Registration { public_key: [4; 32], ..good.clone() },
        ] {
            let json = changed.to_json();
            assert_eq!(
                Registration::verified(json.as_bytes(), &operator.verifying_key()),
                Err(RegistrationError::BadSignature)
            );
        }
        let stranger = SigningKey::from_bytes(&[8; 32]);
        let forged = registration(&stranger).to_json();
        assert_eq!(
            Registration::verified(forged.as_bytes(), &operator.verifying_key()),
            Err(RegistrationError::BadSignature)
        );
    }

    #[test]
    fn malformed_registrations_are_refused_with_the_field() {
        let key = operator().verifying_key();
        for (bytes, field) in [
            (&b"not json"[..], ""),
            (br#"{"id":1,"address":"nowhere","public_key":"","signature":""}"#, "address"),
            (br#"{"id":1,"address":"1.2.3.4:5","public_key":"AAAA","signature":""}"#, "public_key"),
        ] {
            let Err(RegistrationError::Malformed(why)) = Registration::verified(bytes, &key) else {
                panic!("{bytes:?} was not refused as malformed")
            };
            assert!(why.contains(field), "{why}");
        }
    }

    #[test]
    fn the_signed_text_is_as_documented() {
        let address: SocketAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(
            signed_text(12, &address, &[0; 32]),
            "keyhold node registration v1\n12\n[::1]:7000\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
        );
    }
}
