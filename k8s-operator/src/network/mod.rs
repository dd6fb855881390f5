//! One namespace's network, synced as one unit: observe it, plan the next document and the
//! next step of the rollout and retirements, publish them, act (delete the pod an upgrade
//! replaces). Every `NymNode`'s reconcile syncs its namespace, under one lock per namespace
//! so the whole network moves one step at a time; it observes (and fetches descriptions)
//! before taking the lock.

pub mod observe;
pub mod plan;
pub mod publish;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::events::EventType;
use nym_node::topology::TopologyDocument;
use tracing::instrument;

use crate::controller::{Context, Error};
use crate::crd::NymNode;
use crate::retirement;
use crate::rollout::{self, Rollout};

/// One pod after a sync, for status.
#[derive(Debug, Clone)]
pub struct PodReport {
    pub name: String,
    pub nymnode: String,
    pub ready: bool,
    pub serving: bool,
    pub up_to_date: bool,
    pub image: Option<String>,
    pub identity_key: Option<String>,
}

/// The namespace after a sync.
#[derive(Debug, Clone)]
pub struct Network {
    pub document: TopologyDocument,
    pub rollout: Rollout,
    pub retirement: retirement::Plan,
    pub pods: Vec<PodReport>,
    /// ConfigMaps the env of some pod of each `NymNode` comes from (kept while used).
    pub env_in_use: BTreeMap<String, BTreeSet<String>>,
    /// StatefulSet replicas per `NymNode` (the spec's, raised while pods are withdrawn).
    pub replicas: BTreeMap<String, i32>,
    /// `NymNode`s being deleted whose pods are all withdrawn: their finalizer may go.
    pub released: BTreeSet<String>,
    /// Unix seconds of the sync.
    pub now: i64,
}

/// Syncs the namespace `ns`.
#[instrument(skip(ctx), fields(namespace = ns))]
pub async fn sync(ctx: &Context, ns: &str) -> Result<Network, Error> {
    let mut observed = observe::observe(ctx, ns).await?;
    let lock = ctx.namespace_lock(ns);
    let _guard = lock.lock().await;
    // Another pass of this process published while this one waited: read again (its
    // descriptions are fresh in the cache). Other writers are caught by the conditional write.
    if ctx.generation(ns) != observed.generation {
        observed = observe::observe(ctx, ns).await?;
    }
    let plan = plan::plan(ctx, &observed)?;
    let published = publish::publish(ctx, ns, &observed, &plan).await?;
    ctx.metrics.observe_network(
        ns,
        &published.document,
        &observed.published.rollout,
        &published.rollout,
        observed.now,
    );
    let rejected = plan.pods.iter().filter(|p| p.ready && !p.verified).count();
    ctx.metrics.descriptions_rejected.inc_by(rejected as u64);
    if let Some(action) = &plan.action {
        act(ctx, ns, &observed.nymnodes, &published.rollout, action).await?;
    }
    Ok(report(&observed, &plan, published))
}

/// Deletes the pod an upgrade replaces (its own drain releases what it holds).
async fn act(
    ctx: &Context,
    ns: &str,
    nymnodes: &[NymNode],
    rollout: &Rollout,
    action: &rollout::Action,
) -> Result<(), Error> {
    let rollout::Action::DeletePod { name, uid } = action;
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .delete(name, &params)
        .await
    {
        Ok(_) => {
            ctx.metrics.pod_replaced(ns);
            let owner = rollout
                .nymnode()
                .and_then(|n| nymnodes.iter().find(|nn| nn.name_any() == n));
            if let Some(owner) = owner {
                let note = format!(
                    "deleted {name} for its upgrade: it was out of the topology and every node had stopped routing to it"
                );
                ctx.publish_event(owner, EventType::Normal, "PodReplaced", &note)
                    .await;
            }
            Ok(())
        }
        // Already gone, or the name belongs to a replacement now.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn report(o: &observe::Observed, plan: &plan::Plan, published: publish::Publication) -> Network {
    let document = published.document;
    let pods = plan
        .pods
        .iter()
        .map(|s| {
            let entry = document.nodes.iter().find(|n| n.name == s.name);
            PodReport {
                name: s.name.clone(),
                nymnode: s.nymnode.clone(),
                ready: s.ready,
                serving: entry.is_some_and(|n| n.serving),
                up_to_date: s.up_to_date,
                image: plan.images.get(&s.name).cloned().flatten(),
                identity_key: entry.map(|n| n.identity_key.to_string()),
            }
        })
        .collect();
    let mut env_in_use: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &plan.pods {
        let names = plan.env_configmaps.get(&s.name).into_iter().flatten();
        env_in_use
            .entry(s.nymnode.clone())
            .or_default()
            .extend(names.cloned());
    }
    Network {
        replicas: o
            .nymnodes
            .iter()
            .map(|n| (n.name_any(), plan.replicas(n)))
            .collect(),
        released: plan
            .nymnodes
            .iter()
            .filter(|(name, n)| n.deleting && plan.retirement.all_released(name, &plan.pods))
            .map(|(name, _)| name.clone())
            .collect(),
        document,
        rollout: published.rollout,
        retirement: retirement::Plan {
            retiring: published.retiring,
            ..plan.retirement.clone()
        },
        pods,
        env_in_use,
        now: o.now,
    }
}
