//! Observe: everything the operator reads about one namespace before deciding anything, the
//! `NymNode`s, their pods and Services, the published topology with the state persisted
//! beside it, and the pods' descriptions.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use nym_node::http::description::SignedDescription;
use nym_node::topology::{Topology, TopologyDocument};

use crate::controller::{Context, Error};
use crate::crd::NymNode;
use crate::describe::Target;
use crate::resources::{self, NYMNODE_LABEL, TOPOLOGY_KEY};
use crate::retirement::Retirements;
use crate::rollout::Rollout;

/// Annotation on the topology ConfigMap holding the rollout state.
pub const ROLLOUT_ANNOTATION: &str = "mixnet.nym-node.dev/rollout";
/// Annotation holding the pods being retired (scale-down, deletion).
pub const RETIRING_ANNOTATION: &str = "mixnet.nym-node.dev/retiring";
/// Annotation holding the highest revision ever published in the namespace: the floor
/// the next revision must exceed, whatever happens to the document itself.
pub const REVISION_ANNOTATION: &str = "mixnet.nym-node.dev/revision";

/// The topology ConfigMap as read.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// `None`: there is no ConfigMap (never written, or deleted).
    pub resource_version: Option<String>,
    /// The previous document: the ConfigMap's if it parses and is signed by this
    /// operator's directory key, or the last this process published if that is newer.
    pub document: Option<TopologyDocument>,
    /// Whether the ConfigMap itself holds `document` and readable state (else it must be
    /// written again).
    pub in_configmap: bool,
    pub rollout: Rollout,
    pub retiring: Retirements,
    /// The revision annotation (0 when absent or unreadable).
    pub revision_floor: u64,
}

/// One namespace, as read at the start of a pass.
#[derive(Debug, Clone)]
pub struct Observed {
    pub nymnodes: Vec<NymNode>,
    pub pods: Vec<Pod>,
    /// The operator's StatefulSets: which pods belong to their `NymNode` as it is now.
    pub statefulsets: Vec<StatefulSet>,
    /// Ingress address of every per-replica LoadBalancer Service, by Service (= pod) name.
    pub lb_addresses: BTreeMap<String, String>,
    pub published: Published,
    /// Verified or not, by node process ([`process_of`]; only running nodes are asked).
    pub descriptions: BTreeMap<String, SignedDescription>,
    /// Unix seconds.
    pub now: i64,
    /// This process's publication count in the namespace when it was read.
    pub generation: u64,
}

fn managed() -> ListParams {
    ListParams::default().labels(&format!(
        "{}={}",
        resources::MANAGED_BY.0,
        resources::MANAGED_BY.1
    ))
}

/// Whether the pod's readiness probe passes (a terminating pod is never ready).
pub fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The node container's status, if the kubelet reported one.
fn node_container(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == resources::NODE_CONTAINER)
}

/// Whether the node's process runs: it may route, ready or not (a restarted node routes on
/// whatever its volume held before its readiness probe passes). Without a container status,
/// readiness stands in.
pub fn pod_running(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    match node_container(pod) {
        Some(c) => c.state.as_ref().is_some_and(|s| s.running.is_some()),
        None => pod_ready(pod),
    }
}

/// One run of a pod's node: its uid and container restart count. A restarted node is a new
/// process, which may have started from an older document than the one before it.
pub fn process_of(pod: &Pod) -> Option<String> {
    let restarts = node_container(pod).map_or(0, |c| c.restart_count);
    Some(format!("{}/{restarts}", pod.uid()?))
}

