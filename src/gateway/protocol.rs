//! The client API's messages, each carried in one fixed-size transport frame of the
//! client↔gateway channel (see [`super::channel`] and `docs/protocol.md`).
//!
//! ```text
//! client → server  0x02 Auth       [client identity: 32][ed25519 signature: 64][stamp: u64 BE]
//!                                   [downstream rate wanted: u32 BE, frames per 1000 s]
//! server → client  0x03 AuthOk     [downstream rate agreed: u32 BE, frames per 1000 s]
//! server → client  0x04 StampRequired [bits: u8]
//! client → server  0x10 Send       [first hop identity: 32][Sphinx packet]
//! server → client  0x20 Deliver    [id: u64 BE][SURB identifier: 16][body ...]
//! client → server  0x21 Ack        [id: u64 BE]{1..=MAX_ACK_IDS}
//! server → client  0x22 Dummy      (a downstream slot with nothing in it)
//! ```
//! The signature covers the channel's handshake hash ([`super::channel::Channel::auth_message`]),
//! so it authenticates that one channel and cannot be replayed on another. The stamp
//! ([`super::stamp`]) pays for a registration; a registered client's is not checked.
//!
//! The downstream rate is the Poisson rate at which the gateway sends this session frames
//! (a stored payload when one waits, else a `Dummy`), so an observer of the link sees the
//! same rate whether the client receives or not; the gateway caps what a client asks for.
//! 0 asks for no pacing: payloads are pushed as they arrive.

use crate::keys::{KeyBytes, NodeId};
use crate::mixnet::sphinx::{IDENTIFIER_SIZE, PACKET_SIZE, PacketBytes};

/// WebSocket close codes the gateway uses.
pub mod close {
    /// A message the gateway cannot parse or did not expect.
    pub const PROTOCOL: u16 = 4000;
    /// The challenge signature did not verify (or never came).
    pub const AUTH_FAILED: u16 = 4001;
    /// The same client opened a newer session.
    pub const REPLACED: u16 = 4002;
    /// The client sent faster than its rate limit allows, for too long.
    pub const RATE_LIMITED: u16 = 4003;
    /// A client not registered here sent no valid registration stamp (the gateway said
    /// how many bits it wants in a `StampRequired` just before).
    pub const STAMP_REQUIRED: u16 = 4004;
    /// The gateway is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The gateway failed on its side (its storage).
    pub const SERVER_ERROR: u16 = 1011;
}

const AUTH: u8 = 0x02;
const AUTH_OK: u8 = 0x03;
const STAMP_REQUIRED: u8 = 0x04;
const SEND: u8 = 0x10;
const DELIVER: u8 = 0x20;
const ACK: u8 = 0x21;
const DUMMY: u8 = 0x22;

/// Largest message a client may send (a Send message).
pub const MAX_CLIENT_MESSAGE: usize = 1 + 32 + PACKET_SIZE;
/// Ids one Ack message carries at most (it must fit one frame).
pub const MAX_ACK_IDS: usize = (MAX_CLIENT_MESSAGE - 1) / 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    AuthOk {
        /// The downstream rate the gateway keeps to, per [`Rate`].
        rate: Rate,
    },
    /// Registration needs a stamp of this many bits (the session closes next).
    StampRequired { bits: u8 },
    Deliver {
        id: u64,
        identifier: [u8; IDENTIFIER_SIZE],
        body: Vec<u8>,
    },
    /// A downstream slot with nothing stored to fill it.
    Dummy,
}

/// A frame rate on the wire: frames per 1000 seconds, so rates below one a second fit an
/// integer. 0 means unpaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Rate(pub u32);

impl Rate {
    pub const UNPACED: Rate = Rate(0);

    /// `per_second` frames a second, rounded to the wire's precision (negative and
    /// non-finite values are unpaced; very large ones saturate).
    pub fn per_second(per_second: f64) -> Rate {
        if !per_second.is_finite() || per_second <= 0.0 {
            return Rate::UNPACED;
        }
        Rate((per_second * 1000.0).round().min(u32::MAX as f64) as u32)
    }

