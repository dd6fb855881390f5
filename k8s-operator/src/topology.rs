//! The namespace's topology document, rendered from what the pods say about themselves.
//!
//! The operator is the network's directory: a node is listed with the keys of its own
//! signed description (private keys never leave the pod), at the addresses the operator
//! gave it, and serving only while its pod is ready, its description verifies, and no
//! rollout has withdrawn it. A node that stops qualifying stays listed as not serving,
//! so packets already in flight to it still arrive; a pod that no longer exists is
//! dropped. The revision goes up on every change and never on a no-op.

use nym_node::http::description::SignedDescription;
use nym_node::topology::{NodeEntry, SCHEMA_VERSION, Topology, TopologyDocument};

use crate::crd::NodeMode;

/// One pod, as the operator sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub pod: String,
    pub mode: NodeMode,
    pub layer: Option<u8>,
    pub ready: bool,
    /// The description the pod served, if it was fetched (only ready pods are asked).
    pub description: Option<SignedDescription>,
    pub mixnet_address: String,
    pub http_address: String,
    pub client_address: Option<String>,
}

impl Member {
    /// The description, if it verifies and claims the mode the operator gave the pod.
    pub fn verified(&self) -> Option<&SignedDescription> {
        self.description
            .as_ref()
            .filter(|d| d.verify() && d.description.mode == self.mode.node_mode())
    }
}

/// The exit's network requester as its description publishes it, if it is an address at
/// that very node (a description cannot send clients' streams to someone else's exit).
fn requester_of(d: &nym_node::http::description::Description) -> Option<String> {
    let address: nym_node::client::ClientAddress = d.network_requester.as_deref()?.parse().ok()?;
    (address.gateway == d.identity_key).then(|| address.to_string())
}

/// Why a rendered document could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("address of {pod}: {message}")]
    Address { pod: String, message: String },
    #[error(transparent)]
    Invalid(#[from] nym_node::topology::TopologyError),
}

