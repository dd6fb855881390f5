//! The client↔gateway channel: a Noise handshake inside the WebSocket, then fixed-size
//! transport frames. Shared by the gateway's client API and the client's connection.
//!
//! `Noise_NK_25519_ChaChaPoly_BLAKE2s`: the client knows the gateway's Noise key from the
//! topology, so only the real gateway can complete the handshake (a fake one, or a relay,
//! cannot derive the keys); the client stays anonymous at the Noise layer and proves its
//! ed25519 identity afterwards, inside the channel, by signing the handshake hash. A
//! signature therefore authenticates this one channel only: a relay that forwards the
//! client's messages to the gateway can neither read them nor reuse the signature in a
//! session of its own.
//!
//! Every transport frame carries `len:u16 || message || zero padding` up to one fixed size,
//! so a `Send`, a `Deliver` of any payload and an `Ack` all look alike on the wire.

use std::sync::Arc;

use snow::{Builder, HandshakeState, StatelessTransportState};

use crate::keys::KeyBytes;
use crate::mixnet::sphinx::PACKET_SIZE;

pub const NOISE_PARAMS: &str = "Noise_NK_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash (and so into the client's signature).
pub const PROLOGUE: &[u8] = b"nym-node-rs/client-link/3";
/// Domain separation of the client's signature over the handshake hash.
pub const AUTH_CONTEXT: &[u8] = b"nym-node-rs/client-auth/2";
/// Largest protocol message: a `Send` (type, first hop, Sphinx packet).
pub const MAX_MESSAGE: usize = 1 + 32 + PACKET_SIZE;
/// Plaintext of every transport frame: length prefix and the largest message.
pub const FRAME_PLAINTEXT: usize = 2 + MAX_MESSAGE;
/// Every transport frame on the wire, after the handshake.
pub const FRAME_LEN: usize = FRAME_PLAINTEXT + 16;
/// Both handshake messages (an ephemeral key and an empty payload's tag).
pub const HANDSHAKE_LEN: usize = 32 + 16;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    #[error("frame of {0} bytes, expected {FRAME_LEN}")]
    FrameLength(usize),
    #[error("handshake message of {0} bytes, expected {HANDSHAKE_LEN}")]
    HandshakeLength(usize),
    #[error("message of {0} bytes does not fit a frame")]
    TooLarge(usize),
    #[error("padding announces {0} bytes")]
    BadPadding(usize),
    #[error("channel nonce exhausted")]
    Exhausted,
}

fn builder() -> Builder<'static> {
    // A constant of this module; the unit tests fail first if it does not parse.
    Builder::new(NOISE_PARAMS.parse().expect("valid noise parameters"))
}

/// The client's side of the handshake, after its first message.
pub struct Initiator(HandshakeState);

impl Initiator {
    /// Starts a handshake with the gateway whose Noise key is `gateway`; returns the first
    /// handshake message to send.
    pub fn start(gateway: &KeyBytes) -> Result<(Initiator, Vec<u8>), ChannelError> {
        let mut hs = builder()
            .remote_public_key(gateway.as_bytes())?
            .prologue(PROLOGUE)?
            .build_initiator()?;
        let mut msg = vec![0u8; HANDSHAKE_LEN];
        let n = hs.write_message(&[], &mut msg)?;
        msg.truncate(n);
        Ok((Initiator(hs), msg))
    }

    /// Reads the gateway's answer; fails unless it holds the gateway's static key.
    pub fn finish(mut self, answer: &[u8]) -> Result<Channel, ChannelError> {
        if answer.len() != HANDSHAKE_LEN {
            return Err(ChannelError::HandshakeLength(answer.len()));
        }
        let mut scratch = [0u8; HANDSHAKE_LEN];
        self.0.read_message(answer, &mut scratch)?;
        Channel::from_handshake(self.0)
    }
}

/// The gateway's side: reads the client's first message, returns the answer to send.
pub fn respond(static_secret: &[u8; 32], first: &[u8]) -> Result<(Channel, Vec<u8>), ChannelError> {
    if first.len() != HANDSHAKE_LEN {
        return Err(ChannelError::HandshakeLength(first.len()));
    }
    let mut hs = builder()
        .local_private_key(static_secret)?
        .prologue(PROLOGUE)?
        .build_responder()?;
    let mut scratch = [0u8; HANDSHAKE_LEN];
    hs.read_message(first, &mut scratch)?;
    let mut answer = vec![0u8; HANDSHAKE_LEN];
    let n = hs.write_message(&[], &mut answer)?;
    answer.truncate(n);
    Ok((Channel::from_handshake(hs)?, answer))
}

/// An established channel. Clone the [`ChannelHalf`]s out of it for each direction.
pub struct Channel {
    handshake_hash: Vec<u8>,
    transport: Arc<StatelessTransportState>,
}

impl Channel {
    fn from_handshake(hs: HandshakeState) -> Result<Channel, ChannelError> {
        let handshake_hash = hs.get_handshake_hash().to_vec();
        Ok(Channel {
            handshake_hash,
            transport: Arc::new(hs.into_stateless_transport_mode()?),
        })
    }

