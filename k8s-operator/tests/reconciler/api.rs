//! What a real API server refuses and the fake now refuses too: immutable fields, stale
//! writes, rights the chart does not grant; and what the operator does about it.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use nym_operator::controller::reconcile;
use nym_operator::crd::{NodeMode, STORAGE_IMMUTABLE};
use nym_operator::fixtures::{Cluster, DIRECTORY, NS, OPERATOR_NS};
use nym_operator::network::{observe, plan, publish};

use super::*;

#[tokio::test]
async fn the_fake_refuses_what_a_real_api_server_refuses() {
    let (cluster, ctx) = Cluster::start(1).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1));
    step(&cluster, &ctx).await;
    let client = cluster.client();
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let mut sts = sts_api.get("mix-l1").await.unwrap();
    sts.metadata.managed_fields = None;
    sts.metadata.resource_version = None;
    // Volume claims cannot change: 422.
    let mut changed = sts.clone();
    changed.spec.volume_claim_templates.as_mut().unwrap()[0]
        .spec
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .requests = Some(
        [(
            "storage".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("5Gi".into()),
        )]
        .into(),
    );
    let e = sts_api
        .patch(
            "mix-l1",
            &PatchParams::apply("nym-operator").force(),
            &Patch::Apply(&changed),
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 422), "{e}");
    // Another field manager without force: 409 on fields the operator owns.
    let mut replicas = serde_json::json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "spec": {"replicas": 7}});
    let e = sts_api
        .patch(
            "mix-l1",
            &PatchParams::apply("kubectl"),
            &Patch::Apply(&replicas),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, kube::Error::Api(s) if s.code == 409 && s.message.contains("nym-operator")),
        "{e}"
    );
    // A stale resourceVersion: 409.
    replicas["metadata"] = serde_json::json!({"resourceVersion": "1"});
    let e = sts_api
        .patch(
            "mix-l1",
            &PatchParams::apply("nym-operator").force(),
            &Patch::Apply(&replicas),
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 409), "{e}");
    // blockOwnerDeletion needs update rights on nymnodes/finalizers, which the chart does
    // not grant: 403.
    let nn = cluster.nymnode("mix-l1");
    let mut owner = kube::Resource::controller_owner_ref(&nn, &()).unwrap();
    owner.block_owner_deletion = Some(true);
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("blocking".into()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .patch(
            "blocking",
            &PatchParams::apply("nym-operator").force(),
            &Patch::Apply(&cm),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, kube::Error::Api(s) if s.code == 403 && s.message.contains("blockOwnerDeletion")),
        "{e}"
    );
    // Outside the rights the chart grants: 403 (secrets in the watched namespace).
    let e = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client, NS)
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 403), "{e}");
}

#[tokio::test]
async fn a_storage_change_is_refused_with_a_clear_message_not_a_422_on_every_reconcile() {
    let (cluster, ctx) = Cluster::start(1).await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1));
    for _ in 0..4 {
        step(&cluster, &ctx).await;
    }
    // The CRD's CEL rule refuses this; a CRD not yet upgraded (Helm never upgrades crds/)
    // lets it through.
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.storage.size = "5Gi".into());
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    let degraded = condition(&cluster.nymnode("mix-l1"), "Degraded");
    assert_eq!(
        (degraded.reason.as_str(), degraded.message.as_str()),
        ("InvalidSpec", STORAGE_IMMUTABLE)
    );
    assert!(serving(&cluster, "mix-l1-0"), "its pod serves on");
    // The same size written another way is no change.
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.storage.size = "1024Mi".into());
    step(&cluster, &ctx).await;
    assert_eq!(
        condition(&cluster.nymnode("mix-l1"), "Degraded").status,
        "False"
    );
}

#[tokio::test]
async fn a_size_the_server_spells_its_own_way_is_no_storage_change() {
    let (cluster, ctx) = Cluster::start(1).await;
    let mut nn = nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1);
    nn.spec.storage.size = "1.1Gi".into();
    cluster.insert_nymnode(&nn);
    for _ in 0..4 {
        step(&cluster, &ctx).await;
    }
    let sts_api: Api<StatefulSet> = Api::namespaced(cluster.client(), NS);
    let storage = |sts: &StatefulSet| {
        sts.spec.volume_claim_templates.as_ref().unwrap()[0]
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .map(|r| r["storage"].0.clone())
    };
    // The server keeps its canonical spelling, not the one the operator wrote.
    let sts = sts_api.get("mix-l1").await.unwrap();
    assert_eq!(storage(&sts).as_deref(), Some("1181116006400m"));
    assert_eq!(
        condition(&cluster.nymnode("mix-l1"), "Degraded").status,
        "False"
    );
    // And the NymNode is still managed: a scale-up reaches its StatefulSet.
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.replicas = 2);
    for _ in 0..4 {
        step(&cluster, &ctx).await;
    }
    assert_eq!(sts_api.get("mix-l1").await.unwrap().spec.replicas, Some(2));
}

