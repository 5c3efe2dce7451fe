//! The link handshake (docs/PROTOCOL.md, "Handshake"): Noise IK. The initiator knows the
//! responder's static key from the cluster config and sends its own, encrypted, with a hello:
//! the protocol version, its claimed node ID and a TAI64N timestamp. The responder accepts only
//! a key listed in the cluster config, only for the node it is listed for, only in a protocol
//! version it speaks (2 or 3), and only with a timestamp greater than any that peer sent
//! before; it answers with the version the link will speak: the initiator's.
//! An initiator told by an older node that it speaks an older version dials again in that
//! one (the answer is authenticated by the responder's key, so no one else can make a link
//! speak an older version).
//!
//! Every step runs scrubbed and keeps `snow`'s handshake state (its chaining key above all) in
//! secret memory; a finished handshake leaves a [`Transport`] whose keys are in secret memory
//! too (`crypto/noise.rs`).

use snow::{HandshakeState, TransportState};

use super::directory::{Directory, Peer};
use super::timestamp::{self, ReplayGuard, Tai64n};
use super::wire::{HELLO_SIZE, MAX_MESSAGE, MSG1_SIZE, MSG2_SIZE, OLDEST_VERSION, VERSION};
use crate::crypto::node_key::NodeKey;
use crate::crypto::noise;
use crate::secret::{scrubbed, scrubbed_light, SecretBox};

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// A Noise message did not verify, or was the wrong length.
    Noise,
    /// The initiator's static key is not in the cluster config.
    UnknownKey {
        /// The key it presented.
        key: [u8; 32],
    },
    /// The initiator's key is listed for another node than the one it claims.
    ClaimsOtherNode {
        /// The ID it claimed.
        claimed: u32,
        /// The ID its key is listed for.
        listed: u32,
    },
    /// The hello (or the answer's payload) is not one this node understands.
    BadPayload {
        /// The node, when its key authenticated it.
        peer: Option<u32>,
    },
    /// The peer speaks another protocol version. `reply` is the answer that tells it ours.
    Version {
        /// The node, authenticated by its key.
        peer: u32,
        /// The version it speaks.
        version: u8,
        /// The responder's message saying which version it speaks, to send before closing.
        reply: Option<[u8; MSG2_SIZE]>,
    },
    /// The timestamp is not greater than one this peer sent before: a replayed message.
    Replayed {
        /// The node, authenticated by its key.
        peer: u32,
    },
    /// A rekey handshake from a key other than the link's peer's.
    NotThePeer {
        /// The node whose key it was.
        node: u32,
    },
    /// No secret memory for the handshake state.
    Memory,
}

impl HandshakeError {
    /// The reason as the audit log names it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Noise => "handshake_failed",
            Self::UnknownKey { .. } => "unknown_key",
            Self::ClaimsOtherNode { .. } => "claims_other_node",
            Self::BadPayload { .. } => "bad_handshake_payload",
            Self::Version { .. } => "unsupported_version",
            Self::Replayed { .. } => "handshake_replayed",
            Self::NotThePeer { .. } => "rekey_from_another_key",
            Self::Memory => "no_secret_memory",
        }
    }

    /// The node the failure is about, when the peer's key authenticated it.
    pub fn peer(&self) -> Option<u32> {
        match self {
            Self::ClaimsOtherNode { listed, .. } => Some(*listed),
            Self::BadPayload { peer } => *peer,
            Self::Version { peer, .. } | Self::Replayed { peer } => Some(*peer),
            Self::NotThePeer { node } => Some(*node),
            _ => None,
        }
    }
}

impl From<snow::Error> for HandshakeError {
    fn from(_: snow::Error) -> Self {
        Self::Noise
    }
}

/// An established session: the link's Noise transport. Its keys live in secret memory and are
/// zeroed when it is dropped.
pub struct Transport {
    state: TransportState,
}

impl Transport {
    /// Seals `plain` into `out`; returns the message's length.
    pub fn seal(&mut self, plain: &[u8], out: &mut [u8]) -> Option<usize> {
        scrubbed_light(|| self.state.write_message(plain, out).ok())
    }

