//! The channel cryptography, all of it RustCrypto: per-direction keys derived from the channel
//! key with HKDF-SHA256, and AES-256-GCM over each message with the sequence number as nonce and
//! both endpoints and the sequence number as associated data.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use guest_agent::channel::abi::Endpoint;

/// Bytes of a channel key.
pub const KEY_SIZE: usize = 32;
/// Bytes of the authentication tag appended to each message.
pub const TAG_SIZE: usize = 16;
/// Bytes of associated data: source, destination, sequence number.
pub const AAD_SIZE: usize = 12 + 12 + 8;

const HKDF_SALT: &[u8] = b"keyhold channel v1";

/// The key for messages from `source` to `destination` on a channel keyed with `channel_key`.
pub fn direction_key(
    channel_key: &[u8; KEY_SIZE],
    source: &Endpoint,
    destination: &Endpoint,
) -> [u8; KEY_SIZE] {
    let mut info = [0u8; 4 + 24];
    info[..4].copy_from_slice(b"data");
    source.encode(&mut info[4..16]);
    destination.encode(&mut info[16..28]);
    let mut out = [0u8; KEY_SIZE];
    Hkdf::<Sha256>::new(Some(HKDF_SALT), channel_key)
        .expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Associated data binding a message to its endpoints and position.
pub fn associated_data(source: &Endpoint, destination: &Endpoint, seq: u64) -> [u8; AAD_SIZE] {
    let mut aad = [0u8; AAD_SIZE];
    source.encode(&mut aad[..12]);
    destination.encode(&mut aad[12..24]);
    aad[24..].copy_from_slice(&seq.to_le_bytes());
    aad
}

fn nonce(seq: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n.into()
}

/// Encrypts `buf` in place and returns the tag.
pub fn seal(key: &[u8; KEY_SIZE], seq: u64, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_SIZE] {
    // The cipher (and its key schedule) lives only for this call and is zeroized on drop.
    let cipher = Aes256Gcm::new(key.into());
    let tag = cipher
        .encrypt_in_place_detached(&nonce(seq), aad, buf)
        .expect("a message within max_message is within AES-GCM's length limit");
    tag.into()
}

/// Verifies `tag` and decrypts `buf` in place; on failure `buf` is left as ciphertext.
pub fn open(
    key: &[u8; KEY_SIZE],
    seq: u64,
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_SIZE],
) -> bool {
    let cipher = Aes256Gcm::new(key.into());
    cipher.decrypt_in_place_detached(&nonce(seq), aad, buf, Tag::from_slice(tag)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmm::test_endpoints::{A, B};

    #[test]
    fn directions_get_different_keys() {
        let k = [3u8; KEY_SIZE];
        assert_ne!(direction_key(&k, &A, &B), direction_key(&k, &B, &A));
        assert_eq!(direction_key(&k, &A, &B), direction_key(&k, &A, &B));
        assert_ne!(direction_key(&k, &A, &B), direction_key(&[4u8; KEY_SIZE], &A, &B));
    }

    #[test]
    fn seal_then_open_and_every_tamper_fails() {
        let key = direction_key(&[9u8; KEY_SIZE], &A, &B);
        let aad = associated_data(&A, &B, 5);
        let mut msg = *b"hello, partition";
        let tag = seal(&key, 5, &aad, &mut msg);
        assert_ne!(&msg, b"hello, partition");
        let mut copy = msg;
        assert!(open(&key, 5, &aad, &mut copy, &tag));
        assert_eq!(&copy, b"hello, partition");

        let mut replay = msg;
        assert!(!open(&key, 6, &associated_data(&A, &B, 6), &mut replay, &tag), "other seq");
        let mut forged = msg;
        assert!(!open(&key, 5, &associated_data(&B, &B, 5), &mut forged, &tag), "other source");
        let mut flipped = msg;
        flipped[0] ^= 1;
        assert!(!open(&key, 5, &aad, &mut flipped, &tag), "flipped bit");
        let wrong_key = direction_key(&[9u8; KEY_SIZE], &B, &A);
        let mut other = msg;
        assert!(!open(&wrong_key, 5, &aad, &mut other, &tag), "other direction's key");
    }
}
