//! Creation, the topology, errors and events: what the reconciler does on a healthy cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use nym_operator::controller::{error_policy, reconcile};
use nym_operator::crd::NodeMode;
use nym_operator::fixtures::{Cluster, NS};

use super::*;

#[tokio::test]
async fn create_applies_children_in_order_then_topology_then_status() {
    let (cluster, ctx) = Cluster::start(2).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 2));
    cluster.take_log();
    reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
        .await
        .unwrap();
    let writes: Vec<String> = cluster
        .take_log()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| {
            let path = r
                .path
                .rsplit_once("/mix-l1-env-")
                .map_or(r.path.clone(), |(p, _)| format!("{p}/mix-l1-env-HASH"));
            format!("{} {path}", r.method)
        })
        .collect();
    assert_eq!(
        writes,
        [
            format!("PATCH /apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes/mix-l1"),
            format!("POST /api/v1/namespaces/{NS}/secrets"),
            format!("PATCH /api/v1/namespaces/{NS}/configmaps/mix-l1-env-HASH"),
            format!("PATCH /api/v1/namespaces/{NS}/services/mix-l1"),
            format!("PATCH /apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/mix-l1"),
            format!("POST /api/v1/namespaces/{NS}/configmaps"),
            format!("PATCH /apis/apps/v1/namespaces/{NS}/statefulsets/mix-l1"),
            format!(
                "PATCH /apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes/mix-l1/status"
            ),
        ]
    );
    // The metrics token: a random one in a Secret the pods read and the ConfigMaps never hold.
    let secret = cluster
        .get(
            &format!("/api/v1/namespaces/{NS}/secrets"),
            "nym-node-metrics-token",
        )
        .expect("the metrics token Secret");
    let token = secret["data"]["token"].as_str().unwrap().to_string();
    assert!(token.len() >= 40, "{token}");
    let sts = cluster
        .get(
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets"),
            "mix-l1",
        )
        .unwrap();
    let env = &sts["spec"]["template"]["spec"]["containers"][0]["env"];
    let token_var = env
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "NYM_NODE_METRICS_TOKEN")
        .expect("the node reads its metrics token");
    assert_eq!(
        token_var["valueFrom"]["secretKeyRef"]["name"],
        "nym-node-metrics-token"
    );
    // A second pass keeps the token (the Secret exists: created once, never read).
    reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
        .await
        .unwrap();
    let again = cluster
        .get(
            &format!("/api/v1/namespaces/{NS}/secrets"),
            "nym-node-metrics-token",
        )
        .unwrap();
    assert_eq!(again["data"]["token"].as_str().unwrap(), token);
    let nn = cluster.nymnode("mix-l1");
    assert_eq!(
        nn.metadata.finalizers,
        Some(vec!["mixnet.nym-node.dev/withdraw".to_string()])
    );
    assert_eq!(condition(&nn, "Ready").status, "False");
    assert_eq!(condition(&nn, "Progressing").status, "True");
    assert_eq!(condition(&nn, "Progressing").reason, "Scaling");
    assert_eq!(condition(&nn, "Degraded").status, "False");
    let status = nn.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    let signer = ctx.settings.directory.public();
    assert_eq!(status.directory_key, Some(signer.to_base58()));
    // The StatefulSet is OnDelete and owned by the NymNode (deleting it cascades), without
    // blockOwnerDeletion (which needs rights on the NymNode's finalizers).
    let sts = cluster
        .get(
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets"),
            "mix-l1",
        )
        .unwrap();
    assert_eq!(sts["spec"]["updateStrategy"]["type"], "OnDelete");
    let owner = &sts["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["controller"].as_bool()),
        (Some("NymNode"), Some(true))
    );
    assert!(owner["blockOwnerDeletion"].is_null());
    // The topology is signed with the operator's directory key, and the nodes are told to
    // accept nothing else.
    let cm = cluster
        .get(
            &format!("/api/v1/namespaces/{NS}/configmaps"),
            "nym-topology",
        )
        .unwrap();
    let json = cm["data"]["topology.json"].as_str().unwrap();
    assert!(nym_node::topology::Topology::parse_signed(json.as_bytes(), Some(&signer)).is_ok());
    let other = nym_node::keys::Identity::generate().unwrap().public();
    assert!(nym_node::topology::Topology::parse_signed(json.as_bytes(), Some(&other)).is_err());

    // Pods come up; the next reconciles list them serving and report Ready.
    for _ in 0..4 {
        step(&cluster, &ctx).await;
    }
    let _ = reconcile_all(&cluster, &ctx).await;
    assert_eq!(
        env_of(&cluster, "mix-l1-0")["NYM_NODE_TOPOLOGY_SIGNER"],
        signer.to_base58()
    );
    let nn = cluster.nymnode("mix-l1");
    assert_eq!(condition(&nn, "Ready").status, "True", "{:?}", nn.status);
    assert_eq!(condition(&nn, "Progressing").reason, "Complete");
    let status = nn.status.unwrap();
    assert_eq!(status.ready_replicas, 2);
    assert!(
        status
            .replicas
            .iter()
            .all(|r| r.serving && r.identity_key.is_some())
    );
    // Settled: another reconcile writes nothing at all (no self-triggering status writes).
    cluster.take_log();
    let _ = reconcile_all(&cluster, &ctx).await;
    let writes: Vec<String> = cluster
        .take_log()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        writes
            .iter()
            .all(|w| !w.ends_with("/status") && !w.ends_with("nym-topology")),
        "{writes:?}"
    );
}

