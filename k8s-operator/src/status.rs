//! A `NymNode`'s status from a sync of its namespace: conditions (`Ready`, `Progressing`,
//! `Degraded`, each keeping its `lastTransitionTime` while its status holds), replicas and
//! images. Written through the status subresource, only when it changed.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use crate::controller::{Context, Error, FIELD_MANAGER};
use crate::crd::{InvalidSpec, NymNode, NymNodeStatus, ReplicaStatus};
use crate::network::{Network, PodReport};
use crate::rollout::{HaltCause, Rollout};

/// What the status is computed from besides the network.
pub struct Inputs<'a> {
    pub invalid: Option<&'a InvalidSpec>,
    /// How long upgrades may wait for unhealthy pods before `Degraded`.
    pub ready_timeout: Duration,
    pub directory_key: Option<String>,
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        // Set by `write` (kept while the status holds).
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

pub fn now_time(seconds: i64) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(seconds)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// `Progressing`: what this `NymNode` is waiting for, if anything.
fn progressing(
    nn: &NymNode,
    network: &Network,
    mine: &[&PodReport],
) -> (bool, &'static str, String) {
    let name = nn.name_any();
    let ready = mine.iter().filter(|p| p.ready && p.serving).count() as i32;
    let desired = nn.spec.replicas.max(0);
    let outdated = mine.iter().filter(|p| !p.up_to_date).count();
    let ours = network.rollout.nymnode() == Some(name.as_str());
    match &network.rollout {
        Rollout::Withdrawing { .. } | Rollout::Replacing { .. } if ours => {
            (true, "Upgrading", network.rollout.describe())
        }
        _ if nn.metadata.deletion_timestamp.is_some() => (
            true,
            "Deleting",
            "withdrawing every pod from the topology before the NymNode goes".into(),
        ),
        _ if outdated > 0 => (
            true,
            "UpgradePending",
            format!(
                "{outdated} pod(s) wait for their turn: the network upgrades one pod at a time"
            ),
        ),
        _ if ready < desired || mine.len() as i32 != desired => (
            true,
            "Scaling",
            format!("{ready}/{desired} pods ready and serving"),
        ),
        _ => (
            false,
            "Complete",
            format!("all {desired} pods run the current spec and serve"),
        ),
    }
}

type Verdict = (bool, &'static str, String);

/// `Degraded`: the first thing that needs a human, most specific first.
fn degraded(nn: &NymNode, network: &Network, mine: &[&PodReport], inputs: &Inputs) -> Verdict {
    if let Some(invalid) = inputs.invalid {
        return (true, "InvalidSpec", invalid.0.clone());
    }
    rollout_degraded(nn, network, mine, inputs)
        .or_else(|| withdrawal_degraded(network, mine))
        .or_else(|| not_ready_too_long(nn, network, mine, inputs))
        .unwrap_or((false, "AsExpected", "no error".into()))
}

/// This `NymNode`'s rollout halted, or its outdated pods wait on the network too long.
fn rollout_degraded(
    nn: &NymNode,
    network: &Network,
    mine: &[&PodReport],
    inputs: &Inputs,
) -> Option<Verdict> {
    let name = nn.name_any();
    let outdated = mine.iter().any(|p| !p.up_to_date);
    match &network.rollout {
        Rollout::Halted {
            nymnode,
            reason,
            cause,
            ..
        } if *nymnode == name => {
            let r = match cause {
                HaltCause::NotReady => "RolloutStuck",
                HaltCause::NotCaughtUp => "CatchUpTimeout",
            };
            Some((true, r, reason.clone()))
        }
        Rollout::Halted {
            nymnode, reason, ..
        } if outdated => Some((
            true,
            "RolloutBlocked",
            format!("the network's rollout is halted at {nymnode}: {reason}"),
        )),
        Rollout::Blocked { since, .. }
            if outdated
                && network.now.saturating_sub(*since) > inputs.ready_timeout.as_secs() as i64 =>
        {
            Some((true, "RolloutBlocked", network.rollout.describe()))
        }
        _ => None,
    }
}

/// Pods leaving the network still withdrawn past the withdrawal timeout.
fn withdrawal_degraded(network: &Network, mine: &[&PodReport]) -> Option<Verdict> {
    let stuck: Vec<String> = mine
        .iter()
        .filter_map(|p| {
            let laggards = network.retirement.stuck.get(&p.name)?;
            Some(format!("{} (waiting for {})", p.name, laggards.join(", ")))
        })
        .collect();
    (!stuck.is_empty()).then(|| {
        (
            true,
            "WithdrawalStuck",
            format!(
                "pods leaving the network are still withdrawn: {}",
                stuck.join("; ")
            ),
        )
    })
}

/// Pods not ready and serving for longer than the ready timeout (a crash-looping image, a
/// node that cannot start), with nothing the operator can do about it.
fn not_ready_too_long(
    nn: &NymNode,
    network: &Network,
    mine: &[&PodReport],
    inputs: &Inputs,
) -> Option<Verdict> {
    let desired = nn.spec.replicas.max(0);
    // The pod an upgrade is replacing is the rollout's business (it has its own deadline).
    let replacing = network.rollout.withdrawn();
    let mut down: Vec<String> = (0..desired)
        .map(|i| format!("{}-{i}", nn.name_any()))
        .filter(|name| Some(name.as_str()) != replacing)
        .filter(|name| !mine.iter().any(|p| &p.name == name && p.ready && p.serving))
        .collect();
    down.sort();
    if down.is_empty() {
        return None;
    }
    let since = nn
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "False")?
        .last_transition_time
        .0
        .as_second();
    let waited = network.now.saturating_sub(since);
    (waited > inputs.ready_timeout.as_secs() as i64).then(|| {
        (
            true,
            "PodsNotReady",
            format!("{} not ready and serving for {waited}s", down.join(", ")),
        )
    })
}