#[tokio::test]
async fn a_name_its_pods_or_services_cannot_carry_is_refused_with_the_rule() {
    let (cluster, ctx) = Cluster::start(1).await;
    // 53 characters: every apply succeeds, but the pods' revision label would be 64.
    let long = format!("mix-{}", "l".repeat(49));
    for name in [long.as_str(), "mix.l1"] {
        cluster.insert_nymnode(&nymnode(name, NodeMode::Mixnode, Some(1), 1));
    }
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    let sts_api: Api<StatefulSet> = Api::namespaced(cluster.client(), NS);
    for name in [long.as_str(), "mix.l1"] {
        let degraded = condition(&cluster.nymnode(name), "Degraded");
        assert_eq!(degraded.reason, "InvalidSpec", "{name}");
        assert!(
            degraded.message.contains("at most 52"),
            "{}",
            degraded.message
        );
        assert!(sts_api.get_opt(name).await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn two_writers_cannot_publish_out_of_order() {
    let (cluster, ctx) = settled_network().await;
    cluster.hang("mix-l2-0", true);
    cluster.tick();
    // A second replica that still believes it leads (a split brain) reads the namespace and
    // plans to take the hung node out of service ...
    let stale = cluster.operator("stale-leader").await;
    let observed = observe::observe(&stale, NS).await.unwrap();
    let planned = plan::plan(&stale, &observed).unwrap();
    assert!(
        planned
            .nodes
            .iter()
            .any(|n| n.name == "mix-l2-0" && !n.serving)
    );
    // ... the leader publishes meanwhile ...
    let _ = reconcile_all(&cluster, &ctx).await;
    let revision = cluster.topology().unwrap().revision;
    // ... and the stale write is refused instead of overwriting it.
    let e = publish::publish(&stale, NS, &observed, &planned)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "Conflict", "{e}");
    assert_eq!(cluster.topology().unwrap().revision, revision);
    let revisions: Vec<u64> = cluster
        .documents()
        .iter()
        .map(|(_, d)| d.revision)
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
}

#[tokio::test]
async fn the_revision_never_goes_back_whatever_happens_to_the_configmap_or_the_leader() {
    let (cluster, ctx) = settled_network().await;
    let highest = |c: &Cluster| {
        c.documents()
            .iter()
            .map(|(_, d)| d.revision)
            .max()
            .unwrap_or(0)
    };
    let configmap = |c: &Cluster| {
        c.get(
            &format!("/api/v1/namespaces/{NS}/configmaps"),
            "nym-topology",
        )
        .and_then(|cm| {
            let json = cm["data"]["topology.json"].as_str()?.to_string();
            nym_node::topology::Topology::parse(json.as_bytes()).ok()
        })
        .map(|t| t.document().clone())
    };
    let last = cluster.topology().unwrap();
    // Deleted: written again, never below the last (the same document keeps its revision).
    cluster.delete_topology_configmap();
    step(&cluster, &ctx).await;
    assert_eq!(configmap(&cluster), Some(last.clone()));
    // Garbled: the same.
    cluster.garble_topology_configmap("{ not a document");
    step(&cluster, &ctx).await;
    assert_eq!(configmap(&cluster), Some(last));
    // Deleted while a node changes: a higher revision.
    let top = highest(&cluster);
    cluster.delete_topology_configmap();
    cluster.hang("mix-l1-0", true);
    step(&cluster, &ctx).await;
    step(&cluster, &ctx).await;
    assert!(configmap(&cluster).unwrap().revision > top);
    cluster.hang("mix-l1-0", false);
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    // A new leader that never saw the ConfigMap, which is gone: it learns the floor from
    // what the nodes report.
    let top = highest(&cluster);
    cluster.delete_topology_configmap();
    let leader = cluster.operator("new-leader").await;
    for _ in 0..3 {
        step(&cluster, &leader).await;
    }
    assert!(cluster.topology().unwrap().revision > top);
    // No node ever refused a document as older than the one it runs, or as foreign.
    for rt in cluster.runtimes().values() {
        assert_eq!((rt.refused_older, rt.refused_foreign), (0, 0), "{}", rt.pod);
    }
    assert!(cluster.out_of_service().is_empty());
    // Every record lost at once: every NymNode gone (no node left to report), the ConfigMap
    // deleted, a new operator. Clients still hold the last document: the next is above it.
    for name in cluster.nymnode_names() {
        cluster.delete_nymnode(&name);
    }
    for _ in 0..60 {
        let _ = reconcile_all(&cluster, &leader).await;
        cluster.tick();
        if cluster.pods().is_empty() && cluster.nymnode_names().is_empty() {
            break;
        }
    }
    assert!(cluster.pods().is_empty(), "every pod withdrawn and gone");
    let top = highest(&cluster);
    cluster.delete_topology_configmap();
    let fresh = cluster.operator("after-the-loss").await;
    cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1));
    for _ in 0..3 {
        step(&cluster, &fresh).await;
    }
    assert!(cluster.topology().unwrap().revision > top);
    for rt in cluster.runtimes().values() {
        assert_eq!((rt.refused_older, rt.refused_foreign), (0, 0), "{}", rt.pod);
    }
    drop(ctx);
}

