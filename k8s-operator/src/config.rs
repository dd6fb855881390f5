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
    /// The directory key the topology is signed with: base58 or a PKCS#8 PEM ed25519 key
    /// (the Helm chart generates one into a Secret and keeps it across upgrades).
    pub directory_key: String,
    /// Cluster DNS domain of the pods' stable names.
    pub cluster_domain: String,
    /// How long a replaced pod may take to become ready and serving before the rollout stops.
    pub pod_ready_timeout: String,
    /// Deadline for fetching one pod's description.
    pub description_timeout: String,
    /// Leader election: take part (two replicas run; one leads).
    pub leader_election: bool,
    /// Namespace of the leader Lease (defaults to the operator's own, from the service account).
    pub lease_namespace: String,
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
            directory_key: "/etc/nym-operator/directory/directory.key".into(),
            cluster_domain: "cluster.local".into(),
            pod_ready_timeout: "10m".into(),
            description_timeout: "3s".into(),
            leader_election: true,
            lease_namespace: String::new(),
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
    pub settings: Settings,
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
    /// Loads the directory key the topology is signed with.
    pub fn load_directory_key(&mut self) -> Result<(), ConfigError> {
        let path = &self.raw.directory_key;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{ENV_PREFIX}DIRECTORY_KEY: {path}: {e}")))?;
        let key = nym_node::keys::Identity::from_key_text(&text).ok_or_else(|| {
            ConfigError(format!(
                "{ENV_PREFIX}DIRECTORY_KEY: {path}: not an ed25519 private key (PKCS#8 PEM or base58)"
            ))
        })?;
        self.settings.sign_with(key);
        Ok(())
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
        if !matches!(raw.log_format.as_str(), "json" | "text") {
            return Err(ConfigError(format!(
                "{ENV_PREFIX}LOG_FORMAT: expected json or text (got '{}')",
                raw.log_format
            )));
        }
        let settings = Settings {
            build: BuildSettings {
                topology_configmap: raw.topology_configmap.clone(),
                cluster_domain: raw.cluster_domain.clone(),
                ..BuildSettings::default()
            },
            pod_ready_timeout: duration("POD_READY_TIMEOUT", &raw.pod_ready_timeout)?,
            ..Settings::default()
        };
        Ok(Parsed {
            http_bind,
            settings,
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
        assert_eq!(p.settings.pod_ready_timeout, Duration::from_secs(600));
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
