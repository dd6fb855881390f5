//! The `NymNode` custom resource: what an operator declares (spec) and what the operator
//! reports back (status). `crdgen` prints the CustomResourceDefinition generated from these
//! types; the Helm chart ships that output byte for byte.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::crd::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every resource this operator defines.
pub const GROUP: &str = "mixnet.nym-node.dev";

/// Variables the operator sets itself; `spec.env` may not override them, because the pod's
/// identity, its topology and its storage layout are the operator's to decide, and the
/// upgrade depends on how the nodes read the topology (who signs it, how often it is read).
pub const RESERVED_ENV: &[&str] = &[
    "NYM_NODE_ID",
    "NYM_NODE_MODE",
    "NYM_NODE_TOPOLOGY",
    "NYM_NODE_TOPOLOGY_SIGNER",
    "NYM_NODE_TOPOLOGY_REFRESH",
    "NYM_NODE_KEYS_DIR",
    "NYM_NODE_DATA_DIR",
    "NYM_NODE_MIXNET_BIND",
    "NYM_NODE_HTTP_BIND",
    "NYM_NODE_CLIENT_BIND",
];

/// Most entries `spec.env` may hold (the node has fewer knobs); bounds the cost the API
/// server estimates for the CRD's CEL rules over the map.
pub const MAX_ENV_ENTRIES: usize = 96;
/// Longest value of one `spec.env` entry.
pub const MAX_ENV_VALUE: usize = 4096;

/// One group of identical nym-nodes: a mix layer's nodes, or a set of gateways.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mixnet.nym-node.dev",
    version = "v1alpha1",
    kind = "NymNode",
    plural = "nymnodes",
    shortname = "nn",
    namespaced,
    status = "NymNodeStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Layer","type":"integer","jsonPath":".spec.layer"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NymNodeSpec {
    /// Duties of these nodes: `mixnode`, `entry-gateway` or `exit-gateway`.
    pub mode: NodeMode,
    /// Mix layer (1-3); required for mix nodes, forbidden for gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3))]
    pub layer: Option<u8>,
    /// Number of nodes (pods); each has its own keys and its own place in the topology.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Container image of nym-node. A change is rolled out one pod of the network at a time.
    pub image: String,
    /// Overrides of the node's `NYM_NODE_*` settings (see the node's configuration table);
    /// values are checked with the node's own parser before anything is applied. A change is
    /// rolled out like an image change, one pod of the network at a time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "env_schema")]
    pub env: BTreeMap<String, String>,
    /// CPU and memory requests and limits of the node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// How the nodes are reached from outside the cluster.
    #[serde(default)]
    pub exposure: Exposure,
    /// Persistent volume for keys and the gateway mailbox, one per pod. Fixed at creation:
    /// a StatefulSet's volume claims cannot change.
    #[serde(default)]
    pub storage: Storage,
}

fn one() -> i32 {
    1
}

/// `spec.env`: a bounded map of bounded strings (the CEL rules iterate over it).
fn env_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let _ = generator;
    schemars::json_schema!({
        "type": "object",
        "description": "Overrides of the node's `NYM_NODE_*` settings (see the node's configuration table); values are checked with the node's own parser before anything is applied. A change is rolled out like an image change, one pod of the network at a time.",
        "maxProperties": MAX_ENV_ENTRIES,
        "additionalProperties": { "type": "string", "maxLength": MAX_ENV_VALUE },
    })
}

/// The node's duties, as `NYM_NODE_MODE` names them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NodeMode {
    Mixnode,
    EntryGateway,
    ExitGateway,
}

impl NodeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeMode::Mixnode => "mixnode",
            NodeMode::EntryGateway => "entry-gateway",
            NodeMode::ExitGateway => "exit-gateway",
        }
    }

    pub fn is_gateway(self) -> bool {
        self != NodeMode::Mixnode
    }

    /// The node crate's own mode type (topology and descriptions use it).
    pub fn node_mode(self) -> nym_node::config::Mode {
        match self {
            NodeMode::Mixnode => nym_node::config::Mode::Mixnode,
            NodeMode::EntryGateway => nym_node::config::Mode::EntryGateway,
            NodeMode::ExitGateway => nym_node::config::Mode::ExitGateway,
        }
    }
}