/// Whether a pod is on its way out with a StatefulSet that is no longer its `NymNode`'s: a
/// pod of an earlier `NymNode` of the same name (deleted and created again) hangs on a
/// StatefulSet that is gone, going, or controlled by that earlier `NymNode`, and the garbage
/// collector deletes it whatever the operator does: it must never be listed as serving
/// again. A pod with no controller (its StatefulSet deleted with `--cascade=orphan`) is
/// not: the next StatefulSet adopts it.
pub fn doomed(pod: &Pod, owner: &NymNode, statefulsets: &[StatefulSet]) -> bool {
    let controller = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .map(|r| r.uid.clone())
    };
    let Some(controlled_by) = controller(&pod.metadata) else {
        return false;
    };
    let Some(sts) = statefulsets
        .iter()
        .find(|s| s.name_any() == owner.name_any())
    else {
        return true;
    };
    let orphaning = sts
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == "orphan");
    let going = sts.metadata.deletion_timestamp.is_some() && !orphaning;
    let predecessors = controller(&sts.metadata).is_some_and(|uid| Some(uid) != owner.uid());
    sts.uid() != Some(controlled_by) || going || predecessors
}

/// The running nodes to ask for a description, with the HTTP port their `NymNode` gives
/// them.
pub fn targets(pods: &[Pod], nymnodes: &[NymNode]) -> Vec<Target> {
    pods.iter()
        .filter(|p| pod_running(p))
        .filter_map(|p| {
            let owner = p.labels().get(NYMNODE_LABEL)?;
            let port = nymnodes
                .iter()
                .find(|n| &n.name_any() == owner)
                .map_or(8080, |n| n.spec.exposure.http_port);
            Some(Target {
                uid: process_of(p)?,
                name: p.name_any(),
                ip: p.status.as_ref()?.pod_ip.clone()?,
                port,
            })
        })
        .collect()
}

/// Reads the namespace, and asks its running nodes for their descriptions (concurrently, and
/// outside the namespace lock: it is the slow part of a pass).
pub async fn observe(ctx: &Context, ns: &str) -> Result<Observed, Error> {
    let generation = ctx.generation(ns);
    let client = ctx.client.clone();
    let nymnodes = Api::<NymNode>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&managed())
        .await?
        .items;
    let services = Api::<Service>::namespaced(client.clone(), ns)
        .list(&managed())
        .await?
        .items;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .list(&managed())
        .await?
        .items;
    let configmap = Api::<ConfigMap>::namespaced(client, ns)
        .get_opt(&ctx.settings.build.topology_configmap)
        .await?;
    let now = (ctx.clock)();
    let targets = targets(&pods, &nymnodes);
    ctx.descriptions
        .refresh(ctx.describer.as_ref(), &targets, now)
        .await;
    let live: Vec<String> = pods.iter().filter_map(process_of).collect();
    ctx.descriptions.retain(&live);
    Ok(Observed {
        descriptions: ctx.descriptions.current(&targets),
        lb_addresses: load_balancer_addresses(&services),
        published: read_published(ctx, ns, configmap.as_ref()),
        nymnodes,
        pods,
        statefulsets,
        now,
        generation,
    })
}

/// Parses the topology ConfigMap. Anything unreadable is logged and read as absent: the
/// revision floor (memory, the annotation, the nodes' own reports) keeps the next document
/// above whatever the nodes already run.
fn read_published(ctx: &Context, ns: &str, cm: Option<&ConfigMap>) -> Published {
    let mut published = read_configmap(ctx, ns, cm);
    // The ConfigMap lost (deleted, garbled, overwritten): what this process published last
    // still says where every node was, and how far the rollout and retirements got.
    if let Some(last) = ctx.last_published(ns)
        && published
            .document
            .as_ref()
            .is_none_or(|d| d.revision < last.document.revision)
    {
        published.document = Some(last.document);
        published.rollout = last.rollout;
        published.retiring = last.retiring;
        published.in_configmap = false;
    }
    published
}

