//! The primitives of the host links' Noise protocol, `Noise_IK_25519_ChaChaPoly_SHA256`, for
//! `snow`, with every secret they hold in secret memory: X25519 private keys (the node's static
//! key and each handshake's ephemeral one), the ChaCha20-Poly1305 keys of handshakes and
//! sessions, and the SHA-256 state that carries HMAC keys while the handshake runs.
//!
//! `snow` builds its own chaining key and handshake hash inside its `HandshakeState`; the link
//! code keeps that state in secret memory too (`link/handshake.rs`), and runs every handshake
//! step scrubbed, so what `snow` leaves in its stack frames (DH outputs, HKDF outputs, HMAC
//! pads) is wiped.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use sha2::Digest;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};

use crate::secret::SecretBox;

/// The Noise protocol of host links.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_SHA256";
/// Bytes of an X25519 key.
pub const DH_LEN: usize = 32;
/// Bytes of a ChaCha20-Poly1305 tag.
pub const TAG_LEN: usize = 16;

/// A `snow` builder for [`NOISE_PARAMS`] on these primitives.
pub fn builder() -> snow::Builder<'static> {
    let params = NOISE_PARAMS.parse().unwrap_or_else(|_| unreachable!("a valid protocol name"));
    snow::Builder::with_resolver(params, Box::new(SecretResolver))
}

/// Hands `snow` the primitives below; refuses any other.
struct SecretResolver;

impl CryptoResolver for SecretResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(KernelRandom))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => X25519::new().map(|dh| Box::new(dh) as Box<dyn Dh>),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        match choice {
            HashChoice::SHA256 => Sha256State::new().map(|h| Box::new(h) as Box<dyn Hash>),
            _ => None,
        }
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::ChaChaPoly => ChaChaPoly::new().map(|c| Box::new(c) as Box<dyn Cipher>),
            _ => None,
        }
    }
}

/// The kernel's CSPRNG.
struct KernelRandom;

impl Random for KernelRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        crate::entropy::fill(dest).map_err(|_| snow::Error::Rng)
    }
}

/// X25519 with its private key in secret memory.
struct X25519 {
    private: SecretBox<[u8; DH_LEN]>,
    public: [u8; DH_LEN],
    set: bool,
}

impl X25519 {
    fn new() -> Option<Self> {
        Some(Self { private: SecretBox::zeroed().ok()?, public: [0; DH_LEN], set: false })
    }

    fn derive_public(&mut self) {
        self.public = x25519_dalek::x25519(*self.private, x25519_dalek::X25519_BASEPOINT_BYTES);
        self.set = true;
    }
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        DH_LEN
    }

    fn priv_len(&self) -> usize {
        DH_LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        if privkey.len() == DH_LEN {
            self.private.copy_from_slice(privkey);
            self.derive_public();
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        rng.try_fill_bytes(&mut self.private[..])?;
        self.derive_public();
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private[..]
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        // snow passes its whole key buffer (sized for its largest curve): the key is in front.
        let point = pubkey.get(..DH_LEN).and_then(|k| <[u8; DH_LEN]>::try_from(k).ok());
        let (Some(point), true) = (point, self.set) else {
            return Err(snow::Error::Dh);
        };
        let shared = x25519_dalek::x25519(*self.private, point);
        // An all-zero result means a low-order point: no shared secret (RFC 7748, 6.1).
        if shared == [0; DH_LEN] || out.len() < DH_LEN {
            return Err(snow::Error::Dh);
        }
        out[..DH_LEN].copy_from_slice(&shared);
        Ok(())
    }
}

/// ChaCha20-Poly1305 (`ring`) with its key state in secret memory.
struct ChaChaPoly {
    key: SecretBox<Option<LessSafeKey>>,
}

impl ChaChaPoly {
    fn new() -> Option<Self> {
        Some(Self {
            key: SecretBox::new_with(|slot| {
                slot.write(None);
            })
            .ok()?,
        })
    }
}

