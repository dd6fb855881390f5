//! The operator's own settings: `NYM_OPERATOR_*` environment variables, parsed once with
//! the same conventions as the node's (durations like `5s`, a bad value names the variable).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::controller::Settings;
use crate::resources::BuildSettings;

pub const ENV_PREFIX: &str = "NYM_OPERATOR_";

/// Every knob, with its default; documented in README's operator section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperatorConfig {
    /// Address of /metrics, /livez and /readyz.
    pub http_bind: String,
    /// Namespace to watch; empty watches every namespace the RBAC allows.
    pub namespace: String,
    /// Name of each namespace's topology ConfigMap.
    pub topology_configmap: String,
    /// Name of the Secret holding the directory key the topology is signed with, in the
    /// operator's namespace; the operator creates it on first start if absent and publishes
    /// the public key in a ConfigMap of the same name.
    pub directory_name: String,
    /// Name of the Secret (key `token`) holding the bearer token every node serves
    /// `/metrics` to, in each `NymNode`'s namespace: the operator creates it with a random
    /// token where it is absent (and never reads it); give your Prometheus the same Secret.
    pub metrics_token_secret: String,
    /// A file holding the directory key (base58 or PKCS#8 PEM ed25519) instead of the
    /// Secret, for runs outside a cluster; empty uses the Secret.
    pub directory_key: String,
    /// Cluster DNS domain of the pods' stable names.
    pub cluster_domain: String,
    /// How long a replaced pod may take to become ready and serving before the rollout stops
    /// (and how long upgrades wait for unhealthy pods before the waiting NymNodes turn
    /// Degraded).
    pub pod_ready_timeout: String,
    /// How long every running node may take to load the revision that withdraws a pod; an
    /// upgrade then gives the pod back and halts, a scale-down or deletion turns Degraded.
    pub withdrawal_timeout: String,
    /// Deadline for fetching one pod's description.
    pub description_timeout: String,
    /// Leader election: take part (two replicas run; one leads).
    pub leader_election: bool,
    /// The operator's own namespace, where its Lease, directory key Secret and public key
    /// ConfigMap live (defaults to the service account's namespace).
    pub operator_namespace: String,
    pub lease_name: String,
    /// Lease duration; a new leader takes over at most this long after the old one died.
    pub lease_duration: String,
    /// Log format: `json` or `text`.
    pub log_format: String,
    pub log_level: String,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            http_bind: "0.0.0.0:8080".into(),
            namespace: String::new(),
            topology_configmap: "nym-topology".into(),
            directory_name: "nym-operator-directory".into(),
            metrics_token_secret: "nym-node-metrics-token".into(),
            directory_key: String::new(),
            cluster_domain: "cluster.local".into(),
            pod_ready_timeout: "10m".into(),
            withdrawal_timeout: "5m".into(),
            description_timeout: "3s".into(),
            leader_election: true,
            operator_namespace: String::new(),
            lease_name: "nym-operator".into(),
            lease_duration: "15s".into(),
            log_format: "json".into(),
            log_level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Parsed and checked.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub raw: OperatorConfig,
    pub http_bind: SocketAddr,
    pub build: BuildSettings,
    pub pod_ready_timeout: Duration,
    pub withdrawal_timeout: Duration,
    pub description_timeout: Duration,
    pub lease_duration: Duration,
}

fn duration(var: &str, raw: &str) -> Result<Duration, ConfigError> {
    use nym_node::config::{DurationKnob, KnobValue};
    DurationKnob::parse_knob(raw)
        .map(DurationKnob::get)
        .map_err(|_| {
            ConfigError(format!(
                "{ENV_PREFIX}{var}: expected {} (got '{raw}')",
                DurationKnob::EXPECTED
            ))
        })
}

impl Parsed {
    /// The reconciler's settings, signing with `directory`.
    pub fn settings(&self, directory: nym_node::keys::Identity) -> Settings {
        Settings {
            pod_ready_timeout: self.pod_ready_timeout,
            withdrawal_timeout: self.withdrawal_timeout,
            ..Settings::with_directory(directory, self.build.clone())
        }
    }

