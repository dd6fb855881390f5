//! The reconciler. For one `NymNode` it applies the children the builders produce, then
//! syncs the namespace's network (topology document and rollout, under one lock per
//! namespace so the whole network moves one pod at a time), then writes status. It only
//! orchestrates: what to build is `resources`, what to publish is `topology`, when to
//! replace a pod is `rollout`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use nym_node::http::description::SignedDescription;
use nym_node::topology::TopologyDocument;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{NymNode, NymNodeStatus, ReplicaStatus, ServiceType};
use crate::metrics::Metrics;
use crate::resources::{self, BuildSettings, NYMNODE_LABEL, TEMPLATE_HASH_LABEL, TOPOLOGY_KEY};
use crate::rollout::{self, Rollout};
use crate::topology::{self, Member};

/// Field manager of every server-side apply this operator makes.
pub const FIELD_MANAGER: &str = "nym-operator";
/// Annotation on the topology ConfigMap holding the rollout state.
pub const ROLLOUT_ANNOTATION: &str = "mixnet.nym-node.dev/rollout";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("topology: {0}")]
    Topology(#[from] topology::RenderError),
    #[error("signing the topology: {0}")]
    Sign(#[from] nym_node::topology::TopologyError),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// A short PascalCase reason for Events and conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(_) => "ApiError",
            Error::Topology(_) => "TopologyInvalid",
            Error::Sign(_) => "TopologyNotSigned",
            Error::NoNamespace(_) => "NoNamespace",
        }
    }
}

/// Fetches a pod's signed description (`GET /api/v1/description`).
pub trait Describer: Send + Sync {
    fn describe(
        &self,
        pod_ip: String,
        port: i32,
    ) -> BoxFuture<'static, Result<SignedDescription, String>>;
}

/// The real one: plain HTTP to the pod's IP, with a short deadline.
pub struct HttpDescriber {
    client: reqwest::Client,
}

impl HttpDescriber {
    pub fn new(timeout: Duration) -> Self {
        HttpDescriber {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Describer for HttpDescriber {
    fn describe(
        &self,
        pod_ip: String,
        port: i32,
    ) -> BoxFuture<'static, Result<SignedDescription, String>> {
        let client = self.client.clone();
        Box::pin(async move {
            let host = if pod_ip.contains(':') {
                format!("[{pod_ip}]")
            } else {
                pod_ip
            };
            let response = client
                .get(format!("http://{host}:{port}/api/v1/description"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("HTTP {}", response.status()));
            }
            response.json().await.map_err(|e| e.to_string())
        })
    }
}

/// The operator's settings that reconciling needs (see `config.rs` for their env names).
#[derive(Debug, Clone)]
pub struct Settings {
    pub build: BuildSettings,
    /// The directory key topology documents are signed with (its public half is
    /// `build.topology_signer`).
    pub directory: nym_node::keys::Identity,
    /// How long a replacement pod may take to become ready and serving.
    pub pod_ready_timeout: Duration,
    /// Requeue interval while pods are starting or a rollout runs.
    pub busy_requeue: Duration,
    /// Requeue interval of a settled network (descriptions are re-checked this often).
    pub idle_requeue: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        // Tests and tools: a fresh key. The operator itself loads NYM_OPERATOR_DIRECTORY_KEY.
        let directory = nym_node::keys::Identity::generate().expect("the OS provides randomness");
        Settings::with_directory(directory, BuildSettings::default())
    }
}

impl Settings {
    /// Signs with `directory` from now on (and names it to the nodes).
    pub fn sign_with(&mut self, directory: nym_node::keys::Identity) {
        self.build.topology_signer = Some(directory.public());
        self.directory = directory;
    }

