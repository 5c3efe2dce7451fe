//! The node's static X25519 key, which authenticates its host links: read from its file
//! straight into secret memory, and never copied anywhere else.

use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use thiserror::Error;

use crate::secret::{scrubbed, SecretBox};

/// Bytes of an X25519 key.
pub const KEY_LEN: usize = 32;
/// Longest key file read: a base64 key is 44 characters, and a line end.
const MAX_FILE: usize = 256;

/// Why a key file was refused.
#[derive(Debug, Error)]
pub enum NodeKeyError {
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    /// The file is longer than any key file.
    #[error("it is longer than a key file ({MAX_FILE} bytes or more)")]
    TooLong,
    /// Not base64.
    #[error("not a base64 key")]
    NotBase64,
    /// Base64 of the wrong length.
    #[error("a key is {KEY_LEN} bytes (44 base64 characters), this is {0} bytes")]
    WrongLength(usize),
    /// No secret memory for it.
    #[error("no secret memory for the key: {0}")]
    Memory(std::io::Error),
}

/// A node's static key pair; the private half lives in secret memory.
pub struct NodeKey {
    private: SecretBox<[u8; KEY_LEN]>,
    public: [u8; KEY_LEN],
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey").field("public", &STANDARD.encode(self.public)).finish()
    }
}

impl NodeKey {
    /// Reads a base64 private key (as `keyhold keygen` and `wg genkey` write it) from `path`:
    /// the file's bytes go straight into secret memory, and are decoded there.
    pub fn read_file(path: &Path) -> Result<Self, NodeKeyError> {
        let mut file = std::fs::File::open(path).map_err(NodeKeyError::Read)?;
        let mut text = SecretBox::<[u8; MAX_FILE]>::zeroed().map_err(NodeKeyError::Memory)?;
        let mut len = 0;
        loop {
            match file.read(&mut text[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NodeKeyError::Read(e)),
            }
            if len == MAX_FILE {
                return Err(NodeKeyError::TooLong);
            }
        }
        Self::from_base64(&text[..len])
    }

    /// Decodes a base64 private key (surrounding whitespace ignored) into secret memory.
    pub fn from_base64(text: &[u8]) -> Result<Self, NodeKeyError> {
        let text = text.trim_ascii();
        let mut private = SecretBox::<[u8; KEY_LEN]>::zeroed().map_err(NodeKeyError::Memory)?;
        let mut decoded = SecretBox::<[u8; 64]>::zeroed().map_err(NodeKeyError::Memory)?;
        let len = scrubbed(|| STANDARD.decode_slice(text, &mut decoded[..]))
            .map_err(|_| NodeKeyError::NotBase64)?;
        if len != KEY_LEN {
            return Err(NodeKeyError::WrongLength(len));
        }
        private.copy_from_slice(&decoded[..KEY_LEN]);
        Ok(Self::from_secret(private))
    }

    /// A new random key, made in secret memory.
    pub fn generate() -> Result<Self, NodeKeyError> {
        let mut private = SecretBox::<[u8; KEY_LEN]>::zeroed().map_err(NodeKeyError::Memory)?;
        crate::entropy::fill(&mut private[..]).map_err(NodeKeyError::Read)?;
        Ok(Self::from_secret(private))
    }

    fn from_secret(private: SecretBox<[u8; KEY_LEN]>) -> Self {
        let public =
            scrubbed(|| x25519_dalek::x25519(*private, x25519_dalek::X25519_BASEPOINT_BYTES));
        Self { private, public }
    }

    /// The public key.
    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// The public key in base64.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The private key, for the Noise handshake to copy into its own secret memory.
    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// The private key in base64 (for `keyhold keygen`, whose output is the key file).
    pub fn private_base64(&self) -> String {
        STANDARD.encode(*self.private)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_into_secret_memory_and_match_a_known_vector() {
        // RFC 7748 section 6.1: Alice's key pair.
        let alice =
            NodeKey::from_base64(b" dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n").unwrap();
        assert_eq!(alice.public_base64(), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
        assert_eq!(alice.private_base64(), "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=");
        let fresh = NodeKey::generate().unwrap();
        let again = NodeKey::from_base64(fresh.private_base64().as_bytes()).unwrap();
        assert_eq!(fresh.public(), again.public());
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(NodeKey::from_base64(b"not base64!"), Err(NodeKeyError::NotBase64)));
        assert!(matches!(NodeKey::from_base64(b"AAAA"), Err(NodeKeyError::WrongLength(3))));
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("long.key");
        std::fs::write(&long, vec![b'A'; 1000]).unwrap();
        assert!(matches!(NodeKey::read_file(&long), Err(NodeKeyError::TooLong)));
        assert!(matches!(NodeKey::read_file(&dir.path().join("none")), Err(NodeKeyError::Read(_))));
    }
}
