//! The namespace's topology document, rendered from what the pods say about themselves.
//!
//! The operator is the network's directory: a node is listed with the keys of its own
//! signed description (private keys never leave the pod), at the place the operator gave
//! it, and serving only while its pod is ready, its description verifies, and nothing
//! withdrew it. A node that stops qualifying stays listed as not serving, so packets
//! already in flight to it still arrive; a pod that no longer exists is dropped. Revisions
//! are the publisher's business (`network::publish`).

use std::collections::BTreeSet;

use nym_node::http::description::SignedDescription;
use nym_node::topology::NodeEntry;

use crate::crd::NodeMode;

/// Where the operator put a pod: its duties and the addresses peers and clients use.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub mode: NodeMode,
    pub layer: Option<u8>,
    pub mixnet_address: String,
    pub http_address: String,
    pub client_address: Option<String>,
}

/// One pod, as the operator sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub pod: String,
    /// From its `NymNode`'s spec; `None` for a pod of an invalid `NymNode`, which keeps the
    /// place its previous entry gave it (and is not listed if it never had one).
    pub placement: Option<Placement>,
    pub ready: bool,
    /// The description the pod served, kept only if its signature verifies (running pods
    /// are asked; only a ready one is listed as serving).
    description: Option<SignedDescription>,
}

impl Member {
    /// A pod and the description it served; the signature is checked here, once.
    pub fn new(
        pod: String,
        placement: Option<Placement>,
        ready: bool,
        description: Option<SignedDescription>,
    ) -> Member {
        Member {
            pod,
            placement,
            ready,
            description: description.filter(SignedDescription::verify),
        }
    }

    /// The description, if it verified and claims the mode the operator gave the pod.
    pub fn verified(&self, mode: NodeMode) -> Option<&SignedDescription> {
        self.description
            .as_ref()
            .filter(|d| d.description.mode == mode.node_mode())
    }
}

/// The exit's network requester as its description publishes it, if it is an address at
/// that very node (a description cannot send clients' streams to someone else's exit).
fn requester_of(d: &nym_node::http::description::Description) -> Option<String> {
    nym_node::statement::service_at(d.network_requester.as_deref(), &d.identity_key)
}

/// The exit's IP packet router, on the same terms as its requester.
fn router_of(d: &nym_node::http::description::Description) -> Option<String> {
    nym_node::statement::service_at(d.ip_packet_router.as_deref(), &d.identity_key)
}

/// Why a rendered document could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("address of {pod}: {message}")]
    Address { pod: String, message: String },
    #[error(transparent)]
    Invalid(#[from] nym_node::topology::TopologyError),
}

/// The place a previous entry gave a node.
pub fn placement_of(entry: &NodeEntry) -> Option<Placement> {
    Some(Placement {
        mode: match entry.mode {
            nym_node::config::Mode::Mixnode => NodeMode::Mixnode,
            nym_node::config::Mode::EntryGateway => NodeMode::EntryGateway,
            nym_node::config::Mode::ExitGateway => NodeMode::ExitGateway,
        },
        layer: entry.layer,
        mixnet_address: entry.mixnet_address.to_string(),
        http_address: entry.http_address.as_ref()?.to_string(),
        client_address: entry.client_address.as_ref().map(ToString::to_string),
    })
}

