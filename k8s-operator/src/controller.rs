//! The reconciler. For one `NymNode`: hold it with a finalizer, validate it, apply the
//! children the builders produce, sync the namespace's network (`network`: topology,
//! rollout, retirements, one step of the whole network at a time), apply the StatefulSet
//! with the replicas the network can spare, then write status. On deletion it withdraws
//! every pod from the topology before letting the `NymNode` go. It only orchestrates: what
//! to build is `resources`, what to publish is `topology`, when to replace or remove a pod
//! is `rollout` and `retirement`.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::instrument;

use crate::crd::{self, InvalidSpec, NymNode, STORAGE_IMMUTABLE};
use crate::describe::{Describer, Descriptions};
use crate::metrics::Metrics;
use crate::network::{self, Network};
use crate::resources::{self, BuildSettings, NYMNODE_LABEL};
use crate::rollout::Rollout;
use crate::status;

/// Field manager of every server-side apply this operator makes.
pub const FIELD_MANAGER: &str = "nym-operator";
/// Finalizer holding a `NymNode` until its pods are withdrawn from the topology.
pub const FINALIZER: &str = "mixnet.nym-node.dev/withdraw";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("topology: {0}")]
    Topology(#[from] crate::topology::RenderError),
    #[error("signing the topology: {0}")]
    Sign(#[from] nym_node::topology::TopologyError),
    #[error(
        "the signed topology ({data} bytes, at most 1 MiB) or the rollout state ({state} bytes, at most 256 KiB) is more than a ConfigMap holds"
    )]
    TopologyTooLarge { data: usize, state: usize },
    #[error("the topology revision cannot go higher")]
    RevisionExhausted,
    #[error("operator state: {0}")]
    State(String),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("metrics token: {0}")]
    MetricsToken(#[from] crate::generated_secret::SecretError),
}

impl Error {
    /// A short PascalCase reason for Events and conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(_) => "ApiError",
            Error::Topology(_) | Error::TopologyTooLarge { .. } | Error::RevisionExhausted => {
                "TopologyInvalid"
            }
            Error::Sign(_) => "TopologyNotSigned",
            Error::State(_) => "StateInvalid",
            Error::NoNamespace(_) => "NoNamespace",
            Error::MetricsToken(_) => "MetricsTokenSecret",
        }
    }
}

/// The operator's settings that reconciling needs (see `config.rs` for their env names).
#[derive(Debug, Clone)]
pub struct Settings {
    pub build: BuildSettings,
    /// The directory key topology documents are signed with (its public half is
    /// `build.topology_signer`).
    pub directory: nym_node::keys::Identity,
    /// How long a replacement pod may take to become ready and serving (and upgrades may
    /// wait for unhealthy pods before the waiting `NymNode`s turn `Degraded`).
    pub pod_ready_timeout: Duration,
    /// How long every running node may take to load a revision that withdraws a pod.
    pub withdrawal_timeout: Duration,
    /// How long a pod's description is reused before it is asked again.
    pub description_reuse: Duration,
    /// Requeue interval while pods are starting or a rollout runs.
    pub busy_requeue: Duration,
    /// Requeue interval of a settled network (descriptions are re-checked this often).
    pub idle_requeue: Duration,
}

impl Settings {
    /// Settings signing with `directory`, which `build` then names to the nodes.
    pub fn with_directory(directory: nym_node::keys::Identity, build: BuildSettings) -> Self {
        Settings {
            build: BuildSettings {
                topology_signer: Some(directory.public()),
                ..build
            },
            directory,
            pod_ready_timeout: Duration::from_secs(600),
            withdrawal_timeout: Duration::from_secs(300),
            description_reuse: Duration::from_secs(2),
            busy_requeue: Duration::from_secs(5),
            idle_requeue: Duration::from_secs(60),
        }
    }