    pub fn as_per_second(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    pub fn is_paced(self) -> bool {
        self.0 > 0
    }

    /// What a gateway grants when a client asks for `self` and it allows at most `max`
    /// frames a second: the smaller, and unpaced stays unpaced.
    pub fn capped(self, max: u32) -> Rate {
        Rate(self.0.min(max.saturating_mul(1000)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Auth {
        identity: KeyBytes,
        signature: [u8; 64],
        /// Registration stamp nonce (any value from a registered client).
        stamp: u64,
        /// The downstream rate the client asks for.
        downstream: Rate,
    },
    Send {
        first_hop: NodeId,
        packet: PacketBytes,
    },
    Ack {
        ids: Vec<u64>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message of type {0:#04x} has the wrong length {1}")]
    BadLength(u8, usize),
}

/// What the client signs to prove its identity.
fn key(bytes: &[u8]) -> KeyBytes {
    let mut k = [0u8; 32];
    k.copy_from_slice(&bytes[..32]);
    KeyBytes(k)
}

impl ServerMessage {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerMessage::AuthOk { rate } => [&[AUTH_OK][..], &rate.0.to_be_bytes()].concat(),
            ServerMessage::Dummy => vec![DUMMY],
            ServerMessage::StampRequired { bits } => vec![STAMP_REQUIRED, *bits],
            ServerMessage::Deliver {
                id,
                identifier,
                body,
            } => [&[DELIVER][..], &id.to_be_bytes(), identifier, body].concat(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (&t, rest) = bytes.split_first().ok_or(ProtocolError::Empty)?;
        match t {
            AUTH_OK if rest.len() == 4 => Ok(ServerMessage::AuthOk {
                rate: Rate(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]])),
            }),
            DUMMY if rest.is_empty() => Ok(ServerMessage::Dummy),
            STAMP_REQUIRED if rest.len() == 1 => Ok(ServerMessage::StampRequired { bits: rest[0] }),
            DELIVER if rest.len() >= 8 + IDENTIFIER_SIZE => {
                let mut id = [0u8; 8];
                id.copy_from_slice(&rest[..8]);
                let mut identifier = [0u8; IDENTIFIER_SIZE];
                identifier.copy_from_slice(&rest[8..8 + IDENTIFIER_SIZE]);
                Ok(ServerMessage::Deliver {
                    id: u64::from_be_bytes(id),
                    identifier,
                    body: rest[8 + IDENTIFIER_SIZE..].to_vec(),
                })
            }
            AUTH_OK | STAMP_REQUIRED | DELIVER | DUMMY => {
                Err(ProtocolError::BadLength(t, bytes.len()))
            }
            other => Err(ProtocolError::UnknownType(other)),
        }
    }
}

impl ClientMessage {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClientMessage::Auth {
                identity,
                signature,
                stamp,
                downstream,
            } => [
                &[AUTH][..],
                identity.as_bytes(),
                signature,
                &stamp.to_be_bytes(),
                &downstream.0.to_be_bytes(),
            ]
            .concat(),
            ClientMessage::Send { first_hop, packet } => {
                [&[SEND][..], first_hop.as_bytes(), &packet[..]].concat()
            }
            ClientMessage::Ack { ids } => {
                let mut out = Vec::with_capacity(1 + 8 * ids.len());
                out.push(ACK);
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (&t, rest) = bytes.split_first().ok_or(ProtocolError::Empty)?;
        match t {
            AUTH if rest.len() == 108 => {
                let mut signature = [0u8; 64];
                signature.copy_from_slice(&rest[32..96]);
                let mut stamp = [0u8; 8];
                stamp.copy_from_slice(&rest[96..104]);
                let r = &rest[104..108];
                let downstream = Rate(u32::from_be_bytes([r[0], r[1], r[2], r[3]]));
                Ok(ClientMessage::Auth {
                    identity: key(rest),
                    signature,
                    stamp: u64::from_be_bytes(stamp),
                    downstream,
                })
            }
            SEND if rest.len() == 32 + PACKET_SIZE => {
                let mut packet = Box::new([0u8; PACKET_SIZE]);
                packet.copy_from_slice(&rest[32..]);
                Ok(ClientMessage::Send {
                    first_hop: key(rest),
                    packet,
                })
            }
            ACK if rest.len() % 8 == 0 && !rest.is_empty() && rest.len() / 8 <= MAX_ACK_IDS => {
                Ok(ClientMessage::Ack {
                    ids: rest
                        .chunks_exact(8)
                        .map(|c| {
                            u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                })
            }
            AUTH | SEND | ACK => Err(ProtocolError::BadLength(t, bytes.len())),
            other => Err(ProtocolError::UnknownType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let server = [
            ServerMessage::AuthOk { rate: Rate(500) },
            ServerMessage::Dummy,
            ServerMessage::StampRequired { bits: 22 },
            ServerMessage::Deliver {
                id: 9,
                identifier: [1; 16],
                body: vec![5; 300],
            },
        ];
        for m in server {
            assert_eq!(ServerMessage::decode(&m.encode()).unwrap(), m);
        }
        let client = [
            ClientMessage::Auth {
                identity: KeyBytes([1; 32]),
                signature: [2; 64],
                stamp: u64::MAX - 1,
                downstream: Rate::per_second(2.5),
            },
            ClientMessage::Send {
                first_hop: KeyBytes([3; 32]),
                packet: Box::new([4; PACKET_SIZE]),
            },
            ClientMessage::Ack {
                ids: vec![1, 2, u64::MAX],
            },
        ];
        for m in client {
            let bytes = m.encode();
            assert!(bytes.len() <= MAX_CLIENT_MESSAGE);
            assert_eq!(ClientMessage::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn a_gateway_caps_the_rate_asked_for() {
        assert_eq!(Rate::per_second(2.5), Rate(2500));
        assert_eq!(Rate::per_second(-1.0), Rate::UNPACED);
        assert_eq!(Rate::per_second(f64::NAN), Rate::UNPACED);
        assert_eq!(Rate::per_second(1e12).capped(50), Rate(50_000));
        assert_eq!(Rate(2500).capped(50), Rate(2500));
        assert_eq!(Rate::UNPACED.capped(50), Rate::UNPACED);
    }

    #[test]
    fn wrong_lengths_and_types_are_errors() {
        assert_eq!(ClientMessage::decode(&[]), Err(ProtocolError::Empty));
        assert_eq!(
            ClientMessage::decode(&[0x7f]),
            Err(ProtocolError::UnknownType(0x7f))
        );
        assert!(matches!(
            ClientMessage::decode(&[SEND, 1, 2]),
            Err(ProtocolError::BadLength(..))
        ));
        assert!(matches!(
            ClientMessage::decode(&[ACK]),
            Err(ProtocolError::BadLength(..))
        ));
    }

    proptest! {
        #[test]
        fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = ClientMessage::decode(&bytes);
            let _ = ServerMessage::decode(&bytes);
        }
    }
}