/// Service type of the per-replica Services.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    /// Only the headless Service (in-cluster names); no per-replica Services.
    #[default]
    None,
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exposure {
    /// Type of the per-replica Services (`None` creates none).
    #[serde(default, rename = "type")]
    pub service_type: ServiceType,
    /// Mixnet (Noise) port.
    #[serde(default = "mixnet_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub mixnet_port: i32,
    /// Gateways' client WebSocket port.
    #[serde(default = "client_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub client_port: i32,
    /// HTTP port (health, metrics, description); never exposed by the per-replica Services.
    #[serde(default = "http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: i32,
    /// Annotations for the per-replica Services (cloud load-balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn mixnet_port() -> i32 {
    1789
}
fn client_port() -> i32 {
    9000
}
fn http_port() -> i32 {
    8080
}

impl Default for Exposure {
    fn default() -> Self {
        Exposure {
            service_type: ServiceType::None,
            mixnet_port: mixnet_port(),
            client_port: client_port(),
            http_port: http_port(),
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Size of each pod's volume, a Kubernetes quantity such as `10Gi`.
    #[serde(default = "storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// Storage class; the cluster's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn storage_size() -> String {
    "1Gi".into()
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            size: storage_size(),
            storage_class_name: None,
        }
    }
}

/// What the operator observed, written through the status subresource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NymNodeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Pods that are ready and serving in the topology.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Image the oldest pod still runs (the target once every pod is upgraded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_image: Option<String>,
    /// Image of the spec, which the rollout converges to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_image: Option<String>,
    /// Revision of the namespace's topology document when this status was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_revision: Option<u64>,
    /// base58 ed25519 public key the topology documents are signed with (the directory key
    /// the operator keeps in its own namespace); nodes accept no document signed by another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_key: Option<String>,
    /// One entry per pod.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Pod name (also the node's name in the topology).
    pub name: String,
    /// base58 ed25519 identity key, once the pod published a verified description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_key: Option<String>,
    /// The pod's readiness probe passes.
    pub ready: bool,
    /// Listed as serving in the topology: clients route through it.
    pub serving: bool,
    /// Runs the spec's current pod template.
    pub up_to_date: bool,
}

/// The CRD with the rules that a schema alone cannot say, as CEL (checked by the API
/// server; the reconciler enforces the same rules through [`NymNodeSpec::validate`]).
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = NymNode::crd();
    for version in &mut crd.spec.versions {
        let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        root.x_kubernetes_validations = Some(vec![validation_rule(
            &format!(
                "size(self.metadata.name) <= {MAX_NAME_LENGTH} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
            ),
            NAME_RULE,
            "",
        )]);
        let Some(spec) = root.properties.as_mut().and_then(|p| p.get_mut("spec")) else {
            continue;
        };
        spec.x_kubernetes_validations = Some(spec_rules());
        if let Some(storage) = spec.properties.as_mut().and_then(|p| p.get_mut("storage")) {
            storage.x_kubernetes_validations = Some(vec![validation_rule(
                "self == oldSelf",
                STORAGE_IMMUTABLE,
                "",
            )]);
        }
    }
    crd
}

/// The longest `NymNode` name: its StatefulSet's pods carry the label
/// `controller-revision-hash: <name>-<10 characters>`, and a label value holds 63.
pub const MAX_NAME_LENGTH: usize = 52;

/// Why a `NymNode` name is refused (the CRD's rule and the reconciler say it).
pub const NAME_RULE: &str = "a NymNode name is at most 52 lower-case letters, digits and '-', starting with a letter: it names the StatefulSet, its pods and their Services (DNS labels), and the pods' revision label adds 11 characters";

/// A `NymNode` name its children can carry (the CRD's rule, for objects made before it).
pub fn validate_name(name: &str) -> Result<(), InvalidSpec> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LENGTH
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if valid {
        Ok(())
    } else {
        Err(InvalidSpec(format!("{NAME_RULE} (got \"{name}\")")))
    }
}

/// Why `spec.storage` is refused when it changes (the CRD's rule and the reconciler say it).
pub const STORAGE_IMMUTABLE: &str = "spec.storage cannot change once the NymNode exists: a StatefulSet's volume claims are fixed at creation (delete and re-create the NymNode to change them)";

type ValidationRule =
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule;