/// Renders the document. `withdrawn` is the pod a rollout has taken out of service.
/// Returns the previous document unchanged (same revision) when nothing changed.
pub fn render(
    previous: Option<&TopologyDocument>,
    members: &[Member],
    withdrawn: Option<&str>,
) -> Result<TopologyDocument, RenderError> {
    let mut nodes: Vec<NodeEntry> = Vec::new();
    for m in members {
        let entry = match m.verified() {
            Some(signed) => {
                let d = &signed.description;
                let addr = |a: &str| {
                    a.parse().map_err(|message| RenderError::Address {
                        pod: m.pod.clone(),
                        message,
                    })
                };
                Some(NodeEntry {
                    name: m.pod.clone(),
                    identity_key: d.identity_key,
                    sphinx_keys: d.sphinx_keys.clone(),
                    noise_key: d.noise_key,
                    mode: m.mode.node_mode(),
                    layer: m.layer,
                    mixnet_address: addr(&m.mixnet_address)?,
                    client_address: m.client_address.as_deref().map(addr).transpose()?,
                    http_address: Some(addr(&m.http_address)?),
                    network_requester: requester_of(d),
                    serving: m.ready && withdrawn != Some(m.pod.as_str()),
                })
            }
            // Not ready, or its description does not verify: keep what was known, not serving.
            None => previous
                .and_then(|p| p.nodes.iter().find(|n| n.name == m.pod))
                .map(|n| NodeEntry {
                    serving: false,
                    ..n.clone()
                }),
        };
        if let Some(entry) = entry {
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
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let revision = match previous {
        Some(p) if p.nodes == nodes => return Ok(p.clone()),
        Some(p) => p.revision + 1,
        None => 1,
    };
    let document = TopologyDocument {
        schema: SCHEMA_VERSION,
        revision,
        nodes,
    };
    // What a node would refuse, the operator must not publish.
    Topology::from_document(document.clone())?;
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nym_node::http::description::Description;
    use nym_node::keys::NodeKeys;

    pub(crate) fn member(pod: &str, layer: u8, ready: bool) -> (Member, NodeKeys) {
        let keys = NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap();
        let d = Description::new(
            pod,
            nym_node::config::Mode::Mixnode,
            None,
            keys.public(),
            "0.0.0.0:1789".into(),
            None,
            "0.0.0.0:8080".into(),
        )
        .sign(&keys.identity);
        (
            Member {
                pod: pod.into(),
                mode: NodeMode::Mixnode,
                layer: Some(layer),
                ready,
                description: ready.then_some(d),
                mixnet_address: format!("{pod}.mix.ns.svc.cluster.local:1789"),
                http_address: format!("{pod}.mix.ns.svc.cluster.local:8080"),
                client_address: None,
            },
            keys,
        )
    }

    /// An exit pod whose description publishes `requester` as its network requester.
    fn exit(pod: &str, requester: impl Fn(&NodeKeys) -> String) -> Member {
        let keys = NodeKeys::generate(std::time::Duration::from_secs(3600)).unwrap();
        let d = Description::new(
            pod,
            nym_node::config::Mode::ExitGateway,
            None,
            keys.public(),
            "0.0.0.0:1789".into(),
            Some("0.0.0.0:9000".into()),
            "0.0.0.0:8080".into(),
        )
        .with_network_requester(requester(&keys))
        .sign(&keys.identity);
        Member {
            pod: pod.into(),
            mode: NodeMode::ExitGateway,
            layer: None,
            ready: true,
            description: Some(d),
            mixnet_address: format!("{pod}.gw.ns.svc.cluster.local:1789"),
            http_address: format!("{pod}.gw.ns.svc.cluster.local:8080"),
            client_address: Some(format!("{pod}.gw.ns.svc.cluster.local:9000")),
        }
    }

    #[test]
    fn an_exit_is_listed_with_its_own_network_requester_and_never_with_another_nodes() {
        use nym_node::gateway::network_requester;
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
        let doc = render(None, &members, None).unwrap();
        let own = doc.nodes[0].network_requester.as_deref().unwrap();
        let parsed: nym_node::client::ClientAddress = own.parse().unwrap();
        assert_eq!(parsed.gateway, doc.nodes[0].identity_key);
        assert_eq!(doc.nodes[1].network_requester, None);
        assert_eq!(doc.nodes[2].network_requester, None);
        assert!(doc.nodes.iter().all(|n| n.serving));
    }

    #[test]
    fn three_verified_pods_and_a_forged_one_give_exactly_the_three() {
        let mut members: Vec<Member> = (0..3)
            .map(|i| member(&format!("mix-{i}"), 1, true).0)
            .collect();
        // The fourth pod serves a description signed by someone else's key.
        let (mut forged, _) = member("mix-3", 1, true);
        let (other, _) = member("other", 1, true);
        let mut d = forged.description.take().unwrap();
        d.signature = other.description.unwrap().signature;
        forged.description = Some(d);
        members.push(forged);
        let doc = render(None, &members, None).unwrap();
        let names: Vec<_> = doc.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["mix-0", "mix-1", "mix-2"]);
        assert!(doc.nodes.iter().all(|n| n.serving));
        assert_eq!(doc.revision, 1);
    }

    #[test]
    fn revision_rises_on_every_change_and_never_on_a_no_op() {
        let mut members: Vec<Member> = (0..3)
            .map(|i| member(&format!("mix-{i}"), 2, true).0)
            .collect();
        let r1 = render(None, &members, None).unwrap();
        assert_eq!(
            render(Some(&r1), &members, None).unwrap().revision,
            r1.revision
        );
        // Withdrawn: still listed, not serving, new revision.
        let r2 = render(Some(&r1), &members, Some("mix-1")).unwrap();
        assert_eq!(r2.revision, r1.revision + 1);
        assert!(!r2.nodes[1].serving && r2.nodes[1].identity_key == r1.nodes[1].identity_key);
        // Pod not ready: its last known entry stays, not serving (packets in flight arrive).
        members[1].ready = false;
        members[1].description = None;
        let r3 = render(Some(&r2), &members, None).unwrap();
        assert_eq!(
            r3.revision, r2.revision,
            "same document: withdrawn and unready look alike"
        );
        assert!(!r3.nodes[1].serving);
        // A pod that is gone is dropped.
        members.remove(1);
        let r4 = render(Some(&r3), &members, None).unwrap();
        assert_eq!(r4.revision, r3.revision + 1);
        assert_eq!(r4.nodes.len(), 2);
    }

    #[test]
    fn a_description_claiming_another_mode_is_not_serving() {
        let (mut m, _) = member("mix-0", 1, true);
        m.mode = NodeMode::EntryGateway;
        m.layer = None;
        assert!(render(None, &[m], None).unwrap().nodes.is_empty());
    }
}
