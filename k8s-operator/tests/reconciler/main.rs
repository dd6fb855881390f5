//! The reconciler against the strict fake cluster (`nym_operator::fixtures`): what it
//! applies and publishes, and one test per way a real cluster broke the earlier operator.
//! Each test drives the cluster itself: reconcile every `NymNode`, then `tick` the rest of
//! the cluster (time, the StatefulSet controller, the kubelet, the nodes) one second.

mod api;
mod basics;
mod retirement;
mod upgrades;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use nym_operator::controller::{Context, reconcile};
use nym_operator::crd::{NodeMode, NymNode};
use nym_operator::fixtures::{Cluster, NS};

/// Small delays keep the test's clock short; withdrawals wait this long.
pub fn nymnode(name: &str, mode: NodeMode, layer: Option<u8>, replicas: i32) -> NymNode {
    nym_operator::fixtures::nymnode(name, mode, layer, replicas, 3)
}

/// Three mix layers of two, an entry and an exit gateway.
pub fn network() -> Vec<NymNode> {
    nym_operator::fixtures::example_network(3)
}

/// Reconciles every NymNode once; errors are returned as the controller would back off.
pub async fn reconcile_all(cluster: &Cluster, ctx: &Arc<Context>) -> Vec<String> {
    let mut errors = Vec::new();
    for name in cluster.nymnode_names() {
        if let Some(nn) = cluster.try_nymnode(&name)
            && let Err(e) = reconcile(Arc::new(nn), ctx.clone()).await
        {
            errors.push(format!("{name}: {e}"));
        }
    }
    errors
}

/// Reconciles (expecting no error), then ticks.
pub async fn step(cluster: &Cluster, ctx: &Arc<Context>) {
    let errors = reconcile_all(cluster, ctx).await;
    assert!(errors.is_empty(), "{errors:?}");
    cluster.tick();
}

pub fn condition(nn: &NymNode, type_: &str) -> Condition {
    nn.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} has no {type_} condition: {:?}",
                nn.metadata.name.as_deref().unwrap_or(""),
                nn.status
            )
        })
}

/// Drives the network until `done` or the step budget runs out; checks after every step
/// that at most one pod is out of service.
pub async fn drive(
    cluster: &Cluster,
    ctx: &Arc<Context>,
    steps: usize,
    done: impl Fn(&Cluster) -> bool,
) -> bool {
    for _ in 0..steps {
        let _ = reconcile_all(cluster, ctx).await;
        let out = cluster.out_of_service();
        assert!(out.len() <= 1, "more than one pod out of service: {out:?}");
        cluster.tick();
        if done(cluster) {
            return true;
        }
    }
    false
}

pub fn image_of(pod: &serde_json::Value) -> &str {
    pod["spec"]["containers"][0]["image"].as_str().unwrap_or("")
}

/// Every pod exists, runs `image`, and the whole network serves.
pub fn all_on(cluster: &Cluster, pods: usize, image: &str) -> bool {
    let all = cluster.pods();
    all.len() == pods
        && all.iter().all(|p| image_of(p) == image)
        && cluster.out_of_service().is_empty()
}

/// The whole example network, settled: every pod ready and serving.
pub async fn settled_network() -> (Cluster, Arc<Context>) {
    let (cluster, ctx) = Cluster::start(3).await;
    for nn in network() {
        cluster.insert_nymnode(&nn);
    }
    for _ in 0..10 {
        step(&cluster, &ctx).await;
    }
    let _ = reconcile_all(&cluster, &ctx).await;
    assert!(
        cluster.out_of_service().is_empty(),
        "{:?}",
        cluster.out_of_service()
    );
    assert_eq!(cluster.topology().map(|t| t.nodes.len()), Some(8));
    (cluster, ctx)
}

/// The env ConfigMap a pod takes its env from.
pub fn env_of(cluster: &Cluster, pod: &str) -> BTreeMap<String, String> {
    let pod = cluster
        .get(&format!("/api/v1/namespaces/{NS}/pods"), pod)
        .unwrap_or_else(|| panic!("no pod {pod}"));
    let name = pod["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let cm = cluster
        .get(&format!("/api/v1/namespaces/{NS}/configmaps"), &name)
        .unwrap_or_else(|| panic!("no ConfigMap {name}"));
    serde_json::from_value(cm["data"].clone()).unwrap_or_default()
}

/// The rollout state the operator persisted on the topology ConfigMap.
pub fn rollout_of(cluster: &Cluster) -> nym_operator::rollout::Rollout {
    cluster
        .get(
            &format!("/api/v1/namespaces/{NS}/configmaps"),
            "nym-topology",
        )
        .and_then(|cm| {
            let json = cm["metadata"]["annotations"]["mixnet.nym-node.dev/rollout"]
                .as_str()?
                .to_string();
            serde_json::from_str(&json).ok()
        })
        .unwrap_or_default()
}

/// Whether the last published document lists `pod` as serving.
pub fn serving(cluster: &Cluster, pod: &str) -> bool {
    cluster
        .topology()
        .is_some_and(|t| t.nodes.iter().any(|n| n.name == pod && n.serving))
}

/// Edits every NymNode's image.
pub fn upgrade_all(cluster: &Cluster, image: &str) {
    for name in cluster.nymnode_names() {
        cluster.edit_nymnode(&name, |nn| nn.spec.image = image.into());
    }
}

/// Steps until `done`, without the one-out-of-service check (for tests whose faults take
/// pods out themselves).
pub async fn run_until(
    cluster: &Cluster,
    ctx: &Arc<Context>,
    steps: usize,
    done: impl Fn(&Cluster) -> bool,
) -> bool {
    for _ in 0..steps {
        let _ = reconcile_all(cluster, ctx).await;
        if done(cluster) {
            return true;
        }
        cluster.tick();
    }
    false
}
