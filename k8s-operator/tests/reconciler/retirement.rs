//! Pods leaving the network (scale-down, `NymNode` deletion) are withdrawn from the topology
//! before they go; pods of an invalid `NymNode` stay where they are.

use nym_operator::crd::NodeMode;
use nym_operator::fixtures::{Cluster, DeletionCause, NS};

use super::*;

fn statefulset_replicas(cluster: &Cluster, name: &str) -> i64 {
    cluster
        .get(&format!("/apis/apps/v1/namespaces/{NS}/statefulsets"), name)
        .and_then(|s| s["spec"]["replicas"].as_i64())
        .unwrap_or(-1)
}

/// Each of `pods` is listed in `after`, serving, in the layer and at the address `before`
/// gave it.
fn still_serving_in_place(
    before: &nym_node::topology::TopologyDocument,
    after: &nym_node::topology::TopologyDocument,
    pods: &[&str],
) {
    for pod in pods {
        let b = before.nodes.iter().find(|n| n.name == *pod).unwrap();
        let a = after
            .nodes
            .iter()
            .find(|n| n.name == *pod)
            .expect("still listed");
        assert!(a.serving, "{pod} still serves");
        assert_eq!((a.layer, &a.mixnet_address), (b.layer, &b.mixnet_address));
    }
}

/// Every deletion of `cause` happened while the pod was not serving and after every node had
/// loaded the document that withdrew it, plus the largest per-hop delay (3 s here).
fn withdrawn_before_deleted(cluster: &Cluster, cause: DeletionCause) -> usize {
    let documents = cluster.documents();
    let deletions: Vec<_> = cluster
        .deletion_log()
        .into_iter()
        .filter(|d| d.cause == cause)
        .collect();
    for d in &deletions {
        assert!(!d.serving, "{} was deleted while serving", d.pod);
        // The first document of the unbroken run that lists it as not serving.
        let withdrawn_at = documents
            .iter()
            .rev()
            .take_while(|(_, doc)| !doc.nodes.iter().any(|n| n.name == d.pod && n.serving))
            .last()
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("{} was never withdrawn", d.pod));
        assert!(
            d.at - withdrawn_at >= 3,
            "{} deleted {}s after its withdrawal",
            d.pod,
            d.at - withdrawn_at
        );
    }
    deletions.len()
}

#[tokio::test]
async fn scale_down_withdraws_pods_before_the_statefulset_removes_them() {
    let (cluster, ctx) = Cluster::start(2).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 3));
    for _ in 0..6 {
        step(&cluster, &ctx).await;
    }
    assert_eq!(
        cluster
            .topology()
            .unwrap()
            .nodes
            .iter()
            .filter(|n| n.serving)
            .count(),
        3
    );
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.replicas = 1);
    step(&cluster, &ctx).await;
    // Withdrawn, and still there.
    assert_eq!(statefulset_replicas(&cluster, "mix-l1"), 3);
    assert!(!serving(&cluster, "mix-l1-1") && !serving(&cluster, "mix-l1-2"));
    assert!(serving(&cluster, "mix-l1-0"));
    assert!(run_until(&cluster, &ctx, 30, |c| c.pods().len() == 1).await);
    assert_eq!(statefulset_replicas(&cluster, "mix-l1"), 1);
    assert_eq!(
        withdrawn_before_deleted(&cluster, DeletionCause::ScaleDown),
        2
    );
    step(&cluster, &ctx).await;
    step(&cluster, &ctx).await;
    let doc = cluster.topology().unwrap();
    assert_eq!(doc.nodes.len(), 1, "gone pods are dropped");
}

#[tokio::test]
async fn deleting_a_nymnode_withdraws_its_pods_before_they_go() {
    let (cluster, ctx) = settled_network().await;
    cluster.delete_nymnode("exit");
    step(&cluster, &ctx).await;
    // Held by the finalizer while its pod is withdrawn.
    assert!(cluster.try_nymnode("exit").is_some());
    assert!(!serving(&cluster, "exit-0"));
    assert_eq!(
        condition(&cluster.nymnode("exit"), "Progressing").reason,
        "Deleting"
    );
    assert!(
        run_until(&cluster, &ctx, 40, |c| c.try_nymnode("exit").is_none()
            && !c.pods().iter().any(|p| p["metadata"]["name"] == "exit-0"))
        .await
    );
    assert_eq!(
        withdrawn_before_deleted(&cluster, DeletionCause::GarbageCollection),
        1
    );
    // Everything it owned went with it; the rest of the network serves on.
    step(&cluster, &ctx).await;
    assert!(
        cluster
            .get(
                &format!("/apis/apps/v1/namespaces/{NS}/statefulsets"),
                "exit"
            )
            .is_none()
    );
    assert_eq!(cluster.out_of_service(), Vec::<String>::new());
    assert_eq!(cluster.topology().unwrap().nodes.len(), 7);
}

#[tokio::test]
async fn an_invalid_nymnode_keeps_its_running_pods_in_the_topology() {
    let (cluster, ctx) = settled_network().await;
    let before = cluster.topology().unwrap();
    // An operator upgrade that no longer knows a setting looks just like this.
    cluster.edit_nymnode("mix-l2", |nn| {
        nn.spec
            .env
            .insert("NYM_NODE_NO_SUCH_SETTING".into(), "1".into());
        nn.spec.image = "nym-node:1.1".into();
    });
    for _ in 0..20 {
        step(&cluster, &ctx).await;
    }
    still_serving_in_place(
        &before,
        &cluster.topology().unwrap(),
        &["mix-l2-0", "mix-l2-1"],
    );
    assert!(
        cluster.deletions().is_empty(),
        "nothing rolled out from an invalid spec"
    );
    let degraded = condition(&cluster.nymnode("mix-l2"), "Degraded");
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(degraded.message.contains("NYM_NODE_NO_SUCH_SETTING"));
    // The ConfigMap garbled and a new leader with no memory of it: there is no previous
    // entry to keep, so the pods are placed by the template they run.
    cluster.garble_topology_configmap("{ not a document");
    let leader = cluster.operator("new-leader").await;
    for _ in 0..3 {
        step(&cluster, &leader).await;
    }
    still_serving_in_place(
        &before,
        &cluster.topology().unwrap(),
        &["mix-l2-0", "mix-l2-1"],
    );
}

#[tokio::test]
async fn a_nymnode_created_again_never_lists_the_pods_its_predecessor_left() {
    let (cluster, ctx) = settled_network().await;
    cluster.delete_nymnode("mix-l2");
    for _ in 0..60 {
        step(&cluster, &ctx).await;
        if cluster.try_nymnode("mix-l2").is_none() {
            break;
        }
    }
    assert!(
        cluster.try_nymnode("mix-l2").is_none(),
        "withdrawn, then released"
    );
    // Created again before the garbage collector took the old StatefulSet's pods: those are
    // doomed, whatever the new NymNode's pods will be called.
    cluster.insert_nymnode(&nymnode("mix-l2", NodeMode::Mixnode, Some(2), 2));
    for _ in 0..20 {
        step(&cluster, &ctx).await;
    }
    for d in cluster.deletion_log() {
        assert!(
            !d.serving,
            "{} deleted ({:?}) while listed as serving",
            d.pod, d.cause
        );
    }
    assert!(
        cluster
            .deletion_log()
            .iter()
            .any(|d| d.cause == DeletionCause::GarbageCollection),
        "the predecessor's pods went by garbage collection"
    );
    assert!(serving(&cluster, "mix-l2-0") && serving(&cluster, "mix-l2-1"));
}