fn validation_rule(rule: &str, message: &str, field: &str) -> ValidationRule {
    ValidationRule {
        rule: rule.into(),
        message: Some(message.into()),
        field_path: (!field.is_empty()).then(|| field.into()),
        ..Default::default()
    }
}

/// The rules on `spec` as a whole.
fn spec_rules() -> Vec<ValidationRule> {
    let reserved = RESERVED_ENV
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        validation_rule(
            "self.mode != 'mixnode' || has(self.layer)",
            "a mixnode needs spec.layer (1, 2 or 3)",
            ".layer",
        ),
        validation_rule(
            "self.mode == 'mixnode' || !has(self.layer)",
            "gateways have no layer: remove spec.layer",
            ".layer",
        ),
        validation_rule(
            "!has(self.env) || self.env.all(k, k.startsWith('NYM_NODE_'))",
            "spec.env takes only NYM_NODE_* variables",
            ".env",
        ),
        validation_rule(
            &format!("!has(self.env) || self.env.all(k, !(k in [{reserved}]))"),
            "spec.env may not set variables the operator owns (NYM_NODE_ID, _MODE, _TOPOLOGY, _TOPOLOGY_SIGNER, _TOPOLOGY_REFRESH, _KEYS_DIR, _DATA_DIR and the binds)",
            ".env",
        ),
    ]
}