    /// Opens `message` into `out`; returns the plaintext's length, or `None` if it does not
    /// verify (a replayed, reordered, altered or forged message).
    pub fn open(&mut self, message: &[u8], out: &mut [u8]) -> Option<usize> {
        scrubbed_light(|| self.state.read_message(message, out).ok())
    }
}

/// The hello an initiator sends in `version`.
fn hello(own_id: u32, version: u8, stamp: &Tai64n) -> [u8; HELLO_SIZE] {
    let mut out = [0u8; HELLO_SIZE];
    out[0] = version;
    out[1..5].copy_from_slice(&own_id.to_le_bytes());
    out[5..].copy_from_slice(stamp);
    out
}

fn boxed(state: HandshakeState) -> Result<SecretBox<HandshakeState>, HandshakeError> {
    SecretBox::new_with(|slot| {
        slot.write(state);
    })
    .map_err(|_| HandshakeError::Memory)
}

/// The initiator's side, between its message and the responder's answer.
pub struct Initiation {
    state: SecretBox<HandshakeState>,
    version: u8,
}

/// Starts a handshake with `peer` as node `own_id`, speaking `version`; writes the first
/// message to `msg1`.
pub fn initiate(
    key: &NodeKey,
    peer: &Peer,
    own_id: u32,
    version: u8,
    msg1: &mut [u8; MSG1_SIZE],
) -> Result<Initiation, HandshakeError> {
    scrubbed(|| {
        let state = noise::builder()
            .local_private_key(key.private())?
            .remote_public_key(&peer.public_key)?
            .build_initiator()?;
        let mut state = boxed(state)?;
        let n = state.write_message(&hello(own_id, version, &timestamp::now()), msg1)?;
        if n != MSG1_SIZE {
            return Err(HandshakeError::Noise);
        }
        Ok(Initiation { state, version })
    })
}

impl Initiation {
    /// The version it asked for.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Takes the responder's answer; returns the session. An answer naming an older version
    /// than the one asked for is a refusal from a node that speaks only that one.
    pub fn finish(self, msg2: &[u8]) -> Result<Transport, HandshakeError> {
        scrubbed(move || {
            let mut state = self.state;
            let mut payload = [0u8; 64];
            let n = state.read_message(msg2, &mut payload)?;
            match payload[..n] {
                [version] if version == self.version => {}
                [version] => return Err(HandshakeError::Version { peer: 0, version, reply: None }),
                _ => return Err(HandshakeError::BadPayload { peer: None }),
            }
            let transport = state.into_inner().into_transport_mode()?;
            Ok(Transport { state: transport })
        })
    }
}

/// A handshake the responder accepted.
pub struct Response {
    /// The session.
    pub transport: Transport,
    /// The peer, authenticated by its key.
    pub peer: Peer,
    /// The answer to send.
    pub msg2: [u8; MSG2_SIZE],
    /// The version the link speaks (the initiator's).
    pub version: u8,
}

/// Answers `msg1`. `expected` is the link's peer for a rekey handshake (any listed node for a
/// new link).
pub fn respond(
    key: &NodeKey,
    directory: &Directory,
    replays: &ReplayGuard,
    msg1: &[u8],
    expected: Option<u32>,
) -> Result<Response, HandshakeError> {
    scrubbed(|| {
        if msg1.len() > MAX_MESSAGE {
            return Err(HandshakeError::Noise);
        }
        let state = noise::builder().local_private_key(key.private())?.build_responder()?;
        let mut state = boxed(state)?;
        let mut payload = [0u8; 64];
        let n = state.read_message(msg1, &mut payload)?;
        let presented = state.get_remote_static().unwrap_or_default();
        let peer = match directory.by_key(presented) {
            Some(peer) => peer.clone(),
            None => {
                let mut key = [0u8; 32];
                if presented.len() == 32 {
                    key.copy_from_slice(presented);
                }
                return Err(HandshakeError::UnknownKey { key });
            }
        };
        if expected.is_some_and(|id| id != peer.id) {
            return Err(HandshakeError::NotThePeer { node: peer.id });
        }
        let (version, stamp) = check_hello(&payload[..n], &peer, &mut state)?;
        if !replays.accept(peer.id, &stamp) {
            return Err(HandshakeError::Replayed { peer: peer.id });
        }
        let mut msg2 = [0u8; MSG2_SIZE];
        if state.write_message(&[version], &mut msg2)? != MSG2_SIZE {
            return Err(HandshakeError::Noise);
        }
        let transport = state.into_inner().into_transport_mode()?;
        Ok(Response { transport: Transport { state: transport }, peer, msg2, version })
    })
}