    /// Signs with `directory` from now on (and names it to the nodes).
    pub fn sign_with(&mut self, directory: nym_node::keys::Identity) {
        self.build.topology_signer = Some(directory.public());
        self.directory = directory;
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub describer: Arc<dyn Describer>,
    pub descriptions: Descriptions,
    /// Unix seconds; injected so tests drive time.
    pub clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    namespace_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Highest revision this process published per namespace (part of the revision floor).
    revisions: Mutex<HashMap<String, u64>>,
    /// What this process published last per namespace: where entries of pods that cannot
    /// describe themselves, and the rollout's progress, come from when the ConfigMap was lost.
    publications: Mutex<HashMap<String, network::publish::Publication>>,
    /// Publications by this process per namespace: a pass that observed before another
    /// published observes again under the lock.
    generations: Mutex<HashMap<String, u64>>,
    /// Template hash per `NymNode` (uid, generation): building and hashing a pod template
    /// is the costliest part of planning, and a spec only changes with its generation.
    template_hashes: Mutex<HashMap<(String, i64), String>>,
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        describer: Arc<dyn Describer>,
        clock: Arc<dyn Fn() -> i64 + Send + Sync>,
        instance: String,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(instance),
            },
        );
        Context {
            client,
            descriptions: Descriptions::new(settings.description_reuse),
            settings,
            recorder,
            metrics,
            describer,
            clock,
            namespace_locks: Mutex::default(),
            revisions: Mutex::default(),
            publications: Mutex::default(),
            generations: Mutex::default(),
            template_hashes: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    pub fn namespace_lock(&self, ns: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.namespace_locks
            .lock()
            .entry(ns.to_string())
            .or_default()
            .clone()
    }

    /// The highest revision this process published in `ns`.
    pub fn revision_floor(&self, ns: &str) -> u64 {
        self.revisions.lock().get(ns).copied().unwrap_or(0)
    }

    /// Records what was published in `ns` (its revision raises the floor).
    pub fn published(&self, ns: &str, publication: &network::publish::Publication) {
        let mut revisions = self.revisions.lock();
        let floor = revisions.entry(ns.to_string()).or_default();
        *floor = (*floor).max(publication.document.revision);
        self.publications
            .lock()
            .insert(ns.to_string(), publication.clone());
        *self.generations.lock().entry(ns.to_string()).or_default() += 1;
    }

    /// How many times this process published in `ns`.
    pub fn generation(&self, ns: &str) -> u64 {
        self.generations.lock().get(ns).copied().unwrap_or(0)
    }

    /// The hash of the pod template `nn`'s spec builds (a valid spec).
    pub fn template_hash(&self, nn: &NymNode) -> String {
        let key = (
            nn.metadata.uid.clone().unwrap_or_default(),
            nn.metadata.generation.unwrap_or_default(),
        );
        if key.0.is_empty() {
            return resources::desired_template_hash(nn, &self.settings.build);
        }
        let mut hashes = self.template_hashes.lock();
        if hashes.len() > 4096 {
            hashes.clear();
        }
        hashes
            .entry(key)
            .or_insert_with(|| resources::desired_template_hash(nn, &self.settings.build))
            .clone()
    }

    /// What this process published last in `ns`.
    pub fn last_published(&self, ns: &str) -> Option<network::publish::Publication> {
        self.publications.lock().get(ns).cloned()
    }

    /// Publishes an Event about `nn` (best effort: the API may be what failed).
    pub async fn publish_event(&self, nn: &NymNode, type_: EventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(event_note(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        self.metrics.event(
            &nn.namespace().unwrap_or_default(),
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            },
            reason,
        );
        if let Err(e) = self.recorder.publish(&event, &nn.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an Event");
        }
    }
}

/// Reconciles one `NymNode`. Errors are published as an Event and a `Degraded` condition
/// here (so tests see them in order), then backed off by [`error_policy`].
#[instrument(skip_all, fields(nymnode = %nn.name_any(), namespace = nn.namespace().unwrap_or_default()))]
pub async fn reconcile(nn: Arc<NymNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.reconcile_duration.start_timer();
    let result = reconcile_inner(&nn, &ctx).await;
    timer.observe_duration();
    let key = key(&nn);
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
            ctx.failures.lock().remove(&key);
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            *ctx.failures.lock().entry(key).or_default() += 1;
            tracing::warn!(error = %e, "reconcile failed");
            ctx.publish_event(&nn, EventType::Warning, e.reason(), &e.to_string())
                .await;
            // Best effort: the API may be what failed.
            let _ = status::degrade(&nn, &ctx, e.reason(), &e.to_string()).await;
        }
    }
    result
}

/// Backoff after a failed reconcile: 2 s doubling per consecutive failure, capped at 5 min.
pub fn error_policy(nn: Arc<NymNode>, _error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failures.lock().get(&key(&nn)).copied().unwrap_or(1);
    Action::requeue(backoff(failures))
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(
        2u64.saturating_mul(1 << failures.saturating_sub(1).min(8))
            .min(300),
    )
}

fn key(nn: &NymNode) -> String {
    format!("{}/{}", nn.namespace().unwrap_or_default(), nn.name_any())
}

