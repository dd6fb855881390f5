//! Upgrades on a real cluster: what rolls out, and every wait ending in progress or in a
//! `Degraded` condition that says why.

use nym_operator::fixtures::{DeletionCause, NS};
use nym_operator::rollout::Rollout;

use super::*;

#[tokio::test]
async fn an_env_change_rolls_through_every_pod_and_each_pod_keeps_the_env_of_its_template() {
    let (cluster, ctx) = settled_network().await;
    let before = env_of(&cluster, "mix-l1-0");
    assert_eq!(before.get("NYM_NODE_CLIENT_RATE"), None);
    for name in cluster.nymnode_names() {
        cluster.edit_nymnode(&name, |nn| {
            nn.spec
                .env
                .insert("NYM_NODE_CLIENT_RATE".into(), "100".into());
        });
    }
    let done = drive(&cluster, &ctx, 400, |c| {
        c.pods().len() == 8
            && c.out_of_service().is_empty()
            && c.pods().iter().all(|p| {
                let name = p["metadata"]["name"].as_str().unwrap_or("");
                env_of(c, name)
                    .get("NYM_NODE_CLIENT_RATE")
                    .map(String::as_str)
                    == Some("100")
            })
    })
    .await;
    assert!(done, "the env change did not reach every pod");
    // Each pod was withdrawn and replaced, one at a time (drive checked that at every step).
    let replaced: Vec<_> = cluster
        .deletion_log()
        .into_iter()
        .filter(|d| d.cause == DeletionCause::Operator)
        .collect();
    assert_eq!(replaced.len(), 8, "{replaced:?}");
    assert!(replaced.iter().all(|d| !d.serving));
    // Env ConfigMaps are immutable and named by content; the old ones are gone once unused.
    for _ in 0..2 {
        step(&cluster, &ctx).await;
    }
    let envs: Vec<_> = cluster
        .list(&format!("/api/v1/namespaces/{NS}/configmaps"))
        .into_iter()
        .filter(|cm| cm["metadata"]["labels"]["mixnet.nym-node.dev/role"] == "env")
        .collect();
    assert_eq!(envs.len(), 5, "one per NymNode");
    assert!(envs.iter().all(|cm| cm["immutable"] == true));
}

#[tokio::test]
async fn a_node_that_never_loads_the_withdrawal_ends_in_degraded_and_the_pod_serves_again() {
    let (cluster, ctx) = settled_network().await;
    // mix-l3-1 keeps running (ready) but its descriptions stop answering: the operator
    // cannot tell which document it routes on, so it must not count it as caught up.
    cluster.fail_descriptions("mix-l3-1", u32::MAX);
    upgrade_all(&cluster, "nym-node:1.1");
    let degraded = run_until(&cluster, &ctx, 120, |c| {
        c.nymnode("entry").status.is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "CatchUpTimeout"
            })
        })
    })
    .await;
    assert!(degraded, "{:?}", rollout_of(&cluster));
    let message = condition(&cluster.nymnode("entry"), "Degraded").message;
    assert!(message.contains("mix-l3-1"), "{message}");
    assert!(
        cluster.deletions().is_empty(),
        "nothing may be deleted: {:?}",
        cluster.deletions()
    );
    // The withdrawn pod is given back.
    step(&cluster, &ctx).await;
    assert!(serving(&cluster, "entry-0"));
    // Once the node answers again, the rollout resumes and finishes.
    cluster.fail_descriptions("mix-l3-1", 0);
    assert!(run_until(&cluster, &ctx, 600, |c| all_on(c, 8, "nym-node:1.1")).await);
}

#[tokio::test]
async fn a_single_failed_description_does_not_take_a_node_out_of_service() {
    let (cluster, ctx) = settled_network().await;
    let revision = cluster.topology().unwrap().revision;
    cluster.fail_descriptions("mix-l2-0", 1);
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    assert!(serving(&cluster, "mix-l2-0"));
    assert_eq!(cluster.topology().unwrap().revision, revision);
    // Two in a row do.
    cluster.fail_descriptions("mix-l2-0", 2);
    for _ in 0..3 {
        step(&cluster, &ctx).await;
    }
    assert!(!serving(&cluster, "mix-l2-0") || cluster.topology().unwrap().revision > revision);
}

#[tokio::test]
async fn descriptions_are_fetched_once_per_pod_per_pass_whatever_the_number_of_nymnodes() {
    let (cluster, ctx) = settled_network().await;
    cluster.tick();
    let before = cluster.describe_calls();
    let _ = reconcile_all(&cluster, &ctx).await;
    // Five NymNodes each sync the whole namespace; the eight pods are asked once.
    assert_eq!(cluster.describe_calls() - before, 8);
}

#[tokio::test]
async fn a_pod_that_falls_out_before_the_delete_keeps_the_withdrawn_one_from_being_deleted() {
    let (cluster, ctx) = settled_network().await;
    cluster.edit_nymnode("entry", |nn| nn.spec.image = "nym-node:1.1".into());
    // Wait until entry-0 is withdrawn and every node loaded that.
    let settling = run_until(&cluster, &ctx, 60, |c| {
        matches!(rollout_of(c), Rollout::Withdrawing { withdrawal, .. } if withdrawal.caught_up_at.is_some())
    })
    .await;
    assert!(settling, "{:?}", rollout_of(&cluster));
    // Another node crashes while the delay is waited out.
    cluster.crash("mix-l1-0", 30);
    for _ in 0..10 {
        step(&cluster, &ctx).await;
    }
    assert!(
        cluster.deletions().is_empty(),
        "entry-0 was deleted while mix-l1-0 was down"
    );
    assert!(
        serving(&cluster, "entry-0"),
        "entry-0 is given back while the network is short"
    );
    // Once mix-l1-0 is back the upgrade goes on.
    assert!(
        run_until(&cluster, &ctx, 200, |c| c.pods().iter().all(|p| {
            p["metadata"]["name"] != "entry-0" || image_of(p) == "nym-node:1.1"
        }) && c.out_of_service().is_empty())
        .await
    );
}

