//! Route choice: one serving mix node per layer, chosen at random, then the gateway the
//! packet is for.

use rand::seq::IndexedRandom;

use crate::keys::{EpochKey, NodeId};
use crate::topology::{MIX_LAYERS, NodeEntry, Topology};

/// One hop of a route: who it is and the keys its layer may be encrypted to (the packet
/// builder picks the one valid when the packet gets there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub identity: NodeId,
    pub sphinx_keys: Vec<EpochKey>,
}

impl From<&NodeEntry> for Hop {
    fn from(n: &NodeEntry) -> Self {
        Hop {
            identity: n.identity_key,
            sphinx_keys: n.sphinx_keys.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no serving mix node in layer {0}")]
    EmptyLayer(u8),
    #[error("gateway {0} is not in the topology")]
    UnknownGateway(NodeId),
    #[error("no serving gateway in the topology")]
    NoGateway,
}

/// A route through every mix layer ending at `gateway`.
pub fn choose(topology: &Topology, gateway: &NodeId) -> Result<Vec<Hop>, RouteError> {
    choose_avoiding(topology, gateway, &[])
}

/// Like [`choose`], but in each layer prefers nodes not in `avoid` (the mixes of an attempt
/// that was lost), falling back to any serving node where a layer has no other. A
/// retransmission then does not retry the same dead or partitioned node by chance.
pub fn choose_avoiding(
    topology: &Topology,
    gateway: &NodeId,
    avoid: &[NodeId],
) -> Result<Vec<Hop>, RouteError> {
    let mut rng = rand::rng();
    let mut route = Vec::with_capacity(MIX_LAYERS as usize + 1);
    for layer in 1..=MIX_LAYERS {
        let serving: Vec<&NodeEntry> = topology.serving_layer(layer).collect();
        let fresh: Vec<&NodeEntry> = serving
            .iter()
            .copied()
            .filter(|n| !avoid.contains(&n.identity_key))
            .collect();
        let candidates = if fresh.is_empty() { &serving } else { &fresh };
        let node = candidates
            .choose(&mut rng)
            .ok_or(RouteError::EmptyLayer(layer))?;
        route.push(Hop::from(*node));
    }
    let gw = topology
        .node(gateway)
        .filter(|n| n.mode.is_gateway())
        .ok_or(RouteError::UnknownGateway(*gateway))?;
    route.push(Hop::from(gw));
    Ok(route)
}

/// A random serving gateway, for a client that was not told which one to use.
pub fn choose_gateway(topology: &Topology) -> Result<&NodeEntry, RouteError> {
    let gateways: Vec<&NodeEntry> = topology.serving_gateways().collect();
    gateways
        .choose(&mut rand::rng())
        .copied()
        .ok_or(RouteError::NoGateway)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::keys::{Identity, KeyBytes};
    use crate::statement::NodeStatement;
    use crate::topology::TopologyDocument;

    /// The identity key of node `seed` (signing its own statement needs a real key).
    fn id(seed: u8) -> KeyBytes {
        Identity::from_secret([seed; 32]).public()
    }

    fn seed_of(identity: &KeyBytes) -> u8 {
        (0..=u8::MAX).find(|s| id(*s) == *identity).unwrap()
    }

    fn entry(seed: u8, mode: Mode, layer: Option<u8>, serving: bool) -> NodeEntry {
        let node = Identity::from_secret([seed; 32]);
        let statement = NodeStatement {
            identity_key: node.public(),
            mode,
            noise_key: KeyBytes([seed.wrapping_add(100); 32]),
            sphinx_keys: vec![EpochKey::always(KeyBytes([seed; 32]))],
            network_requester: None,
            ip_packet_router: None,
        };
        NodeEntry {
            name: format!("n{seed}"),
            identity_key: statement.identity_key,
            sphinx_keys: statement.sphinx_keys.clone(),
            noise_key: statement.noise_key,
            mode,
            layer,
            mixnet_address: "127.0.0.1:1".parse().unwrap(),
            client_address: None,
            http_address: None,
            network_requester: None,
            ip_packet_router: None,
            serving,
            statement: statement.sign(&node),
        }
    }

    #[test]
    fn one_serving_node_per_layer_then_the_gateway() {
        let t = Topology::from_document(TopologyDocument::issue(
            1,
            vec![
                entry(1, Mode::Mixnode, Some(1), true),
                entry(2, Mode::Mixnode, Some(1), false),
                entry(3, Mode::Mixnode, Some(2), true),
                entry(4, Mode::Mixnode, Some(3), true),
                entry(5, Mode::EntryGateway, None, true),
            ],
        ))
        .unwrap();
        for _ in 0..50 {
            let r = choose(&t, &id(5)).unwrap();
            let ids: Vec<u8> = r.iter().map(|h| seed_of(&h.identity)).collect();
            assert_eq!(ids, vec![1, 3, 4, 5], "the draining node 2 is never chosen");
        }
        assert_eq!(choose(&t, &id(1)), Err(RouteError::UnknownGateway(id(1))));
        assert_eq!(choose_gateway(&t).unwrap().name, "n5");
    }

    #[test]
    fn a_retry_avoids_the_mixes_of_the_lost_attempt_where_it_can() {
        let t = Topology::from_document(TopologyDocument::issue(
            1,
            vec![
                entry(1, Mode::Mixnode, Some(1), true),
                entry(2, Mode::Mixnode, Some(1), true),
                entry(3, Mode::Mixnode, Some(2), true),
                entry(4, Mode::Mixnode, Some(3), true),
                entry(5, Mode::EntryGateway, None, true),
            ],
        ))
        .unwrap();
        let avoid = [id(1), id(3)];
        for _ in 0..50 {
            let r = choose_avoiding(&t, &id(5), &avoid).unwrap();
            let ids: Vec<u8> = r.iter().map(|h| seed_of(&h.identity)).collect();
            // Layer 1 has another node; layer 2 has none, so node 3 is still used.
            assert_eq!(ids, vec![2, 3, 4, 5]);
        }
    }

    #[test]
    fn empty_layer_is_an_error() {
        let t = Topology::from_document(TopologyDocument::issue(
            1,
            vec![
                entry(1, Mode::Mixnode, Some(1), true),
                entry(5, Mode::EntryGateway, None, true),
            ],
        ))
        .unwrap();
        assert_eq!(choose(&t, &id(5)), Err(RouteError::EmptyLayer(2)));
    }
}
