//! Observe: everything the operator reads about one namespace before deciding anything, the
//! `NymNode`s, their pods and Services, the published topology with the state persisted
//! beside it, and the pods' descriptions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
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
    /// The document, if it parses and is signed by this operator's directory key.
    pub document: Option<TopologyDocument>,
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
    /// Ingress address of every per-replica LoadBalancer Service, by Service (= pod) name.
    pub lb_addresses: BTreeMap<String, String>,
    pub published: Published,
    /// Verified or not, by pod uid (only ready pods are asked).
    pub descriptions: BTreeMap<String, SignedDescription>,
    /// Unix seconds.
    pub now: i64,
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

/// The ready pods to ask for a description, with the HTTP port their `NymNode` gives them.
pub fn targets(pods: &[Pod], nymnodes: &[NymNode]) -> Vec<Target> {
    pods.iter()
        .filter(|p| pod_ready(p))
        .filter_map(|p| {
            let owner = p.labels().get(NYMNODE_LABEL)?;
            let port = nymnodes
                .iter()
                .find(|n| &n.name_any() == owner)
                .map_or(8080, |n| n.spec.exposure.http_port);
            Some(Target {
                uid: p.uid()?,
                name: p.name_any(),
                ip: p.status.as_ref()?.pod_ip.clone()?,
                port,
            })
        })
        .collect()
}

/// Lists the namespace's pods and brings their descriptions up to date, concurrently.
/// Runs before the namespace lock is taken: it is the slow part of a pass.
pub async fn prefetch_descriptions(ctx: &Context, ns: &str) -> Result<(), Error> {
    let nymnodes = Api::<NymNode>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&managed())
        .await?;
    let targets = targets(&pods.items, &nymnodes.items);
    ctx.descriptions
        .refresh(ctx.describer.as_ref(), &targets, (ctx.clock)())
        .await;
    Ok(())
}

/// Reads the namespace (under its lock; descriptions come from the prefetch, and only pods
/// it did not see are asked now).
pub async fn observe(ctx: &Context, ns: &str) -> Result<Observed, Error> {
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
    let configmap = Api::<ConfigMap>::namespaced(client, ns)
        .get_opt(&ctx.settings.build.topology_configmap)
        .await?;
    let now = (ctx.clock)();
    let targets = targets(&pods, &nymnodes);
    ctx.descriptions
        .refresh(ctx.describer.as_ref(), &targets, now)
        .await;
    let live: Vec<&str> = pods
        .iter()
        .filter_map(|p| p.meta().uid.as_deref())
        .collect();
    ctx.descriptions.retain(&live);
    Ok(Observed {
        descriptions: ctx.descriptions.current(&targets),
        lb_addresses: load_balancer_addresses(&services),
        published: read_published(ctx, ns, configmap.as_ref()),
        nymnodes,
        pods,
        now,
    })
}

/// Parses the topology ConfigMap. Anything unreadable is logged and read as absent: the
/// revision floor (memory, the annotation, the nodes' own reports) keeps the next document
/// above whatever the nodes already run.
fn read_published(ctx: &Context, ns: &str, cm: Option<&ConfigMap>) -> Published {
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
    Published {
        resource_version: cm.metadata.resource_version.clone(),
        document,
        rollout: parse_state(ns, ROLLOUT_ANNOTATION, annotation(ROLLOUT_ANNOTATION)),
        retiring: parse_state(ns, RETIRING_ANNOTATION, annotation(RETIRING_ANNOTATION)),
        revision_floor: annotation(REVISION_ANNOTATION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
    }
}

/// A persisted state annotation; unreadable reads as the default, loudly.
fn parse_state<T: serde::de::DeserializeOwned + Default>(
    ns: &str,
    key: &str,
    raw: Option<String>,
) -> T {
    match raw.map(|json| serde_json::from_str(&json)) {
        None => T::default(),
        Some(Ok(state)) => state,
        Some(Err(e)) => {
            tracing::warn!(namespace = ns, annotation = key, error = %e, "unreadable operator state on the topology ConfigMap; starting from the default");
            T::default()
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