#[tokio::test]
async fn forged_description_is_left_out_and_revision_moves_only_on_change() {
    let (cluster, ctx) = Cluster::start(1).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 4));
    step(&cluster, &ctx).await;
    cluster.forge("mix-l1-3");
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    let doc = cluster.topology().unwrap();
    let names: Vec<&str> = doc.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["mix-l1-0", "mix-l1-1", "mix-l1-2"]);
    assert!(doc.nodes.iter().all(|n| n.serving));
    let revision = doc.revision;
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    assert_eq!(
        cluster.topology().unwrap().revision,
        revision,
        "no change, no new revision"
    );
    // Scaling down withdraws two nodes first (a new, higher revision), then removes them.
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.replicas = 2);
    for _ in 0..12 {
        step(&cluster, &ctx).await;
    }
    let doc = cluster.topology().unwrap();
    assert!(doc.revision > revision);
    assert_eq!(doc.nodes.len(), 2, "{doc:?}");
    assert_eq!(cluster.pods().len(), 2);
}

#[tokio::test]
async fn the_directory_re_signs_at_half_the_validity_and_each_re_signing_is_a_new_revision() {
    let (cluster, ctx) = Cluster::start(1).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 2));
    for _ in 0..4 {
        step(&cluster, &ctx).await;
    }
    let first = cluster.topology().unwrap();
    assert!(!first.is_expired(cluster.now() as u64));
    let half = (first.issued_at + (first.valid_until - first.issued_at) / 2) as i64;
    // Just before half its validity: the same document.
    cluster.advance(half - 10 - cluster.now());
    step(&cluster, &ctx).await;
    assert_eq!(
        cluster.topology().unwrap(),
        first,
        "nothing changed, nothing due"
    );
    // Past it: the same nodes, signed again as a higher revision valid for longer.
    cluster.advance(20);
    step(&cluster, &ctx).await;
    let second = cluster.topology().unwrap();
    assert_eq!(second.nodes, first.nodes);
    assert!(second.revision > first.revision);
    assert!(second.issued_at >= half as u64);
    assert!(second.valid_until > first.valid_until);
    // And not again until half of the new one has passed.
    step(&cluster, &ctx).await;
    assert_eq!(cluster.topology().unwrap(), second);
}

