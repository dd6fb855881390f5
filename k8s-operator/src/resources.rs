//! Pure builders: every object the operator applies for a `NymNode`, as a function of the
//! resource and the operator's settings. No API calls here, so each builder is unit-tested
//! and every object is validated against the Kubernetes schemas without a cluster
//! (`nym-operator render` prints them).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::{NymNode, ServiceType};
use crate::quantity;

/// Label naming the `NymNode` a child object belongs to.
pub const NYMNODE_LABEL: &str = "mixnet.nym-node.dev/nymnode";
/// Label on the env ConfigMaps (value [`ENV_ROLE`]), so old ones can be found and removed.
pub const ROLE_LABEL: &str = "mixnet.nym-node.dev/role";
pub const ENV_ROLE: &str = "env";
/// Pod label with the hash of the pod template it was created from; a pod whose hash
/// differs from its `NymNode`'s current one is due for an upgrade.
pub const TEMPLATE_HASH_LABEL: &str = "mixnet.nym-node.dev/template-hash";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "nym-operator");
/// A mix node pod's layer, from the template it runs.
pub const LAYER_LABEL: &str = "mixnet.nym-node.dev/layer";
/// Where the pod's volume is mounted; keys and the mailbox live under it.
pub const DATA_MOUNT: &str = "/var/lib/nym-node";
/// Where the topology ConfigMap is mounted; the node reads `topology.json` from it.
pub const TOPOLOGY_MOUNT: &str = "/etc/nym-node/topology";
pub const TOPOLOGY_KEY: &str = "topology.json";
/// Name of the node's container in every pod.
pub const NODE_CONTAINER: &str = "nym-node";
/// The image's non-root user (Dockerfile); the volume is group-owned by it.
pub const NODE_UID: i64 = 10001;

/// Operator settings the builders need.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// Name of the namespace's topology ConfigMap.
    pub topology_configmap: String,
    /// Cluster DNS domain, for the pods' stable names.
    pub cluster_domain: String,
    /// The directory key the operator signs topology documents with: every node is
    /// configured to accept only documents it signed.
    pub topology_signer: Option<nym_node::keys::KeyBytes>,
    /// The Secret (key [`METRICS_TOKEN_KEY`]) whose token every node serves `/metrics` to.
    pub metrics_token_secret: String,
}

/// Key of the token in the metrics token Secret.
pub const METRICS_TOKEN_KEY: &str = "token";

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            topology_configmap: "nym-topology".into(),
            cluster_domain: "cluster.local".into(),
            topology_signer: None,
            metrics_token_secret: "nym-node-metrics-token".into(),
        }
    }
}

fn namespace(nn: &NymNode) -> String {
    nn.namespace().unwrap_or_else(|| "default".into())
}

/// Labels every child object carries; the selector subset is what never changes.
pub fn selector_labels(nn: &NymNode) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "nym-node".into()),
        ("app.kubernetes.io/instance".into(), nn.name_any()),
        (NYMNODE_LABEL.into(), nn.name_any()),
    ])
}

pub fn labels(nn: &NymNode) -> BTreeMap<String, String> {
    let mut l = selector_labels(nn);
    l.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    l.insert(
        "app.kubernetes.io/component".into(),
        nn.spec.mode.as_str().into(),
    );
    if let Some(layer) = nn.spec.layer {
        l.insert(LAYER_LABEL.into(), layer.to_string());
    }
    l
}

/// The `NymNode` as controller of a child, so deleting it deletes the child. Without
/// `blockOwnerDeletion`: setting it needs update rights on `nymnodes/finalizers`, and the
/// operator's own finalizer already holds the `NymNode` until its pods are withdrawn.
pub fn owner(nn: &NymNode) -> Vec<OwnerReference> {
    nn.controller_owner_ref(&())
        .map(|r| OwnerReference {
            block_owner_deletion: None,
            ..r
        })
        .into_iter()
        .collect()
}

fn meta(nn: &NymNode, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(nn)),
        labels: Some(labels(nn)),
        owner_references: Some(owner(nn)),
        ..Default::default()
    }
}

/// Name of the env ConfigMap holding `data`: the `NymNode`'s name and the data's hash, so
/// a change of the env is a new ConfigMap, a new pod template and a rollout.
fn env_configmap_name(nn: &NymNode, data: &BTreeMap<String, String>) -> String {
    let json = serde_json::to_vec(data).unwrap_or_default();
    format!("{}-env-{}", nn.name_any(), short_hash(&json))
}

/// Ten hex digits of SHA-256: names and labels that change exactly when their input does.
fn short_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The stable DNS name of a pod behind the headless Service.
pub fn pod_host(nn: &NymNode, pod: &str, settings: &BuildSettings) -> String {
    format!(
        "{pod}.{}.{}.svc.{}",
        nn.name_any(),
        namespace(nn),
        settings.cluster_domain
    )
}