/// One member's entry: fresh from its verified description, else its previous entry as not
/// serving, else none.
fn entry(
    m: &Member,
    previous: Option<&NodeEntry>,
    withdrawn: &BTreeSet<String>,
) -> Result<Option<NodeEntry>, RenderError> {
    let Some(place) = m
        .placement
        .clone()
        .or_else(|| previous.and_then(placement_of))
    else {
        return Ok(None);
    };
    let Some(signed) = m
        .verified(place.mode)
        .filter(|_| m.ready)
        // An entry lists what the node signed or nothing: a requester elsewhere is refused.
        .filter(|s| requester_of(&s.description) == s.description.network_requester)
        .filter(|s| router_of(&s.description) == s.description.ip_packet_router)
    else {
        // Not ready, or its description does not verify: keep what was known, not serving.
        return Ok(previous.map(|n| NodeEntry {
            serving: false,
            ..n.clone()
        }));
    };
    let d = &signed.description;
    let addr = |a: &str| {
        a.parse().map_err(|message| RenderError::Address {
            pod: m.pod.clone(),
            message,
        })
    };
    Ok(Some(NodeEntry {
        name: m.pod.clone(),
        identity_key: d.identity_key,
        sphinx_keys: d.sphinx_keys.clone(),
        noise_key: d.noise_key,
        mode: place.mode.node_mode(),
        layer: place.layer,
        mixnet_address: addr(&place.mixnet_address)?,
        client_address: place.client_address.as_deref().map(addr).transpose()?,
        http_address: Some(addr(&place.http_address)?),
        network_requester: requester_of(d),
        ip_packet_router: router_of(d),
        serving: m.ready && !withdrawn.contains(&m.pod),
        statement: signed.statement.clone(),
    }))
}

