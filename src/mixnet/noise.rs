//! Noise links between nodes: `Noise_XK_25519_ChaChaPoly_BLAKE2s`.
//!
//! The initiator knows the responder's static key from the topology before it connects
//! (XK); the responder learns the initiator's static key in the third message and refuses
//! the link unless that key belongs to a node in the topology. Links are one-way: the
//! initiator only sends packets and the responder only receives them.

use std::time::Duration;

use snow::{Builder, TransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::keys::KeyBytes;
use crate::metrics::HandshakeFailure;
use crate::mixnet::framing::{
    self, FRAME_CIPHERTEXT_LEN, FRAME_PLAINTEXT_LEN, MAX_HANDSHAKE_FRAME, NOISE_TAG_LEN,
};
use crate::mixnet::sphinx::PACKET_SIZE;

/// The Noise protocol name; both sides must agree on it exactly.
pub const NOISE_PARAMS: &str = "Noise_XK_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash, so a peer speaking another protocol version fails the handshake.
pub const PROLOGUE: &[u8] = b"nym-node-rs/mixnet/1";
/// The initiator's first message on the wire: its length prefix, its ephemeral key and the
/// tag of its empty payload (`-> e, es`).
pub const FIRST_MESSAGE_WIRE_LEN: usize = framing::LENGTH_PREFIX + 32 + NOISE_TAG_LEN;

#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("handshake timed out")]
    Timeout,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("noise: {0}")]
    Protocol(#[from] snow::Error),
    #[error("handshake frame: {0}")]
    Frame(#[from] framing::FrameError),
    #[error("static key {0} is not a node in the topology")]
    UnknownKey(KeyBytes),
}

impl NoiseError {
    /// The metric label for this failure.
    pub fn reason(&self) -> HandshakeFailure {
        match self {
            NoiseError::Timeout => HandshakeFailure::Timeout,
            NoiseError::Io(_) => HandshakeFailure::Io,
            NoiseError::Protocol(_) | NoiseError::Frame(_) => HandshakeFailure::Protocol,
            NoiseError::UnknownKey(_) => HandshakeFailure::UnknownKey,
        }
    }
}

fn builder() -> Builder<'static> {
    // The pattern string is a constant of this module; parsing it cannot fail at run time
    // without failing every unit test first.
    Builder::new(NOISE_PARAMS.parse().expect("valid noise parameters"))
}

async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> Result<(), NoiseError> {
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&framing::prefix(msg.len()));
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8; MAX_HANDSHAKE_FRAME],
) -> Result<usize, NoiseError> {
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).await?;
    let len = u16::from_be_bytes(prefix) as usize;
    if len > MAX_HANDSHAKE_FRAME {
        return Err(framing::FrameError::Oversized(len).into());
    }
    stream.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

/// Runs the initiator side of the handshake against a responder whose static key is `remote`.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    local_secret: &[u8; 32],
    remote: &KeyBytes,
    timeout: Duration,
) -> Result<LinkSender, NoiseError> {
    let run = async {
        let mut hs = builder()
            .local_private_key(local_secret)?
            .remote_public_key(remote.as_bytes())?
            .prologue(PROLOGUE)?
            .build_initiator()?;
        let mut msg = [0u8; MAX_HANDSHAKE_FRAME];
        let mut scratch = [0u8; MAX_HANDSHAKE_FRAME];
        let n = hs.write_message(&[], &mut msg)?;
        write_message(stream, &msg[..n]).await?;
        let n = read_message(stream, &mut msg).await?;
        hs.read_message(&msg[..n], &mut scratch)?;
        let n = hs.write_message(&[], &mut msg)?;
        write_message(stream, &msg[..n]).await?;
        Ok(LinkSender {
            transport: hs.into_transport_mode()?,
        })
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| NoiseError::Timeout)?
}

