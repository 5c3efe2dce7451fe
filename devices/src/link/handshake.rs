//! The link handshake: Noise IK (`snow`). The initiator knows the responder's static key from the
//! cluster config and sends its own, encrypted, with its claimed node ID; the responder accepts
//! only a key listed in the cluster config, and only for the node it is listed for.

use std::io::{Read, Write};

use snow::{Builder, TransportState};

use super::directory::{Directory, Peer};
use super::wire::{self, MAX_MESSAGE};

/// The Noise protocol of host links.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_SHA256";

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// Reading or writing the stream failed (or timed out).
    Io(std::io::Error),
    /// The Noise messages did not verify.
    Noise(snow::Error),
    /// The initiator's static key is not in the cluster config.
    UnknownKey,
    /// The initiator's key is listed for another node than the one it claims.
    ClaimsOtherNode {
        /// The ID it claimed.
        claimed: u32,
        /// The ID its key is listed for.
        listed: u32,
    },
    /// The first message's payload is not a node ID.
    BadPayload,
}

impl HandshakeError {
    /// The reason as the audit log names it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io(_) => "handshake_io",
            Self::Noise(_) => "handshake_failed",
            Self::UnknownKey => "unknown_key",
            Self::ClaimsOtherNode { .. } => "claims_other_node",
            Self::BadPayload => "bad_handshake_payload",
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<snow::Error> for HandshakeError {
    fn from(e: snow::Error) -> Self {
        Self::Noise(e)
    }
}

fn builder() -> Builder<'static> {
    Builder::new(NOISE_PARAMS.parse().expect("NOISE_PARAMS is a valid Noise protocol name"))
}

/// Runs the initiator's side against `peer`, claiming to be `own_id`.
pub fn initiate<S: Read + Write>(
    stream: &mut S,
    own_id: u32,
    own_key: &[u8; 32],
    peer: &Peer,
) -> Result<TransportState, HandshakeError> {
    let mut hs = builder()
        .local_private_key(own_key)
        .remote_public_key(&peer.public_key)
        .build_initiator()?;
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let len = hs.write_message(&own_id.to_le_bytes(), &mut buf[..])?;
    wire::write_message(stream, &buf[..len])?;
    let len = wire::read_message(stream, &mut buf)?;
    let mut payload = [0u8; 64];
    hs.read_message(&buf[..len], &mut payload)?;
    Ok(hs.into_transport_mode()?)
}

/// Runs the responder's side; returns the transport and the authenticated peer.
pub fn respond<S: Read + Write>(
    stream: &mut S,
    own_key: &[u8; 32],
    directory: &Directory,
) -> Result<(TransportState, Peer), HandshakeError> {
    let mut hs = builder().local_private_key(own_key).build_responder()?;
    let mut buf = Box::new([0u8; MAX_MESSAGE]);
    let len = wire::read_message(stream, &mut buf)?;
    let mut payload = [0u8; 64];
    let n = hs.read_message(&buf[..len], &mut payload)?;
    let key = hs.get_remote_static().ok_or(HandshakeError::UnknownKey)?;
    let peer = directory.by_key(key).ok_or(HandshakeError::UnknownKey)?.clone();
    let claimed = <[u8; 4]>::try_from(&payload[..n])
        .map(u32::from_le_bytes)
        .map_err(|_| HandshakeError::BadPayload)?;
    if claimed != peer.id {
        return Err(HandshakeError::ClaimsOtherNode { claimed, listed: peer.id });
    }
    let len = hs.write_message(&[], &mut buf[..])?;
    wire::write_message(stream, &buf[..len])?;
    Ok((hs.into_transport_mode()?, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn keypair() -> ([u8; 32], [u8; 32]) {
        let kp = builder().generate_keypair().unwrap();
        (kp.private.try_into().unwrap(), kp.public.try_into().unwrap())
    }

    fn peer(id: u32, public_key: [u8; 32]) -> Peer {
        Peer { id, address: "127.0.0.1:1".parse().unwrap(), public_key }
    }

    /// Runs a handshake over real loopback TCP: `claim` is the initiator's claimed ID.
    fn run(directory: Directory, claim: u32, initiator_key: [u8; 32]) -> Result<u32, String> {
        let (responder_private, responder_public) = keypair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            respond(&mut stream, &responder_private, &directory)
                .map(|(_, p)| p.id)
                .map_err(|e| e.reason().to_owned())
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        let _ = initiate(&mut stream, claim, &initiator_key, &peer(9, responder_public));
        drop(stream);
        server.join().unwrap()
    }

    #[test]
    fn a_listed_key_authenticates_its_node_only() {
        let (private, public) = keypair();
        let directory = Directory::new(vec![peer(2, public)]);
        assert_eq!(run(directory.clone(), 2, private), Ok(2));
        assert_eq!(run(directory, 3, private), Err("claims_other_node".into()));
        let (stranger, _) = keypair();
        assert_eq!(
            run(Directory::new(vec![peer(2, public)]), 2, stranger),
            Err("unknown_key".into())
        );
    }
}