async fn reconcile_inner(nn: &NymNode, ctx: &Context) -> Result<Action, Error> {
    let ns = nn
        .namespace()
        .ok_or_else(|| Error::NoNamespace(nn.name_any()))?;
    if nn.metadata.deletion_timestamp.is_some() {
        return finalize(nn, ctx, &ns).await;
    }
    add_finalizer(nn, ctx, &ns).await?;
    let (existing, invalid) = validate(nn, ctx, &ns).await?;
    match &invalid {
        // Nothing is applied from a spec the node would refuse; its pods keep running as
        // they are and keep their place in the topology. Said once, not every pass.
        Some(invalid) if !already_degraded(nn, "InvalidSpec", &invalid.0) => {
            ctx.publish_event(nn, EventType::Warning, "InvalidSpec", &invalid.0)
                .await;
        }
        Some(_) => {}
        None => apply_children(nn, ctx, &ns).await?,
    }
    let network = network::sync(ctx, &ns).await?;
    if invalid.is_none() {
        apply_statefulset(nn, ctx, &ns, &network, existing.as_ref()).await?;
        prune_env_configmaps(nn, ctx, &ns, &network).await?;
    }
    let inputs = status::Inputs {
        invalid: invalid.as_ref(),
        ready_timeout: ctx.settings.pod_ready_timeout,
        directory_key: ctx.settings.build.topology_signer.map(|k| k.to_base58()),
    };
    status::write(nn, ctx, status::status_for(nn, &network, &inputs)).await?;
    Ok(Action::requeue(requeue_after(ctx, &network)))
}

/// Whether the status already says `Degraded` for this reason and message.
fn already_degraded(nn: &NymNode, reason: &str, message: &str) -> bool {
    nn.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.status == "True"
                && c.reason == reason
                && c.message == message
        })
    })
}

/// Settled networks are re-checked rarely, busy ones often.
fn requeue_after(ctx: &Context, network: &Network) -> Duration {
    let settled = matches!(network.rollout, Rollout::Idle | Rollout::Halted { .. })
        && network.retirement.retiring.is_empty()
        && network
            .pods
            .iter()
            .all(|p| p.ready && p.serving && p.up_to_date);
    if settled {
        ctx.settings.idle_requeue
    } else {
        ctx.settings.busy_requeue
    }
}

/// The spec, checked as the node would check its env, and against what cannot change: a
/// storage change would be refused by the API server on every apply. Returns the existing
/// StatefulSet too, and why the spec is refused, if it is.
async fn validate(
    nn: &NymNode,
    ctx: &Context,
    ns: &str,
) -> Result<(Option<StatefulSet>, Option<InvalidSpec>), Error> {
    if let Err(invalid) = crd::validate_name(&nn.name_any()).and_then(|()| nn.spec.validate()) {
        return Ok((None, Some(invalid)));
    }
    let existing = Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
        .get_opt(&nn.name_any())
        .await?;
    let wanted = resources::statefulset(nn, &ctx.settings.build, nn.spec.replicas);
    let invalid = existing
        .as_ref()
        .filter(|sts| resources::storage_of(sts) != resources::storage_of(&wanted))
        .map(|_| InvalidSpec(STORAGE_IMMUTABLE.into()));
    Ok((existing, invalid))
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?;
    Ok(())
}

/// Everything but the StatefulSet, whose replicas the network decides.
async fn apply_children(nn: &NymNode, ctx: &Context, ns: &str) -> Result<(), Error> {
    let client = ctx.client.clone();
    // Before any pod that reads it: a pod whose Secret is missing never starts.
    crate::generated_secret::create_if_absent(
        &Api::<Secret>::namespaced(client.clone(), ns),
        &ctx.settings.build.metrics_token_secret,
        resources::METRICS_TOKEN_KEY,
        || {
            nym_node::keys::random_token()
                .map(String::into_bytes)
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let env = resources::env_configmap(nn, &ctx.settings.build);
    // Immutable and named by its content: one that exists holds exactly this env, so it is
    // written only when absent (or left by an earlier NymNode of the same name).
    let existing = configmaps.get_opt(&env.name_any()).await?;
    let ours = existing.is_some_and(|cm| {
        cm.owner_references()
            .iter()
            .any(|r| Some(&r.uid) == nn.metadata.uid.as_ref())
    });
    if !ours {
        apply(&configmaps, &env).await?;
    }
    apply(&services, &resources::headless_service(nn)).await?;
    let replica_services = resources::replica_services(nn);
    for s in &replica_services {
        apply(&services, s).await?;
    }
    // Per-replica Services no longer asked for (fewer replicas, exposure changed).
    let mine = services
        .list(&ListParams::default().labels(&format!("{NYMNODE_LABEL}={}", nn.name_any())))
        .await?;
    for s in mine {
        let name = s.name_any();
        if name != nn.name_any() && !replica_services.iter().any(|r| r.name_any() == name) {
            services.delete(&name, &DeleteParams::default()).await?;
        }
    }
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client, ns),
        &resources::pod_disruption_budget(nn),
    )
    .await
}

