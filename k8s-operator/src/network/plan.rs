//! Plan: from what was observed, decide the next document and the next step of the rollout
//! and of every retirement. No API calls; the publisher writes what this decides.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use nym_node::topology::NodeEntry;

use crate::controller::{Context, Error};
use crate::crd::{NodeMode, NymNode, ServiceType};
use crate::network::observe::{Observed, doomed, pod_ready, pod_running, process_of};
use crate::resources::{self, NYMNODE_LABEL, TEMPLATE_HASH_LABEL};
use crate::retirement;
use crate::rollout::{self, Rollout};
use crate::snapshot::{NymNodeState, PodState, Snapshot, ordinal_of};
use crate::topology::{self, Member, Placement};

/// What a pass decided.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nymnodes: BTreeMap<String, NymNodeState>,
    pub pods: Vec<PodState>,
    /// Rollout state after this pass (a new withdrawal's revision is stamped on publish).
    pub rollout: Rollout,
    pub action: Option<rollout::Action>,
    pub retirement: retirement::Plan,
    /// The document's nodes.
    pub nodes: Vec<NodeEntry>,
    /// Image and env ConfigMap of each pod, for status and pruning.
    pub images: BTreeMap<String, Option<String>>,
    pub env_configmaps: BTreeMap<String, Vec<String>>,
    pub settle: Duration,
}

pub fn plan(ctx: &Context, o: &Observed) -> Result<Plan, Error> {
    let valid: Vec<bool> = o
        .nymnodes
        .iter()
        .map(|n| n.spec.validate().is_ok())
        .collect();
    let nymnodes = nymnode_states(ctx, &o.nymnodes, &valid);
    let previous: &[NodeEntry] = o
        .published
        .document
        .as_ref()
        .map_or(&[], |d| d.nodes.as_slice());
    let mut members = Vec::new();
    let mut pods = Vec::new();
    for pod in &o.pods {
        let Some(owner) = owner_of(pod, &o.nymnodes) else {
            continue;
        };
        let mut member = member(ctx, o, pod, owner, nymnodes.get(&owner.name_any()));
        // A pod left by an earlier NymNode of this name is on its way out: never serving.
        member.ready &= !doomed(pod, owner, &o.statefulsets);
        pods.push(pod_state(pod, owner, &member, &nymnodes, previous));
        members.push(member);
    }
    members.extend(absent_members(previous, &pods, &nymnodes));
    let settle = settle(&o.nymnodes, &valid);
    let snapshot = Snapshot {
        pods: &pods,
        nymnodes: &nymnodes,
        revision: o.published.document.as_ref().map_or(0, |d| d.revision),
        now: o.now,
        settle,
        ready_timeout: ctx.settings.pod_ready_timeout,
        withdrawal_timeout: ctx.settings.withdrawal_timeout,
    };
    let (rollout, action) = rollout::step(&o.published.rollout, &snapshot);
    let retirement = retirement::step(&o.published.retiring, &snapshot);
    let mut withdrawn: BTreeSet<String> = retirement.retiring.keys().cloned().collect();
    withdrawn.extend(rollout.withdrawn().map(String::from));
    let nodes = topology::render(previous, &members, &withdrawn)?;
    Ok(Plan {
        images: o.pods.iter().map(|p| (p.name_any(), image_of(p))).collect(),
        env_configmaps: o
            .pods
            .iter()
            .map(|p| (p.name_any(), env_configmaps_of(p)))
            .collect(),
        nymnodes,
        pods,
        rollout,
        action,
        retirement,
        nodes,
        settle,
    })
}

impl Plan {
    /// The StatefulSet replicas of `nn`: its spec's count, raised to keep pods whose
    /// withdrawal is not complete.
    pub fn replicas(&self, nn: &NymNode) -> i32 {
        let desired = nn.spec.replicas.max(0) as usize;
        self.retirement
            .replicas(&nn.name_any(), desired, &self.pods)
            .try_into()
            .unwrap_or(i32::MAX)
    }
}

