//! Sphinx processing: unwrap one layer, reject replays, and decide where the packet goes.
//! Pure: no sockets, no clocks; the Sphinx workers in `intake.rs` call [`SphinxProcessor::process`].

use std::time::Duration;

use std::sync::Arc;

use sphinx_packet::header::HEADER_SIZE;
use sphinx_packet::{ProcessedPacketData, SphinxPacket};

use crate::keys::{KeyBytes, NodeId};
use crate::metrics::DropReason;
use crate::mixnet::epochs::{KeyRing, LiveKey};
use crate::mixnet::tag_journal::JournalError;

/// Bytes of a Sphinx payload: fixed by the protocol so every packet has the same size.
pub const PAYLOAD_SIZE: usize = 2048;
/// Bytes of a whole Sphinx packet (header + payload).
pub const PACKET_SIZE: usize = HEADER_SIZE + PAYLOAD_SIZE;
/// Bytes of a SURB identifier delivered to the final hop.
pub const IDENTIFIER_SIZE: usize = 16;

/// One packet's bytes, boxed so moving it through channels copies a pointer.
pub type PacketBytes = Box<[u8; PACKET_SIZE]>;

/// What unwrapping decided.
pub enum Processed {
    /// Hold for `delay`, then send `packet` to `next_hop`.
    Forward {
        next_hop: NodeId,
        delay: Duration,
        packet: PacketBytes,
    },
    /// This node is the last hop: hand the payload to `destination`.
    Final(FinalHop),
}

/// A payload that reached its last hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalHop {
    /// The client the payload is for (its identity key).
    pub destination: KeyBytes,
    /// All zero for a forward message; a SURB's identifier for a reply or an acknowledgement.
    pub identifier: [u8; IDENTIFIER_SIZE],
    /// The payload with this node's layer removed ([`PAYLOAD_SIZE`] bytes).
    pub payload: Vec<u8>,
}

/// Why a packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("replayed packet")]
    Replay,
    #[error("packet is for none of this node's live Sphinx keys (expired or unknown)")]
    ExpiredKey,
    #[error("delay {0:?} exceeds the cap")]
    ExcessiveDelay(Duration),
    #[error("the replay tag could not be written to disk: {0}")]
    Journal(String),
}

impl Rejection {
    pub fn drop_reason(&self) -> DropReason {
        match self {
            Rejection::Malformed(_) => DropReason::MalformedPacket,
            Rejection::Replay => DropReason::Replay,
            Rejection::ExpiredKey => DropReason::ExpiredKey,
            Rejection::ExcessiveDelay(_) => DropReason::ExcessiveDelay,
            Rejection::Journal(_) => DropReason::ReplayJournal,
        }
    }
}

/// Replay tags recorded while unwrapping a batch, written to their keys' journals before
/// any packet of the batch goes on (one write, and one flush, per key and batch).
#[derive(Default)]
pub struct TagBatch {
    tags: Vec<(Arc<LiveKey>, [u8; 32])>,
}

impl TagBatch {
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Moves every tag of `other` into this batch.
    pub fn append(&mut self, other: &mut TagBatch) {
        self.tags.append(&mut other.tags);
    }

    /// Journals every recorded tag and empties the batch. On an error the batch's packets
    /// must not go on: they could be replayed after a crash.
    pub fn commit(&mut self) -> Result<(), JournalError> {
        let mut result = Ok(());
        while let Some((key, _)) = self.tags.first() {
            let key = key.clone();
            let (mine, rest): (Vec<_>, Vec<_>) =
                self.tags.drain(..).partition(|(k, _)| Arc::ptr_eq(k, &key));
            self.tags = rest;
            if let Some(journal) = &key.journal {
                let tags: Vec<[u8; 32]> = mine.into_iter().map(|(_, t)| t).collect();
                if let Err(e) = journal.append(&tags) {
                    result = Err(e);
                }
            }
        }
        result
    }
}

/// Unwraps packets with this node's live Sphinx keys. Shared by all workers.
pub struct SphinxProcessor {
    keys: Arc<KeyRing>,
    max_delay: Duration,
}

impl SphinxProcessor {
    pub fn new(keys: Arc<KeyRing>, max_delay: Duration) -> Self {
        SphinxProcessor { keys, max_delay }
    }

    /// Unwraps one packet. The key valid now is tried first; only packets near an epoch
    /// boundary need a second Diffie-Hellman. A key is the packet's when the header's MAC
    /// verifies under it; one under no live key is [`Rejection::ExpiredKey`]. The replay tag
    /// is checked before the rest of the work and recorded only once the packet has been
    /// processed, so garbage cannot fill the filter; of two copies racing on different
    /// workers, the final insert lets only one through. The tag is journaled before this
    /// returns; workers batch that with [`process_into`](Self::process_into).
    pub fn process(&self, bytes: &[u8; PACKET_SIZE]) -> Result<Processed, Rejection> {
        let mut tags = TagBatch::default();
        let processed = self.process_into(bytes, &mut tags)?;
        tags.commit()
            .map_err(|e| Rejection::Journal(e.to_string()))?;
        Ok(processed)
    }

