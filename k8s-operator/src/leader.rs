//! Leader election on a `coordination.k8s.io` Lease (`kube-lease-manager`). Each replica
//! takes part under its own identity (the pod name) and its own field manager: the Lease's
//! holder is claimed with a server-side apply that is not forced, so when two replicas race
//! for a free Lease the API server gives it to one and answers the other 409. With one
//! shared field manager both applies would succeed and both replicas would lead.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};

use crate::controller::FIELD_MANAGER;

/// This replica's identity: `POD_NAME` (the chart sets it from the pod's name), else
/// `HOSTNAME` (a container's host name is its pod's name), else a random one, so two
/// replicas never share an identity (a process id would: it is 1 in every container).
pub fn identity() -> String {
    identity_from(|var| std::env::var(var).ok())
}

/// [`identity`] from any source of variables.
pub fn identity_from(var: impl Fn(&str) -> Option<String>) -> String {
    let from_env = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    from_env("POD_NAME")
        .or_else(|| from_env("HOSTNAME"))
        .unwrap_or_else(|| {
            let bytes = nym_node::keys::random_bytes().unwrap_or([0; 32]);
            let suffix: String = bytes[..6].iter().map(|b| format!("{b:02x}")).collect();
            format!("nym-operator-{suffix}")
        })
}

/// The field manager of this replica's Lease writes.
pub fn field_manager(identity: &str) -> String {
    format!("{FIELD_MANAGER}-lease-{identity}")
}

/// A lease manager for `identity` on the Lease `name` in `namespace`, held `duration_secs`.
pub async fn lease_manager(
    client: Client,
    namespace: &str,
    name: &str,
    identity: &str,
    duration_secs: u64,
) -> Result<LeaseManager, kube_lease_manager::LeaseManagerError> {
    let duration = duration_secs.max(3);
    LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .with_field_manager(field_manager(identity))
        .build()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_replica_has_its_own_identity_and_field_manager() {
        let pod =
            |name: &'static str| move |var: &str| (var == "POD_NAME").then(|| name.to_string());
        assert_eq!(
            identity_from(pod("nym-operator-7d9-abc")),
            "nym-operator-7d9-abc"
        );
        let host = |var: &str| (var == "HOSTNAME").then(|| "nym-operator-7d9-xyz".to_string());
        assert_eq!(identity_from(host), "nym-operator-7d9-xyz");
        // Outside a pod: random, never a shared value such as a process id.
        let a = identity_from(|_| None);
        let b = identity_from(|_| None);
        assert!(a.starts_with("nym-operator-") && a != b);
        assert_ne!(field_manager(&a), field_manager(&b));
    }
}