/// Renders the nodes of the document, sorted by name. `withdrawn` are the pods an upgrade,
/// a scale-down or a deletion has taken out of service.
pub fn render(
    previous: &[NodeEntry],
    members: &[Member],
    withdrawn: &BTreeSet<String>,
) -> Result<Vec<NodeEntry>, RenderError> {
    let mut nodes: Vec<NodeEntry> = Vec::new();
    for m in members {
        let before = previous.iter().find(|n| n.name == m.pod);
        let Some(entry) = entry(m, before, withdrawn)? else {
            continue;
        };
        // Two pods claiming one identity (a copied volume) must not both be listed.
        let clash = nodes
            .iter()
            .any(|n| n.identity_key == entry.identity_key || n.noise_key == entry.noise_key);
        if clash {
            tracing::warn!(pod = %m.pod, "identity already listed for another pod; left out");
            continue;
        }
        nodes.push(entry);
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nym_node::http::description::Description;
    use nym_node::keys::NodeKeys;

    fn description(pod: &str, mode: nym_node::config::Mode, keys: &NodeKeys) -> Description {
        Description::new(
            pod,
            mode,
            None,
            keys.public(),
            "0.0.0.0:1789".into(),
            mode.is_gateway().then(|| "0.0.0.0:9000".into()),
            "0.0.0.0:8080".into(),
        )
    }

    fn member(pod: &str, layer: u8, ready: bool) -> (Member, NodeKeys) {
        let keys = NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap();
        let d = description(pod, nym_node::config::Mode::Mixnode, &keys).sign(&keys.identity);
        (
            Member::new(
                pod.into(),
                Some(Placement {
                    mode: NodeMode::Mixnode,
                    layer: Some(layer),
                    mixnet_address: format!("{pod}.mix.ns.svc.cluster.local:1789"),
                    http_address: format!("{pod}.mix.ns.svc.cluster.local:8080"),
                    client_address: None,
                }),
                ready,
                ready.then_some(d),
            ),
            keys,
        )
    }

    /// An exit pod whose description publishes `requester` as its network requester.
    fn exit(pod: &str, requester: impl Fn(&NodeKeys) -> String) -> Member {
        let keys = NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap();
        let d = description(pod, nym_node::config::Mode::ExitGateway, &keys)
            .with_network_requester(requester(&keys))
            .sign(&keys.identity);
        Member::new(
            pod.into(),
            Some(Placement {
                mode: NodeMode::ExitGateway,
                layer: None,
                mixnet_address: format!("{pod}.gw.ns.svc.cluster.local:1789"),
                http_address: format!("{pod}.gw.ns.svc.cluster.local:8080"),
                client_address: Some(format!("{pod}.gw.ns.svc.cluster.local:9000")),
            }),
            true,
            Some(d),
        )
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn an_exit_is_listed_with_its_own_network_requester_and_one_naming_another_nodes_is_not_listed()
    {
        use nym_node::exit::network_requester;
        let stranger = NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap();
        let members = [
            exit("exit-0", |k| {
                network_requester::address(&k.identity).to_string()
            }),
            // Claims a requester at another gateway: clients must not be sent there.
            exit("exit-1", |_| {
                network_requester::address(&stranger.identity).to_string()
            }),
            exit("exit-2", |_| "not an address".into()),
        ];
        let nodes = render(&[], &members, &none()).unwrap();
        let own = nodes[0].network_requester.as_deref().unwrap();
        let parsed: nym_node::client::ClientAddress = own.parse().unwrap();
        assert_eq!(parsed.gateway, nodes[0].identity_key);
        assert!(nodes[0].serving);
        // The others signed a requester that is not theirs: their entry cannot drop it
        // (readers check the entry against what the node signed), so they are not listed.
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["exit-0"]);
    }

    #[test]
    fn three_verified_pods_and_a_forged_one_give_exactly_the_three() {
        let mut members: Vec<Member> = (0..3)
            .map(|i| member(&format!("mix-{i}"), 1, true).0)
            .collect();
        // The fourth pod serves a description signed by someone else's key.
        let (genuine, _) = member("mix-3", 1, true);
        let (other, _) = member("other", 1, true);
        let mut d = genuine.description.clone().unwrap();
        d.signature = other.description.unwrap().signature;
        members.push(Member::new(
            "mix-3".into(),
            genuine.placement,
            true,
            Some(d),
        ));
        let nodes = render(&[], &members, &none()).unwrap();
        let names: Vec<_> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["mix-0", "mix-1", "mix-2"]);
        assert!(nodes.iter().all(|n| n.serving));
    }

    #[test]
    fn withdrawn_and_unready_pods_stay_listed_not_serving_and_gone_pods_are_dropped() {
        let mut members: Vec<Member> = (0..3)
            .map(|i| member(&format!("mix-{i}"), 2, true).0)
            .collect();
        let r1 = render(&[], &members, &none()).unwrap();
        assert_eq!(render(&r1, &members, &none()).unwrap(), r1, "no change");
        // Withdrawn: still listed, not serving.
        let r2 = render(&r1, &members, &BTreeSet::from(["mix-1".to_string()])).unwrap();
        assert!(!r2[1].serving && r2[1].identity_key == r1[1].identity_key);
        // Pod not ready: its last known entry stays, not serving (packets in flight arrive).
        members[1] = Member::new("mix-1".into(), members[1].placement.clone(), false, None);
        let r3 = render(&r2, &members, &none()).unwrap();
        assert_eq!(r3, r2, "withdrawn and unready look alike");
        // A pod that is gone is dropped.
        members.remove(1);
        let r4 = render(&r3, &members, &none()).unwrap();
        assert_eq!(r4.len(), 2);
    }

    #[test]
    fn a_pod_of_an_invalid_nymnode_keeps_its_place_with_fresh_keys() {
        let (m, keys) = member("mix-0", 3, true);
        let before = render(&[], std::slice::from_ref(&m), &none()).unwrap();
        // Its NymNode's spec turned invalid: no placement from the spec any more.
        let invalid = Member {
            placement: None,
            ..m
        };
        let after = render(&before, std::slice::from_ref(&invalid), &none()).unwrap();
        assert_eq!(after, before);
        assert!(after[0].serving && after[0].layer == Some(3));
        // Its keys still come from its own description (the next epoch's key, say).
        assert_eq!(after[0].identity_key, keys.identity.public());
        // Never listed before: there is no place to keep.
        assert!(render(&[], &[invalid], &none()).unwrap().is_empty());
    }

    #[test]
    fn a_description_claiming_another_mode_is_not_serving() {
        let (mut m, _) = member("mix-0", 1, true);
        if let Some(p) = m.placement.as_mut() {
            p.mode = NodeMode::EntryGateway;
            p.layer = None;
        }
        assert!(render(&[], &[m], &none()).unwrap().is_empty());
    }
}