#[tokio::test]
async fn upgrade_replaces_one_pod_of_the_network_at_a_time_after_withdrawing_it() {
    let (cluster, ctx) = settled_network().await;
    let before: BTreeMap<String, String> = cluster
        .topology()
        .unwrap()
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.identity_key.to_string()))
        .collect();
    for name in cluster.nymnode_names() {
        cluster.edit_nymnode(&name, |nn| nn.spec.image = "nym-node:1.1".into());
    }
    assert!(
        drive(&cluster, &ctx, 400, |c| all_on(c, 8, "nym-node:1.1")).await,
        "rollout did not finish"
    );
    let deletions = cluster.deletions();
    assert_eq!(deletions.len(), 8, "{deletions:?}");
    assert!(
        deletions.iter().all(|(_, unserving)| *unserving),
        "a pod was deleted while serving: {deletions:?}"
    );
    // Keys live on the pods' volumes: every node kept its identity through its upgrade.
    let after: BTreeMap<String, String> = cluster
        .topology()
        .unwrap()
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.identity_key.to_string()))
        .collect();
    assert_eq!(before, after);
    let _ = reconcile_all(&cluster, &ctx).await;
    for name in cluster.nymnode_names() {
        let status = cluster.nymnode(&name).status.unwrap();
        assert_eq!(status.current_image.as_deref(), Some("nym-node:1.1"));
        assert_eq!(status.target_image.as_deref(), Some("nym-node:1.1"));
    }
}

#[tokio::test]
async fn a_pod_stuck_unready_stops_the_rollout_and_sets_degraded() {
    let (cluster, ctx) = settled_network().await;
    // The first pod to be replaced never becomes ready again.
    cluster.stick("entry-0");
    for name in cluster.nymnode_names() {
        cluster.edit_nymnode(&name, |nn| nn.spec.image = "nym-node:1.1".into());
    }
    let halted = drive(&cluster, &ctx, 200, |c| {
        c.nymnode("entry").status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "RolloutStuck")
        })
    })
    .await;
    assert!(halted, "no Degraded condition");
    assert_eq!(cluster.deletions().len(), 1);
    // No further pod is touched while the spec stays as it is, and the NymNodes waiting for
    // their upgrade say why.
    assert!(!drive(&cluster, &ctx, 60, |c| c.deletions().len() > 1).await);
    let waiting = condition(&cluster.nymnode("mix-l1"), "Degraded");
    assert_eq!(
        (waiting.status.as_str(), waiting.reason.as_str()),
        ("True", "RolloutBlocked")
    );
    assert!(waiting.message.contains("entry"), "{}", waiting.message);
    let events: Vec<_> = cluster
        .take_log()
        .into_iter()
        .filter(|r| r.path.ends_with("/events"))
        .collect();
    assert!(events.iter().any(|e| e.body["reason"] == "PodReplaced"));
}

#[tokio::test]
async fn api_errors_back_off_and_surface_as_event_and_condition() {
    let (cluster, ctx) = Cluster::start(1).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1));
    cluster.take_log();
    cluster.fail_next("PATCH", "/statefulsets/", 409);
    let nn = Arc::new(cluster.nymnode("mix-l1"));
    let err = reconcile(nn.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.reason(), "Conflict");
    let log = cluster.take_log();
    let event = log
        .iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/events"))
        .expect("an Event");
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "Conflict");
    let nn = cluster.nymnode("mix-l1");
    assert_eq!(condition(&nn, "Degraded").status, "True");
    assert_eq!(condition(&nn, "Degraded").reason, "Conflict");
    let first = error_policy(Arc::new(nn.clone()), &err, ctx.clone());
    // A 500 next: the backoff doubles.
    cluster.fail_next("PATCH", "/poddisruptionbudgets/", 500);
    let err = reconcile(Arc::new(nn.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ApiError");
    let second = error_policy(Arc::new(nn), &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(2)));
    assert_eq!(second, Action::requeue(Duration::from_secs(4)));
    // Recovery clears Degraded.
    reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        condition(&cluster.nymnode("mix-l1"), "Degraded").status,
        "False"
    );
}

#[tokio::test]
async fn invalid_env_is_refused_with_the_node_parser_message() {
    let (cluster, ctx) = Cluster::start(1).await;
    let mut nn = nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1);
    nn.spec
        .env
        .insert("NYM_NODE_DRAIN_GRACE".into(), "forever".into());
    cluster.insert_nymnode(&nn);
    cluster.take_log();
    reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
        .await
        .unwrap();
    let log = cluster.take_log();
    assert!(
        !log.iter()
            .any(|r| r.method != "GET" && r.path.contains("/statefulsets/")),
        "nothing applied"
    );
    let nn = cluster.nymnode("mix-l1");
    let degraded = condition(&nn, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded
            .message
            .contains("NYM_NODE_DRAIN_GRACE: expected a duration"),
        "{}",
        degraded.message
    );
}
