//! Channel cryptography (docs/PROTOCOL.md, "Channel keys"): what proves the key on every
//! message that crosses nodes (claim 10).
//!
//! Each direction of a channel has a chain of epochs. From the channel key `K` and the offer's
//! salt `S`:
//!
//! ```text
//! PRK        = HKDF-Extract(salt = S, ikm = K)                                (HKDF-SHA256)
//! C_0        = HKDF-Expand(PRK, "keyhold v2 chain" || sender || receiver, 32)
//! M_e        = HKDF-Expand(C_e, "keyhold v2 message key", 32)
//! C_(e+1)    = HKDF-Expand(C_e, "keyhold v2 next chain", 32)
//! ```
//!
//! Messages of epoch `e` are sealed with AES-256-GCM under `M_e`, nonce = 4 zero bytes ||
//! `seq` (u64, little-endian), associated data = source || destination || epoch (u32 LE) ||
//! seq (u64 LE). Moving to the next epoch erases `C_e` and `M_e`: the ratchet is one way, so a
//! key that leaks later opens no earlier message. The salt is fresh for every channel, so a
//! guest that opens the same endpoints again with the same key still gets new keys, and no
//! nonce ever repeats under one key.
//!
//! [`Direction`] holds one direction's chain key and its expanded AES-GCM state (round keys
//! and GHASH key). It is only ever built in place, in a key-table slot in secret memory, and
//! the stack its set-up used is wiped ([`crate::secret::scrubbed`]).

use std::mem::MaybeUninit;

use guest_agent::channel::abi::{Endpoint, ENDPOINT_SIZE};
use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use sha2::Sha256;

use crate::secret::scrubbed;

/// Bytes of a channel key.
pub const KEY_SIZE: usize = 32;
/// Bytes of the authentication tag of each message.
pub const TAG_SIZE: usize = 16;
/// Bytes of the salt an offer carries.
pub const SALT_SIZE: usize = 16;
/// Bytes of associated data: source, destination, epoch, sequence number.
pub const AAD_SIZE: usize = 2 * ENDPOINT_SIZE + 4 + 8;

const CHAIN_LABEL: &[u8] = b"keyhold v2 chain";
const MESSAGE_KEY_LABEL: &[u8] = b"keyhold v2 message key";
const NEXT_CHAIN_LABEL: &[u8] = b"keyhold v2 next chain";

/// One direction of a channel at its current epoch: the chain key and the AES-256-GCM state
/// of the epoch's message key. Lives only in secret memory.
pub struct Direction {
    chain: [u8; KEY_SIZE],
    aead: LessSafeKey,
}

/// Both directions of a cross-node channel, as one key-table slot holds them.
pub struct ChannelCiphers {
    /// Messages this side sends.
    pub tx: Direction,
    /// Messages this side receives.
    pub rx: Direction,
}

impl ChannelCiphers {
    /// Builds the ciphers of `local`'s channel with `remote` into `slot`, from the channel key
    /// and the offer's salt.
    pub fn init(
        slot: &mut MaybeUninit<Self>,
        key: &[u8; KEY_SIZE],
        salt: &[u8; SALT_SIZE],
        local: &Endpoint,
        remote: &Endpoint,
    ) {
        let slot = slot.as_mut_ptr();
        scrubbed(|| {
            let prk = Hkdf::<Sha256>::new(Some(salt), key);
            // SAFETY: `slot` is valid for writes of a `ChannelCiphers`; writing its fields
            // through raw pointers initialises it without reading it.
            unsafe {
                Direction::write(&raw mut (*slot).tx, &first_chain(&prk, local, remote));
                Direction::write(&raw mut (*slot).rx, &first_chain(&prk, remote, local));
            }
        });
    }
}

fn first_chain(prk: &Hkdf<Sha256>, sender: &Endpoint, receiver: &Endpoint) -> [u8; KEY_SIZE] {
    let mut info = [0u8; CHAIN_LABEL.len() + 2 * ENDPOINT_SIZE];
    info[..CHAIN_LABEL.len()].copy_from_slice(CHAIN_LABEL);
    sender.encode(&mut info[CHAIN_LABEL.len()..][..ENDPOINT_SIZE]);
    receiver.encode(&mut info[CHAIN_LABEL.len() + ENDPOINT_SIZE..]);
    expand(prk, &info)
}

fn expand(prk: &Hkdf<Sha256>, info: &[u8]) -> [u8; KEY_SIZE] {
    let mut out = [0u8; KEY_SIZE];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
    let _ = prk.expand(info, &mut out);
    out
}

