//! Publish: the signed document and the operator's state, in one conditional write of the
//! topology ConfigMap.
//!
//! A new revision is signed when the nodes changed, and when half the last one's validity
//! has passed (`topology::DOCUMENT_VALIDITY`): readers refuse an expired document, so the
//! directory re-signs long before, and every re-signing is a revision of its own.
//!
//! Revisions only go up. The next one exceeds the revision floor: the highest of the
//! ConfigMap's revision annotation, what this process published, every node's reported
//! revision and the document itself; so a deleted or garbled ConfigMap, or a new leader that
//! never saw it, still publishes above what every node runs (a node refuses older ones).
//! And it is at least the clock in milliseconds: when every record is gone at once (the
//! ConfigMap deleted, the operator restarted, no node left to report, only clients holding
//! the last document), the next revision is still above every earlier one, unless the
//! clock went back or the operator published more than one revision per millisecond.
//! The write carries the `resourceVersion` that was read (or is a create when there was
//! none), so two writers (a split brain, two installs) cannot publish out of order: the
//! second gets a conflict and re-reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use nym_node::topology::{SCHEMA_VERSION, Topology, TopologyDocument, validity_from};

use crate::controller::{Context, Error, FIELD_MANAGER};
use crate::network::observe::{
    Observed, RETIRING_ANNOTATION, REVISION_ANNOTATION, ROLLOUT_ANNOTATION,
};
use crate::network::plan::Plan;
use crate::resources::{self, TOPOLOGY_KEY};
use crate::retirement::Retirements;
use crate::rollout::Rollout;

/// Largest ConfigMap data the API server stores.
pub const MAX_CONFIGMAP_BYTES: usize = 1024 * 1024;
/// Largest total of an object's annotations the API server stores (the rollout state).
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;

/// What was published.
#[derive(Debug, Clone)]
pub struct Publication {
    pub document: TopologyDocument,
    pub rollout: Rollout,
    pub retiring: Retirements,
}

/// How far above the clock (in milliseconds) a pod's reported revision may be and still
/// count: revisions follow the clock, so one far above it is a pod's lie, which must not
/// push the revisions to their end (and stop every re-signing).
const MAX_REPORTED_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// The highest revision anything has seen: the next one must be above it.
fn revision_floor(ctx: &Context, ns: &str, o: &Observed, plan: &Plan) -> u64 {
    let believable = clock_revision(ctx).saturating_add(MAX_REPORTED_AHEAD_MS);
    let reported = plan
        .pods
        .iter()
        .filter_map(|p| p.reported_revision)
        .filter(|r| *r <= believable)
        .max()
        .unwrap_or(0);
    let document = o.published.document.as_ref().map_or(0, |d| d.revision);
    ctx.revision_floor(ns)
        .max(o.published.revision_floor)
        .max(reported)
        .max(document)
}

/// The clock as a revision: milliseconds since the epoch.
fn clock_revision(ctx: &Context) -> u64 {
    u64::try_from((ctx.clock)())
        .unwrap_or(0)
        .saturating_mul(1000)
}

/// Decides the document and writes it with the state, when anything changed.
pub async fn publish(
    ctx: &Context,
    ns: &str,
    o: &Observed,
    plan: &Plan,
) -> Result<Publication, Error> {
    let floor = revision_floor(ctx, ns, o, plan);
    let previous = o.published.document.as_ref();
    let now = u64::try_from((ctx.clock)()).unwrap_or(0);
    let document = match previous {
        Some(p) if p.nodes == plan.nodes && p.revision >= floor && !p.due_for_resigning(now) => {
            p.clone()
        }
        _ => {
            let (issued_at, valid_until) = validity_from(now);
            TopologyDocument {
                schema: SCHEMA_VERSION,
                revision: floor
                    .checked_add(1)
                    .ok_or(Error::RevisionExhausted)?
                    .max(clock_revision(ctx)),
                issued_at,
                valid_until,
                nodes: plan.nodes.clone(),
            }
        }
    };
    let revision = document.revision;
    // What a node would refuse, the operator must not publish.
    Topology::from_document(document.clone()).map_err(crate::topology::RenderError::from)?;
    let published = Publication {
        rollout: stamp_rollout(plan.rollout.clone(), revision),
        retiring: stamp_retiring(&plan.retirement.retiring, revision),
        document,
    };
    let unchanged = o.published.in_configmap
        && previous == Some(&published.document)
        && published.rollout == o.published.rollout
        && published.retiring == o.published.retiring
        && o.published.revision_floor == revision;
    if !unchanged {
        write(ctx, ns, o, &published).await?;
        log_changes(ns, o, &published);
    }
    ctx.published(ns, &published);
    Ok(published)
}

