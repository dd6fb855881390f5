//! nym-operator: reconciles `NymNode` resources into StatefulSets, keeps the namespace's
//! topology document true, and upgrades, scales and removes nodes one withdrawal at a time
//! without losing a packet. Laid out after kube-rs's controller-rs: the CRD types, pure
//! resource builders, pure planners (rollout, retirement), and a reconciler that only
//! orchestrates them; `fixtures` is the strict in-memory API server the tests and the
//! simulation run it against.

pub mod config;
pub mod controller;
pub mod crd;
pub mod describe;
pub mod directory;
pub mod generated_secret;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod network;
pub mod quantity;
pub mod resources;
pub mod retirement;
pub mod rollout;
pub mod snapshot;
pub mod status;
pub mod topology;
pub mod withdrawal;

#[cfg(any(test, feature = "test-support"))]
pub mod fixtures;