fn read_configmap(ctx: &Context, ns: &str, cm: Option<&ConfigMap>) -> Published {
    let Some(cm) = cm else {
        return Published::default();
    };
    let annotation = |key: &str| cm.metadata.annotations.as_ref()?.get(key).cloned();
    let signer = ctx.settings.build.topology_signer;
    let document = match cm.data.as_ref().and_then(|d| d.get(TOPOLOGY_KEY)) {
        None => None,
        Some(json) => match Topology::parse_signed(json.as_bytes(), signer.as_ref()) {
            Ok(t) => Some(t.document().clone()),
            Err(e) => {
                tracing::warn!(namespace = ns, error = %e, "the published topology is unreadable; publishing a new one above every revision seen");
                None
            }
        },
    };
    let (rollout, rollout_ok) = parse_state(ns, ROLLOUT_ANNOTATION, annotation(ROLLOUT_ANNOTATION));
    let (retiring, retiring_ok) =
        parse_state(ns, RETIRING_ANNOTATION, annotation(RETIRING_ANNOTATION));
    Published {
        resource_version: cm.metadata.resource_version.clone(),
        in_configmap: document.is_some() && rollout_ok && retiring_ok,
        document,
        rollout,
        retiring,
        revision_floor: annotation(REVISION_ANNOTATION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
    }
}

/// A persisted state annotation, and whether it was readable; unreadable reads as the
/// default, loudly, and is written again at once.
fn parse_state<T: serde::de::DeserializeOwned + Default>(
    ns: &str,
    key: &str,
    raw: Option<String>,
) -> (T, bool) {
    match raw.map(|json| serde_json::from_str(&json)) {
        None => (T::default(), true),
        Some(Ok(state)) => (state, true),
        Some(Err(e)) => {
            tracing::warn!(namespace = ns, annotation = key, error = %e, "unreadable operator state on the topology ConfigMap; starting from the default");
            (T::default(), false)
        }
    }
}

/// Ingress address (IP or host name) of every LoadBalancer Service the operator made.
fn load_balancer_addresses(services: &[Service]) -> BTreeMap<String, String> {
    services
        .iter()
        .filter_map(|s| {
            let ingress = s
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .first()?;
            let addr = ingress.ip.clone().or_else(|| ingress.hostname.clone())?;
            Some((s.name_any(), addr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::{NodeMode, NymNodeSpec};

    fn controlled_by(uid: &str) -> Option<Vec<OwnerReference>> {
        Some(vec![OwnerReference {
            uid: uid.into(),
            controller: Some(true),
            ..Default::default()
        }])
    }

    fn statefulset(uid: &str, controller: &str) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("mix-l1".into()),
                uid: Some(uid.into()),
                owner_references: controlled_by(controller),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(controller: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("mix-l1-0".into()),
                owner_references: controller.and_then(controlled_by),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_pods_hanging_on_a_statefulset_that_is_not_their_nymnodes_are_doomed() {
        let mut nn = NymNode::new(
            "mix-l1",
            NymNodeSpec {
                mode: NodeMode::Mixnode,
                layer: Some(1),
                replicas: 1,
                image: "nym-node:1".into(),
                env: BTreeMap::new(),
                resources: None,
                exposure: Default::default(),
                storage: Default::default(),
            },
        );
        nn.metadata.uid = Some("nn-2".into());
        let live = statefulset("sts-2", "nn-2");
        assert!(!doomed(
            &pod(Some("sts-2")),
            &nn,
            std::slice::from_ref(&live)
        ));
        // Orphaned (--cascade=orphan): the next StatefulSet adopts it.
        assert!(!doomed(&pod(None), &nn, &[]));
        // Its StatefulSet is gone, or another one took the name.
        assert!(doomed(&pod(Some("sts-1")), &nn, &[]));
        assert!(doomed(
            &pod(Some("sts-1")),
            &nn,
            std::slice::from_ref(&live)
        ));
        // Its StatefulSet still belongs to the NymNode's predecessor.
        assert!(doomed(
            &pod(Some("sts-1")),
            &nn,
            &[statefulset("sts-1", "nn-1")]
        ));
        // Being deleted: doomed, unless its pods are being orphaned.
        let mut going = live.clone();
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(doomed(&pod(Some("sts-2")), &nn, &[going.clone()]));
        going.metadata.finalizers = Some(vec!["orphan".into()]);
        assert!(!doomed(&pod(Some("sts-2")), &nn, &[going]));
    }
}