async fn apply_statefulset(
    nn: &NymNode,
    ctx: &Context,
    ns: &str,
    network: &Network,
    existing: Option<&StatefulSet>,
) -> Result<(), Error> {
    let replicas = network
        .replicas
        .get(&nn.name_any())
        .copied()
        .unwrap_or(nn.spec.replicas);
    let mut sts = resources::statefulset(nn, &ctx.settings.build, replicas);
    // The claims are the same (validate checked their values); keep them exactly as stored,
    // since the API server refuses any change of their text ("1024Mi" for "1Gi").
    if let Some(existing) = existing {
        sts.spec.volume_claim_templates = existing.spec.volume_claim_templates.clone();
    }
    apply(
        &Api::<StatefulSet>::namespaced(ctx.client.clone(), ns),
        &sts,
    )
    .await
}

/// Removes env ConfigMaps of earlier templates once no pod takes its env from them.
async fn prune_env_configmaps(
    nn: &NymNode,
    ctx: &Context,
    ns: &str,
    network: &Network,
) -> Result<(), Error> {
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let current = resources::env_configmap(nn, &ctx.settings.build).name_any();
    let prefix = format!("{}-env", nn.name_any());
    let empty = BTreeSet::new();
    let in_use = network.env_in_use.get(&nn.name_any()).unwrap_or(&empty);
    let mine = configmaps
        .list(&ListParams::default().labels(&format!(
            "{NYMNODE_LABEL}={},{}={}",
            nn.name_any(),
            resources::ROLE_LABEL,
            resources::ENV_ROLE
        )))
        .await?;
    for cm in mine {
        let name = cm.name_any();
        if name.starts_with(&prefix) && name != current && !in_use.contains(&name) {
            match configmaps.delete(&name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// JSON patch on the `NymNode`'s finalizers, guarded by a test of what was read (so a
/// concurrent change makes it fail rather than clobber).
async fn patch_finalizers(
    nn: &NymNode,
    ctx: &Context,
    ns: &str,
    ops: serde_json::Value,
) -> Result<(), Error> {
    let patch = serde_json::from_value(ops).map_err(|e| Error::State(e.to_string()))?;
    Api::<NymNode>::namespaced(ctx.client.clone(), ns)
        .patch(
            &nn.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await?;
    Ok(())
}

async fn add_finalizer(nn: &NymNode, ctx: &Context, ns: &str) -> Result<(), Error> {
    let finalizers = nn.finalizers();
    if finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let ops = if finalizers.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    patch_finalizers(nn, ctx, ns, ops).await
}

/// A `NymNode` being deleted: its pods are withdrawn from the topology (the network sync
/// retires every one of them); once nothing is routed to any, the finalizer goes and
/// garbage collection deletes the StatefulSet and its pods.
async fn finalize(nn: &NymNode, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let Some(index) = nn.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(Action::await_change());
    };
    let network = network::sync(ctx, ns).await?;
    if !network.released.contains(&nn.name_any()) {
        let inputs = status::Inputs {
            invalid: None,
            ready_timeout: ctx.settings.pod_ready_timeout,
            directory_key: ctx.settings.build.topology_signer.map(|k| k.to_base58()),
        };
        status::write(nn, ctx, status::status_for(nn, &network, &inputs)).await?;
        return Ok(Action::requeue(ctx.settings.busy_requeue));
    }
    let path = format!("/metadata/finalizers/{index}");
    patch_finalizers(
        nn,
        ctx,
        ns,
        serde_json::json!([
            {"op": "test", "path": path, "value": FINALIZER},
            {"op": "remove", "path": path},
        ]),
    )
    .await?;
    ctx.metrics.observe_degraded(ns, &nn.name_any(), None);
    tracing::info!("every pod withdrawn from the topology; finalizer removed");
    Ok(Action::await_change())
}

/// An Event's note within the 1024 bytes `events.k8s.io/v1` allows, cut at a character.
fn event_note(note: &str) -> String {
    const MAX_NOTE_BYTES: usize = 1024;
    let mut end = note.len().min(MAX_NOTE_BYTES);
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_in_1024_bytes_without_splitting_a_character() {
        let note = "é".repeat(600);
        let cut = event_note(&note);
        assert!(cut.len() <= 1024 && cut.len() > 1020);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(event_note("short"), "short");
    }
}