/// Checks the initiator's hello against `peer` (authenticated by its key); returns its version
/// and timestamp. An initiator of a version this node does not speak gets an answer that names
/// the newest it does.
fn check_hello(
    hello: &[u8],
    peer: &Peer,
    state: &mut HandshakeState,
) -> Result<(u8, Tai64n), HandshakeError> {
    let version = match hello {
        // Version 1's hello was the node ID alone.
        [_, _, _, _] => 1,
        [version, ..] => *version,
        [] => return Err(HandshakeError::BadPayload { peer: Some(peer.id) }),
    };
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        let mut reply = [0u8; MSG2_SIZE];
        let answered = state.write_message(&[VERSION], &mut reply).is_ok();
        return Err(HandshakeError::Version {
            peer: peer.id,
            version,
            reply: answered.then_some(reply),
        });
    }
    if hello.len() != HELLO_SIZE {
        return Err(HandshakeError::BadPayload { peer: Some(peer.id) });
    }
    let claimed = u32::from_le_bytes([hello[1], hello[2], hello[3], hello[4]]);
    if claimed != peer.id {
        return Err(HandshakeError::ClaimsOtherNode { claimed, listed: peer.id });
    }
    let mut stamp = [0u8; 12];
    stamp.copy_from_slice(&hello[5..]);
    Ok((version, stamp))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn peer(id: u32, key: &NodeKey) -> Peer {
        Peer { id, address: "127.0.0.1:1".parse().unwrap(), public_key: *key.public() }
    }

    struct Pair {
        responder: NodeKey,
        initiator: NodeKey,
        directory: Directory,
        replays: ReplayGuard,
    }

    fn pair() -> Pair {
        let responder = NodeKey::generate().unwrap();
        let initiator = NodeKey::generate().unwrap();
        let directory = Directory::new(vec![peer(1, &initiator), peer(2, &responder)]);
        Pair { responder, initiator, directory, replays: ReplayGuard::default() }
    }

    impl Pair {
        /// A bare Noise initiator with node 1's key, for hellos this node would not send.
        fn raw_initiator(&self) -> HandshakeState {
            noise::builder()
                .local_private_key(self.initiator.private())
                .unwrap()
                .remote_public_key(self.responder.public())
                .unwrap()
                .build_initiator()
                .unwrap()
        }

        fn msg1(&self, claim: u32) -> (Initiation, [u8; MSG1_SIZE]) {
            let mut msg1 = [0u8; MSG1_SIZE];
            let init =
                initiate(&self.initiator, &peer(2, &self.responder), claim, VERSION, &mut msg1)
                    .unwrap();
            (init, msg1)
        }

        fn respond(&self, msg1: &[u8]) -> Result<Response, HandshakeError> {
            respond(&self.responder, &self.directory, &self.replays, msg1, None)
        }
    }

    #[test]
    fn a_listed_key_authenticates_its_node_and_the_sessions_talk() {
        let p = pair();
        let (init, msg1) = p.msg1(1);
        let mut response = p.respond(&msg1).unwrap();
        assert_eq!(response.peer.id, 1);
        let mut initiator = init.finish(&response.msg2).unwrap();
        let (mut sealed, mut plain) = ([0u8; 64], [0u8; 64]);
        let n = initiator.seal(b"confirm", &mut sealed).unwrap();
        assert_eq!(response.transport.open(&sealed[..n], &mut plain), Some(7));
        assert!(response.transport.open(&sealed[..n], &mut plain).is_none(), "replayed record");
    }

    #[test]
    fn replays_false_claims_strangers_and_old_versions_are_refused() {
        let p = pair();
        let (_, msg1) = p.msg1(1);
        assert!(p.respond(&msg1).is_ok());
        assert_eq!(p.respond(&msg1).err(), Some(HandshakeError::Replayed { peer: 1 }));
        let (_, lying) = p.msg1(3);
        assert_eq!(
            p.respond(&lying).err(),
            Some(HandshakeError::ClaimsOtherNode { claimed: 3, listed: 1 })
        );
        let stranger = NodeKey::generate().unwrap();
        let mut msg1 = [0u8; MSG1_SIZE];
        initiate(&stranger, &peer(2, &p.responder), 1, VERSION, &mut msg1).unwrap();
        assert_eq!(
            p.respond(&msg1).err(),
            Some(HandshakeError::UnknownKey { key: *stranger.public() })
        );
        assert_eq!(p.respond(&msg1[..50]).err(), Some(HandshakeError::Noise));
        // A version-1 initiator: its hello was the node ID alone.
        let mut v1 = p.raw_initiator();
        let mut old = [0u8; 200];
        let n = v1.write_message(&1u32.to_le_bytes(), &mut old).unwrap();
        let Err(HandshakeError::Version { peer: 1, version: 1, reply: Some(reply) }) =
            p.respond(&old[..n])
        else {
            panic!("a version-1 hello was not refused as such")
        };
        let mut payload = [0u8; 8];
        assert_eq!(v1.read_message(&reply, &mut payload).unwrap(), 1);
        assert_eq!(payload[0], VERSION, "the answer names this node's version");
    }

    #[test]
    fn a_version_2_initiator_gets_a_version_2_link() {
        let p = pair();
        let mut msg1 = [0u8; MSG1_SIZE];
        let init = initiate(&p.initiator, &peer(2, &p.responder), 1, 2, &mut msg1).unwrap();
        let response = p.respond(&msg1).unwrap();
        assert_eq!(response.version, 2);
        assert!(init.finish(&response.msg2).is_ok(), "the answer names the version asked for");
        let (init, msg1) = p.msg1(1);
        let response = p.respond(&msg1).unwrap();
        assert_eq!(response.version, VERSION);
        assert!(init.finish(&response.msg2).is_ok());
    }

    #[test]
    fn a_node_that_speaks_only_version_2_makes_the_initiator_dial_in_it() {
        let p = pair();
        let (init, msg1) = p.msg1(1);
        // A version-2 node reads the hello, refuses its version and names its own.
        let mut old = noise::builder()
            .local_private_key(p.responder.private())
            .unwrap()
            .build_responder()
            .unwrap();
        let mut hello = [0u8; 64];
        old.read_message(&msg1, &mut hello).unwrap();
        let mut refusal = [0u8; MSG2_SIZE];
        old.write_message(&[2], &mut refusal).unwrap();
        let Err(HandshakeError::Version { version: 2, .. }) = init.finish(&refusal) else {
            panic!("an answer naming an older version was not taken as a refusal")
        };
        // A version above any this node speaks is refused, the answer naming the newest.
        let mut future = p.raw_initiator();
        let mut hello = [0u8; HELLO_SIZE];
        hello[0] = VERSION + 1;
        hello[1] = 1;
        let mut msg = [0u8; MSG1_SIZE];
        future.write_message(&hello, &mut msg).unwrap();
        let refused = p.respond(&msg);
        // Version 0 is no version either.
        let mut zero = p.raw_initiator();
        hello[0] = 0;
        let mut msg0 = [0u8; MSG1_SIZE];
        zero.write_message(&hello, &mut msg0).unwrap();
        assert!(matches!(p.respond(&msg0), Err(HandshakeError::Version { version: 0, .. })));
        assert!(
            matches!(refused, Err(HandshakeError::Version { version, .. }) if version == VERSION + 1)
        );
    }

    #[test]
    fn a_rekey_must_come_from_the_links_peer() {
        let p = pair();
        let (_, msg1) = p.msg1(1);
        let result = respond(&p.responder, &p.directory, &p.replays, &msg1, Some(5));
        assert_eq!(result.err(), Some(HandshakeError::NotThePeer { node: 1 }));
    }
}