/// Runs the responder side; `is_known` decides whether the initiator's static key may link.
/// Returns the receiving half and the initiator's static key.
pub async fn respond<S, F>(
    stream: &mut S,
    local_secret: &[u8; 32],
    timeouts: ResponderTimeouts,
    is_known: F,
    greeted: impl FnOnce(),
) -> Result<(LinkReceiver, KeyBytes), NoiseError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&KeyBytes) -> bool,
{
    let run = async {
        let mut hs = builder()
            .local_private_key(local_secret)?
            .prologue(PROLOGUE)?
            .build_responder()?;
        let mut msg = [0u8; MAX_HANDSHAKE_FRAME];
        let mut scratch = [0u8; MAX_HANDSHAKE_FRAME];
        let n = tokio::time::timeout(timeouts.first_message, read_message(stream, &mut msg))
            .await
            .map_err(|_| NoiseError::Timeout)??;
        hs.read_message(&msg[..n], &mut scratch)?;
        greeted();
        let n = hs.write_message(&[], &mut msg)?;
        write_message(stream, &msg[..n]).await?;
        let n = read_message(stream, &mut msg).await?;
        hs.read_message(&msg[..n], &mut scratch)?;
        let remote: [u8; 32] = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or(NoiseError::Protocol(snow::Error::Input))?;
        let remote = KeyBytes(remote);
        if !is_known(&remote) {
            return Err(NoiseError::UnknownKey(remote));
        }
        Ok((
            LinkReceiver {
                transport: hs.into_transport_mode()?,
            },
            remote,
        ))
    };
    tokio::time::timeout(timeouts.whole, run)
        .await
        .map_err(|_| NoiseError::Timeout)?
}

/// Responds to an initiator whose key must be among `known`, within `timeout` (a sink or
/// a tool, not the node's ingress, which has its admission to keep informed).
pub async fn respond_to<S>(
    stream: &mut S,
    local_secret: &[u8; 32],
    timeout: Duration,
    known: &[KeyBytes],
) -> Result<(LinkReceiver, KeyBytes), NoiseError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    respond(
        stream,
        local_secret,
        ResponderTimeouts::within(timeout),
        |k| known.contains(k),
        || {},
    )
    .await
}

/// The responder's deadlines: for the initiator's first message (sent the moment it
/// connects), and for the whole handshake.
#[derive(Debug, Clone, Copy)]
pub struct ResponderTimeouts {
    pub first_message: Duration,
    pub whole: Duration,
}

impl ResponderTimeouts {
    /// One deadline for both.
    pub fn within(whole: Duration) -> Self {
        ResponderTimeouts {
            first_message: whole,
            whole,
        }
    }
}

/// The sending half of an established link.
pub struct LinkSender {
    transport: TransportState,
}

impl LinkSender {
    /// Appends one wire frame carrying `packet` to `out`.
    pub fn encrypt_packet(
        &mut self,
        packet: &[u8; PACKET_SIZE],
        plain: &mut [u8; FRAME_PLAINTEXT_LEN],
        out: &mut Vec<u8>,
    ) -> Result<(), snow::Error> {
        framing::encode_packet(packet, plain);
        let start = out.len();
        out.extend_from_slice(&framing::prefix(FRAME_CIPHERTEXT_LEN));
        out.resize(start + framing::WIRE_FRAME_LEN, 0);
        let n = self
            .transport
            .write_message(plain, &mut out[start + framing::LENGTH_PREFIX..])?;
        debug_assert_eq!(n, FRAME_CIPHERTEXT_LEN);
        Ok(())
    }