/// What each `NymNode` asks for: a valid spec's template hash and replicas; an invalid one
/// keeps its pods as they are.
fn nymnode_states(
    ctx: &Context,
    nymnodes: &[NymNode],
    valid: &[bool],
) -> BTreeMap<String, NymNodeState> {
    nymnodes
        .iter()
        .zip(valid)
        .map(|(n, &valid)| {
            (
                n.name_any(),
                NymNodeState {
                    template_hash: valid.then(|| ctx.template_hash(n)),
                    replicas: n.spec.replicas.max(0) as usize,
                    deleting: n.metadata.deletion_timestamp.is_some(),
                },
            )
        })
        .collect()
}

/// Wanted pods that have no pod object right now (between an eviction or a replacement and
/// the StatefulSet creating the pod again): they keep their entry, not serving, so peers
/// still resolve them and the new incarnation (same volume, same keys) comes back in place.
fn absent_members(
    previous: &[NodeEntry],
    pods: &[PodState],
    nymnodes: &BTreeMap<String, NymNodeState>,
) -> Vec<Member> {
    previous
        .iter()
        .filter(|entry| !pods.iter().any(|p| p.name == entry.name))
        .filter(|entry| {
            let Some((nymnode, ordinal)) = entry.name.rsplit_once('-') else {
                return false;
            };
            let ordinal: Option<usize> = ordinal.parse().ok();
            nymnodes
                .get(nymnode)
                .is_some_and(|n| !n.deleting && ordinal.is_some_and(|o| o < n.replicas))
        })
        .map(|entry| Member::new(entry.name.clone(), None, false, None))
        .collect()
}

fn owner_of<'a>(pod: &Pod, nymnodes: &'a [NymNode]) -> Option<&'a NymNode> {
    let owner = pod.labels().get(NYMNODE_LABEL)?;
    nymnodes.iter().find(|n| &n.name_any() == owner)
}

/// The largest per-hop delay any node may hold a packet for. An invalid spec's delay is
/// taken from its env when that one value parses, else the node's default.
fn settle(nymnodes: &[NymNode], valid: &[bool]) -> Duration {
    nymnodes
        .iter()
        .zip(valid)
        .map(|(n, valid)| match valid {
            true => n.spec.node_config().max_packet_delay.get(),
            false => n
                .spec
                .env
                .get("NYM_NODE_MAX_PACKET_DELAY")
                .and_then(|raw| nym_node::config::parse_duration(raw).ok())
                .unwrap_or_else(|| nym_node::config::Config::default().max_packet_delay.get()),
        })
        .max()
        .unwrap_or_default()
}

/// A pod as the topology sees it: placed by its valid spec, or kept where its previous entry
/// put it when the spec is invalid.
fn member(
    ctx: &Context,
    o: &Observed,
    pod: &Pod,
    owner: &NymNode,
    state: Option<&NymNodeState>,
) -> Member {
    let name = pod.name_any();
    let valid = state.is_some_and(|s| s.template_hash.is_some());
    let placement = valid.then(|| {
        let host = resources::pod_host(owner, &name, &ctx.settings.build);
        let e = &owner.spec.exposure;
        Placement {
            mode: owner.spec.mode,
            layer: owner.spec.layer,
            mixnet_address: format!("{host}:{}", e.mixnet_port),
            http_address: format!("{host}:{}", e.http_port),
            client_address: owner
                .spec
                .mode
                .is_gateway()
                .then(|| client_address(owner, &host, o.lb_addresses.get(&name))),
        }
    });
    // An invalid spec places nothing: the pod keeps its previous entry, or, when there is
    // none to keep (the ConfigMap lost with the memory of it), is placed by the template it
    // runs, which its labels and ports say.
    let listed = o
        .published
        .document
        .as_ref()
        .is_some_and(|d| d.nodes.iter().any(|n| n.name == name));
    let placement = match placement {
        None if !listed => placement_of_running_template(ctx, o, pod, owner),
        placement => placement,
    };
    let description = process_of(pod).and_then(|p| o.descriptions.get(&p).cloned());
    Member::new(name, placement, pod_ready(pod), description)
}