    /// What the client signs (with [`AUTH_CONTEXT`]) to prove its identity on this channel.
    pub fn auth_message(&self) -> Vec<u8> {
        [AUTH_CONTEXT, &self.handshake_hash].concat()
    }

    /// The sending and receiving halves (each keeps its own nonce).
    pub fn split(self) -> (ChannelHalf, ChannelHalf) {
        (
            ChannelHalf {
                transport: self.transport.clone(),
                nonce: 0,
            },
            ChannelHalf {
                transport: self.transport,
                nonce: 0,
            },
        )
    }
}

/// One direction of a channel.
pub struct ChannelHalf {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
}

impl ChannelHalf {
    fn next_nonce(&mut self) -> Result<u64, ChannelError> {
        let n = self.nonce;
        self.nonce = self.nonce.checked_add(1).ok_or(ChannelError::Exhausted)?;
        Ok(n)
    }

    /// Pads `message` to the fixed frame size and encrypts it.
    pub fn seal(&mut self, message: &[u8]) -> Result<Vec<u8>, ChannelError> {
        if message.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(message.len()));
        }
        let mut plain = vec![0u8; FRAME_PLAINTEXT];
        plain[..2].copy_from_slice(&(message.len() as u16).to_be_bytes());
        plain[2..2 + message.len()].copy_from_slice(message);
        let mut frame = vec![0u8; FRAME_LEN];
        let nonce = self.next_nonce()?;
        let n = self.transport.write_message(nonce, &plain, &mut frame)?;
        frame.truncate(n);
        Ok(frame)
    }

    /// Decrypts one frame and strips its padding.
    pub fn open(&mut self, frame: &[u8]) -> Result<Vec<u8>, ChannelError> {
        if frame.len() != FRAME_LEN {
            return Err(ChannelError::FrameLength(frame.len()));
        }
        let mut plain = vec![0u8; FRAME_PLAINTEXT];
        let nonce = self.next_nonce()?;
        self.transport.read_message(nonce, frame, &mut plain)?;
        let len = u16::from_be_bytes([plain[0], plain[1]]) as usize;
        if len > MAX_MESSAGE {
            return Err(ChannelError::BadPadding(len));
        }
        plain.truncate(2 + len);
        plain.drain(..2);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::X25519;

    fn pair() -> (Channel, Channel) {
        let gateway = X25519::generate().unwrap();
        let (init, first) = Initiator::start(&gateway.public()).unwrap();
        let (server, answer) = respond(&gateway.secret_bytes(), &first).unwrap();
        (init.finish(&answer).unwrap(), server)
    }

    #[test]
    fn frames_have_one_size_and_round_trip() {
        let (client, server) = pair();
        assert_eq!(
            client.auth_message(),
            server.auth_message(),
            "same handshake hash"
        );
        let (mut c_tx, _) = client.split();
        let (_, mut s_rx) = server.split();
        for msg in [vec![], vec![0x21; 9], vec![7; MAX_MESSAGE]] {
            let frame = c_tx.seal(&msg).unwrap();
            assert_eq!(frame.len(), FRAME_LEN);
            assert_eq!(s_rx.open(&frame).unwrap(), msg);
        }
        assert!(c_tx.seal(&vec![0; MAX_MESSAGE + 1]).is_err());
        let mut bad = c_tx.seal(b"x").unwrap();
        bad[100] ^= 1;
        assert!(s_rx.open(&bad).is_err());
    }

    #[test]
    fn only_the_holder_of_the_topology_key_completes_the_handshake() {
        let real = X25519::generate().unwrap();
        let fake = X25519::generate().unwrap();
        let (init, first) = Initiator::start(&real.public()).unwrap();
        // The fake gateway cannot even read the first message (es needs the real secret)...
        assert!(respond(&fake.secret_bytes(), &first).is_err());
        // ... and an answer it makes for a handshake of its own does not complete this one.
        let (_, first_to_fake) = Initiator::start(&fake.public()).unwrap();
        let (_, answer) = respond(&fake.secret_bytes(), &first_to_fake).unwrap();
        assert!(init.finish(&answer).is_err());
    }

    #[test]
    fn a_relayed_handshake_gives_the_relay_a_different_channel() {
        // The relay forwards the client's first message to the real gateway twice: its own
        // session with the gateway has a different hash, so the client's signature (over
        // the client's hash) does not authenticate it.
        let gateway = X25519::generate().unwrap();
        let (init, first) = Initiator::start(&gateway.public()).unwrap();
        let (real, answer) = respond(&gateway.secret_bytes(), &first).unwrap();
        let client = init.finish(&answer).unwrap();
        let (replayed, _) = respond(&gateway.secret_bytes(), &first).unwrap();
        assert_eq!(client.auth_message(), real.auth_message());
        assert_ne!(client.auth_message(), replayed.auth_message());
    }
}