/// The node's environment: the operator's own settings, then the spec's overrides. Immutable
/// and named by its content: a pod only ever sees the env of the template it was created
/// from (a container restart cannot pick up settings its pod was not rolled for), and old
/// ones are removed once no pod uses them.
pub fn env_configmap(nn: &NymNode, settings: &BuildSettings) -> ConfigMap {
    let data = env_data(nn, settings);
    let mut metadata = meta(nn, env_configmap_name(nn, &data));
    if let Some(labels) = metadata.labels.as_mut() {
        labels.insert(ROLE_LABEL.into(), ENV_ROLE.into());
    }
    ConfigMap {
        metadata,
        immutable: Some(true),
        data: Some(data),
        ..Default::default()
    }
}

fn env_data(nn: &NymNode, settings: &BuildSettings) -> BTreeMap<String, String> {
    let mut data = BTreeMap::from([
        (
            "NYM_NODE_MODE".to_string(),
            nn.spec.mode.as_str().to_string(),
        ),
        (
            "NYM_NODE_TOPOLOGY".into(),
            format!("{TOPOLOGY_MOUNT}/{TOPOLOGY_KEY}"),
        ),
        ("NYM_NODE_KEYS_DIR".into(), format!("{DATA_MOUNT}/keys")),
        ("NYM_NODE_DATA_DIR".into(), format!("{DATA_MOUNT}/data")),
        (
            "NYM_NODE_MIXNET_BIND".into(),
            format!("0.0.0.0:{}", nn.spec.exposure.mixnet_port),
        ),
        (
            "NYM_NODE_HTTP_BIND".into(),
            format!("0.0.0.0:{}", nn.spec.exposure.http_port),
        ),
        (
            "NYM_NODE_CLIENT_BIND".into(),
            format!("0.0.0.0:{}", nn.spec.exposure.client_port),
        ),
        // ConfigMap volumes update within about a minute; re-read often enough that a
        // withdrawal reaches every node well within the rollout's wait.
        ("NYM_NODE_TOPOLOGY_REFRESH".into(), "10s".into()),
        ("NYM_NODE_LOG_FORMAT".into(), "json".into()),
    ]);
    if let Some(signer) = &settings.topology_signer {
        data.insert("NYM_NODE_TOPOLOGY_SIGNER".into(), signer.to_base58());
    }
    data.extend(nn.spec.env.clone());
    data
}

fn ports(nn: &NymNode) -> Vec<ServicePort> {
    let e = &nn.spec.exposure;
    let port = |name: &str, p: i32| ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![port("mixnet", e.mixnet_port), port("http", e.http_port)];
    if nn.spec.mode.is_gateway() {
        ports.push(port("client", e.client_port));
    }
    ports
}