/// Where a pod sits by the template it runs: the mode and layer its labels carry and the
/// ports its node container declares.
fn placement_of_running_template(
    ctx: &Context,
    o: &Observed,
    pod: &Pod,
    owner: &NymNode,
) -> Option<Placement> {
    let labels = pod.labels();
    let mode = [
        NodeMode::Mixnode,
        NodeMode::EntryGateway,
        NodeMode::ExitGateway,
    ]
    .into_iter()
    .find(|m| {
        labels
            .get("app.kubernetes.io/component")
            .map(String::as_str)
            == Some(m.as_str())
    })?;
    let layer = match labels.get(resources::LAYER_LABEL) {
        Some(l) => Some(l.parse().ok().filter(|l| (1..=3).contains(l))?),
        None => None,
    };
    // A mix node has a layer and a gateway none; anything else is no placement at all.
    if mode.is_gateway() == layer.is_some() {
        return None;
    }
    let port = |wanted: &str| {
        pod.spec
            .as_ref()?
            .containers
            .iter()
            .find(|c| c.name == resources::NODE_CONTAINER)?
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(wanted))
            .map(|p| p.container_port)
    };
    let host = resources::pod_host(owner, &pod.name_any(), &ctx.settings.build);
    Some(Placement {
        mode,
        layer,
        mixnet_address: format!("{host}:{}", port("mixnet")?),
        http_address: format!("{host}:{}", port("http")?),
        client_address: match mode.is_gateway() {
            // The address a LoadBalancer was given, as for any gateway.
            true => Some(format!(
                "{}:{}",
                o.lb_addresses.get(&pod.name_any()).unwrap_or(&host),
                port("client")?
            )),
            false => None,
        },
    })
}

fn pod_state(
    pod: &Pod,
    owner: &NymNode,
    member: &Member,
    nymnodes: &BTreeMap<String, NymNodeState>,
    previous: &[NodeEntry],
) -> PodState {
    let name = pod.name_any();
    let state = nymnodes.get(&owner.name_any());
    let mode = member
        .placement
        .as_ref()
        .map(|p| p.mode)
        .or_else(|| {
            let entry = previous.iter().find(|n| n.name == name)?;
            topology::placement_of(entry).map(|p| p.mode)
        })
        .unwrap_or(owner.spec.mode);
    let verified = member.verified(mode);
    PodState {
        ordinal: ordinal_of(&name),
        nymnode: owner.name_any(),
        uid: pod.uid().unwrap_or_default(),
        process: process_of(pod).unwrap_or_default(),
        running: pod_running(pod),
        ready: member.ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        up_to_date: match state.and_then(|s| s.template_hash.as_ref()) {
            Some(hash) => pod.labels().get(TEMPLATE_HASH_LABEL) == Some(hash),
            None => true,
        },
        serving: previous.iter().any(|n| n.name == name && n.serving),
        verified: member.ready && verified.is_some(),
        reported_revision: verified.map(|d| d.description.topology_revision),
        name,
    }
}

/// Where clients reach a gateway pod: the address its per-replica LoadBalancer Service was
/// given, once the cloud assigned one; otherwise (and for other exposure types) the pod's
/// stable in-cluster name.
fn client_address(nn: &NymNode, host: &str, lb: Option<&String>) -> String {
    match lb {
        Some(addr) if nn.spec.exposure.service_type == ServiceType::LoadBalancer => {
            format!("{addr}:{}", nn.spec.exposure.client_port)
        }
        _ => format!("{host}:{}", nn.spec.exposure.client_port),
    }
}

fn image_of(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
}

/// Every ConfigMap the pod's containers take their env from.
fn env_configmaps_of(pod: &Pod) -> Vec<String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.env_from.iter().flatten())
        .filter_map(|e| e.config_map_ref.as_ref().map(|r| r.name.clone()))
        .collect()
}
