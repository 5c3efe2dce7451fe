//! The cluster operator's Ed25519 key, as the operator handles it: made once, kept off the
//! nodes, used to sign each node's registration (`keyhold sign-node`); its public half goes
//! into every node's `[etcd] operator_public_key`.

use std::net::SocketAddr;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::SigningKey;
use zeroize::Zeroize;

use super::registration;
use crate::keys;

/// A new operator key: 32 random bytes (an Ed25519 seed) in base64.
pub fn generate() -> Result<String, String> {
    let mut seed = [0u8; 32];
    keyhold_devices::entropy::fill(&mut seed).map_err(|e| format!("no entropy: {e}"))?;
    let text = STANDARD.encode(seed);
    seed.zeroize();
    Ok(text)
}

/// The operator key in `text` (base64 seed).
fn signing_key(text: &str) -> Result<SigningKey, String> {
    let mut seed = keys::decode(text).map_err(|e| e.to_string())?;
    let key = SigningKey::from_bytes(&seed);
    seed.zeroize();
    Ok(key)
}

/// The public half of the operator key in `text`, in base64.
pub fn public(text: &str) -> Result<String, String> {
    Ok(STANDARD.encode(signing_key(text)?.verifying_key().to_bytes()))
}

/// The operator's signature over node `id`'s registration at `address` with the node's
/// static public key `public_key` (base64), the operator key read from `key_file`.
pub fn sign_node(
    key_file: &Path,
    id: u32,
    address: SocketAddr,
    public_key: &str,
) -> Result<String, String> {
    let public_key = keys::decode(public_key).map_err(|e| format!("--public-key: {e}"))?;
    let mut text =
        std::fs::read_to_string(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let key = signing_key(&text).map_err(|e| format!("{}: {e}", key_file.display()));
    text.zeroize();
    Ok(STANDARD.encode(registration::sign(&key?, id, &address, &public_key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use registration::Registration;

    #[test]
    fn a_signature_made_here_verifies_in_a_node() {
        let operator = generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("operator.key");
        std::fs::write(&file, &operator).unwrap();
        let node_key = keys::encode(&[9; 32]);
        let address: SocketAddr = "10.0.0.9:7000".parse().unwrap();
        let signature = sign_node(&file, 9, address, &node_key).unwrap();
        let operator_key = registration::operator_public_key(&public(&operator).unwrap()).unwrap();
        let registration = Registration {
            id: 9,
            address,
            public_key: [9; 32],
            signature: registration::signature(&signature).unwrap(),
        };
        assert!(Registration::verified(registration.to_json().as_bytes(), &operator_key).is_ok());
        assert!(sign_node(&file, 9, address, "short").unwrap_err().contains("--public-key"));
    }
}
