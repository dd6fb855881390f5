//! Building Sphinx packets and SURBs for a chosen route.
//!
//! Per-hop delays are drawn from an exponential distribution (Loopix): memoryless delays
//! make a packet's departure from a mix independent of its arrival, which is what mixes
//! the traffic. The mean is the client's choice (`--mean-delay`, default 50 ms: three mix
//! hops add about 150 ms on average, enough to mix at the rates a node carries while
//! keeping interactive traffic usable).

use std::time::Duration;

use rand_distr::{Distribution, Exp};
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;
use sphinx_packet::{SURBMaterial, SphinxPacketBuilder, SurbReplyRecovery};

use crate::client::route::Hop;
use crate::keys::{KeyBytes, NodeId, key_at, unix_ms};
use crate::mixnet::sphinx::{IDENTIFIER_SIZE, PACKET_SIZE, PAYLOAD_SIZE, PacketBytes};

#[derive(Debug, thiserror::Error)]
#[error("building a packet: {0}")]
pub struct PacketError(String);

impl PacketError {
    pub fn from_message(message: String) -> Self {
        PacketError(message)
    }
}

/// Draws one delay per mix hop (the route's last hop, the gateway, holds nothing).
pub fn sample_delays(route_len: usize, mean: Duration) -> Vec<Duration> {
    let mut rng = rand::rng();
    let mut delays: Vec<Duration> = match Exp::new(1.0 / mean.as_secs_f64().max(1e-9)) {
        Ok(exp) if !mean.is_zero() => (0..route_len.saturating_sub(1))
            .map(|_| Duration::from_secs_f64(exp.sample(&mut rng)))
            .collect(),
        _ => vec![Duration::ZERO; route_len.saturating_sub(1)],
    };
    delays.push(Duration::ZERO);
    delays
}

/// Time allowed for a packet to cross one link (the key choice only has to land on the
/// right side of an epoch boundary, and the node's overlap absorbs the rest).
const LINK_ALLOWANCE: Duration = Duration::from_millis(50);

/// The Sphinx nodes of `route`, each hop encrypted to its key valid when the packet
/// reaches it: now, plus the delays of the hops before it, plus a link crossing per hop.
fn nodes(route: &[Hop], delays: &[Duration]) -> Result<Vec<Node>, PacketError> {
    let mut arrival = Duration::from_millis(unix_ms());
    route
        .iter()
        .enumerate()
        .map(|(i, h)| {
            arrival += LINK_ALLOWANCE;
            if i > 0 {
                arrival += delays.get(i - 1).copied().unwrap_or_default();
            }
            let key = key_at(&h.sphinx_keys, arrival.as_millis() as u64)
                .ok_or_else(|| PacketError(format!("{} publishes no Sphinx key", h.identity)))?;
            Ok(Node::new(
                NodeAddressBytes::from_bytes(h.identity.0),
                x25519_dalek::PublicKey::from(key.0),
            ))
        })
        .collect()
}

fn sphinx_delays(delays: &[Duration]) -> Vec<Delay> {
    delays
        .iter()
        .map(|d| Delay::new_from_nanos(d.as_nanos().min(u128::from(u64::MAX)) as u64))
        .collect()
}

/// A forward packet carrying `plaintext` to `destination` (a client of the route's last hop).
/// Returns the first hop to send it to and the packet.
pub fn build_forward(
    route: &[Hop],
    destination: &KeyBytes,
    plaintext: &[u8],
    delays: &[Duration],
) -> Result<(NodeId, PacketBytes), PacketError> {
    let first = route
        .first()
        .ok_or_else(|| PacketError("empty route".into()))?;
    let dest = Destination::new(
        DestinationAddressBytes::from_bytes(destination.0),
        [0u8; IDENTIFIER_SIZE],
    );
    let packet = SphinxPacketBuilder::new()
        .with_payload_size(PAYLOAD_SIZE)
        .build_packet(
            plaintext,
            &nodes(route, delays)?,
            &dest,
            &sphinx_delays(delays),
        )
        .map_err(|e| PacketError(e.to_string()))?;
    let bytes: [u8; PACKET_SIZE] = packet
        .to_bytes()
        .try_into()
        .map_err(|_| PacketError("unexpected packet size".into()))?;
    Ok((first.identity, Box::new(bytes)))
}

/// A single-use reply block that delivers to `destination` at the route's last hop with
/// `identifier`; the returned recovery material opens what comes back through it.
pub fn build_surb(
    route: &[Hop],
    destination: &KeyBytes,
    identifier: [u8; IDENTIFIER_SIZE],
    delays: &[Duration],
) -> Result<(Vec<u8>, SurbReplyRecovery), PacketError> {
    let material = SURBMaterial::new(
        nodes(route, delays)?,
        sphinx_delays(delays),
        Destination::new(
            DestinationAddressBytes::from_bytes(destination.0),
            identifier,
        ),
        SINGLE_SEED_SURB_VERSION,
    );
    let (surb, recovery) = material
        .construct_recoverable_SURB()
        .map_err(|e| PacketError(e.to_string()))?;
    Ok((surb.to_bytes(), recovery))
}

/// Sends `plaintext` back through someone else's SURB. Returns the first hop and the packet.
pub fn use_surb(surb: &[u8], plaintext: &[u8]) -> Result<(NodeId, PacketBytes), PacketError> {
    let surb = sphinx_packet::SURB::from_bytes(surb).map_err(|e| PacketError(e.to_string()))?;
    let (packet, first_hop) = surb
        .use_surb(plaintext, PAYLOAD_SIZE)
        .map_err(|e| PacketError(e.to_string()))?;
    let bytes: [u8; PACKET_SIZE] = packet
        .to_bytes()
        .try_into()
        .map_err(|_| PacketError("unexpected packet size".into()))?;
    Ok((KeyBytes(first_hop.to_bytes()), Box::new(bytes)))
}

/// Opens a payload that came back through one of our SURBs.
pub fn open_reply(recovery: &SurbReplyRecovery, payload: &[u8]) -> Result<Vec<u8>, PacketError> {
    let payload = sphinx_packet::payload::Payload::from_bytes(payload)
        .map_err(|e| PacketError(e.to_string()))?;
    recovery
        .recover_plaintext(payload)
        .map_err(|e| PacketError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_have_the_requested_mean_and_a_zero_last_hop() {
        let mean = Duration::from_millis(50);
        let mut total = Duration::ZERO;
        for _ in 0..2000 {
            let d = sample_delays(4, mean);
            assert_eq!(d.len(), 4);
            assert_eq!(d[3], Duration::ZERO);
            total += d[0] + d[1] + d[2];
        }
        let avg = total / 6000;
        assert!(
            avg > Duration::from_millis(40) && avg < Duration::from_millis(60),
            "{avg:?}"
        );
        assert_eq!(sample_delays(4, Duration::ZERO), vec![Duration::ZERO; 4]);
    }
}