fn from_chain(chain: &[u8; KEY_SIZE], label: &[u8]) -> [u8; KEY_SIZE] {
    // A chain key is a uniformly random 32-byte key: a valid HKDF pseudorandom key.
    match Hkdf::<Sha256>::from_prk(chain) {
        Ok(prk) => expand(&prk, label),
        Err(_) => unreachable!("a 32-byte chain key is SHA-256's output length"),
    }
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Associated data binding a message to its endpoints, epoch and position.
pub fn associated_data(
    source: &Endpoint,
    destination: &Endpoint,
    epoch: u32,
    seq: u64,
) -> [u8; AAD_SIZE] {
    let mut aad = [0u8; AAD_SIZE];
    source.encode(&mut aad[..ENDPOINT_SIZE]);
    destination.encode(&mut aad[ENDPOINT_SIZE..2 * ENDPOINT_SIZE]);
    aad[2 * ENDPOINT_SIZE..2 * ENDPOINT_SIZE + 4].copy_from_slice(&epoch.to_le_bytes());
    aad[2 * ENDPOINT_SIZE + 4..].copy_from_slice(&seq.to_le_bytes());
    aad
}

impl Direction {
    /// Writes the direction whose chain key is `chain` (and its message key's cipher) to
    /// `at`. Runs inside a scrubbed call: the message key and the cipher built on the stack
    /// are wiped by the caller.
    ///
    /// # Safety
    /// `at` must be valid for writes of a `Direction`.
    unsafe fn write(at: *mut Direction, chain: &[u8; KEY_SIZE]) {
        let message_key = from_chain(chain, MESSAGE_KEY_LABEL);
        let aead = match UnboundKey::new(&AES_256_GCM, &message_key) {
            Ok(key) => LessSafeKey::new(key),
            Err(_) => unreachable!("AES-256 takes a 32-byte key"),
        };
        // SAFETY: the caller vouches for `at`.
        unsafe { at.write(Direction { chain: *chain, aead }) };
    }

    /// Moves this direction to the next epoch, erasing the current one's keys.
    pub fn advance(&mut self) {
        let at: *mut Direction = self;
        scrubbed(|| {
            // SAFETY: `at` is this initialised `Direction`; `Direction` owns no resources,
            // so overwriting it without dropping leaks nothing, and the old keys are gone.
            unsafe {
                let next = from_chain(&(*at).chain, NEXT_CHAIN_LABEL);
                Direction::write(at, &next);
            }
        });
    }

    /// Builds this direction's next epoch into `slot`, leaving this one as it is (a receiver
    /// tries it on a message before it commits to it).
    pub fn next_into(&self, slot: &mut MaybeUninit<Direction>) {
        let at = slot.as_mut_ptr();
        scrubbed(|| {
            let next = from_chain(&self.chain, NEXT_CHAIN_LABEL);
            // SAFETY: `slot` is valid for writes of a `Direction`.
            unsafe { Direction::write(at, &next) };
        });
    }

    /// Encrypts `buf` in place; returns the tag (`None` only for a buffer beyond AES-GCM's
    /// limit of 64 GiB).
    pub fn seal(&self, aad: &[u8; AAD_SIZE], seq: u64, buf: &mut [u8]) -> Option<[u8; TAG_SIZE]> {
        let tag = self.aead.seal_in_place_separate_tag(nonce(seq), Aad::from(aad), buf).ok()?;
        let mut out = [0u8; TAG_SIZE];
        out.copy_from_slice(tag.as_ref());
        Some(out)
    }

    /// Verifies `tag` and decrypts `buf` in place; on failure `buf` is zeroed.
    pub fn open(
        &self,
        aad: &[u8; AAD_SIZE],
        seq: u64,
        buf: &mut [u8],
        tag: &[u8; TAG_SIZE],
    ) -> bool {
        self.aead
            .open_in_place_separate_tag(nonce(seq), Aad::from(aad), Tag::from(*tag), buf, 0..)
            .is_ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cmm::test_endpoints::{A, B};
    use crate::secret::SecretBox;

    /// A channel's ciphers for `local` talking with `remote`, in secret memory.
    pub(crate) fn ciphers(
        key: [u8; 32],
        salt: [u8; 16],
        local: Endpoint,
        remote: Endpoint,
    ) -> SecretBox<ChannelCiphers> {
        SecretBox::new_with(|slot| ChannelCiphers::init(slot, &key, &salt, &local, &remote))
            .unwrap()
    }

    #[test]
    fn each_side_opens_what_the_other_seals_and_every_tamper_fails() {
        let a = ciphers([9; 32], [1; 16], A, B);
        let b = ciphers([9; 32], [1; 16], B, A);
        let aad = associated_data(&A, &B, 0, 5);
        let mut msg = *b"hello, partition";
        let tag = a.tx.seal(&aad, 5, &mut msg).unwrap();
        assert_ne!(&msg, b"hello, partition");
        let mut copy = msg;
        assert!(b.rx.open(&aad, 5, &mut copy, &tag));
        assert_eq!(&copy, b"hello, partition");

        let fails = |aad: [u8; AAD_SIZE], seq: u64, mut buf: [u8; 16], key: &Direction| {
            !key.open(&aad, seq, &mut buf, &tag) && buf == [0; 16]
        };
        assert!(fails(associated_data(&A, &B, 0, 6), 6, msg, &b.rx), "another seq");
        assert!(fails(associated_data(&B, &B, 0, 5), 5, msg, &b.rx), "another source");
        assert!(fails(associated_data(&A, &B, 1, 5), 5, msg, &b.rx), "another epoch");
        let mut flipped = msg;
        flipped[0] ^= 1;
        assert!(fails(aad, 5, flipped, &b.rx), "a flipped bit");
        assert!(fails(aad, 5, msg, &b.tx), "the other direction's key");
        let other_salt = ciphers([9; 32], [2; 16], B, A);
        assert!(fails(aad, 5, msg, &other_salt.rx), "the same key with another salt");
    }

    #[test]
    fn epochs_ratchet_in_lockstep_and_never_back() {
        let mut a = ciphers([3; 32], [4; 16], A, B);
        let mut b = ciphers([3; 32], [4; 16], B, A);
        let mut candidate = MaybeUninit::<Direction>::uninit();
        b.rx.next_into(&mut candidate);
        // SAFETY: `next_into` initialised it.
        let candidate = unsafe { candidate.assume_init() };
        a.tx.advance();
        let aad = associated_data(&A, &B, 1, 0);
        let mut msg = *b"epoch one";
        let tag = a.tx.seal(&aad, 0, &mut msg).unwrap();
        assert!(!b.rx.open(&aad, 0, &mut msg.clone(), &tag), "epoch 0's key opens epoch 1");
        assert!(candidate.open(&aad, 0, &mut msg.clone(), &tag), "the candidate opens it");
        b.rx.advance();
        assert!(b.rx.open(&aad, 0, &mut msg, &tag));
        assert_eq!(&msg, b"epoch one");
    }

    /// The vector docs/PROTOCOL.md gives implementers: keys and a sealed message.
    #[test]
    fn the_documented_test_vector_holds() {
        let src = Endpoint { node: 1, partition: 2, process: 3 };
        let dst = Endpoint { node: 4, partition: 5, process: 6 };
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let salt: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        let prk = Hkdf::<Sha256>::new(Some(&salt), &key);
        let c0 = first_chain(&prk, &src, &dst);
        let m0 = from_chain(&c0, MESSAGE_KEY_LABEL);
        let c1 = from_chain(&c0, NEXT_CHAIN_LABEL);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut ciphers = ciphers(key, salt, src, dst);
        let mut msg = *b"keyhold";
        let tag = ciphers.tx.seal(&associated_data(&src, &dst, 0, 7), 7, &mut msg).unwrap();
        ciphers.tx.advance();
        let mut msg1 = *b"keyhold";
        let tag1 = ciphers.tx.seal(&associated_data(&src, &dst, 1, 8), 8, &mut msg1).unwrap();
        let got = [hex(&c0), hex(&m0), hex(&c1), hex(&msg), hex(&tag), hex(&msg1), hex(&tag1)];
        assert_eq!(got, VECTOR, "update docs/PROTOCOL.md if this changes on purpose");
    }

    /// C_0, M_0, C_1, then "keyhold" sealed at epoch 0 seq 7 (ciphertext, tag) and at epoch 1
    /// seq 8 (ciphertext, tag).
    /// Computed independently too (Python: hmac, hashlib and OpenSSL's AES-GCM through the
    /// `cryptography` package), so it pins the construction, not just this code.
    const VECTOR: [&str; 7] = [
        "e063cac12c218007763cb51034fd07b13cab6338844fd16ef817468873dee006",
        "8da8246a6833eab48c339d6e0d0253c8cc23291886daab6e5c51ed11cd2f4256",
        "d497ff52e2829e32385c2044dbdb1be4183b6e6c57193452ea56ab7bd26051a3",
        "0964d19a6b1b0a",
        "86486e63831b88ffbde5552568945a48",
        "2adfaa73eb79a8",
        "9775d28b1da712be3950690499a8a154",
    ];
}
