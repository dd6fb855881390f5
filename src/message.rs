//! The plaintext a forward Sphinx packet carries to its final hop (see `docs/protocol.md`).
//!
//! The final-hop gateway reads only this envelope: the SURB-ACK to send back to the sender,
//! and the fragment, sealed end to end, to store for the destination client. Messages and
//! loop cover look the same here; only the client that opens the fragment can tell them
//! apart.
//!
//! ```text
//! kind = 1 (data):  [1][ack_len: u16 BE][SURB-ACK: ack_len bytes][sealed fragment ...]
//! ```

use crate::keys::KeyBytes;
use crate::mixnet::sphinx::PAYLOAD_SIZE;

/// The destination of drop cover (Loopix's): the final-hop gateway discards a packet for
/// it unread, unstored and unacknowledged. It learns that the packet was cover, never whose:
/// it came through the mixnet like any other.
pub const DROP_COVER_DESTINATION: KeyBytes = KeyBytes([0u8; 32]);

/// Sphinx's own overhead inside a payload (16 zero bytes and a padding marker).
pub const SPHINX_PAYLOAD_OVERHEAD: usize = 17;
/// Largest plaintext one packet can carry.
pub const MAX_PLAINTEXT: usize = PAYLOAD_SIZE - SPHINX_PAYLOAD_OVERHEAD;

const KIND_DATA: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// A fragment of a client message (or a loop), with the SURB-ACK (if any) the final hop
    /// must send back.
    Data {
        ack: Option<Vec<u8>>,
        fragment: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("empty plaintext")]
    Empty,
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    #[error("truncated envelope")]
    Truncated,
    #[error("envelope of {0} bytes exceeds {MAX_PLAINTEXT}")]
    TooLarge(usize),
}

impl Envelope {
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        let out = match self {
            Envelope::Data { ack, fragment } => {
                let ack = ack.as_deref().unwrap_or(&[]);
                let mut out = Vec::with_capacity(3 + ack.len() + fragment.len());
                out.push(KIND_DATA);
                out.extend_from_slice(&(ack.len() as u16).to_be_bytes());
                out.extend_from_slice(ack);
                out.extend_from_slice(fragment);
                out
            }
        };
        if out.len() > MAX_PLAINTEXT {
            return Err(EnvelopeError::TooLarge(out.len()));
        }
        Ok(out)
    }

    pub fn decode(plaintext: &[u8]) -> Result<Envelope, EnvelopeError> {
        let (&kind, rest) = plaintext.split_first().ok_or(EnvelopeError::Empty)?;
        match kind {
            KIND_DATA => {
                let len = rest.get(..2).ok_or(EnvelopeError::Truncated)?;
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                let ack = rest.get(2..2 + len).ok_or(EnvelopeError::Truncated)?;
                let fragment = rest[2 + len..].to_vec();
                Ok(Envelope::Data {
                    ack: (len > 0).then(|| ack.to_vec()),
                    fragment,
                })
            }
            other => Err(EnvelopeError::UnknownKind(other)),
        }
    }

    /// Room left for the fragment when the envelope carries an ack of `ack_len` bytes.
    pub const fn fragment_capacity(ack_len: usize) -> usize {
        MAX_PLAINTEXT - 3 - ack_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        for e in [
            Envelope::Data {
                ack: None,
                fragment: b"abc".to_vec(),
            },
            Envelope::Data {
                ack: Some(vec![7; 396]),
                fragment: vec![1; 100],
            },
        ] {
            assert_eq!(Envelope::decode(&e.encode().unwrap()).unwrap(), e);
        }
        let too_big = Envelope::Data {
            ack: None,
            fragment: vec![0; MAX_PLAINTEXT],
        };
        assert!(too_big.encode().is_err());
        let exact = Envelope::Data {
            ack: None,
            fragment: vec![0; Envelope::fragment_capacity(0)],
        };
        assert_eq!(exact.encode().unwrap().len(), MAX_PLAINTEXT);
    }

    #[test]
    fn bad_envelopes_are_errors() {
        assert_eq!(Envelope::decode(&[]), Err(EnvelopeError::Empty));
        assert_eq!(Envelope::decode(&[9]), Err(EnvelopeError::UnknownKind(9)));
        // The old cover kind is gone: the gateway has no way to tell cover from messages.
        assert_eq!(Envelope::decode(&[2]), Err(EnvelopeError::UnknownKind(2)));
        assert_eq!(Envelope::decode(&[1, 0]), Err(EnvelopeError::Truncated));
        assert_eq!(
            Envelope::decode(&[1, 0, 5, 1]),
            Err(EnvelopeError::Truncated)
        );
    }

    proptest! {
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = Envelope::decode(&bytes);
        }
    }
}