/// The status of `nn` after a sync.
pub fn status_for(nn: &NymNode, network: &Network, inputs: &Inputs) -> NymNodeStatus {
    let name = nn.name_any();
    let mine: Vec<&PodReport> = network.pods.iter().filter(|p| p.nymnode == name).collect();
    let ready = mine.iter().filter(|p| p.ready && p.serving).count() as i32;
    let desired = nn.spec.replicas.max(0);
    let generation = nn.metadata.generation;
    let (p, p_reason, p_message) = progressing(nn, network, &mine);
    let (d, d_reason, d_message) = degraded(nn, network, &mine, inputs);
    let conditions = vec![
        condition(
            "Ready",
            ready == desired && mine.len() as i32 == desired,
            if ready == desired {
                "AllServing"
            } else {
                "NotAllServing"
            },
            format!("{ready}/{desired} pods ready and serving in the topology"),
            generation,
        ),
        condition("Progressing", p, p_reason, p_message, generation),
        condition("Degraded", d, d_reason, d_message, generation),
    ];
    let current_image = mine
        .iter()
        .filter(|p| !p.up_to_date)
        .find_map(|p| p.image.clone())
        .or_else(|| Some(nn.spec.image.clone()));
    NymNodeStatus {
        observed_generation: generation,
        conditions,
        ready_replicas: ready,
        ready: Some(format!("{ready}/{desired}")),
        current_image,
        target_image: Some(nn.spec.image.clone()),
        topology_revision: Some(network.document.revision),
        directory_key: inputs.directory_key.clone(),
        replicas: mine
            .iter()
            .map(|p| ReplicaStatus {
                name: p.name.clone(),
                identity_key: p.identity_key.clone(),
                ready: p.ready,
                serving: p.serving,
                up_to_date: p.up_to_date,
            })
            .collect(),
    }
}

/// Keeps each condition's `lastTransitionTime` when its status did not change.
fn carry_transition_times(new: &mut NymNodeStatus, old: Option<&NymNodeStatus>, now: &Time) {
    for c in &mut new.conditions {
        let previous = old.and_then(|o| o.conditions.iter().find(|p| p.type_ == c.type_));
        c.last_transition_time = match previous {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
    }
}

/// Writes status through the status subresource, only when it changed. Status changes do
/// not trigger reconciles (the controller filters on generation).
pub async fn write(nn: &NymNode, ctx: &Context, mut status: NymNodeStatus) -> Result<(), Error> {
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True");
    ctx.metrics.observe_degraded(
        &nn.namespace().unwrap_or_default(),
        &nn.name_any(),
        degraded.map(|c| c.reason.as_str()),
    );
    let now = now_time((ctx.clock)());
    carry_transition_times(&mut status, nn.status.as_ref(), &now);
    if nn.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<NymNode> =
        Api::namespaced(ctx.client.clone(), &nn.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": format!("{}/v1alpha1", crate::crd::GROUP),
        "kind": "NymNode",
        "status": status,
    });
    api.patch_status(
        &nn.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Sets `Degraded=True` with a reason, keeping the rest of the status (after an error, when
/// no sync result is at hand).
pub async fn degrade(
    nn: &NymNode,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let mut status = nn.status.clone().unwrap_or_default();
    status.conditions.retain(|c| c.type_ != "Degraded");
    status.conditions.push(condition(
        "Degraded",
        true,
        reason,
        message.to_string(),
        nn.metadata.generation,
    ));
    status.target_image = Some(nn.spec.image.clone());
    write(nn, ctx, status).await
}