#[tokio::test]
async fn scaling_down_the_nymnode_under_upgrade_lets_the_others_finish() {
    let (cluster, ctx) = settled_network().await;
    upgrade_all(&cluster, "nym-node:1.1");
    // Wait until mix-l1-1 is the pod being replaced, then scale mix-l1 down to one pod.
    let replacing = run_until(
        &cluster,
        &ctx,
        200,
        |c| matches!(rollout_of(c), Rollout::Replacing { pod, .. } if pod == "mix-l1-1"),
    )
    .await;
    assert!(replacing, "{:?}", rollout_of(&cluster));
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.replicas = 1);
    let done = run_until(&cluster, &ctx, 400, |c| all_on(c, 7, "nym-node:1.1")).await;
    assert!(
        done,
        "the other upgrades stalled: {:?}",
        rollout_of(&cluster)
    );
    assert!(!matches!(rollout_of(&cluster), Rollout::Halted { .. }));
}

#[tokio::test]
async fn deleting_the_nymnode_under_upgrade_does_not_stall_the_others() {
    let (cluster, ctx) = settled_network().await;
    upgrade_all(&cluster, "nym-node:1.1");
    let replacing = run_until(
        &cluster,
        &ctx,
        200,
        |c| matches!(rollout_of(c), Rollout::Replacing { nymnode, .. } if nymnode == "entry"),
    )
    .await;
    assert!(replacing, "{:?}", rollout_of(&cluster));
    let start = cluster.now();
    cluster.delete_nymnode("entry");
    let done = run_until(&cluster, &ctx, 400, |c| all_on(c, 7, "nym-node:1.1")).await;
    assert!(done, "{:?}", rollout_of(&cluster));
    // Well within the ready timeout the others were under way again.
    assert!(cluster.now() - start < 400);
    assert!(
        cluster.try_nymnode("entry").is_none(),
        "the deleted NymNode went"
    );
}

#[tokio::test]
async fn a_spec_change_during_a_replacement_does_not_halt_the_rollout() {
    let (cluster, ctx) = settled_network().await;
    upgrade_all(&cluster, "nym-node:1.1");
    let replacing = run_until(&cluster, &ctx, 200, |c| {
        matches!(rollout_of(c), Rollout::Replacing { .. })
    })
    .await;
    assert!(replacing);
    upgrade_all(&cluster, "nym-node:1.2");
    let done = run_until(&cluster, &ctx, 600, |c| all_on(c, 8, "nym-node:1.2")).await;
    assert!(done, "{:?}", rollout_of(&cluster));
    assert!(
        cluster
            .nymnode_names()
            .iter()
            .all(|n| condition(&cluster.nymnode(n), "Degraded").status == "False")
    );
}

#[tokio::test]
async fn two_crash_looping_pods_get_their_fixed_image() {
    let (cluster, ctx) = settled_network().await;
    // A bad image, and both pods of mix-l1 recreated from it (a node drain, say).
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.image = "nym-node:broken".into());
    step(&cluster, &ctx).await;
    cluster.delete_pod_externally("mix-l1-0");
    cluster.delete_pod_externally("mix-l1-1");
    for _ in 0..40 {
        let _ = reconcile_all(&cluster, &ctx).await;
        cluster.tick();
    }
    let broken = cluster
        .pods()
        .iter()
        .filter(|p| image_of(p) == "nym-node:broken")
        .count();
    assert_eq!(broken, 2);
    // The fix must reach both, though neither is healthy.
    cluster.edit_nymnode("mix-l1", |nn| nn.spec.image = "nym-node:1.1".into());
    let fixed = run_until(&cluster, &ctx, 300, |c| {
        c.pods()
            .iter()
            .filter(|p| image_of(p) == "nym-node:1.1")
            .count()
            == 2
            && c.out_of_service().is_empty()
    })
    .await;
    assert!(fixed, "{:?}", rollout_of(&cluster));
}

#[tokio::test]
async fn upgrades_waiting_on_an_unhealthy_pod_turn_degraded_and_say_which() {
    let (cluster, ctx) = settled_network().await;
    cluster.hang("mix-l2-1", true);
    cluster.edit_nymnode("exit", |nn| nn.spec.image = "nym-node:1.1".into());
    let degraded = run_until(&cluster, &ctx, 60, |c| {
        let d = condition(&c.nymnode("exit"), "Degraded");
        d.status == "True" && d.reason == "RolloutBlocked"
    })
    .await;
    assert!(degraded, "{:?}", cluster.nymnode("exit").status);
    assert!(
        condition(&cluster.nymnode("exit"), "Degraded")
            .message
            .contains("mix-l2-1")
    );
    // NymNodes with nothing to upgrade are not Degraded.
    assert_eq!(
        condition(&cluster.nymnode("mix-l1"), "Degraded").status,
        "False"
    );
    cluster.hang("mix-l2-1", false);
    assert!(
        run_until(&cluster, &ctx, 200, |c| all_on(c, 8, "nym-node:1.0")
            || c.pods().iter().any(
                |p| image_of(p) == "nym-node:1.1" && c.out_of_service().is_empty()
            ))
        .await
    );
}