    /// Settings signing with `directory`, which `build` then names to the nodes.
    pub fn with_directory(directory: nym_node::keys::Identity, build: BuildSettings) -> Self {
        Settings {
            build: BuildSettings {
                topology_signer: Some(directory.public()),
                ..build
            },
            directory,
            pod_ready_timeout: Duration::from_secs(600),
            busy_requeue: Duration::from_secs(5),
            idle_requeue: Duration::from_secs(60),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub describer: Arc<dyn Describer>,
    /// Unix seconds; injected so tests drive time.
    pub clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    namespace_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Highest revision published per namespace, so a stale read never lowers it.
    revisions: Mutex<HashMap<String, u64>>,
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
            settings,
            recorder,
            metrics,
            describer,
            clock,
            namespace_locks: Mutex::default(),
            revisions: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    fn namespace_lock(&self, ns: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.namespace_locks
            .lock()
            .entry(ns.to_string())
            .or_default()
            .clone()
    }
}

/// Reconciles one `NymNode`. Errors are published as an Event and a `Degraded` condition
/// here (so tests see them in order), then backed off by [`error_policy`].
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
            tracing::warn!(nymnode = %nn.name_any(), error = %e, "reconcile failed");
            publish(&ctx, &nn, EventType::Warning, e.reason(), &e.to_string()).await;
            // Best effort: the API may be what failed.
            let _ = degrade(&nn, &ctx, e.reason(), &e.to_string()).await;
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
    if let Err(invalid) = nn.spec.validate() {
        // Nothing is applied from a spec the node would refuse; the last good children stay.
        publish(ctx, nn, EventType::Warning, "InvalidSpec", &invalid.0).await;
        degrade(nn, ctx, "InvalidSpec", &invalid.0).await?;
        return Ok(Action::await_change());
    }
    apply_children(nn, ctx, &ns).await?;
    let lock = ctx.namespace_lock(&ns);
    let network = {
        let _guard = lock.lock().await;
        sync_network(ctx, &ns).await?
    };
    let status = status_for(nn, &network);
    write_status(nn, ctx, status).await?;
    let settled = matches!(network.rollout, Rollout::Idle | Rollout::Halted { .. })
        && network
            .pods
            .iter()
            .all(|p| p.ready && p.serving && p.up_to_date);
    Ok(Action::requeue(if settled {
        ctx.settings.idle_requeue
    } else {
        ctx.settings.busy_requeue
    }))
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

async fn apply_children(nn: &NymNode, ctx: &Context, ns: &str) -> Result<(), Error> {
    let client = ctx.client.clone();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply(
        &configmaps,
        &resources::env_configmap(nn, &ctx.settings.build),
    )
    .await?;
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
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        &resources::pod_disruption_budget(nn),
    )
    .await?;
    apply(
        &Api::<StatefulSet>::namespaced(client, ns),
        &resources::statefulset(nn, &ctx.settings.build),
    )
    .await?;
    Ok(())
}

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
    pub pods: Vec<PodReport>,
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Reads every pod of the namespace, renders and publishes the topology, advances the
/// rollout. Holds the namespace lock.
async fn sync_network(ctx: &Context, ns: &str) -> Result<Network, Error> {
    let client = ctx.client.clone();
    let nymnodes = Api::<NymNode>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            resources::MANAGED_BY.0,
            resources::MANAGED_BY.1
        )))
        .await?;
    let managed = format!("{}={}", resources::MANAGED_BY.0, resources::MANAGED_BY.1);
    let services = Api::<Service>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&managed))
        .await?;
    // Per-replica Services are named like their pods.
    let lb_addresses = load_balancer_addresses(&services.items);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let topology_name = &ctx.settings.build.topology_configmap;
    let current = configmaps.get_opt(topology_name).await?;
    let mut previous: Option<TopologyDocument> = current
        .as_ref()
        .and_then(|c| c.data.as_ref()?.get(TOPOLOGY_KEY))
        .and_then(|json| nym_node::topology::Topology::parse(json.as_bytes()).ok())
        .map(|t| t.document().clone());
    let state: Rollout = current
        .as_ref()
        .and_then(|c| c.metadata.annotations.as_ref()?.get(ROLLOUT_ANNOTATION))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    // Never publish below what this operator already published (a stale read).
    let floor = ctx.revisions.lock().get(ns).copied().unwrap_or(0);
    if let Some(p) = previous.as_mut() {
        p.revision = p.revision.max(floor);
    }

    let by_name: BTreeMap<String, &NymNode> = nymnodes
        .iter()
        .filter(|n| n.spec.validate().is_ok())
        .map(|n| (n.name_any(), n))
        .collect();
    let hashes: BTreeMap<String, String> = by_name
        .iter()
        .map(|(name, n)| {
            (
                name.clone(),
                resources::desired_template_hash(n, &ctx.settings.build),
            )
        })
        .collect();
    let desired: BTreeMap<String, usize> = by_name
        .iter()
        .map(|(name, n)| (name.clone(), n.spec.replicas.max(0) as usize))
        .collect();
    let settle = by_name
        .values()
        .map(|n| n.spec.node_config().max_packet_delay.get())
        .max()
        .unwrap_or_default();

    let mut members = Vec::new();
    let mut states = Vec::new();
    let mut images = BTreeMap::new();
    for pod in &pods {
        let Some(owner) = pod.labels().get(NYMNODE_LABEL).and_then(|o| by_name.get(o)) else {
            continue;
        };
        let name = pod.name_any();
        let ready = pod_ready(pod);
        let description = match pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
            Some(ip) if ready => match ctx
                .describer
                .describe(ip, owner.spec.exposure.http_port)
                .await
            {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::info!(pod = %name, error = %e, "description not available");
                    None
                }
            },
            _ => None,
        };
        let host = resources::pod_host(owner, &name, &ctx.settings.build);
        let e = &owner.spec.exposure;
        let member = Member {
            pod: name.clone(),
            mode: owner.spec.mode,
            layer: owner.spec.layer,
            ready,
            description,
            mixnet_address: format!("{host}:{}", e.mixnet_port),
            http_address: format!("{host}:{}", e.http_port),
            client_address: owner
                .spec
                .mode
                .is_gateway()
                .then(|| client_address(owner, &host, lb_addresses.get(&name))),
        };
        let verified = member.verified();
        if member.ready && verified.is_none() {
            ctx.metrics.descriptions_rejected.inc();
        }
        let entry = previous
            .as_ref()
            .and_then(|d| d.nodes.iter().find(|n| n.name == name));
        states.push(rollout::PodState {
            name: name.clone(),
            nymnode: owner.name_any(),
            uid: pod.uid().unwrap_or_default(),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            up_to_date: pod.labels().get(TEMPLATE_HASH_LABEL) == hashes.get(&owner.name_any()),
            serving: entry.is_some_and(|e| e.serving),
            reported_revision: verified.map(|d| d.description.topology_revision),
        });
        images.insert(
            name.clone(),
            pod.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone()),
        );
        members.push(member);
    }

    let snapshot = rollout::Snapshot {
        pods: &states,
        desired: &desired,
        template_hashes: &hashes,
        now: (ctx.clock)(),
        settle,
        ready_timeout: ctx.settings.pod_ready_timeout,
    };
    let (mut next, action) = rollout::step(&state, &snapshot);
    let document = topology::render(previous.as_ref(), &members, next.withdrawn())?;
    if let Rollout::Withdrawing {
        revision: revision @ None,
        ..
    } = &mut next
    {
        *revision = Some(document.revision);
    }
    if previous.as_ref() != Some(&document) || next != state || current.is_none() {
        let owners: Vec<OwnerReference> = nymnodes
            .iter()
            .filter_map(|n| {
                let mut r = n.controller_owner_ref(&())?;
                // Shared by the namespace's NymNodes: deleted with the last of them.
                r.controller = None;
                r.block_owner_deletion = None;
                Some(r)
            })
            .collect();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(topology_name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([(
                    resources::MANAGED_BY.0.into(),
                    resources::MANAGED_BY.1.into(),
                )])),
                annotations: Some(BTreeMap::from([(
                    ROLLOUT_ANNOTATION.to_string(),
                    serde_json::to_string(&next).unwrap_or_default(),
                )])),
                owner_references: (!owners.is_empty()).then_some(owners),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                TOPOLOGY_KEY.to_string(),
                String::from_utf8(nym_node::topology::sign_document(
                    &document,
                    &ctx.settings.directory,
                )?)
                .unwrap_or_default(),
            )])),
            ..Default::default()
        };
        apply(&configmaps, &cm).await?;
        if previous.as_ref().map(|p| p.revision) != Some(document.revision) {
            tracing::info!(
                namespace = ns,
                revision = document.revision,
                nodes = document.nodes.len(),
                "topology published"
            );
        }
        if next != state {
            tracing::info!(namespace = ns, rollout = %next.describe(), "rollout");
        }
    }
    ctx.revisions
        .lock()
        .insert(ns.to_string(), document.revision);
    ctx.metrics.observe_network(ns, &document, &next);

    if let Some(rollout::Action::DeletePod { name, uid }) = action {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match Api::<Pod>::namespaced(client, ns).delete(&name, &dp).await {
            Ok(_) => {
                ctx.metrics.pods_replaced.inc();
                if let Some(owner) = next.nymnode().and_then(|n| by_name.get(n)) {
                    publish(ctx, owner, EventType::Normal, "PodReplaced", &format!(
                        "deleted {name} for its upgrade: it was out of the topology and every node had stopped routing to it"
                    ))
                    .await;
                }
            }
            // Already gone, or the name belongs to a replacement now.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }

    let pods = states
        .iter()
        .map(|s| PodReport {
            name: s.name.clone(),
            nymnode: s.nymnode.clone(),
            ready: s.ready,
            serving: document.nodes.iter().any(|n| n.name == s.name && n.serving),
            up_to_date: s.up_to_date,
            image: images.get(&s.name).cloned().flatten(),
            identity_key: document
                .nodes
                .iter()
                .find(|n| n.name == s.name)
                .map(|n| n.identity_key.to_string()),
        })
        .collect();
    Ok(Network {
        document,
        rollout: next,
        pods,
    })
}

/// Where clients reach a gateway pod: the address its per-replica LoadBalancer Service was
/// given, once the cloud assigned one; otherwise (and for other exposure types) the pod's
/// stable in-cluster name.
fn client_address(nn: &NymNode, host: &str, lb: Option<&String>) -> String {
    match lb {
        Some(addr) if nn.spec.exposure.service_type == ServiceType::LoadBalancer => {
            format!("{addr}:{}", nn.spec.exposure.client_port)
        }
        _ => format!("{host}:{}", nn.spec.exposure.client_port),
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

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

fn now_time(ctx_clock: i64) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(ctx_clock)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Status from a sync; conditions keep their `lastTransitionTime` while their status holds.
fn status_for(nn: &NymNode, network: &Network) -> NymNodeStatus {
    let name = nn.name_any();
    let mine: Vec<&PodReport> = network.pods.iter().filter(|p| p.nymnode == name).collect();
    let ready = mine.iter().filter(|p| p.ready && p.serving).count() as i32;
    let desired = nn.spec.replicas.max(0);
    let outdated = mine.iter().filter(|p| !p.up_to_date).count();
    let generation = nn.metadata.generation;
    let placeholder = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let ours = network.rollout.nymnode() == Some(name.as_str());
    let (progressing, p_reason, p_message) = match &network.rollout {
        Rollout::Withdrawing { .. } | Rollout::Replacing { .. } if ours => {
            (true, "Upgrading", network.rollout.describe())
        }
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
    };
    let (degraded, d_reason, d_message) = match &network.rollout {
        Rollout::Halted { reason, .. } if ours => (true, "RolloutStuck", reason.clone()),
        _ => (false, "AsExpected", "no error".to_string()),
    };
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
            &placeholder,
        ),
        condition(
            "Progressing",
            progressing,
            p_reason,
            p_message,
            generation,
            &placeholder,
        ),
        condition(
            "Degraded",
            degraded,
            d_reason,
            d_message,
            generation,
            &placeholder,
        ),
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
/// not trigger reconciles (the controller filters on generation), and unchanged status is
/// not written at all.
async fn write_status(nn: &NymNode, ctx: &Context, mut status: NymNodeStatus) -> Result<(), Error> {
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

/// Sets `Degraded=True` with a reason, keeping the rest of the status.
async fn degrade(nn: &NymNode, ctx: &Context, reason: &str, message: &str) -> Result<(), Error> {
    let mut status = nn.status.clone().unwrap_or_default();
    let generation = nn.metadata.generation;
    let placeholder = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    status.conditions.retain(|c| c.type_ != "Degraded");
    status.conditions.push(condition(
        "Degraded",
        true,
        reason,
        message.to_string(),
        generation,
        &placeholder,
    ));
    status.target_image = Some(nn.spec.image.clone());
    write_status(nn, ctx, status).await
}

async fn publish(ctx: &Context, nn: &NymNode, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &nn.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::crd::{Exposure, NodeMode, NymNodeSpec, Storage};
    use crate::fixtures::{Cluster, NS};

    fn nymnode(name: &str, mode: NodeMode, layer: Option<u8>, replicas: i32) -> NymNode {
        let mut nn = NymNode::new(
            name,
            NymNodeSpec {
                mode,
                layer,
                replicas,
                image: "nym-node:1.0".into(),
                // Small delays keep the test's clock short; the rollout waits this long.
                env: BTreeMap::from([("NYM_NODE_MAX_PACKET_DELAY".into(), "3s".into())]),
                resources: None,
                exposure: Exposure::default(),
                storage: Storage::default(),
            },
        );
        nn.metadata.namespace = Some(NS.into());
        nn
    }

    fn network() -> Vec<NymNode> {
        vec![
            nymnode("mix-l1", NodeMode::Mixnode, Some(1), 2),
            nymnode("mix-l2", NodeMode::Mixnode, Some(2), 2),
            nymnode("mix-l3", NodeMode::Mixnode, Some(3), 2),
            nymnode("entry", NodeMode::EntryGateway, None, 1),
            nymnode("exit", NodeMode::ExitGateway, None, 1),
        ]
    }

    async fn reconcile_all(cluster: &Cluster, ctx: &Arc<Context>) {
        for name in cluster.nymnode_names() {
            let nn = Arc::new(cluster.nymnode(&name));
            reconcile(nn, ctx.clone()).await.unwrap();
        }
    }

    fn condition<'a>(nn: &'a NymNode, type_: &str) -> &'a Condition {
        nn.status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[tokio::test]
    async fn create_applies_children_in_order_then_topology_then_status() {
        let (cluster, ctx) = Cluster::start(2);
        cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 2));
        reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
            .await
            .unwrap();
        let writes: Vec<String> = cluster
            .take_log()
            .into_iter()
            .filter(|r| r.method != "GET")
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(
            writes,
            [
                format!("PATCH /api/v1/namespaces/{NS}/configmaps/mix-l1-env"),
                format!("PATCH /api/v1/namespaces/{NS}/services/mix-l1"),
                format!("PATCH /apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/mix-l1"),
                format!("PATCH /apis/apps/v1/namespaces/{NS}/statefulsets/mix-l1"),
                format!("PATCH /api/v1/namespaces/{NS}/configmaps/nym-topology"),
                format!(
                    "PATCH /apis/mixnet.nym-node.dev/v1alpha1/namespaces/{NS}/nymnodes/mix-l1/status"
                ),
            ]
        );
        let nn = cluster.nymnode("mix-l1");
        assert_eq!(condition(&nn, "Ready").status, "False");
        assert_eq!(condition(&nn, "Progressing").status, "True");
        assert_eq!(condition(&nn, "Progressing").reason, "Scaling");
        assert_eq!(condition(&nn, "Degraded").status, "False");
        assert_eq!(nn.status.as_ref().unwrap().observed_generation, Some(1));
        // The StatefulSet is OnDelete and owned by the NymNode (deleting it cascades).
        let sts = cluster
            .get(
                &format!("/apis/apps/v1/namespaces/{NS}/statefulsets"),
                "mix-l1",
            )
            .unwrap();
        assert_eq!(sts["spec"]["updateStrategy"]["type"], "OnDelete");
        assert_eq!(sts["metadata"]["ownerReferences"][0]["kind"], "NymNode");
        assert_eq!(sts["metadata"]["ownerReferences"][0]["controller"], true);
        // The topology is signed with the operator's directory key, and the nodes are told
        // to accept nothing else.
        let signer = ctx.settings.directory.public();
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
        let env = cluster
            .get(&format!("/api/v1/namespaces/{NS}/configmaps"), "mix-l1-env")
            .unwrap();
        assert_eq!(env["data"]["NYM_NODE_TOPOLOGY_SIGNER"], signer.to_base58());

        // Pods come up; the next reconciles list them serving and report Ready.
        for _ in 0..3 {
            cluster.tick();
            reconcile_all(&cluster, &ctx).await;
        }
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
        reconcile_all(&cluster, &ctx).await;
        assert!(
            cluster
                .take_log()
                .iter()
                .filter(|r| r.method != "GET")
                .all(|r| !r.path.ends_with("/status") && !r.path.ends_with("nym-topology"))
        );
    }

    #[tokio::test]
    async fn forged_description_is_left_out_and_revision_moves_only_on_change() {
        let (cluster, ctx) = Cluster::start(1);
        cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 4));
        reconcile_all(&cluster, &ctx).await;
        cluster.tick();
        cluster.forge("mix-l1-3");
        cluster.tick();
        reconcile_all(&cluster, &ctx).await;
        let doc = cluster.topology().unwrap();
        let names: Vec<&str> = doc.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["mix-l1-0", "mix-l1-1", "mix-l1-2"]);
        assert!(doc.nodes.iter().all(|n| n.serving));
        let revision = doc.revision;
        for _ in 0..3 {
            cluster.tick();
            reconcile_all(&cluster, &ctx).await;
        }
        assert_eq!(
            cluster.topology().unwrap().revision,
            revision,
            "no change, no new revision"
        );
        // Scaling down removes a node: a new, higher revision.
        cluster.edit_nymnode("mix-l1", |nn| nn.spec.replicas = 2);
        reconcile_all(&cluster, &ctx).await;
        cluster.tick();
        reconcile_all(&cluster, &ctx).await;
        let doc = cluster.topology().unwrap();
        assert!(doc.revision > revision);
        assert_eq!(doc.nodes.len(), 2);
    }

    /// Drives the network until `done` or the step budget runs out; checks after every step
    /// that at most one pod is out of service.
    async fn drive(
        cluster: &Cluster,
        ctx: &Arc<Context>,
        steps: usize,
        done: impl Fn(&Cluster) -> bool,
    ) -> bool {
        for _ in 0..steps {
            reconcile_all(cluster, ctx).await;
            let out = cluster.out_of_service();
            assert!(out.len() <= 1, "more than one pod out of service: {out:?}");
            cluster.tick();
            let out = cluster.out_of_service();
            assert!(out.len() <= 1, "more than one pod out of service: {out:?}");
            if done(cluster) {
                return true;
            }
        }
        false
    }

    fn all_on(cluster: &Cluster, image: &str) -> bool {
        let pods = cluster.pods();
        pods.len() == 8
            && pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == image)
            && cluster.out_of_service().is_empty()
    }

    async fn settled_network() -> (Cluster, Arc<Context>) {
        let (cluster, ctx) = Cluster::start(3);
        for nn in network() {
            cluster.insert_nymnode(&nn);
        }
        for _ in 0..8 {
            reconcile_all(&cluster, &ctx).await;
            cluster.tick();
        }
        reconcile_all(&cluster, &ctx).await;
        assert!(
            cluster.out_of_service().is_empty(),
            "{:?}",
            cluster.out_of_service()
        );
        assert_eq!(cluster.topology().unwrap().nodes.len(), 8);
        (cluster, ctx)
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
            drive(&cluster, &ctx, 400, |c| all_on(c, "nym-node:1.1")).await,
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
        reconcile_all(&cluster, &ctx).await;
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
            cluster.edit_nymnode(&name, |nn| nn.spec.image = "nym-node:broken".into());
        }
        let halted = drive(&cluster, &ctx, 200, |c| {
            c.nymnode("entry").status.is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Degraded" && c.status == "True" && c.reason == "RolloutStuck"
                })
            })
        })
        .await;
        assert!(halted, "no Degraded condition");
        assert_eq!(cluster.deletions().len(), 1);
        // No further pod is touched while the spec stays as it is.
        assert!(!drive(&cluster, &ctx, 60, |c| c.deletions().len() > 1).await);
        let events: Vec<_> = cluster
            .take_log()
            .into_iter()
            .filter(|r| r.path.ends_with("/events"))
            .collect();
        assert!(events.iter().any(|e| e.body["reason"] == "PodReplaced"));
    }

    #[tokio::test]
    async fn api_errors_back_off_and_surface_as_event_and_condition() {
        let (cluster, ctx) = Cluster::start(1);
        cluster.insert_nymnode(&nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1));
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
        cluster.fail_next("PATCH", "/configmaps/mix-l1-env", 500);
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
        let (cluster, ctx) = Cluster::start(1);
        let mut nn = nymnode("mix-l1", NodeMode::Mixnode, Some(1), 1);
        nn.spec
            .env
            .insert("NYM_NODE_DRAIN_GRACE".into(), "forever".into());
        cluster.insert_nymnode(&nn);
        reconcile(Arc::new(cluster.nymnode("mix-l1")), ctx.clone())
            .await
            .unwrap();
        let log = cluster.take_log();
        assert!(
            !log.iter().any(|r| r.path.contains("/statefulsets/")),
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
}