    /// The directory key from `NYM_OPERATOR_DIRECTORY_KEY`'s file, when one is named.
    pub fn directory_key_file(&self) -> Result<Option<nym_node::keys::Identity>, ConfigError> {
        let path = &self.raw.directory_key;
        if path.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{ENV_PREFIX}DIRECTORY_KEY: {path}: {e}")))?;
        nym_node::keys::Identity::from_key_text(&text)
            .map(Some)
            .ok_or_else(|| {
                ConfigError(format!(
                    "{ENV_PREFIX}DIRECTORY_KEY: {path}: not an ed25519 private key (PKCS#8 PEM or base58)"
                ))
            })
    }

    /// The operator's namespace: the setting, else the service account's.
    pub fn operator_namespace(&self) -> String {
        if !self.raw.operator_namespace.is_empty() {
            return self.raw.operator_namespace.clone();
        }
        std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            .map(|ns| ns.trim().to_string())
            .unwrap_or_else(|_| "default".into())
    }
}

impl OperatorConfig {
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Parsed, ConfigError> {
        let raw: OperatorConfig = envy::prefixed(ENV_PREFIX)
            .from_iter(vars.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)))
            .map_err(|e| ConfigError(format!("{e}")))?;
        let http_bind = raw.http_bind.parse().map_err(|_| {
            ConfigError(format!(
                "{ENV_PREFIX}HTTP_BIND: expected ip:port (got '{}')",
                raw.http_bind
            ))
        })?;
        if raw.directory_name.is_empty() || raw.directory_name.len() > 253 {
            return Err(ConfigError(format!(
                "{ENV_PREFIX}DIRECTORY_NAME: expected a Secret name (got '{}')",
                raw.directory_name
            )));
        }
        if raw.metrics_token_secret.is_empty() || raw.metrics_token_secret.len() > 253 {
            return Err(ConfigError(format!(
                "{ENV_PREFIX}METRICS_TOKEN_SECRET: expected a Secret name (got '{}')",
                raw.metrics_token_secret
            )));
        }
        if !matches!(raw.log_format.as_str(), "json" | "text") {
            return Err(ConfigError(format!(
                "{ENV_PREFIX}LOG_FORMAT: expected json or text (got '{}')",
                raw.log_format
            )));
        }
        Ok(Parsed {
            http_bind,
            build: BuildSettings {
                topology_configmap: raw.topology_configmap.clone(),
                cluster_domain: raw.cluster_domain.clone(),
                metrics_token_secret: raw.metrics_token_secret.clone(),
                ..BuildSettings::default()
            },
            pod_ready_timeout: duration("POD_READY_TIMEOUT", &raw.pod_ready_timeout)?,
            withdrawal_timeout: duration("WITHDRAWAL_TIMEOUT", &raw.withdrawal_timeout)?,
            description_timeout: duration("DESCRIPTION_TIMEOUT", &raw.description_timeout)?,
            lease_duration: duration("LEASE_DURATION", &raw.lease_duration)?,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_run_and_bad_values_name_the_variable() {
        let p = OperatorConfig::from_vars(vars(&[])).unwrap();
        assert_eq!(p.pod_ready_timeout, Duration::from_secs(600));
        assert_eq!(p.withdrawal_timeout, Duration::from_secs(300));
        assert_eq!(p.raw.directory_name, "nym-operator-directory");
        let key = nym_node::keys::Identity::generate().unwrap();
        assert_eq!(
            p.settings(key.clone()).build.topology_signer,
            Some(key.public())
        );
        assert!(p.raw.leader_election);
        let e = OperatorConfig::from_vars(vars(&[("NYM_OPERATOR_POD_READY_TIMEOUT", "soon")]))
            .unwrap_err();
        assert!(
            e.0.starts_with("NYM_OPERATOR_POD_READY_TIMEOUT: expected a duration"),
            "{e}"
        );
        let e = OperatorConfig::from_vars(vars(&[("NYM_OPERATOR_LEADER_ELECTION", "maybe")]))
            .unwrap_err();
        assert!(e.0.contains("maybe"), "{e}");
        let e = OperatorConfig::from_vars(vars(&[("NYM_OPERATOR_HTTP_BIND", "8080")])).unwrap_err();
        assert!(e.0.contains("NYM_OPERATOR_HTTP_BIND"), "{e}");
    }
}