/// A spec the operator refuses, with the reason in words (for `Degraded` and Events).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl NymNodeSpec {
    /// The CRD's CEL rules, plus what only the node's own parser can judge: every `env`
    /// value must parse as the node would parse it.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        match (self.mode, self.layer) {
            (NodeMode::Mixnode, None) => {
                return Err(InvalidSpec("a mixnode needs spec.layer (1, 2 or 3)".into()));
            }
            (NodeMode::Mixnode, Some(l)) if !(1..=3).contains(&l) => {
                return Err(InvalidSpec(format!("spec.layer {l} is not 1, 2 or 3")));
            }
            (m, Some(_)) if m.is_gateway() => {
                return Err(InvalidSpec(
                    "gateways have no layer: remove spec.layer".into(),
                ));
            }
            _ => {}
        }
        if self.replicas < 0 {
            return Err(InvalidSpec(format!(
                "spec.replicas must not be negative (got {})",
                self.replicas
            )));
        }
        let size = crate::quantity::Quantity::parse(&self.storage.size);
        if size.is_none_or(|(size, _)| size <= crate::quantity::Quantity::ZERO) {
            return Err(InvalidSpec(format!(
                "spec.storage.size {:?} is not a size (a Kubernetes quantity such as 10Gi)",
                self.storage.size
            )));
        }
        if self.env.len() > MAX_ENV_ENTRIES {
            return Err(InvalidSpec(format!(
                "spec.env holds {} entries; at most {MAX_ENV_ENTRIES}",
                self.env.len()
            )));
        }
        if let Some((key, _)) = self.env.iter().find(|(_, v)| v.len() > MAX_ENV_VALUE) {
            return Err(InvalidSpec(format!(
                "spec.env: {key} is longer than {MAX_ENV_VALUE} characters"
            )));
        }
        for key in self.env.keys() {
            if !key.starts_with(nym_node::config::ENV_PREFIX) {
                return Err(InvalidSpec(format!(
                    "spec.env takes only NYM_NODE_* variables (got {key})"
                )));
            }
            if RESERVED_ENV.contains(&key.as_str()) {
                return Err(InvalidSpec(format!(
                    "spec.env may not set variables the operator owns: {key} is set by the operator"
                )));
            }
        }
        if let Some(unknown) = self
            .env
            .keys()
            .find(|k| !nym_node::config::knob_names().contains(*k))
        {
            return Err(InvalidSpec(format!(
                "spec.env: {unknown} is not a nym-node setting"
            )));
        }
        // The node's own parser, with a placeholder topology (the operator provides it).
        let vars = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain([("NYM_NODE_TOPOLOGY".to_string(), "/dev/null".to_string())]);
        nym_node::config::Config::from_vars(vars)
            .map(|_| ())
            .map_err(|e| InvalidSpec(format!("spec.env: {e}")))
    }

    /// The node configuration these pods run with (the spec's env over the defaults). Only
    /// meaningful for a spec that [`validate`](Self::validate)s; an invalid one reads as the
    /// defaults.
    pub fn node_config(&self) -> nym_node::config::Config {
        let vars = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain([("NYM_NODE_TOPOLOGY".to_string(), "/dev/null".to_string())]);
        nym_node::config::Config::from_vars(vars)
            .map(|(c, _)| c)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: NodeMode, layer: Option<u8>) -> NymNodeSpec {
        NymNodeSpec {
            mode,
            layer,
            replicas: 2,
            image: "nym-node:1".into(),
            env: BTreeMap::new(),
            resources: None,
            exposure: Exposure::default(),
            storage: Storage::default(),
        }
    }

    #[test]
    fn mode_and_layer_rules_match_the_crd() {
        assert!(spec(NodeMode::Mixnode, Some(1)).validate().is_ok());
        assert!(spec(NodeMode::EntryGateway, None).validate().is_ok());
        let e = spec(NodeMode::Mixnode, None).validate().unwrap_err();
        assert!(e.0.contains("needs spec.layer"), "{e}");
        let e = spec(NodeMode::ExitGateway, Some(2)).validate().unwrap_err();
        assert!(e.0.contains("no layer"), "{e}");
        let e = spec(NodeMode::Mixnode, Some(4)).validate().unwrap_err();
        assert!(e.0.contains("not 1, 2 or 3"), "{e}");
        // The same rules are in the generated CRD, for the API server.
        let crd = serde_json::to_string(&crd()).unwrap();
        assert!(crd.contains("has(self.layer)"));
        assert!(crd.contains("x-kubernetes-validations"));
        assert!(crd.contains("size(self.metadata.name) <= 52"));
    }

    #[test]
    fn storage_sizes_are_quantities_above_zero() {
        for (size, ok) in [
            ("10Gi", true),
            ("1.5Ti", true),
            ("0", false),
            ("lots", false),
        ] {
            let mut s = spec(NodeMode::Mixnode, Some(1));
            s.storage.size = size.into();
            assert_eq!(s.validate().is_ok(), ok, "{size}");
        }
        let crd = serde_json::to_string(&crd()).unwrap();
        assert!(crd.contains("(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)"));
    }

    #[test]
    fn names_are_ones_every_child_object_can_carry() {
        for good in ["mix-l1", "a", &"m".repeat(MAX_NAME_LENGTH)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "mix.l1",
            "1mix",
            "Mix",
            "mix-",
            "",
            &"m".repeat(MAX_NAME_LENGTH + 1),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.0.contains("at most 52"), "{e}");
        }
    }

    #[test]
    fn env_is_checked_with_the_node_parser() {
        let mut s = spec(NodeMode::Mixnode, Some(1));
        s.env
            .insert("NYM_NODE_MAX_PACKET_DELAY".into(), "2s".into());
        assert!(s.validate().is_ok());
        assert_eq!(
            s.node_config().max_packet_delay.get(),
            std::time::Duration::from_secs(2)
        );
        s.env
            .insert("NYM_NODE_MAX_PACKET_DELAY".into(), "soon".into());
        let e = s.validate().unwrap_err();
        assert!(
            e.0.contains("NYM_NODE_MAX_PACKET_DELAY: expected a duration"),
            "{e}"
        );
        let mut s = spec(NodeMode::Mixnode, Some(1));
        s.env.insert("NYM_NODE_TOPOLOGY".into(), "/x".into());
        let e = s.validate().unwrap_err();
        assert!(
            e.0.contains("NYM_NODE_TOPOLOGY is set by the operator"),
            "{e}"
        );
        // The upgrade depends on who signs the topology and how often nodes read it.
        for var in ["NYM_NODE_TOPOLOGY_SIGNER", "NYM_NODE_TOPOLOGY_REFRESH"] {
            let mut s = spec(NodeMode::Mixnode, Some(1));
            s.env.insert(var.into(), "1s".into());
            let e = s.validate().unwrap_err();
            assert!(
                e.0.contains(&format!("{var} is set by the operator")),
                "{e}"
            );
        }
        let mut s = spec(NodeMode::Mixnode, Some(1));
        s.env.insert("NYM_NODE_NO_SUCH_KNOB".into(), "1".into());
        assert!(
            s.validate()
                .unwrap_err()
                .0
                .contains("not a nym-node setting")
        );
    }
}