/// The headless Service that gives every pod a stable DNS name. Not-ready pods keep their
/// names (`publishNotReadyAddresses`), so packets already routed to a draining node arrive.
pub fn headless_service(nn: &NymNode) -> Service {
    Service {
        metadata: meta(nn, nn.name_any()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(nn)),
            ports: Some(ports(nn)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn replica_service_name(nn: &NymNode, ordinal: i32) -> String {
    format!("{}-{ordinal}", nn.name_any())
}

/// One Service per pod for the public ports (mixnet, and the client API of gateways), when
/// `exposure.type` asks for them.
pub fn replica_services(nn: &NymNode) -> Vec<Service> {
    let service_type = match nn.spec.exposure.service_type {
        ServiceType::None => return Vec::new(),
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    (0..nn.spec.replicas.max(0))
        .map(|i| {
            let name = replica_service_name(nn, i);
            let mut metadata = meta(nn, name.clone());
            if !nn.spec.exposure.annotations.is_empty() {
                metadata.annotations = Some(nn.spec.exposure.annotations.clone());
            }
            let mut selector = selector_labels(nn);
            selector.insert("statefulset.kubernetes.io/pod-name".into(), name);
            Service {
                metadata,
                spec: Some(ServiceSpec {
                    type_: Some(service_type.into()),
                    selector: Some(selector),
                    ports: Some(
                        ports(nn)
                            .into_iter()
                            .filter(|p| p.name.as_deref() != Some("http"))
                            .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect()
}

/// Voluntary disruptions (node drains) take at most one pod of this group at a time.
pub fn pod_disruption_budget(nn: &NymNode) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(nn, nn.name_any()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            // Unready pods (a node waiting for its topology) can always be evicted, so a
            // node drain never hangs on them.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(nn)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn data_mount() -> VolumeMount {
    VolumeMount {
        name: "data".into(),
        mount_path: DATA_MOUNT.into(),
        ..Default::default()
    }
}

fn container_ports(nn: &NymNode) -> Vec<ContainerPort> {
    let e = &nn.spec.exposure;
    let port = |name: &str, number: i32| ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![port("mixnet", e.mixnet_port), port("http", e.http_port)];
    if nn.spec.mode.is_gateway() {
        ports.push(port("client", e.client_port));
    }
    ports
}

/// The pod's env: its template's own immutable ConfigMap (the node and keygen both read it:
/// the rotation interval the first keys are made for is the node's).
fn env_from(nn: &NymNode, settings: &BuildSettings) -> Vec<EnvFromSource> {
    vec![EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource {
            name: env_configmap(nn, settings)
                .metadata
                .name
                .unwrap_or_default(),
            optional: Some(false),
        }),
        ..Default::default()
    }]
}

/// Non-root (the image's user), and group-owned volumes whose key files stay 0600.
fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NODE_UID),
        run_as_group: Some(NODE_UID),
        fs_group: Some(NODE_UID),
        // Only on a fresh volume: a recursive change on every start would make the 0600 key
        // files group-readable, and the node refuses such keys.
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Keys are generated inside the pod, onto its own volume, only when absent: private keys
/// never leave the pod.
fn keygen_container(nn: &NymNode, settings: &BuildSettings) -> Container {
    Container {
        name: "keygen".into(),
        image: Some(nn.spec.image.clone()),
        args: Some(vec![
            "keygen".into(),
            "--if-missing".into(),
            "--dir".into(),
            format!("{DATA_MOUNT}/keys"),
        ]),
        env_from: Some(env_from(nn, settings)),
        resources: Some(small_resources()),
        volume_mounts: Some(vec![data_mount()]),
        security_context: Some(restricted_container_security()),
        ..Default::default()
    }
}

/// What keygen needs (namespaces with a ResourceQuota refuse containers that name none).
fn small_resources() -> k8s_openapi::api::core::v1::ResourceRequirements {
    let quantity = |q: &str| Quantity(q.into());
    k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), quantity("10m")),
            ("memory".to_string(), quantity("16Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), quantity("64Mi"))])),
        ..Default::default()
    }
}

fn node_container(nn: &NymNode, settings: &BuildSettings) -> Container {
    // Liveness and readiness wait until /livez first answers: loading a large replay filter
    // at start can take a while.
    let startup = http_probe("/livez", 5, 60);
    Container {
        name: NODE_CONTAINER.into(),
        image: Some(nn.spec.image.clone()),
        args: Some(vec!["run".into()]),
        env_from: Some(env_from(nn, settings)),
        env: Some(vec![
            EnvVar {
                name: "NYM_NODE_ID".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            // From a Secret, never the env ConfigMap: whoever reads ConfigMaps must not
            // read metrics that locate senders' gateways.
            EnvVar {
                name: "NYM_NODE_METRICS_TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: settings.metrics_token_secret.clone(),
                        key: METRICS_TOKEN_KEY.into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ports: Some(container_ports(nn)),
        startup_probe: Some(startup),
        liveness_probe: Some(http_probe("/livez", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 1)),
        resources: nn.spec.resources.clone(),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![
            data_mount(),
            VolumeMount {
                name: "topology".into(),
                mount_path: TOPOLOGY_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

fn volumes(settings: &BuildSettings) -> Vec<Volume> {
    vec![
        Volume {
            name: "topology".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: settings.topology_configmap.clone(),
                // The operator writes it on its first pass; until then the node simply is
                // not ready.
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ]
}

/// The pod template, without its template-hash label (which is computed over it).
fn pod_template(nn: &NymNode, settings: &BuildSettings) -> PodTemplateSpec {
    // The pod outlives its own drain: SIGTERM, the drain grace, then flushing egress.
    let drain = nn.spec.node_config().drain_grace.get().as_secs() as i64;
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(nn)),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(drain + 30),
            security_context: Some(pod_security_context()),
            init_containers: Some(vec![keygen_container(nn, settings)]),
            containers: vec![node_container(nn, settings)],
            volumes: Some(volumes(settings)),
            ..Default::default()
        }),
    }
}

/// Hash of a pod template: what distinguishes an up-to-date pod from one due for upgrade.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    // Serialising k8s-openapi types cannot fail.
    let json = serde_json::to_vec(template).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The StatefulSet with `replicas` pods (the spec's count, or more while pods beyond it
/// are still being withdrawn from the topology). `OnDelete`: the operator, not the
/// StatefulSet controller, decides when each pod is replaced (after withdrawing it).
pub fn statefulset(nn: &NymNode, settings: &BuildSettings, replicas: i32) -> StatefulSet {
    let mut template = pod_template(nn, settings);
    let hash = template_hash(&template);
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.insert(TEMPLATE_HASH_LABEL.into(), hash);
    }
    let mut volume_request = BTreeMap::new();
    volume_request.insert(
        "storage".to_string(),
        Quantity(nn.spec.storage.size.clone()),
    );
    StatefulSet {
        metadata: meta(nn, nn.name_any()),
        spec: StatefulSetSpec {
            replicas: Some(replicas.max(0)),
            service_name: Some(nn.name_any()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(nn)),
                ..Default::default()
            },
            template,
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    labels: Some(selector_labels(nn)),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: nn.spec.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(volume_request),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A volume claim's size by value, or its text when unreadable.
pub type ClaimSize = Result<quantity::Quantity, String>;

/// What a StatefulSet's volume claim asks for: its size (by value: the API server stores a
/// canonical spelling, not the one written) and storage class.
pub fn storage_of(sts: &StatefulSet) -> Vec<(Option<ClaimSize>, Option<String>)> {
    sts.spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|claim| {
            let spec = claim.spec.as_ref();
            let size = spec
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map(|q| quantity::Quantity::comparable(&q.0));
            (size, spec.and_then(|s| s.storage_class_name.clone()))
        })
        .collect()
}

/// The template hash pods of this `NymNode` must carry to be up to date.
pub fn desired_template_hash(nn: &NymNode, settings: &BuildSettings) -> String {
    template_hash(&pod_template(nn, settings))
}

/// Every object for one `NymNode`, in the order they are applied.
pub fn all(nn: &NymNode, settings: &BuildSettings) -> Vec<serde_json::Value> {
    let mut out = vec![
        serde_json::to_value(env_configmap(nn, settings)),
        serde_json::to_value(headless_service(nn)),
    ];
    out.extend(replica_services(nn).into_iter().map(serde_json::to_value));
    out.push(serde_json::to_value(pod_disruption_budget(nn)));
    out.push(serde_json::to_value(statefulset(
        nn,
        settings,
        nn.spec.replicas,
    )));
    // k8s-openapi writes `apiVersion` and `kind` itself; serialising these cannot fail.
    out.into_iter().filter_map(Result::ok).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Exposure, NodeMode, NymNodeSpec, Storage};

    fn nymnode(env: &[(&str, &str)]) -> NymNode {
        let mut nn = NymNode::new(
            "mix-l1",
            NymNodeSpec {
                mode: NodeMode::Mixnode,
                layer: Some(1),
                replicas: 2,
                image: "nym-node:1".into(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                resources: None,
                exposure: Exposure::default(),
                storage: Storage::default(),
            },
        );
        nn.metadata.namespace = Some("mixnet".into());
        nn.metadata.uid = Some("uid-1".into());
        nn
    }

    #[test]
    fn an_env_change_is_a_new_immutable_configmap_and_a_new_template() {
        let settings = BuildSettings::default();
        let before = nymnode(&[]);
        let after = nymnode(&[("NYM_NODE_CLIENT_RATE", "100")]);
        let (a, b) = (
            env_configmap(&before, &settings),
            env_configmap(&after, &settings),
        );
        assert_eq!(a.immutable, Some(true));
        assert_ne!(a.metadata.name, b.metadata.name);
        assert!(
            a.metadata
                .name
                .as_deref()
                .unwrap()
                .starts_with("mix-l1-env-")
        );
        assert_ne!(
            desired_template_hash(&before, &settings),
            desired_template_hash(&after, &settings),
            "a spec.env change must roll out"
        );
        // The same env is the same ConfigMap and the same template.
        assert_eq!(
            desired_template_hash(&before, &settings),
            desired_template_hash(&nymnode(&[]), &settings)
        );
    }

    #[test]
    fn keygen_reads_the_node_env_and_children_never_block_owner_deletion() {
        let nn = nymnode(&[("NYM_NODE_KEY_ROTATION_INTERVAL", "30m")]);
        let sts = statefulset(&nn, &BuildSettings::default(), 2);
        let pod = sts.spec.template.spec.unwrap();
        let keygen = &pod.init_containers.unwrap()[0];
        assert_eq!(keygen.env_from, pod.containers[0].env_from);
        assert!(
            keygen
                .resources
                .as_ref()
                .is_some_and(|r| r.requests.is_some())
        );
        assert!(pod.containers[0].startup_probe.is_some());
        let owners = sts.metadata.owner_references.unwrap();
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, None);
        let pdb = pod_disruption_budget(&nn).spec.unwrap();
        assert_eq!(
            pdb.unhealthy_pod_eviction_policy.as_deref(),
            Some("AlwaysAllow")
        );
    }
}