    /// Encrypts an arbitrary plaintext as one frame body (tests use it to send bad frames).
    pub fn encrypt_raw(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, snow::Error> {
        let mut out = vec![0u8; plaintext.len() + NOISE_TAG_LEN];
        let n = self.transport.write_message(plaintext, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

/// The receiving half of an established link.
pub struct LinkReceiver {
    transport: TransportState,
}

impl LinkReceiver {
    /// Decrypts one frame body into `plain`.
    pub fn decrypt(
        &mut self,
        ciphertext: &[u8],
        plain: &mut [u8; FRAME_PLAINTEXT_LEN],
    ) -> Result<(), snow::Error> {
        if ciphertext.len() != FRAME_CIPHERTEXT_LEN {
            return Err(snow::Error::Input);
        }
        self.transport.read_message(ciphertext, plain)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::X25519;

    #[tokio::test]
    async fn the_first_message_is_as_long_as_admission_expects() {
        let (a, b) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let initiator = tokio::spawn(async move {
            let _ = initiate(
                &mut sa,
                &a.secret_bytes(),
                &b.public(),
                Duration::from_millis(200),
            )
            .await;
        });
        let mut first = vec![0u8; FIRST_MESSAGE_WIRE_LEN + 1];
        let n = tokio::time::timeout(Duration::from_secs(5), sb.read(&mut first))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, FIRST_MESSAGE_WIRE_LEN);
        let _ = initiator.await;
    }

    #[tokio::test]
    async fn handshake_and_transport_round_trip() {
        let (a, b) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let a_pub = a.public();
        let b_pub = b.public();
        let t = Duration::from_secs(5);
        let responder = tokio::spawn(async move {
            respond(
                &mut sb,
                &b.secret_bytes(),
                ResponderTimeouts::within(t),
                |k| *k == a_pub,
                || {},
            )
            .await
        });
        let mut sender = initiate(&mut sa, &a.secret_bytes(), &b_pub, t)
            .await
            .unwrap();
        let (mut receiver, remote) = responder.await.unwrap().unwrap();
        assert_eq!(remote, a_pub);

        let packet = [42u8; PACKET_SIZE];
        let mut plain = [0u8; FRAME_PLAINTEXT_LEN];
        let mut wire = Vec::new();
        sender
            .encrypt_packet(&packet, &mut plain, &mut wire)
            .unwrap();
        assert_eq!(wire.len(), framing::WIRE_FRAME_LEN);
        let body = framing::next_frame(&wire, FRAME_CIPHERTEXT_LEN, true)
            .unwrap()
            .unwrap();
        let mut out = [0u8; FRAME_PLAINTEXT_LEN];
        receiver.decrypt(body, &mut out).unwrap();
        assert_eq!(framing::decode_packet(&out).unwrap(), &packet);

        // A flipped bit fails authentication.
        let mut wire2 = Vec::new();
        sender
            .encrypt_packet(&packet, &mut plain, &mut wire2)
            .unwrap();
        wire2[100] ^= 1;
        assert!(receiver.decrypt(&wire2[2..], &mut out).is_err());
    }

    #[tokio::test]
    async fn unknown_initiator_is_refused() {
        let (a, b) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let b_pub = b.public();
        let t = Duration::from_secs(5);
        let responder = tokio::spawn(async move {
            respond(
                &mut sb,
                &b.secret_bytes(),
                ResponderTimeouts::within(t),
                |_| false,
                || {},
            )
            .await
        });
        let _ = initiate(&mut sa, &a.secret_bytes(), &b_pub, t).await;
        let err = responder.await.unwrap().err().expect("refused");
        assert_eq!(err.reason(), HandshakeFailure::UnknownKey);
    }

    #[tokio::test]
    async fn wrong_responder_key_fails() {
        let (a, b, c) = (
            X25519::generate().unwrap(),
            X25519::generate().unwrap(),
            X25519::generate().unwrap(),
        );
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let t = Duration::from_secs(5);
        let responder = tokio::spawn(async move {
            respond(
                &mut sb,
                &b.secret_bytes(),
                ResponderTimeouts::within(t),
                |_| true,
                || {},
            )
            .await
        });
        // The initiator believes it talks to `c`: the handshake cannot complete.
        let _ = initiate(&mut sa, &a.secret_bytes(), &c.public(), t).await;
        assert!(responder.await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out() {
        let b = X25519::generate().unwrap();
        let (_sa, mut sb) = tokio::io::duplex(4096);
        let err = respond(
            &mut sb,
            &b.secret_bytes(),
            ResponderTimeouts::within(Duration::from_secs(5)),
            |_| true,
            || {},
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.reason(), HandshakeFailure::Timeout);
    }
}