#[tokio::test]
async fn the_operator_makes_its_directory_key_once_and_a_racing_replica_takes_the_same() {
    let cluster = Cluster::new(1, 0);
    let first = cluster.operator("first").await;
    // The second replica found no Secret (it looked before the first created it) and then
    // lost the race to create it: it must use the winner's key.
    cluster.fail_next("GET", &format!("/secrets/{DIRECTORY}"), 404);
    let second = cluster.operator("second").await;
    assert_eq!(
        first.settings.directory.public(),
        second.settings.directory.public()
    );
    let public = cluster
        .get(
            &format!("/api/v1/namespaces/{OPERATOR_NS}/configmaps"),
            DIRECTORY,
        )
        .unwrap();
    assert_eq!(
        public["data"]["publicKey"],
        first.settings.directory.public().to_base58()
    );
    let secrets = cluster.list(&format!("/api/v1/namespaces/{OPERATOR_NS}/secrets"));
    assert_eq!(secrets.len(), 1);
    // The key is a PKCS#8 PEM ed25519 key, what OpenSSL and `kubectl` users expect.
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(cluster.client(), OPERATOR_NS)
            .get(DIRECTORY)
            .await
            .unwrap();
    let pem = secret.data.unwrap()["directory.key"].0.clone();
    assert!(
        String::from_utf8(pem)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
}

#[tokio::test]
async fn a_free_lease_goes_to_one_replica_only() {
    let cluster = Cluster::new(1, 0);
    let client = cluster.client();
    let a = nym_operator::leader::lease_manager(
        client.clone(),
        OPERATOR_NS,
        "nym-operator",
        "replica-a",
        15,
    )
    .await
    .unwrap();
    assert!(a.changed().await.unwrap(), "replica-a takes the free lease");
    // replica-b claims it the way kube-lease-manager claims a free lease: a server-side
    // apply of holderIdentity, not forced, under its own field manager.
    let claim = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 15},
    });
    let leases: Api<Lease> = Api::namespaced(client, OPERATOR_NS);
    let mine = PatchParams::apply(&nym_operator::leader::field_manager("replica-b"));
    let e = leases
        .patch("nym-operator", &mine, &Patch::Apply(&claim))
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 409), "{e}");
    // The same claim under replica-a's field manager (one manager for every replica, as
    // before) goes through: both would lead.
    let shared = PatchParams::apply(&nym_operator::leader::field_manager("replica-a"));
    assert!(
        leases
            .patch("nym-operator", &shared, &Patch::Apply(&claim))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_keygen_init_container_reads_the_node_env() {
    let (cluster, ctx) = Cluster::start(1).await;
    let mut nn = nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1);
    nn.spec
        .env
        .insert("NYM_NODE_KEY_ROTATION_INTERVAL".into(), "30m".into());
    cluster.insert_nymnode(&nn);
    reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
        .await
        .unwrap();
    let sts = cluster
        .get(
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets"),
            "mix-l1",
        )
        .unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(
        pod["initContainers"][0]["envFrom"],
        pod["containers"][0]["envFrom"]
    );
}

#[tokio::test]
async fn unreadable_operator_state_is_replaced_not_silently_kept() {
    let (cluster, ctx) = settled_network().await;
    let rollout = "mixnet.nym-node.dev/rollout";
    cluster.annotate_topology_configmap(rollout, "{ not json");
    step(&cluster, &ctx).await;
    let cm = cluster
        .get(
            &format!("/api/v1/namespaces/{NS}/configmaps"),
            "nym-topology",
        )
        .unwrap();
    let state = cm["metadata"]["annotations"][rollout].as_str().unwrap();
    assert!(
        serde_json::from_str::<nym_operator::rollout::Rollout>(state).is_ok(),
        "{state}"
    );
    let revision: u64 = cm["metadata"]["annotations"]["mixnet.nym-node.dev/revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(revision, cluster.topology().unwrap().revision);
    assert!(cluster.out_of_service().is_empty());
}
