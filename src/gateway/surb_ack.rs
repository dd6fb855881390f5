//! SURB-ACKs: the acknowledgement a gateway sends back into the mixnet once a payload is
//! safe in its mailbox. The sender packed it into the payload as a SURB, which carries its
//! own route and delays; the gateway only fills it with an empty payload.

use std::time::Duration;

use sphinx_packet::SURB;

use crate::keys::KeyBytes;
use crate::mixnet::intake::ForwardItem;
use crate::mixnet::sphinx::{PACKET_SIZE, PAYLOAD_SIZE};

/// The packet that acknowledges a payload, ready for the forwarder; `None` for a SURB that
/// cannot be used (it came from the sender, who only hurts itself).
pub fn packet(surb: &[u8]) -> Option<ForwardItem> {
    let (packet, first_hop) = SURB::from_bytes(surb)
        .and_then(|s| s.use_surb(&[], PAYLOAD_SIZE))
        .ok()?;
    let packet = <[u8; PACKET_SIZE]>::try_from(packet.to_bytes().as_slice()).ok()?;
    Some(ForwardItem {
        next_hop: KeyBytes(first_hop.to_bytes()),
        delay: Duration::ZERO,
        ready_at: tokio::time::Instant::now(),
        packet: Box::new(packet),
    })
}