/// A withdrawal takes effect in the first revision that lists its pod as not serving.
fn stamp_rollout(mut rollout: Rollout, revision: u64) -> Rollout {
    if let Rollout::Withdrawing { withdrawal, .. } = &mut rollout {
        withdrawal.revision.get_or_insert(revision);
    }
    rollout
}

fn stamp_retiring(retiring: &Retirements, revision: u64) -> Retirements {
    retiring
        .iter()
        .map(|(pod, w)| {
            let mut w = w.clone();
            w.revision.get_or_insert(revision);
            (pod.clone(), w)
        })
        .collect()
}

fn log_changes(ns: &str, o: &Observed, p: &Publication) {
    if o.published.document.as_ref().map(|d| d.revision) != Some(p.document.revision) {
        tracing::info!(
            namespace = ns,
            revision = p.document.revision,
            nodes = p.document.nodes.len(),
            "topology published"
        );
    }
    if o.published.rollout != p.rollout {
        tracing::info!(namespace = ns, rollout = %p.rollout.describe(), "rollout");
    }
}

/// The ConfigMap: the signed document, the state annotations, owned by every `NymNode` of
/// the namespace (deleted with the last of them).
fn configmap(ctx: &Context, ns: &str, o: &Observed, p: &Publication) -> Result<ConfigMap, Error> {
    let owners: Vec<OwnerReference> = o
        .nymnodes
        .iter()
        .filter_map(|n| {
            let mut r = n.controller_owner_ref(&())?;
            // Shared: no controller, and no blockOwnerDeletion (that needs finalizer rights).
            r.controller = None;
            r.block_owner_deletion = None;
            Some(r)
        })
        .collect();
    let signed = nym_node::topology::sign_document(&p.document, &ctx.settings.directory)?;
    let signed = String::from_utf8(signed).map_err(|e| Error::State(e.to_string()))?;
    let annotations = BTreeMap::from([
        (ROLLOUT_ANNOTATION.to_string(), to_json(&p.rollout)?),
        (RETIRING_ANNOTATION.to_string(), to_json(&p.retiring)?),
        (
            REVISION_ANNOTATION.to_string(),
            p.document.revision.to_string(),
        ),
    ]);
    let data = TOPOLOGY_KEY.len() + signed.len();
    let state = annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>();
    if data > MAX_CONFIGMAP_BYTES || state > MAX_ANNOTATION_BYTES {
        return Err(Error::TopologyTooLarge { data, state });
    }
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(ctx.settings.build.topology_configmap.clone()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([(
                resources::MANAGED_BY.0.into(),
                resources::MANAGED_BY.1.into(),
            )])),
            annotations: Some(annotations),
            owner_references: (!owners.is_empty()).then_some(owners),
            resource_version: o.published.resource_version.clone(),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(TOPOLOGY_KEY.to_string(), signed)])),
        ..Default::default()
    })
}

fn to_json<T: serde::Serialize>(state: &T) -> Result<String, Error> {
    serde_json::to_string(state).map_err(|e| Error::State(e.to_string()))
}

/// Conditional on what was read: an update at the `resourceVersion` read, or a create.
async fn write(ctx: &Context, ns: &str, o: &Observed, p: &Publication) -> Result<(), Error> {
    let cm = configmap(ctx, ns, o, p)?;
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    if o.published.resource_version.is_some() {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&cm.name_any(), &params, &Patch::Apply(&cm))
            .await?;
    } else {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.create(&params, &cm).await?;
    }
    Ok(())
}