/// Noise's ChaChaPoly nonce: 32 zero bits, then the 64-bit counter little-endian.
fn noise_nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&n.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; 32]) {
        if let Ok(unbound) = UnboundKey::new(&CHACHA20_POLY1305, key) {
            *self.key = Some(LessSafeKey::new(unbound));
        }
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let (Some(key), len) = (&*self.key, plaintext.len()) else { return 0 };
        if out.len() < len + TAG_LEN {
            return 0;
        }
        // Sealed in place: the plaintext copy in `out` is overwritten by its ciphertext within
        // this call.
        out[..len].copy_from_slice(plaintext);
        match key.seal_in_place_separate_tag(
            noise_nonce(nonce),
            Aad::from(authtext),
            &mut out[..len],
        ) {
            Ok(tag) => {
                out[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
                len + TAG_LEN
            }
            Err(_) => 0,
        }
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let Some(key) = &*self.key else { return Err(snow::Error::Decrypt) };
        let len = ciphertext.len().checked_sub(TAG_LEN).ok_or(snow::Error::Decrypt)?;
        if out.len() < len {
            return Err(snow::Error::Decrypt);
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&ciphertext[len..]);
        out[..len].copy_from_slice(&ciphertext[..len]);
        key.open_in_place_separate_tag(
            noise_nonce(nonce),
            Aad::from(authtext),
            Tag::from(tag),
            &mut out[..len],
            0..,
        )
        .map(|plain| plain.len())
        .map_err(|_| snow::Error::Decrypt)
    }
}

/// SHA-256 whose state (which carries HMAC keys during a handshake) is in secret memory.
struct Sha256State {
    state: SecretBox<sha2::Sha256>,
}

impl Sha256State {
    fn new() -> Option<Self> {
        Some(Self {
            state: SecretBox::new_with(|slot| {
                slot.write(sha2::Sha256::new());
            })
            .ok()?,
        })
    }
}

impl Hash for Sha256State {
    fn name(&self) -> &'static str {
        "SHA256"
    }

    fn block_len(&self) -> usize {
        64
    }

    fn hash_len(&self) -> usize {
        32
    }

    fn reset(&mut self) {
        Digest::reset(&mut *self.state);
    }

    fn input(&mut self, data: &[u8]) {
        Digest::update(&mut *self.state, data);
    }

    fn result(&mut self, out: &mut [u8]) {
        let digest = Digest::finalize_reset(&mut *self.state);
        out[..32].copy_from_slice(&digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ik_handshake_on_these_primitives_interoperates() {
        // The responder's key pair, and a handshake with `snow`'s own check of IK.
        let responder_key = builder().generate_keypair().unwrap();
        let initiator_key = builder().generate_keypair().unwrap();
        let mut initiator = builder()
            .local_private_key(&initiator_key.private)
            .unwrap()
            .remote_public_key(&responder_key.public)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut responder =
            builder().local_private_key(&responder_key.private).unwrap().build_responder().unwrap();
        let (mut m1, mut m2, mut payload) = ([0u8; 256], [0u8; 256], [0u8; 64]);
        let n = initiator.write_message(b"hi", &mut m1).unwrap();
        let p = responder.read_message(&m1[..n], &mut payload).unwrap();
        assert_eq!(&payload[..p], b"hi");
        assert_eq!(responder.get_remote_static().unwrap(), &initiator_key.public[..]);
        let n = responder.write_message(&[], &mut m2).unwrap();
        initiator.read_message(&m2[..n], &mut payload).unwrap();
        let mut a = initiator.into_transport_mode().unwrap();
        let mut b = responder.into_transport_mode().unwrap();
        let (mut sealed, mut open) = ([0u8; 64], [0u8; 64]);
        let n = a.write_message(b"over the link", &mut sealed).unwrap();
        let p = b.read_message(&sealed[..n], &mut open).unwrap();
        assert_eq!(&open[..p], b"over the link");
        sealed[0] ^= 1;
        assert!(b.read_message(&sealed[..n], &mut open).is_err(), "tampered");
    }

    #[test]
    fn low_order_points_give_no_shared_secret() {
        let mut dh = X25519::new().unwrap();
        dh.generate(&mut KernelRandom).unwrap();
        let mut out = [0u8; 32];
        assert!(dh.dh(&[0; 32], &mut out).is_err());
        assert!(dh.dh(&[1; 31], &mut out).is_err(), "too short");
    }
}