    /// Like [`process`](Self::process), the tag left in `tags` for the caller to commit
    /// before the packet goes on.
    pub fn process_into(
        &self,
        bytes: &[u8; PACKET_SIZE],
        tags: &mut TagBatch,
    ) -> Result<Processed, Rejection> {
        let packet =
            SphinxPacket::from_bytes(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
        let live = self.keys.live();
        let mut found = None;
        for key in live.iter() {
            let secret = packet.header.compute_expanded_shared_secret(&key.secret);
            if secret.replay_tag() == &key.low_order_tag {
                return Err(Rejection::Malformed("low-order group element".into()));
            }
            if packet.header.ensure_header_integrity(&secret).is_ok() {
                found = Some((key, secret));
                break;
            }
        }
        let Some((key, secret)) = found else {
            return Err(Rejection::ExpiredKey);
        };
        let tag = *secret.replay_tag();
        if key.filter.contains(&tag) {
            return Err(Rejection::Replay);
        }
        let processed = packet
            .process_with_expanded_secret(&secret)
            .map_err(|e| Rejection::Malformed(e.to_string()))?;
        if !key.filter.check_and_insert(&tag) {
            return Err(Rejection::Replay);
        }
        tags.tags.push((key.clone(), tag));
        match processed.data {
            ProcessedPacketData::ForwardHop {
                next_hop_packet,
                next_hop_address,
                delay,
            } => {
                let delay = Duration::from_nanos(delay.to_nanos());
                if delay > self.max_delay {
                    return Err(Rejection::ExcessiveDelay(delay));
                }
                let mut out: PacketBytes = Box::new([0u8; PACKET_SIZE]);
                let header = next_hop_packet.header.to_bytes();
                let payload = next_hop_packet.payload.as_bytes();
                if header.len() + payload.len() != PACKET_SIZE {
                    return Err(Rejection::Malformed("unexpected packet size".into()));
                }
                out[..HEADER_SIZE].copy_from_slice(&header);
                out[HEADER_SIZE..].copy_from_slice(payload);
                Ok(Processed::Forward {
                    next_hop: KeyBytes(next_hop_address.to_bytes()),
                    delay,
                    packet: out,
                })
            }
            ProcessedPacketData::FinalHop {
                destination,
                identifier,
                payload,
            } => Ok(Processed::Final(FinalHop {
                destination: KeyBytes(destination.as_bytes()),
                identifier,
                payload: payload.into_bytes(),
            })),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::X25519;
    use proptest::prelude::*;
    use sphinx_packet::SphinxPacketBuilder;
    use sphinx_packet::header::delays::Delay;
    use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};

    fn processor(key: &X25519, max_delay: Duration) -> SphinxProcessor {
        SphinxProcessor::new(
            Arc::new(KeyRing::fixed(key.secret().clone(), 100_000)),
            max_delay,
        )
    }

    pub(crate) fn build(
        route: &[(&X25519, [u8; 32])],
        delays_ms: &[u64],
        message: &[u8],
    ) -> PacketBytes {
        let nodes: Vec<Node> = route
            .iter()
            .map(|(k, id)| {
                Node::new(
                    NodeAddressBytes::from_bytes(*id),
                    x25519_dalek::PublicKey::from(k.public().0),
                )
            })
            .collect();
        let delays: Vec<Delay> = delays_ms
            .iter()
            .map(|d| Delay::new_from_millis(*d))
            .collect();
        let dest = Destination::new(DestinationAddressBytes::from_bytes([9u8; 32]), [0u8; 16]);
        let packet = SphinxPacketBuilder::new()
            .with_payload_size(PAYLOAD_SIZE)
            .build_packet(message, &nodes, &dest, &delays)
            .unwrap();
        let bytes = packet.to_bytes();
        Box::new(bytes.try_into().unwrap())
    }

    #[test]
    fn forward_then_final_then_replay() {
        let (k1, k2) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let p1 = processor(&k1, Duration::from_secs(10));
        let p2 = processor(&k2, Duration::from_secs(10));
        let packet = build(&[(&k1, [1; 32]), (&k2, [2; 32])], &[25, 0], b"hello mixnet");

        let Processed::Forward {
            next_hop,
            delay,
            packet: next,
        } = p1.process(&packet).unwrap()
        else {
            panic!("expected a forward hop");
        };
        assert_eq!(next_hop, KeyBytes([2; 32]));
        assert_eq!(delay, Duration::from_millis(25));
        let Processed::Final(fin) = p2.process(&next).unwrap() else {
            panic!("expected the final hop");
        };
        assert_eq!(fin.destination, KeyBytes([9; 32]));
        assert_eq!(fin.payload.len(), PAYLOAD_SIZE);
        let plain = sphinx_packet::payload::Payload::from_bytes(&fin.payload)
            .unwrap()
            .recover_plaintext()
            .unwrap();
        assert_eq!(plain, b"hello mixnet");

        assert!(matches!(p1.process(&packet), Err(Rejection::Replay)));
    }

    #[test]
    fn excessive_delay_is_rejected() {
        let (k1, k2) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let p1 = processor(&k1, Duration::from_secs(1));
        let packet = build(&[(&k1, [1; 32]), (&k2, [2; 32])], &[5_000, 0], b"x");
        assert!(matches!(
            p1.process(&packet),
            Err(Rejection::ExcessiveDelay(_))
        ));
    }

    #[test]
    fn the_matching_live_key_is_found_and_a_foreign_one_is_expired() {
        use crate::keys::SphinxKeys;
        use crate::mixnet::epochs::test_settings;
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(
            dir.path(),
            Duration::from_secs(3600),
            Duration::from_secs(60),
        );
        let seed = SphinxKeys::generate(&settings.schedule).unwrap();
        let e = seed.epochs().next().unwrap();
        let (ring, _) = KeyRing::open(settings, seed.clone(), crate::keys::unix_ms()).unwrap();
        let p = SphinxProcessor::new(Arc::new(ring), Duration::from_secs(10));
        let next = seed.key(e + 1).unwrap();
        let other = X25519::generate().unwrap();
        // Built for the next epoch's key (published ahead): found on the second try.
        let packet = build(&[(&next, [1; 32]), (&other, [2; 32])], &[1, 0], b"x");
        assert!(matches!(p.process(&packet), Ok(Processed::Forward { .. })));
        assert!(matches!(p.process(&packet), Err(Rejection::Replay)));
        // Built for a key this node does not hold (retired, or never its own).
        let foreign = build(&[(&other, [1; 32]), (&next, [2; 32])], &[1, 0], b"x");
        assert!(matches!(p.process(&foreign), Err(Rejection::ExpiredKey)));
        // The current epoch's key is the first tried.
        let packet = build(&[(&seed.key(e).unwrap(), [1; 32])], &[0], b"x");
        assert!(matches!(p.process(&packet), Ok(Processed::Final(_))));
    }

    #[test]
    fn corrupted_headers_authenticate_under_no_key_and_low_order_points_are_malformed() {
        let (k1, k2) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let p1 = processor(&k1, Duration::from_secs(1));
        let mut packet = build(&[(&k1, [1; 32]), (&k2, [2; 32])], &[1, 0], b"x");
        packet[40] ^= 0x80;
        // Links are authenticated, so a header whose MAC fails under every live key was
        // built for a key this node does not hold.
        assert!(matches!(p1.process(&packet), Err(Rejection::ExpiredKey)));
        let mut low = packet.clone();
        low[..32].copy_from_slice(&[0u8; 32]);
        assert!(matches!(p1.process(&low), Err(Rejection::Malformed(_))));
        low[0] = 1;
        assert!(matches!(p1.process(&low), Err(Rejection::Malformed(_))));
    }

    fn fixture() -> (SphinxProcessor, PacketBytes) {
        let (k1, k2) = (X25519::generate().unwrap(), X25519::generate().unwrap());
        let p = processor(&k1, Duration::from_secs(10));
        let packet = build(&[(&k1, [1; 32]), (&k2, [2; 32])], &[1, 0], b"fuzz");
        (p, packet)
    }

    proptest! {
        // Each case is a real unwrap; 64 by default, PROPTEST_CASES to fuzz longer.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
        ))]
        // Mutated packets never panic; each is either processed or rejected with a reason.
        #[test]
        fn mutated_packets_never_panic(flips in proptest::collection::vec((0usize..PACKET_SIZE, any::<u8>()), 1..8)) {
            let (p, mut packet) = fixture();
            for (i, b) in flips {
                packet[i] ^= b | 1;
            }
            let _ = p.process(&packet);
        }

        #[test]
        fn random_packets_are_rejected(bytes in proptest::collection::vec(any::<u8>(), PACKET_SIZE)) {
            let (p, _) = fixture();
            let packet: PacketBytes = Box::new(bytes.try_into().unwrap());
            prop_assert!(p.process(&packet).is_err());
        }
    }
}
